"""A loopback WeChat Pay Global closeorder server for tests, demos and benchmarks.

It answers `POST /pay/closeorder` the way WeChat does (docs/protocol.md) from an in-memory order table, signs
with the shared `wechat.signing` module and can misbehave on demand (`Fault`), so the client and everything
built on it run end to end over real sockets without reaching WeChat. It also plays WeChat's notifying side:
`notify()` marks an order paid and POSTs a signed payment result notification to a loopback URL. It imports
nothing from Django.
"""

from __future__ import annotations

import contextlib
import ipaddress
import itertools
import selectors
import socket
import socketserver
import struct
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import Enum
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Literal, NamedTuple
from urllib.parse import urlsplit

from ..wechat import (
    CLOSEORDER_PATH,
    DEFAULT_MAX_BODY_BYTES,
    InvalidXMLBody,
    SignType,
    compute_signature,
    decode_xml,
    new_nonce,
    verify_signature,
)

__all__ = [
    "API_KEY",
    "APPID",
    "MCH_ID",
    "SUB_MCH_ID",
    "Fault",
    "FaultRule",
    "OrderKey",
    "OrderState",
    "RecordedRequest",
    "UnknownOrders",
    "WeChatPaySimulator",
]

# The demo merchant: the seed page's sample appid/mch_id and the key tests/settings.py uses.
APPID = "wx2421b1c4370ec43b"
MCH_ID = "10000100"
SUB_MCH_ID = "20000200"
API_KEY = "TESTKEY0TESTKEY1TESTKEY2TESTKEY3"

REQUIRED_FIELDS = ("appid", "mch_id", "sub_mch_id", "out_trade_no", "nonce_str", "sign")

UnknownOrders = Literal["not_exist", "open"]

# The descriptions the seed page gives for each documented err_code.
_ERR_CODE_DESCRIPTIONS: Mapping[str, str] = {
    "ORDERPAID": "Order is paid.",
    "ORDERCLOSED": "Order is closed.",
    "ORDERNOTEXIST": "Order does not exist.",
    "SYSTEMERROR": "System error",
    "SIGNERROR": "Signature error",
    "REQUIRE_POST_METHOD": "Use post method",
    "XML_FORMAT_ERROR": "INVALID XML FORMAT",
}

_XML_CONTENT_TYPE = "text/xml; charset=utf-8"
_HTML_CONTENT_TYPE = "text/html; charset=utf-8"
_LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
_PAYER_OPENID = "oSimulatedPayer0000000000000"


class OrderState(str, Enum):
    NOTPAY = "NOTPAY"
    PAID = "PAID"
    CLOSED = "CLOSED"


class OrderKey(NamedTuple):
    """An order is unique per merchant and sub-merchant, as WeChat scopes out_trade_no."""

    mch_id: str
    sub_mch_id: str
    out_trade_no: str


class Fault(str, Enum):
    """Ways to misbehave instead of answering normally. None of them changes an order, except DELAY with apply."""

    # Answer after `delay` seconds. apply=True (default): the close is applied when the request arrives and
    # the normal answer is sent late, so a client that gave up meanwhile never learns the order was closed.
    # apply=False: nothing is processed and, after the delay, the connection is closed without an answer.
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

    @property
    def err_code(self) -> str | None:
        """The err_code this fault answers with, for the members named after one."""
        return self.value if self.value in _ERR_CODE_DESCRIPTIONS else None


@dataclass
class FaultRule:
    """One injected fault; the simulator's lock guards `remaining` and `hits`."""

    fault: Fault
    out_trade_no: str | None  # None: any order
    remaining: int | None  # matching requests still to fault; None: always
    delay: float
    apply: bool
    err_code: str | None
    hits: int = 0

    def matches(self, out_trade_no: str) -> bool:
        return self.out_trade_no is None or self.out_trade_no == out_trade_no


@dataclass(frozen=True, slots=True)
class RecordedRequest:
    """What the simulator received and how it answered: the server side of every exchange."""

    received_at: float  # time.time()
    method: str
    path: str
    mch_id: str  # "" when absent or the body was unreadable
    sub_mch_id: str
    out_trade_no: str
    sign_type: str  # as sent; "" when absent (MD5)
    # "SUCCESS" (closed now), an err_code, "FAIL" (return_code FAIL), "NOT_FOUND" (HTTP 404), or the name of
    # the fault that replaced the answer.
    answer: str
    http_status: int | None  # None: no HTTP answer was sent
    fault: Fault | None = None
    closed: bool = False  # this request moved the order from NOTPAY to CLOSED
    detail: str = ""  # return_msg of a FAIL answer, err_code_des of a business error


@dataclass(frozen=True)
class _Reply:
    """What the request handler sends; decided under the lock, sent outside it."""

    status: int | None  # None: send nothing and close the connection
    body: bytes = b""
    content_type: str = _XML_CONTENT_TYPE
    delay: float = 0.0  # seconds to wait before sending
    reset_after: int | None = None  # send this many body bytes, then reset the connection


def _cdata_xml(fields: Mapping[str, str]) -> bytes:
    """The answer document with every value in CDATA, as WeChat sends it (`]]>` split across two sections)."""
    parts = ["<xml>"]
    for name, value in fields.items():
        parts.append(f"<{name}><![CDATA[{value.replace(']]>', ']]]]><![CDATA[>')}]]></{name}>")
    parts.append("</xml>")
    return "".join(parts).encode("utf-8")


def _html_page(status: int, reason: str) -> bytes:
    return (
        f"<html><head><title>{status} {reason}</title></head><body><center><h1>{status} {reason}</h1>"
        "</center><hr><center>stgw</center></body></html>"
    ).encode("ascii")


def _unsigned_fail(return_msg: str) -> bytes:
    return _cdata_xml({"return_code": "FAIL", "return_msg": return_msg})


def _check_loopback(url: str) -> None:
    """Notifications go to this machine only: the simulator must never post to a real shop."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    try:
        loopback = host in _LOOPBACK_NAMES or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if parts.scheme not in ("http", "https") or not loopback:
        raise ValueError(f"notifications are only sent to loopback http(s) URLs, not {url!r}")


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None  # urllib then raises the 3xx as an HTTPError, which post_notification returns


class WeChatPaySimulator:
    """A threaded HTTP server on 127.0.0.1 that plays WeChat Pay's closeorder endpoint.

    `merchants` maps mch_id to its 32-character API key (default: the demo merchant). `unknown_orders`
    decides what an order missing from the table is: "not_exist" answers ORDERNOTEXIST, "open" treats it
    as NOTPAY and records it as CLOSED on its first close (no setup needed for demos and benchmarks).
    `latency` seconds are added to every answer and may be changed while it runs.
    One lock guards the orders, the faults and the log; it is never held while sleeping or doing I/O.
    """

    def __init__(
        self,
        merchants: Mapping[str, str] | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        unknown_orders: UnknownOrders = "not_exist",
        latency: float = 0.0,
    ) -> None:
        if unknown_orders not in ("not_exist", "open"):
            raise ValueError(f"unknown_orders must be 'not_exist' or 'open', not {unknown_orders!r}")
        self.merchants: Mapping[str, str] = dict({MCH_ID: API_KEY} if merchants is None else merchants)
        self.address = (host, port)
        self.unknown_orders = unknown_orders
        self.latency = latency
        self._lock = threading.Lock()
        self._orders: dict[OrderKey, OrderState] = {}
        self._faults: list[FaultRule] = []
        self._log: list[RecordedRequest] = []
        self._close_counts: Counter[OrderKey] = Counter()
        self._close_counts_by_number: Counter[str] = Counter()
        self._connections: set[socket.socket] = set()
        self._connections_opened = 0
        self._stopping = threading.Event()
        self._server: _SimulatorHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._last_notification: bytes | None = None
        self._transaction_numbers = itertools.count(1)

    # -- lifecycle -----------------------------------------------------------------------------------

    def start(self) -> WeChatPaySimulator:
        if self._server is not None or self._stopping.is_set():
            raise RuntimeError("a simulator starts once; create a new one")
        self._server = _SimulatorHTTPServer(self.address, self)
        self._thread = threading.Thread(
            target=self._server.serve_until_stopped, name=f"wxpay-simulator:{self.port}", daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop accepting, wake delayed answers, cut open keep-alive connections and close the socket."""
        server, thread = self._server, self._thread
        if server is None or thread is None or self._stopping.is_set():
            return
        self._stopping.set()
        server.wake()
        thread.join()
        with self._lock:
            connections = list(self._connections)
        for connection in connections:
            with contextlib.suppress(OSError):  # the client closed it first
                connection.shutdown(socket.SHUT_RDWR)
        server.server_close()

    def __enter__(self) -> WeChatPaySimulator:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the simulator is not started")
        return int(self._server.server_address[1])

    @property
    def base_url(self) -> str:
        return f"http://{self.address[0]}:{self.port}"

    def __repr__(self) -> str:
        where = self.base_url if self._server is not None else "not started"
        return f"<WeChatPaySimulator {where} merchants={sorted(self.merchants)}>"

    # -- orders --------------------------------------------------------------------------------------

    def add_order(
        self, out_trade_no: str, *, mch_id: str, sub_mch_id: str, state: OrderState | str = OrderState.NOTPAY
    ) -> OrderKey:
        """Create (or overwrite) one order."""
        key = OrderKey(mch_id, sub_mch_id, out_trade_no)
        with self._lock:
            self._orders[key] = OrderState(state)
        return key

    def add_orders(
        self,
        out_trade_nos: Iterable[str],
        *,
        mch_id: str,
        sub_mch_id: str,
        state: OrderState | str = OrderState.NOTPAY,
    ) -> None:
        """Create many orders of one sub-merchant under a single lock acquisition."""
        state = OrderState(state)
        entries = {OrderKey(mch_id, sub_mch_id, number): state for number in out_trade_nos}
        with self._lock:
            self._orders.update(entries)

    def order_state(self, out_trade_no: str, *, mch_id: str, sub_mch_id: str) -> OrderState | None:
        with self._lock:
            return self._orders.get(OrderKey(mch_id, sub_mch_id, out_trade_no))

    def set_state(self, out_trade_no: str, state: OrderState | str, *, mch_id: str, sub_mch_id: str) -> None:
        """Change a known order, e.g. mark it PAID as if the payer paid; KeyError for an unknown one."""
        key = OrderKey(mch_id, sub_mch_id, out_trade_no)
        with self._lock:
            if key not in self._orders:
                raise KeyError(key)
            self._orders[key] = OrderState(state)

    # -- payment notifications (WeChat's side of the shop's notify_url) ---------------------------------

    def notify(
        self,
        url: str,
        out_trade_no: str,
        *,
        total_fee: int,
        fee_type: str,
        mch_id: str = MCH_ID,
        sub_mch_id: str = SUB_MCH_ID,
        result_code: str = "SUCCESS",
        sign_type: SignType | str = SignType.HMAC_SHA256,
        claim_sign_type: str | None = None,
        tamper: bool = False,
        timeout: float = 10.0,
    ) -> tuple[int, bytes]:
        """The payer paid a known order: mark it PAID here, then POST WeChat's notification to `url`.

        Returns the HTTP status and the body the shop answered. The table is changed first, as at WeChat, and
        whatever the order's state (a payment for an order closed here is how a shop's incident path is tested);
        a close sent later answers ORDERPAID. `total_fee`/`fee_type` are what the payer paid: pass other values
        than the shop's order has to send a wrong amount. `tamper=True` sends a forged body instead: a valid
        notification whose total_fee is changed after signing; the table is left as it is (nobody paid).
        A `result_code` other than SUCCESS reports a failed payment and leaves the table too. KeyError for an
        order the simulator does not know; for one, send `notification_body(...)` with `post_notification`.
        The body is kept for `replay_last_notification`.
        """
        key = OrderKey(mch_id, sub_mch_id, out_trade_no)
        body = self.notification_body(
            out_trade_no, total_fee=total_fee, fee_type=fee_type, mch_id=mch_id, sub_mch_id=sub_mch_id,
            result_code=result_code, sign_type=sign_type, claim_sign_type=claim_sign_type, tamper=tamper,
        )
        _check_loopback(url)
        with self._lock:
            if key not in self._orders:
                raise KeyError(key)
            if result_code == "SUCCESS" and not tamper:
                self._orders[key] = OrderState.PAID
            self._last_notification = body
        return self.post_notification(url, body, timeout=timeout)

    def notification_body(
        self,
        out_trade_no: str,
        *,
        total_fee: int,
        fee_type: str,
        mch_id: str = MCH_ID,
        sub_mch_id: str = SUB_MCH_ID,
        appid: str = APPID,
        sub_appid: str | None = None,
        result_code: str = "SUCCESS",
        sign_type: SignType | str = SignType.HMAC_SHA256,
        claim_sign_type: str | None = None,
        tamper: bool = False,
    ) -> bytes:
        """A payment result notification as WeChat sends it (fields sorted, values in CDATA); no side effects.

        Signed with `mch_id`'s key (KeyError for a merchant the simulator does not know) and `sign_type`. Like
        WeChat's, the body names no sign_type unless `claim_sign_type` gives one (it is then signed too).
        """
        api_key = self.merchants[mch_id]
        now = time.time()
        fields = {
            "return_code": "SUCCESS",
            "return_msg": "OK",
            "appid": appid,
            "mch_id": mch_id,
            "sub_mch_id": sub_mch_id,
            "nonce_str": new_nonce(),
            "result_code": result_code,
            "openid": _PAYER_OPENID,
            "is_subscribe": "N",
            "trade_type": "JSAPI",
            "bank_type": "OTHERS",
            "total_fee": str(total_fee),
            "fee_type": fee_type,
            "transaction_id": f"4200{int(now):010d}{next(self._transaction_numbers):014d}",
            "out_trade_no": out_trade_no,
            # yyyyMMddHHmmss in Beijing time (GMT+8), as WeChat writes it.
            "time_end": time.strftime("%Y%m%d%H%M%S", time.gmtime(now + 8 * 3600)),
        }
        if sub_appid:
            fields["sub_appid"] = sub_appid
        if result_code != "SUCCESS":
            fields.update(err_code="SYSTEMERROR", err_code_des="System error")
        if claim_sign_type is not None:
            fields["sign_type"] = claim_sign_type
        fields["sign"] = compute_signature(fields, api_key, sign_type)
        if tamper:
            fields["total_fee"] = str(total_fee + 1)
        return _cdata_xml(dict(sorted(fields.items())))

    def post_notification(self, url: str, body: bytes, *, timeout: float = 10.0) -> tuple[int, bytes]:
        """POST `body` (any bytes: a replay, a hostile body) to a loopback `url`: (HTTP status, answer body).

        No proxy and no redirects: a 3xx is returned as it came, as WeChat would count it a failure.
        """
        _check_loopback(url)
        request = urllib.request.Request(
            url, data=body, method="POST", headers={"Content-Type": _XML_CONTENT_TYPE},
        )
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirects())
        try:
            with opener.open(request, timeout=timeout) as response:
                return int(response.status), bytes(response.read(DEFAULT_MAX_BODY_BYTES))
        except urllib.error.HTTPError as error:
            with error:
                return int(error.code), bytes(error.read(DEFAULT_MAX_BODY_BYTES))

    @property
    def last_notification(self) -> bytes | None:
        """The body `notify()` sent last, or None."""
        with self._lock:
            return self._last_notification

    def replay_last_notification(self, url: str, *, timeout: float = 10.0) -> tuple[int, bytes]:
        """Send the last `notify()` body again, byte for byte, as WeChat repeats a notification."""
        body = self.last_notification
        if body is None:
            raise RuntimeError("no notification was sent yet")
        return self.post_notification(url, body, timeout=timeout)

    # -- faults --------------------------------------------------------------------------------------

    def inject(
        self,
        fault: Fault,
        *,
        out_trade_no: str | None = None,
        times: int | None = 1,
        delay: float = 0.0,
        apply: bool | None = None,
        err_code: str | None = None,
    ) -> FaultRule:
        """Misbehave for the next `times` valid closeorder requests (None: always) for `out_trade_no` (None: any).

        Faults replace the answer to a correctly signed request only; an invalid request gets WeChat's normal
        refusal and uses up no fault. The earliest injected matching rule wins. `delay` (seconds) comes on
        top of the global latency for any fault. `apply` is for DELAY only (see `Fault.DELAY`; default True).
        """
        fault = Fault(fault)
        if times is not None and times < 1:
            raise ValueError("times must be at least 1, or None for always")
        if delay < 0:
            raise ValueError("delay cannot be negative")
        if apply is not None and fault is not Fault.DELAY:
            raise ValueError("only Fault.DELAY can apply the close; every other fault leaves the order as it is")
        if (fault is Fault.ERR_CODE) != bool(err_code):
            raise ValueError("err_code is required with Fault.ERR_CODE and only with it")
        rule = FaultRule(
            fault=fault, out_trade_no=out_trade_no, remaining=times, delay=delay,
            apply=fault is Fault.DELAY and apply is not False, err_code=err_code or fault.err_code,
        )
        with self._lock:
            self._faults.append(rule)
        return rule

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    # -- accounting ----------------------------------------------------------------------------------

    @property
    def requests(self) -> list[RecordedRequest]:
        """A copy of the log, in the order the requests were decided."""
        with self._lock:
            return list(self._log)

    @property
    def connections_opened(self) -> int:
        """TCP connections accepted so far: a client that keeps its connections alive opens one per worker."""
        with self._lock:
            return self._connections_opened

    def close_requests_for(self, out_trade_no: str) -> int:
        """How many POST /pay/closeorder bodies named this out_trade_no (any merchant, valid or not)."""
        with self._lock:
            return self._close_counts_by_number[out_trade_no]

    def close_request_counts(self) -> dict[OrderKey, int]:
        """POST /pay/closeorder bodies received per order key (valid or not), e.g. to assert at most one each."""
        with self._lock:
            return dict(self._close_counts)

    def reset_log(self) -> None:
        with self._lock:
            self._log.clear()
            self._close_counts.clear()
            self._close_counts_by_number.clear()

    # -- answering (called by the request handler threads) ---------------------------------------------

    def _respond(self, method: str, target: str, body: bytes) -> _Reply:
        """Decide the answer to one HTTP request and log it, all under one lock acquisition."""
        received_at = time.time()
        path = urlsplit(target).path
        if path != CLOSEORDER_PATH:
            reply, answer, detail = _Reply(404, _html_page(404, "Not Found"), _HTML_CONTENT_TYPE), "NOT_FOUND", ""
        elif method != "POST":
            detail = "require POST method"
            reply, answer = _Reply(200, _unsigned_fail(detail)), "FAIL"
        else:
            try:
                fields = decode_xml(body)
            except InvalidXMLBody:
                detail = "XML format error"
                reply, answer = _Reply(200, _unsigned_fail(detail)), "FAIL"
            else:
                return self._respond_to_close(received_at, path, fields)
        record = RecordedRequest(
            received_at=received_at, method=method, path=path, mch_id="", sub_mch_id="", out_trade_no="",
            sign_type="", answer=answer, http_status=reply.status, detail=detail,
        )
        with self._lock:
            self._log.append(record)
        return self._with_latency(reply)

    def _respond_to_close(self, received_at: float, path: str, fields: Mapping[str, str]) -> _Reply:
        key = OrderKey(fields.get("mch_id", ""), fields.get("sub_mch_id", ""), fields.get("out_trade_no", ""))
        sign_type_sent = fields.get("sign_type", "")
        refusal = self._refusal(fields)
        with self._lock:
            if key.out_trade_no:
                self._close_counts[key] += 1
                self._close_counts_by_number[key.out_trade_no] += 1
            if refusal is not None:
                reply, answer, detail, rule, closed = _Reply(200, _unsigned_fail(refusal)), "FAIL", refusal, None, False
            else:
                rule = self._take_fault(key.out_trade_no)
                reply, answer, detail, closed = self._answer(fields, key, rule)
            self._log.append(
                RecordedRequest(
                    received_at=received_at, method="POST", path=path, mch_id=key.mch_id,
                    sub_mch_id=key.sub_mch_id, out_trade_no=key.out_trade_no, sign_type=sign_type_sent,
                    answer=answer, http_status=reply.status, fault=rule.fault if rule else None, closed=closed,
                    detail=detail,
                )
            )
        return self._with_latency(reply, rule.delay if rule else 0.0)

    def _refusal(self, fields: Mapping[str, str]) -> str | None:
        """The unsigned return_msg WeChat refuses this request with, or None when it is valid and signed."""
        api_key = self.merchants.get(fields.get("mch_id", ""))
        if api_key is None:
            return "Parameter format checking error: unknown mch_id"
        missing = [name for name in REQUIRED_FIELDS if not fields.get(name)]
        if missing:
            return f"Parameter format checking error: missing {', '.join(missing)}"
        try:
            sign_type = SignType.parse(fields.get("sign_type"))
        except ValueError:
            return "Parameter format checking error: invalid sign_type"
        if not verify_signature(fields, api_key, sign_type):
            return "Signature Failure"
        return None

    def _take_fault(self, out_trade_no: str) -> FaultRule | None:
        """The earliest matching rule, used up once (caller holds the lock)."""
        for index, rule in enumerate(self._faults):
            if rule.matches(out_trade_no):
                rule.hits += 1
                if rule.remaining is not None:
                    rule.remaining -= 1
                    if rule.remaining == 0:
                        del self._faults[index]
                return rule
        return None

    def _close(self, key: OrderKey, *, apply: bool) -> str | None:
        """The err_code WeChat answers for this order (None: it closes now); changes the table only if `apply`."""
        state = self._orders.get(key)
        if state is None:
            if self.unknown_orders == "not_exist":
                return "ORDERNOTEXIST"
            state = OrderState.NOTPAY
        if state is OrderState.PAID:
            return "ORDERPAID"
        if state is OrderState.CLOSED:
            return "ORDERCLOSED"
        if apply:
            self._orders[key] = OrderState.CLOSED
        return None

    def _answer(
        self, fields: Mapping[str, str], key: OrderKey, rule: FaultRule | None
    ) -> tuple[_Reply, str, str, bool]:
        """(reply, answer, detail, closed) for a valid request, as `rule` bends it (caller holds the lock)."""
        if rule is None or rule.apply:  # no fault, or a DELAY that still closes
            err_code = self._close(key, apply=True)
            body = _cdata_xml(self._signed_answer(fields, err_code))
            if err_code is None:
                return _Reply(200, body), "SUCCESS", "", True
            return _Reply(200, body), err_code, _ERR_CODE_DESCRIPTIONS[err_code], False
        fault = rule.fault
        if rule.err_code is not None:
            body = _cdata_xml(self._signed_answer(fields, rule.err_code))
            return _Reply(200, body), rule.err_code, _ERR_CODE_DESCRIPTIONS.get(rule.err_code, "injected error"), False
        if fault is Fault.RETURN_FAIL:
            detail = "injected return_code FAIL"
            return _Reply(200, _unsigned_fail(detail)), "FAIL", detail, False
        if fault is Fault.HTTP_502:
            return _Reply(502, _html_page(502, "Bad Gateway"), _HTML_CONTENT_TYPE), fault.name, "", False
        if fault is Fault.HTTP_503:
            return _Reply(503, _html_page(503, "Service Unavailable"), _HTML_CONTENT_TYPE), fault.name, "", False
        if fault in (Fault.DELAY, Fault.DROP_CONNECTION):
            return _Reply(None), fault.name, "", False
        would_be = self._signed_answer(fields, self._close(key, apply=False))
        if fault is Fault.BAD_SIGNATURE:
            sign = would_be["sign"]
            would_be["sign"] = sign[:-1] + ("1" if sign.endswith("0") else "0")
        elif fault is Fault.UNSIGNED:
            del would_be["sign"]
        body = _cdata_xml(would_be)
        if fault is Fault.RESET_CONNECTION:
            return _Reply(200, body, reset_after=len(body) // 2), fault.name, "", False
        if fault is Fault.MALFORMED_BODY:
            body = body[: len(body) // 2]
        return _Reply(200, body), fault.name, "", False

    def _signed_answer(self, fields: Mapping[str, str], err_code: str | None) -> dict[str, str]:
        """A return_code SUCCESS answer echoing the request, signed with its sign type and merchant key."""
        answer = {
            "return_code": "SUCCESS",
            "return_msg": "OK",
            "appid": fields["appid"],
            "mch_id": fields["mch_id"],
            "sub_mch_id": fields["sub_mch_id"],
        }
        if fields.get("sub_appid"):
            answer["sub_appid"] = fields["sub_appid"]
        answer["nonce_str"] = new_nonce()
        if err_code is None:
            answer.update(result_code="SUCCESS", result_msg="OK")
        else:
            description = _ERR_CODE_DESCRIPTIONS.get(err_code, "injected error")
            answer.update(result_code="FAIL", result_msg=description, err_code=err_code, err_code_des=description)
        sign_type = SignType.parse(fields.get("sign_type"))
        answer["sign"] = compute_signature(answer, self.merchants[fields["mch_id"]], sign_type)
        return answer

    def _with_latency(self, reply: _Reply, extra: float = 0.0) -> _Reply:
        delay = self.latency + extra
        if delay <= 0:
            return reply
        return _Reply(reply.status, reply.body, reply.content_type, delay, reply.reset_after)

    # -- connection bookkeeping, so stop() can cut keep-alive connections ------------------------------

    def _track(self, connection: socket.socket) -> bool:
        """Register a new connection; False when stopping (the handler then hangs up on it)."""
        with self._lock:
            if self._stopping.is_set():
                return False
            self._connections.add(connection)
            self._connections_opened += 1
            return True

    def _untrack(self, connection: socket.socket) -> None:
        with self._lock:
            self._connections.discard(connection)


class _SimulatorHTTPServer(ThreadingHTTPServer):
    daemon_threads = True  # a hung client never keeps the process alive
    request_queue_size = 256  # benchmarks open many connections at once
    timeout = 0  # handle_request() is only called once a connection is pending: never wait in it

    def __init__(self, address: tuple[str, int], simulator: WeChatPaySimulator) -> None:
        self.simulator = simulator
        self._wake_receiver, self._wake_sender = socket.socketpair()
        super().__init__(address, _RequestHandler)

    def serve_until_stopped(self) -> None:
        """serve_forever() that stop() wakes at once, instead of at its next poll (tests start hundreds)."""
        with selectors.DefaultSelector() as selector:
            selector.register(self, selectors.EVENT_READ)
            selector.register(self._wake_receiver, selectors.EVENT_READ)
            while not self.simulator._stopping.is_set():
                ready = selector.select()
                if any(key.fileobj is self for key, _ in ready) and not self.simulator._stopping.is_set():
                    self.handle_request()

    def wake(self) -> None:
        self._wake_sender.send(b"\0")

    def server_close(self) -> None:
        super().server_close()
        self._wake_receiver.close()
        self._wake_sender.close()

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves the host's FQDN, a DNS lookup that can stall start-up for seconds.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)


class _RequestHandler(BaseHTTPRequestHandler):
    """HTTP/1.1 with exact Content-Length, so clients keep connections alive; all decisions are the simulator's."""

    protocol_version = "HTTP/1.1"
    # An answer leaves in one write, headers and body together, as a web server's front end sends a small
    # answer; written apart, a client in another process reads two segments and wakes twice for one answer,
    # a cost the real server would not cause it. `_send` flushes the buffer itself.
    wbufsize = -1
    disable_nagle_algorithm = True  # an answer never waits for the ACK of the one before it
    server: _SimulatorHTTPServer

    def setup(self) -> None:
        super().setup()
        if not self.server.simulator._track(self.connection):
            self.connection.shutdown(socket.SHUT_RDWR)  # stopping: the first read sees EOF and ends the handler

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.simulator._untrack(self.connection)

    def do_POST(self) -> None:
        body = self._read_body()
        reply = self.server.simulator._respond(self.command, self.path, body)
        try:
            self._send(reply)
        except OSError:  # the client went away (e.g. timed out during a delay)
            self.close_connection = True

    do_GET = do_HEAD = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_POST

    def _read_body(self) -> bytes:
        """The request body by Content-Length; an unusable framing gets an empty body and a closed connection."""
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            length = -1
        if self.headers.get("Transfer-Encoding") or not 0 <= length <= DEFAULT_MAX_BODY_BYTES:
            self.close_connection = True
            return b""
        return self.rfile.read(length) if length else b""

    def _send(self, reply: _Reply) -> None:
        if reply.delay and self.server.simulator._stopping.wait(reply.delay):
            self.close_connection = True
            return
        if reply.status is None:
            self.close_connection = True
            return
        self.send_response(reply.status)
        self.send_header("Content-Type", reply.content_type)
        self.send_header("Content-Length", str(len(reply.body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(reply.body if reply.reset_after is None else reply.body[: reply.reset_after])
        self.wfile.flush()
        if reply.reset_after is not None:
            self._reset_connection()

    def _reset_connection(self) -> None:
        """Close with SO_LINGER 0, so the peer gets a TCP RST rather than an orderly FIN."""
        self.close_connection = True
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        # The buffered reader and writer hold references to the socket, so the reset leaves when `finish` closes
        # them, right after this request; closing them here would break the server's own flush after it.
        self.connection.close()

    def log_message(self, format: str, *args: object) -> None:
        """Silent: benchmarks send thousands of requests; the simulator's own log records each one."""
