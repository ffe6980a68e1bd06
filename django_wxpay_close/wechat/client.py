"""The WeChat Pay client: closeorder and orderquery, each one signed POST and one immutable result, never an
exception for anything WeChat or the network can do (only for our own bad input, before anything is sent).

Both APIs share everything but their fields and what their answer means: the signing, the transport (size cap,
deadline, failover) and the checks an answer passes before it is believed (docs/protocol.md).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

import requests

from .merchant import (
    API_KEY_LENGTH,
    OUT_TRADE_NO_PATTERN,
    InvalidRequestField,
    Merchant,
    check_id,
    validate_out_trade_no,
)
from .outcomes import AnswerFields, Outcome, answer_failure
from .query import ORDERQUERY_PATH, PreparedQuery, QueryResult, classify_query, failed_query
from .signing import SignType, compute_signature, new_nonce, verify_signature
from .transport import Answer, Transport
from .xmlcodec import DEFAULT_MAX_BODY_BYTES, InvalidXMLBody, decode_xml, encode_xml

__all__ = [
    "API_KEY_LENGTH",
    "CLOSEORDER_PATH",
    "OUT_TRADE_NO_PATTERN",
    "InvalidRequestField",
    "Merchant",
    "PreparedClose",
    "CloseResult",
    "CloseOrderClient",
    "validate_out_trade_no",
]

CLOSEORDER_PATH = "/pay/closeorder"
# The request fields a signed answer must echo unchanged, when it carries them: an answer about another merchant,
# sub-merchant or order must not settle this one.
_ECHOED = frozenset({"appid", "mch_id", "sub_mch_id", "sub_appid", "out_trade_no", "transaction_id"})


@dataclass(frozen=True)
class PreparedClose:
    """A signed closeorder request, built before sending so the exact bytes can be audited first."""

    out_trade_no: str
    sign_type: SignType
    fields: Mapping[str, str]
    body: bytes
    api: str = "closeorder"


@dataclass(frozen=True)
class CloseResult(AnswerFields):
    """Everything one closeorder exchange produced; `outcome` is what it means (docs/protocol.md#outcomes)."""

    out_trade_no: str
    outcome: Outcome
    reason: str  # one line for people: "" on success, else why
    url: str  # the URL that answered, or the last one tried
    sign_type: SignType
    request_body: bytes
    http_status: int | None
    response_body: bytes  # raw, at most the configured cap
    response_fields: Mapping[str, str]
    signature_verified: bool | None  # None: the answer carried nothing to verify
    elapsed: float  # seconds, all URLs tried included
    failed_over_from: str | None = None  # the primary URL that refused the connection, if any
    api: str = "closeorder"


@dataclass(frozen=True)
class _Exchange:
    """One request and what came back, checked as far as any API's answer is (docs/protocol.md#verifying-a-response).

    `failure` is None for a verified, self-consistent result_code SUCCESS that is about this request.
    """

    url: str
    failed_over_from: str | None
    failure: tuple[Outcome, str] | None
    http_status: int | None = None
    response_body: bytes = b""
    fields: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    verified: bool | None = None


class CloseOrderClient:
    """Sends closeorder and orderquery for one merchant over a reused `requests.Session`.

    `base_urls` is the primary region first; a later one is used only when an earlier one could not even be
    connected to (a WeChat answer is never retried elsewhere). `pool_size` is how many connections are kept
    alive per base URL: the number of threads that share this client.
    """

    def __init__(
        self,
        merchant: Merchant,
        *,
        base_urls: Sequence[str],
        connect_timeout: float = 3.05,
        read_timeout: float = 10.0,
        max_response_bytes: int = DEFAULT_MAX_BODY_BYTES,
        pool_size: int = 10,
        user_agent: str | None = None,
    ) -> None:
        self.merchant = merchant
        self.transport = Transport(
            base_urls, connect_timeout=connect_timeout, read_timeout=read_timeout,
            max_response_bytes=max_response_bytes, pool_size=pool_size,
            user_agent=user_agent or _default_user_agent(),
        )
        self.urls = tuple(base + CLOSEORDER_PATH for base in self.transport.base_urls)
        self.query_urls = tuple(base + ORDERQUERY_PATH for base in self.transport.base_urls)
        self.max_response_bytes = max_response_bytes

    def close(self) -> None:
        """Close the kept-alive connections; the client stays usable and connects again when next called."""
        self.transport.close()

    def __enter__(self) -> CloseOrderClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<CloseOrderClient mch_id={self.merchant.mch_id} urls={self.urls!r}>"

    # -- closeorder ----------------------------------------------------------------------------------

    def prepare(
        self, out_trade_no: str, *, sub_mch_id: str | None = None, sub_appid: str | None = None
    ) -> PreparedClose:
        """Validate and sign. `sub_mch_id`/`sub_appid` override the merchant's (institutional mode)."""
        validate_out_trade_no(out_trade_no)
        fields, body = self._signed({"out_trade_no": out_trade_no}, sub_mch_id, sub_appid)
        return PreparedClose(out_trade_no=out_trade_no, sign_type=self.merchant.sign_type, fields=fields, body=body)

    def close_order(self, out_trade_no: str, **overrides: str | None) -> CloseResult:
        return self.send(self.prepare(out_trade_no, **overrides))

    def send(self, prepared: PreparedClose) -> CloseResult:
        """Post the request and interpret the answer (docs/protocol.md#outcomes)."""
        started = time.perf_counter()
        exchange = self._exchange(CLOSEORDER_PATH, prepared.fields, prepared.body, prepared.sign_type)
        outcome, reason = exchange.failure or (Outcome.CLOSED, "")
        return CloseResult(
            out_trade_no=prepared.out_trade_no, outcome=outcome, reason=reason, url=exchange.url,
            sign_type=prepared.sign_type, request_body=prepared.body, http_status=exchange.http_status,
            response_body=exchange.response_body, response_fields=exchange.fields,
            signature_verified=exchange.verified, elapsed=time.perf_counter() - started,
            failed_over_from=exchange.failed_over_from,
        )

    # -- orderquery ----------------------------------------------------------------------------------

    def prepare_query(
        self,
        out_trade_no: str | None = None,
        *,
        transaction_id: str | None = None,
        sub_mch_id: str | None = None,
        sub_appid: str | None = None,
    ) -> PreparedQuery:
        """Validate and sign a query for one order, named by `out_trade_no` or by WeChat's `transaction_id`."""
        if (out_trade_no is None) == (transaction_id is None):
            raise InvalidRequestField("out_trade_no", "give out_trade_no or transaction_id, exactly one of them")
        if out_trade_no is not None:
            validate_out_trade_no(out_trade_no)
            named = {"out_trade_no": out_trade_no}
        else:
            check_id("transaction_id", transaction_id, required=True)
            named = {"transaction_id": str(transaction_id)}
        fields, body = self._signed(named, sub_mch_id, sub_appid)
        return PreparedQuery(out_trade_no=out_trade_no, transaction_id=transaction_id,
                             sign_type=self.merchant.sign_type, fields=fields, body=body)

    def query_order(
        self, out_trade_no: str | None = None, *, transaction_id: str | None = None, **overrides: str | None
    ) -> QueryResult:
        return self.query(self.prepare_query(out_trade_no, transaction_id=transaction_id, **overrides))

    def query(self, prepared: PreparedQuery) -> QueryResult:
        """Post the query and interpret the answer (docs/protocol.md#orderquery)."""
        started = time.perf_counter()
        exchange = self._exchange(ORDERQUERY_PATH, prepared.fields, prepared.body, prepared.sign_type)
        if exchange.failure is None:
            verdict, trade_state, failure, reason = classify_query(exchange.fields, signature_verified=True)
        else:
            verdict, trade_state, failure, reason = failed_query(*exchange.failure)
        answered_about = exchange.fields.get("out_trade_no", "") if failure is None else ""
        return QueryResult(
            out_trade_no=prepared.out_trade_no or answered_about,
            verdict=verdict, trade_state=trade_state, failure=failure, reason=reason, url=exchange.url,
            sign_type=prepared.sign_type, request_body=prepared.body, http_status=exchange.http_status,
            response_body=exchange.response_body, response_fields=exchange.fields,
            signature_verified=exchange.verified, elapsed=time.perf_counter() - started,
            failed_over_from=exchange.failed_over_from,
        )

    # -- shared by both APIs -------------------------------------------------------------------------

    def _signed(
        self, named: Mapping[str, str], sub_mch_id: str | None, sub_appid: str | None
    ) -> tuple[Mapping[str, str], bytes]:
        """The merchant's IDs, the order's name, a fresh nonce and the sign; the fields and their XML body."""
        sub_mch_id = sub_mch_id or self.merchant.sub_mch_id
        sub_appid = self.merchant.sub_appid if sub_appid is None else sub_appid
        check_id("sub_mch_id", sub_mch_id, required=True)
        check_id("sub_appid", sub_appid, required=False)
        sign_type = self.merchant.sign_type
        fields = {"appid": self.merchant.appid, "mch_id": self.merchant.mch_id, "sub_mch_id": sub_mch_id,
                  **named, "nonce_str": new_nonce()}
        if sub_appid:
            fields["sub_appid"] = sub_appid
        if sign_type is not SignType.MD5:
            fields["sign_type"] = sign_type.value
        fields["sign"] = compute_signature(fields, self.merchant.api_key, sign_type)
        return MappingProxyType(fields), encode_xml(fields)

    def _exchange(self, path: str, sent: Mapping[str, str], body: bytes, sign_type: SignType) -> _Exchange:
        delivery = self.transport.post(path, body)
        reply = delivery.reply
        if not isinstance(reply, Answer):
            return _Exchange(delivery.url, delivery.failed_over_from, (reply.outcome, reply.reason))

        def checked(failure: tuple[Outcome, str] | None, fields: Mapping[str, str] = {},
                    verified: bool | None = None) -> _Exchange:
            return _Exchange(delivery.url, delivery.failed_over_from, failure, reply.status, reply.body,
                             MappingProxyType(dict(fields)), verified)

        if not 200 <= reply.status < 300:
            return checked((Outcome.INVALID_RESPONSE, f"HTTP {reply.status}"))
        try:
            fields = decode_xml(reply.body, max_bytes=self.max_response_bytes)
        except InvalidXMLBody as exc:
            return checked((Outcome.INVALID_RESPONSE, f"unreadable body: {exc}"))
        verified: bool | None = None
        if fields.get("return_code") == "SUCCESS" or fields.get("sign"):
            verified = verify_signature(fields, self.merchant.api_key, sign_type)
        failure = answer_failure(fields, signature_verified=bool(verified))
        if verified:
            strangers = sorted(name for name in _ECHOED if name in sent and fields.get(name, sent[name]) != sent[name])
            if strangers:
                failure = Outcome.UNTRUSTED_RESPONSE, f"signed answer echoes another {'/'.join(strangers)}"
        return checked(failure, fields, verified)


def _default_user_agent() -> str:
    from .. import __version__

    return f"django-wxpay-close/{__version__} python-requests/{requests.__version__}"
