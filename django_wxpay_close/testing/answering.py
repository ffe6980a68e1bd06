"""The simulator's answering side: what WeChat answers to each closeorder and orderquery request, as the order
table and the injected faults decide, and the log of every exchange."""

from __future__ import annotations

import itertools
import threading
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

from ..wechat import InvalidXMLBody, SignType, decode_xml, verify_signature
from .answers import beijing_time, cdata_xml, html_page, query_fields, signed_answer, unsigned_fail
from .httpserver import HTML_CONTENT_TYPE, Reply
from .scenarios import (
    API_PATHS,
    ERR_CODE_DESCRIPTIONS,
    REQUIRED_FIELDS,
    Api,
    Fault,
    FaultRule,
    OrderKey,
    OrderState,
    Payment,
    UnknownOrders,
)

__all__ = ["DEFAULT_FEE_TYPE", "DEFAULT_TOTAL_FEE", "AnsweringSide", "RecordedRequest"]

# The amount of an order created without one: what a query reports once it is paid.
DEFAULT_TOTAL_FEE = 1
DEFAULT_FEE_TYPE = "CNY"


@dataclass(frozen=True, slots=True)
class RecordedRequest:
    """What the simulator received and how it answered: the server side of every exchange."""

    received_at: float  # time.time()
    method: str
    path: str
    mch_id: str  # "" when absent or the body was unreadable
    sub_mch_id: str
    out_trade_no: str  # of a query by transaction_id: the order it named, "" when none
    sign_type: str  # as sent; "" when absent (MD5)
    # "SUCCESS" (closed now), a trade_state answered to a query (SUCCESS for paid), an err_code, "FAIL"
    # (return_code FAIL), "NOT_FOUND" (HTTP 404), or the name of the fault that replaced the answer.
    answer: str
    http_status: int | None  # None: no HTTP answer was sent
    fault: Fault | None = None
    closed: bool = False  # this request moved the order from NOTPAY to CLOSED
    detail: str = ""  # return_msg of a FAIL answer, err_code_des of a business error
    api: str = "closeorder"  # "orderquery" for a query; "" for a request to no API (HTTP 404)


class AnsweringSide:
    """WeChatPaySimulator's methods that decide answers; they run in the request handler threads under its lock."""

    merchants: Mapping[str, str]
    unknown_orders: UnknownOrders
    latency: float
    _lock: threading.Lock
    _orders: dict[OrderKey, OrderState]
    _amounts: dict[OrderKey, tuple[int, str]]
    _payments: dict[OrderKey, Payment]
    _faults: list[FaultRule]
    _log: list[RecordedRequest]
    _request_counts: dict[Api, Counter[OrderKey]]
    _request_counts_by_number: dict[Api, Counter[str]]
    _transaction_numbers: itertools.count[int]

    # -- answering (called by the request handler threads) ---------------------------------------------

    def _respond(self, method: str, target: str, body: bytes) -> Reply:
        """Decide the answer to one HTTP request and log it, all under one lock acquisition."""
        received_at = time.time()
        path = urlsplit(target).path
        api = API_PATHS.get(path)
        if api is None:
            reply, answer, detail = Reply(404, html_page(404, "Not Found"), HTML_CONTENT_TYPE), "NOT_FOUND", ""
        elif method != "POST":
            detail = "require POST method"
            reply, answer = Reply(200, unsigned_fail(detail)), "FAIL"
        else:
            try:
                fields = decode_xml(body)
            except InvalidXMLBody:
                detail = "XML format error"
                reply, answer = Reply(200, unsigned_fail(detail)), "FAIL"
            else:
                return self._respond_to(api, received_at, path, fields)
        record = RecordedRequest(
            received_at=received_at, method=method, path=path, mch_id="", sub_mch_id="", out_trade_no="",
            sign_type="", answer=answer, http_status=reply.status, detail=detail, api=api or "",
        )
        with self._lock:
            self._log.append(record)
        return self._with_latency(reply)

    def _respond_to(self, api: Api, received_at: float, path: str, fields: Mapping[str, str]) -> Reply:
        sign_type_sent = fields.get("sign_type", "")
        refusal = self._refusal(api, fields)
        with self._lock:
            key = self._key_of(fields)
            if key.out_trade_no:
                self._request_counts[api][key] += 1
                self._request_counts_by_number[api][key.out_trade_no] += 1
            if refusal is not None:
                reply, answer, detail, rule, closed = Reply(200, unsigned_fail(refusal)), "FAIL", refusal, None, False
            else:
                rule = self._take_fault(key.out_trade_no, api)
                reply, answer, detail, closed = self._answer(api, fields, key, rule)
            self._log.append(
                RecordedRequest(
                    received_at=received_at, method="POST", path=path, mch_id=key.mch_id,
                    sub_mch_id=key.sub_mch_id, out_trade_no=key.out_trade_no, sign_type=sign_type_sent,
                    answer=answer, http_status=reply.status, fault=rule.fault if rule else None, closed=closed,
                    detail=detail, api=api,
                )
            )
        return self._with_latency(reply, rule.delay if rule else 0.0)

    def _key_of(self, fields: Mapping[str, str]) -> OrderKey:
        """The order a request names; a query by transaction_id names the paid order that has it (caller holds
        the lock)."""
        key = OrderKey(fields.get("mch_id", ""), fields.get("sub_mch_id", ""), fields.get("out_trade_no", ""))
        transaction_id = fields.get("transaction_id", "")
        if key.out_trade_no or not transaction_id:
            return key
        for paid, payment in self._payments.items():
            if payment.transaction_id == transaction_id and paid[:2] == key[:2]:
                return paid
        return key

    def _refusal(self, api: Api, fields: Mapping[str, str]) -> str | None:
        """The unsigned return_msg WeChat refuses this request with, or None when it is valid and signed."""
        api_key = self.merchants.get(fields.get("mch_id", ""))
        if api_key is None:
            return "Parameter format checking error: unknown mch_id"
        missing = [name for name in REQUIRED_FIELDS[api] if not fields.get(name)]
        if api == "orderquery" and not (fields.get("out_trade_no") or fields.get("transaction_id")):
            missing.append("out_trade_no or transaction_id")
        if missing:
            return f"Parameter format checking error: missing {', '.join(missing)}"
        try:
            sign_type = SignType.parse(fields.get("sign_type"))
        except ValueError:
            return "Parameter format checking error: invalid sign_type"
        if not verify_signature(fields, api_key, sign_type):
            return "Signature Failure"
        return None

    def _take_fault(self, out_trade_no: str, api: Api) -> FaultRule | None:
        """The earliest matching rule, used up once (caller holds the lock)."""
        for index, rule in enumerate(self._faults):
            if rule.matches(out_trade_no, api):
                rule.hits += 1
                if rule.remaining is not None:
                    rule.remaining -= 1
                    if rule.remaining == 0:
                        del self._faults[index]
                return rule
        return None

    def _state_of(self, key: OrderKey) -> OrderState | None:
        """The order's state; an unknown one is NOTPAY in "open" mode, else None (caller holds the lock)."""
        state = self._orders.get(key)
        if state is None and self.unknown_orders == "open" and key.out_trade_no:
            return OrderState.NOTPAY
        return state

    def _payment_of(self, key: OrderKey) -> Payment:
        """The payment of a paid order, made up from its amount the first time it is asked for (caller holds
        the lock)."""
        payment = self._payments.get(key)
        if payment is None:
            total_fee, fee_type = self._amounts.get(key, (DEFAULT_TOTAL_FEE, DEFAULT_FEE_TYPE))
            now = time.time()
            transaction_id = f"4200{int(now):010d}{next(self._transaction_numbers):014d}"
            payment = self._payments[key] = Payment(total_fee, fee_type, transaction_id, beijing_time(now))
        return payment

    def _normal_answer(
        self, api: Api, fields: Mapping[str, str], key: OrderKey, *, apply: bool, state: OrderState | None = None
    ) -> tuple[dict[str, str], str, bool]:
        """(signed document, what it answers, whether the order closed now) for a valid request, as the order's
        state (or `state`, pretended) decides; the table changes only if `apply` (caller holds the lock)."""
        api_key = self.merchants[fields["mch_id"]]
        state = state or self._state_of(key)
        if state is None:
            return signed_answer(fields, api_key, "ORDERNOTEXIST"), "ORDERNOTEXIST", False
        if api == "orderquery":
            payment = self._payment_of(key) if state.is_paid else None
            document = signed_answer(fields, api_key, None, query_fields(key.out_trade_no, state, payment))
            return document, state.trade_state, False
        err_code = state.close_err_code
        closes = err_code is None and apply
        if closes:
            self._orders[key] = OrderState.CLOSED
        return signed_answer(fields, api_key, err_code), err_code or "SUCCESS", closes

    def _answer(
        self, api: Api, fields: Mapping[str, str], key: OrderKey, rule: FaultRule | None
    ) -> tuple[Reply, str, str, bool]:
        """(reply, answer, detail, closed) for a valid request, as `rule` bends it (caller holds the lock)."""
        if rule is None or rule.apply or rule.fault.order_state is not None:
            pretended = rule.fault.order_state if rule is not None else None
            document, answer, closed = self._normal_answer(api, fields, key, apply=pretended is None,
                                                           state=pretended)
            return Reply(200, cdata_xml(document)), answer, document.get("err_code_des", ""), closed
        fault = rule.fault
        if rule.err_code is not None:
            body = cdata_xml(signed_answer(fields, self.merchants[fields["mch_id"]], rule.err_code))
            return Reply(200, body), rule.err_code, ERR_CODE_DESCRIPTIONS.get(rule.err_code, "injected error"), False
        if fault is Fault.RETURN_FAIL:
            detail = "injected return_code FAIL"
            return Reply(200, unsigned_fail(detail)), "FAIL", detail, False
        if fault is Fault.HTTP_502:
            return Reply(502, html_page(502, "Bad Gateway"), HTML_CONTENT_TYPE), fault.name, "", False
        if fault is Fault.HTTP_503:
            return Reply(503, html_page(503, "Service Unavailable"), HTML_CONTENT_TYPE), fault.name, "", False
        if fault in (Fault.DELAY, Fault.DROP_CONNECTION):
            return Reply(None), fault.name, "", False
        would_be, _, _ = self._normal_answer(api, fields, key, apply=False)
        if fault is Fault.BAD_SIGNATURE:
            sign = would_be["sign"]
            would_be["sign"] = sign[:-1] + ("1" if sign.endswith("0") else "0")
        elif fault is Fault.UNSIGNED:
            del would_be["sign"]
        body = cdata_xml(would_be)
        if fault is Fault.RESET_CONNECTION:
            return Reply(200, body, reset_after=len(body) // 2), fault.name, "", False
        if fault is Fault.MALFORMED_BODY:
            body = body[: len(body) // 2]
        return Reply(200, body), fault.name, "", False

    def _with_latency(self, reply: Reply, extra: float = 0.0) -> Reply:
        delay = self.latency + extra
        if delay <= 0:
            return reply
        return Reply(reply.status, reply.body, reply.content_type, delay, reply.reset_after)
