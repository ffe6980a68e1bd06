"""What an orderquery answer says about an order (docs/protocol.md#orderquery). No I/O here."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum

from .outcomes import AnswerFields, Outcome, answer_failure
from .signing import SignType

__all__ = [
    "ORDERQUERY_PATH", "PreparedQuery", "QueryResult", "QueryVerdict", "TradeState", "classify_query", "failed_query",
]

ORDERQUERY_PATH = "/pay/orderquery"


class TradeState(str, Enum):
    """The `trade_state` of a verified orderquery answer."""

    SUCCESS = "SUCCESS"  # paid
    REFUND = "REFUND"  # paid, and a refund was started
    NOTPAY = "NOTPAY"  # not paid, still payable
    CLOSED = "CLOSED"
    REVOKED = "REVOKED"  # cancelled (payment-code orders)
    USERPAYING = "USERPAYING"  # the payer is paying right now
    PAYERROR = "PAYERROR"  # the payment failed; the order is still payable


class QueryVerdict(str, Enum):
    """What a query means for the local order; its value is what the audit can store."""

    PAID = "paid"  # SUCCESS, REFUND: mark it paid (after checking the amount)
    CLOSED = "closed"  # CLOSED, REVOKED: it can never be paid
    PAYABLE = "payable"  # NOTPAY, PAYERROR: still payable, so close it
    PAYING = "paying"  # USERPAYING: a payment is in progress; leave it open and look again later
    NOT_FOUND = "not_found"  # ORDERNOTEXIST
    UNKNOWN = "unknown"  # SYSTEMERROR, no answer, an untrusted or unexpected answer: WeChat did not say

    @property
    def settles_order(self) -> bool:
        """WeChat said for certain whether the order is paid or can never be."""
        return self in (QueryVerdict.PAID, QueryVerdict.CLOSED)


_TRADE_STATE_VERDICTS: Mapping[TradeState, QueryVerdict] = {
    TradeState.SUCCESS: QueryVerdict.PAID,
    TradeState.REFUND: QueryVerdict.PAID,
    TradeState.CLOSED: QueryVerdict.CLOSED,
    TradeState.REVOKED: QueryVerdict.CLOSED,
    TradeState.NOTPAY: QueryVerdict.PAYABLE,
    TradeState.PAYERROR: QueryVerdict.PAYABLE,
    TradeState.USERPAYING: QueryVerdict.PAYING,
}

# err_codes of closeorder that orderquery does not answer with: from a query they mean nothing we can act on.
_NOT_QUERY_OUTCOMES = frozenset({Outcome.PAID, Outcome.ALREADY_CLOSED})


@dataclass(frozen=True)
class PreparedQuery:
    """A signed orderquery request, built before sending so the exact bytes can be audited first."""

    out_trade_no: str | None  # what was asked about: out_trade_no or transaction_id, never both
    transaction_id: str | None
    sign_type: SignType
    fields: Mapping[str, str]
    body: bytes
    api: str = "orderquery"


@dataclass(frozen=True)
class QueryResult(AnswerFields):
    """Everything one orderquery exchange produced; `verdict` is what it means for the local order.

    `failure` is None when WeChat answered with a trustworthy trade_state; otherwise it is the `Outcome` a close
    would have had (network_error, untrusted_response, not_found, ...) and `reason` says why.
    """

    out_trade_no: str  # the one asked about, or the answer's when the query named a transaction_id
    verdict: QueryVerdict
    trade_state: TradeState | None
    failure: Outcome | None
    reason: str  # one line for people: the trade_state and its description, or why there is none
    url: str
    sign_type: SignType
    request_body: bytes
    http_status: int | None
    response_body: bytes
    response_fields: Mapping[str, str]
    signature_verified: bool | None
    elapsed: float
    failed_over_from: str | None = None
    api: str = "orderquery"

    @property
    def outcome_value(self) -> str:
        """What an audit trail stores as the exchange's outcome: the failure's, else the verdict's."""
        return self.failure.value if self.failure is not None else self.verdict.value

    @property
    def transaction_id(self) -> str:
        return self.response_fields.get("transaction_id", "") if self.failure is None else ""

    @property
    def total_fee(self) -> int | None:
        """The order's amount in the currency's smallest unit, when WeChat gave one."""
        return _amount(self.response_fields.get("total_fee")) if self.failure is None else None

    @property
    def cash_fee(self) -> int | None:
        return _amount(self.response_fields.get("cash_fee")) if self.failure is None else None

    @property
    def fee_type(self) -> str:
        return self.response_fields.get("fee_type", "") if self.failure is None else ""

    @property
    def time_end(self) -> str:
        """When the payment was made, yyyyMMddHHmmss in Beijing time, as WeChat writes it."""
        return self.response_fields.get("time_end", "") if self.failure is None else ""

    @property
    def trade_state_desc(self) -> str:
        return self.response_fields.get("trade_state_desc", "")



def _amount(value: str | None) -> int | None:
    return int(value) if value is not None and value.isascii() and value.isdigit() else None


def failed_query(outcome: Outcome, reason: str) -> tuple[QueryVerdict, None, Outcome, str]:
    """(verdict, trade_state, failure, reason) for a query that brought back no trustworthy trade_state."""
    if outcome in _NOT_QUERY_OUTCOMES:
        outcome = Outcome.UNEXPECTED_ERROR
    return (QueryVerdict.NOT_FOUND if outcome is Outcome.NOT_FOUND else QueryVerdict.UNKNOWN), None, outcome, reason


def classify_query(
    fields: Mapping[str, str], *, signature_verified: bool
) -> tuple[QueryVerdict, TradeState | None, Outcome | None, str]:
    """(verdict, trade_state, failure, reason) for a parsed orderquery answer (HTTP 200, well-formed XML)."""
    failure = answer_failure(fields, signature_verified=signature_verified)
    if failure is not None:
        return failed_query(*failure)
    raw_state = fields.get("trade_state", "")
    try:
        trade_state = TradeState(raw_state)
    except ValueError:
        return QueryVerdict.UNKNOWN, None, Outcome.UNEXPECTED_ERROR, f"unknown trade_state {raw_state!r}"
    verdict = _TRADE_STATE_VERDICTS[trade_state]
    if verdict is QueryVerdict.PAID and _amount(fields.get("total_fee")) is None:
        # The amount is what proves the payment is this order's; without it nothing may be marked paid.
        return (QueryVerdict.UNKNOWN, None, Outcome.UNEXPECTED_ERROR,
                f"trade_state {raw_state} without a valid total_fee")
    description = fields.get("trade_state_desc", "")
    return verdict, trade_state, None, f"trade_state {raw_state}: {description}" if description else (
        f"trade_state {raw_state}"
    )
