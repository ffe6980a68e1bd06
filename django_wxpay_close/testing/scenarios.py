"""What the simulated WeChat knows and how it can misbehave: the demo merchant, an order's states and what each
API answers for them, and the faults a test injects. Pure data and rules: no I/O, no lock."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Literal, NamedTuple

from ..wechat import CLOSEORDER_PATH, ORDERQUERY_PATH

__all__ = [
    "API_KEY", "APPID", "MCH_ID", "SUB_MCH_ID", "Api", "ERR_CODE_DESCRIPTIONS", "Fault", "FaultRule", "OrderKey",
    "OrderState", "Payment", "UnknownOrders",
]

# The demo merchant: the seed page's sample appid/mch_id and the key tests/settings.py uses.
APPID = "wx2421b1c4370ec43b"
MCH_ID = "10000100"
SUB_MCH_ID = "20000200"
API_KEY = "TESTKEY0TESTKEY1TESTKEY2TESTKEY3"

UnknownOrders = Literal["not_exist", "open"]
Api = Literal["closeorder", "orderquery"]
API_PATHS: Mapping[str, Api] = {CLOSEORDER_PATH: "closeorder", ORDERQUERY_PATH: "orderquery"}
# Fields every valid request carries; an orderquery names the order by out_trade_no or transaction_id.
REQUIRED_FIELDS: Mapping[Api, tuple[str, ...]] = {
    "closeorder": ("appid", "mch_id", "sub_mch_id", "out_trade_no", "nonce_str", "sign"),
    "orderquery": ("appid", "mch_id", "sub_mch_id", "nonce_str", "sign"),
}

# The descriptions the seed page gives for each documented err_code.
ERR_CODE_DESCRIPTIONS: Mapping[str, str] = {
    "ORDERPAID": "Order is paid.",
    "ORDERCLOSED": "Order is closed.",
    "ORDERNOTEXIST": "Order does not exist.",
    "SYSTEMERROR": "System error",
    "SIGNERROR": "Signature error",
    "REQUIRE_POST_METHOD": "Use post method",
    "XML_FORMAT_ERROR": "INVALID XML FORMAT",
}


class OrderState(str, Enum):
    """An order at the simulated WeChat. orderquery answers it as its trade_state (PAID as SUCCESS)."""

    NOTPAY = "NOTPAY"
    PAID = "PAID"
    CLOSED = "CLOSED"
    USERPAYING = "USERPAYING"  # the payer is paying right now
    REFUND = "REFUND"  # paid, and a refund was started
    REVOKED = "REVOKED"  # cancelled; like CLOSED it can never be paid
    PAYERROR = "PAYERROR"  # the payment failed; still payable

    @property
    def trade_state(self) -> str:
        return "SUCCESS" if self is OrderState.PAID else self.value

    @property
    def is_paid(self) -> bool:
        return self in (OrderState.PAID, OrderState.REFUND)

    @property
    def close_err_code(self) -> str | None:
        """What closeorder answers for an order in this state; None: the order closes now.

        WeChat does not document closing a payment in progress; the simulator refuses it as a SYSTEMERROR, which
        a client retries, so it never closes an order that is being paid.
        """
        return _CLOSE_ERR_CODES.get(self)


_CLOSE_ERR_CODES: Mapping[OrderState, str] = {
    OrderState.PAID: "ORDERPAID",
    OrderState.REFUND: "ORDERPAID",
    OrderState.CLOSED: "ORDERCLOSED",
    OrderState.REVOKED: "ORDERCLOSED",
    OrderState.USERPAYING: "SYSTEMERROR",
}


class OrderKey(NamedTuple):
    """An order is unique per merchant and sub-merchant, as WeChat scopes out_trade_no."""

    mch_id: str
    sub_mch_id: str
    out_trade_no: str


@dataclass(frozen=True)
class Payment:
    """What the payer paid for an order: what orderquery reports for a paid or refunded one."""

    total_fee: int
    fee_type: str
    transaction_id: str
    time_end: str  # yyyyMMddHHmmss in Beijing time (GMT+8), as WeChat writes it


class Fault(str, Enum):
    """Ways to misbehave instead of answering normally. None of them changes an order, except DELAY with apply."""

    # Answer after `delay` seconds. apply=True (default): the request is processed when it arrives (a close is
    # applied) and the normal answer is sent late, so a client that gave up meanwhile never learns the order was
    # closed. apply=False: nothing is processed and, after the delay, the connection is closed without an answer.
    DELAY = "DELAY"
    # A signed result_code FAIL answer with this err_code (the documented codes, by name) ...
    ORDERPAID = "ORDERPAID"
    ORDERCLOSED = "ORDERCLOSED"
    ORDERNOTEXIST = "ORDERNOTEXIST"
    SYSTEMERROR = "SYSTEMERROR"
    SIGNERROR = "SIGNERROR"
    REQUIRE_POST_METHOD = "REQUIRE_POST_METHOD"
    XML_FORMAT_ERROR = "XML_FORMAT_ERROR"
    # ... or with the undocumented err_code passed as inject(err_code=...).
    ERR_CODE = "ERR_CODE"
    RETURN_FAIL = "RETURN_FAIL"  # unsigned return_code FAIL
    DROP_CONNECTION = "DROP_CONNECTION"  # close the connection without sending anything
    RESET_CONNECTION = "RESET_CONNECTION"  # headers and half the body, then a TCP reset
    HTTP_502 = "HTTP_502"  # a gateway's HTML error page
    HTTP_503 = "HTTP_503"
    BAD_SIGNATURE = "BAD_SIGNATURE"  # the would-be answer with a sign that does not verify
    UNSIGNED = "UNSIGNED"  # the would-be answer without its sign
    MALFORMED_BODY = "MALFORMED_BODY"  # the would-be answer cut in half: HTTP 200, unparseable XML
    # Answer as if the order were in this state, the table unchanged: orderquery gets this trade_state, closeorder
    # what closing such an order answers.
    USERPAYING = "USERPAYING"
    REFUND = "REFUND"
    REVOKED = "REVOKED"

    @property
    def err_code(self) -> str | None:
        """The err_code this fault answers with, for the members named after one."""
        return self.value if self.value in ERR_CODE_DESCRIPTIONS else None

    @property
    def order_state(self) -> OrderState | None:
        """The state this fault pretends the order is in, for the members named after one."""
        return OrderState(self.value) if self.value in _PRETENDED_STATES else None


_PRETENDED_STATES = frozenset({"USERPAYING", "REFUND", "REVOKED"})


@dataclass
class FaultRule:
    """One injected fault; the simulator's lock guards `remaining` and `hits`."""

    fault: Fault
    out_trade_no: str | None  # None: any order
    remaining: int | None  # matching requests still to fault; None: always
    delay: float
    apply: bool
    err_code: str | None
    api: Api = "closeorder"  # the API whose answers it replaces
    hits: int = 0

    def matches(self, out_trade_no: str, api: Api = "closeorder") -> bool:
        return self.api == api and (self.out_trade_no is None or self.out_trade_no == out_trade_no)
