"""The closeorder HTTP client: one signed POST, one immutable result, never an exception for
anything WeChat or the network can do (only for our own bad input, before anything is sent)."""

from __future__ import annotations

import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import requests
import urllib3
from requests.adapters import HTTPAdapter
from requests.structures import CaseInsensitiveDict

from .outcomes import Outcome, classify_answer
from .signing import SignType, compute_signature, new_nonce, verify_signature
from .xmlcodec import DEFAULT_MAX_BODY_BYTES, InvalidXMLBody, decode_xml, encode_xml

__all__ = [
    "CLOSEORDER_PATH",
    "InvalidRequestField",
    "Merchant",
    "PreparedClose",
    "CloseResult",
    "CloseOrderClient",
    "validate_out_trade_no",
]

CLOSEORDER_PATH = "/pay/closeorder"
API_KEY_LENGTH = 32
_OUT_TRADE_NO = re.compile(r"^[A-Za-z0-9_\-|*@]{1,32}$")
_MAX_ID_LENGTH = 32
_ECHOED_IDS = frozenset({"appid", "mch_id", "sub_mch_id", "sub_appid"})


class InvalidRequestField(ValueError):
    """Our own input is wrong; raised before anything is sent. `field` names the culprit."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"{field_name}: {message}")
        self.field = field_name


def validate_out_trade_no(out_trade_no: str) -> None:
    # fullmatch: with match(), `$` would also accept a trailing newline ("ORDER1\n").
    if not isinstance(out_trade_no, str) or not _OUT_TRADE_NO.fullmatch(out_trade_no):
        raise InvalidRequestField(
            "out_trade_no",
            f"{out_trade_no!r} must be 1-32 characters of letters, digits and _ - | * @",
        )


def _check_id(field_name: str, value: str | None, *, required: bool) -> None:
    if value is None or value == "":
        if required:
            raise InvalidRequestField(field_name, "is required")
        return
    if not isinstance(value, str):
        raise InvalidRequestField(field_name, f"must be a string, not {type(value).__name__}")
    if len(value) > _MAX_ID_LENGTH or not value.isascii() or not value.isprintable() or value.strip() != value:
        raise InvalidRequestField(field_name, f"{value!r} must be at most 32 printable ASCII characters")


@dataclass(frozen=True)
class Merchant:
    """Who calls: the IDs that go into the request and the key that signs it (never shown)."""

    appid: str
    mch_id: str
    sub_mch_id: str
    api_key: str = field(repr=False)
    sign_type: SignType = SignType.HMAC_SHA256
    sub_appid: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "sign_type", SignType.parse(self.sign_type))
        for name in ("appid", "mch_id", "sub_mch_id"):
            _check_id(name, getattr(self, name), required=True)
        _check_id("sub_appid", self.sub_appid, required=False)
        if not isinstance(self.api_key, str) or len(self.api_key) != API_KEY_LENGTH or not self.api_key.isascii():
            # Never echo the key itself, not even a wrong one.
            raise InvalidRequestField("api_key", f"must be {API_KEY_LENGTH} ASCII characters")


@dataclass(frozen=True)
class PreparedClose:
    """A signed request, built before sending so the exact bytes can be audited first."""

    out_trade_no: str
    sign_type: SignType
    fields: Mapping[str, str]
    body: bytes


@dataclass(frozen=True)
class CloseResult:
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

    @property
    def return_code(self) -> str:
        return self.response_fields.get("return_code", "")

    @property
    def return_msg(self) -> str:
        return self.response_fields.get("return_msg", "")

    @property
    def result_code(self) -> str:
        return self.response_fields.get("result_code", "")

    @property
    def err_code(self) -> str:
        return self.response_fields.get("err_code", "")

    @property
    def err_code_des(self) -> str:
        return self.response_fields.get("err_code_des", "")


@dataclass(frozen=True)
class Answer:
    """What a transport brought back from one URL: the HTTP status and the body, at most the size cap."""

    status: int
    body: bytes


@dataclass(frozen=True)
class TransportFailure:
    """Why a transport brought no answer back, and whether the request can have reached the server at all."""

    reason: str
    never_connected: bool = False
    outcome: Outcome = Outcome.NETWORK_ERROR


class BodyTooLarge(Exception):
    """The answer grew past `max_response_bytes`; reading stopped there."""


class _FixedRouteAdapter(HTTPAdapter):
    """An HTTPAdapter for a client that only posts to a few URLs whose proxy and TLS settings never change.

    Both overrides are requests' documented subclassing hooks, and both skip per-call work whose answer is
    fixed: finding the connection pool of a URL (re-parsing it and checking the CA path on disk each time),
    and filling a cookie jar and guessing a text encoding for answers whose bytes we parse ourselves.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._pools: dict[tuple[Any, ...], Any] = {}

    def get_connection_with_tls_context(self, request: requests.PreparedRequest, verify: Any,
                                        proxies: Mapping[str, str] | None = None, cert: Any = None) -> Any:
        key = (request.url, verify, cert, tuple(sorted(proxies.items())) if proxies else ())
        pool = self._pools.get(key)
        if pool is None or pool.pool is None:  # first use, or the pool was closed (its queue is then None)
            pool = self._pools[key] = super().get_connection_with_tls_context(request, verify, proxies, cert)
        return pool

    def close(self) -> None:
        pools, self._pools = list(self._pools.values()), {}
        for pool in pools:  # urllib3's PoolManager forgets its pools on clear() but leaves them open
            pool.close()
        super().close()

    def build_response(self, req: requests.PreparedRequest, resp: Any) -> requests.Response:
        response = requests.Response()
        response.status_code = resp.status
        response.headers = CaseInsensitiveDict(resp.headers)
        response.raw = resp
        response.reason = resp.reason
        response.url = req.url or ""
        response.request = req
        response.connection = self
        return response


def _never_connected(exc: requests.RequestException) -> bool:
    """True when the request cannot have reached the server (refused, unresolvable, connect timeout)."""
    if isinstance(exc, requests.ConnectTimeout):
        return True
    if isinstance(exc, requests.ConnectionError) and exc.args:
        reason = getattr(exc.args[0], "reason", None)
        return isinstance(reason, urllib3.exceptions.NewConnectionError)
    return False


class CloseOrderClient:
    """Sends closeorder for one merchant over a reused `requests.Session`.

    `base_urls` is the primary region first; a later one is used only when an earlier one
    could not even be connected to (closing is idempotent, but a WeChat answer is never retried
    elsewhere). Proxy and CA settings from the environment are resolved once, here, not per call.
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
        if not base_urls:
            raise ValueError("base_urls needs at least one URL")
        self.merchant = merchant
        self.urls = tuple(url.rstrip("/") + CLOSEORDER_PATH for url in base_urls)
        self.timeout = (connect_timeout, read_timeout)
        self.deadline = connect_timeout + read_timeout  # per URL, body download included
        self.max_response_bytes = max_response_bytes
        self.session = requests.Session()
        self._adapter = _FixedRouteAdapter(pool_connections=len(self.urls), pool_maxsize=max(pool_size, 1),
                                           max_retries=0)
        self.session.mount("https://", self._adapter)
        self.session.mount("http://", self._adapter)
        self.session.headers.update(
            {"User-Agent": user_agent or _default_user_agent(), "Content-Type": "text/xml; charset=utf-8"}
        )
        self._send_options: dict[str, dict[str, Any]] = {}
        for url in self.urls:
            resolved = self.session.merge_environment_settings(url, {}, None, None, None)
            self._send_options[url] = {key: resolved[key] for key in ("proxies", "verify", "cert")}
        self.session.trust_env = False
        # Each call copies a request prepared here (URL parsed, session headers merged) and hands it straight
        # to the adapter: Session.request would redo all of that, and the cookie and redirect handling around
        # adapter.send, per call (docs/performance.md measures what that costs).
        self._templates = {url: self.session.prepare_request(requests.Request("POST", url)) for url in self.urls}

    def close(self) -> None:
        self.session.close()

    def __enter__(self) -> CloseOrderClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<CloseOrderClient mch_id={self.merchant.mch_id} urls={self.urls!r}>"

    def prepare(
        self, out_trade_no: str, *, sub_mch_id: str | None = None, sub_appid: str | None = None
    ) -> PreparedClose:
        """Validate and sign. `sub_mch_id`/`sub_appid` override the merchant's (institutional mode)."""
        validate_out_trade_no(out_trade_no)
        sub_mch_id = sub_mch_id or self.merchant.sub_mch_id
        sub_appid = self.merchant.sub_appid if sub_appid is None else sub_appid
        _check_id("sub_mch_id", sub_mch_id, required=True)
        _check_id("sub_appid", sub_appid, required=False)
        sign_type = self.merchant.sign_type
        fields = {
            "appid": self.merchant.appid,
            "mch_id": self.merchant.mch_id,
            "sub_mch_id": sub_mch_id,
            "out_trade_no": out_trade_no,
            "nonce_str": new_nonce(),
        }
        if sub_appid:
            fields["sub_appid"] = sub_appid
        if sign_type is not SignType.MD5:
            fields["sign_type"] = sign_type.value
        fields["sign"] = compute_signature(fields, self.merchant.api_key, sign_type)
        return PreparedClose(
            out_trade_no=out_trade_no, sign_type=sign_type, fields=MappingProxyType(fields), body=encode_xml(fields)
        )

    def close_order(self, out_trade_no: str, **overrides: str | None) -> CloseResult:
        return self.send(self.prepare(out_trade_no, **overrides))

    def send(self, prepared: PreparedClose) -> CloseResult:
        """Post the request and interpret the answer; a later URL is tried only when an earlier one was never
        connected to (a WeChat answer, or a request that may have arrived, is never sent elsewhere)."""
        started = time.perf_counter()
        failed_over_from: str | None = None
        for index, url in enumerate(self.urls):
            reply = self._attempt(url, prepared.body)
            if isinstance(reply, Answer):
                return self._interpret(prepared, url, started, failed_over_from, reply)
            if reply.never_connected and index + 1 < len(self.urls):
                failed_over_from = failed_over_from or url
                continue
            return self._result(prepared, url, started, failed_over_from, reply.outcome, reply.reason)
        raise AssertionError("unreachable: the last URL always returns")

    def _attempt(self, url: str, body: bytes) -> Answer | TransportFailure:
        try:
            return self._post(url, body)
        except requests.RequestException as exc:
            return TransportFailure(_describe(exc), never_connected=_never_connected(exc))
        except BodyTooLarge:
            return TransportFailure(f"response body exceeds the {self.max_response_bytes}-byte limit",
                                    outcome=Outcome.INVALID_RESPONSE)
        except TimeoutError as exc:
            return TransportFailure(str(exc))

    def _post(self, url: str, body: bytes) -> Answer:
        started = time.monotonic()
        request = self._templates[url].copy()
        request.prepare_body(body, None)
        with self._adapter.send(request, stream=True, timeout=self.timeout, **self._send_options[url]) as response:
            received = bytearray()
            while chunk := _read_some(response, self.deadline - (time.monotonic() - started), self.timeout[1]):
                received += chunk
                if len(received) > self.max_response_bytes:
                    raise BodyTooLarge
            return Answer(status=response.status_code, body=bytes(received))

    def _interpret(
        self, prepared: PreparedClose, url: str, started: float, failed_over_from: str | None, answer: Answer
    ) -> CloseResult:
        def result(outcome: Outcome, reason: str, fields: Mapping[str, str] = {},
                   verified: bool | None = None) -> CloseResult:
            return self._result(
                prepared, url, started, failed_over_from, outcome, reason,
                http_status=answer.status, response_body=answer.body, fields=fields, verified=verified,
            )

        if not 200 <= answer.status < 300:
            return result(Outcome.INVALID_RESPONSE, f"HTTP {answer.status}")
        try:
            fields = decode_xml(answer.body, max_bytes=self.max_response_bytes)
        except InvalidXMLBody as exc:
            return result(Outcome.INVALID_RESPONSE, f"unreadable body: {exc}")
        verified: bool | None = None
        if fields.get("return_code") == "SUCCESS" or fields.get("sign"):
            verified = verify_signature(fields, self.merchant.api_key, prepared.sign_type)
        outcome, reason = classify_answer(fields, signature_verified=bool(verified))
        if verified and not self._echoes_request(fields, prepared):
            outcome, reason = Outcome.UNTRUSTED_RESPONSE, "signed answer echoes another appid/mch_id/sub_mch_id"
        return result(outcome, reason, fields, verified)

    @staticmethod
    def _echoes_request(fields: Mapping[str, str], prepared: PreparedClose) -> bool:
        """A signed answer about another merchant or sub-merchant must not settle this order."""
        return all(fields.get(name, sent) == sent for name, sent in prepared.fields.items() if name in _ECHOED_IDS)

    def _result(
        self,
        prepared: PreparedClose,
        url: str,
        started: float,
        failed_over_from: str | None,
        outcome: Outcome,
        reason: str,
        *,
        http_status: int | None = None,
        response_body: bytes = b"",
        fields: Mapping[str, str] = {},
        verified: bool | None = None,
    ) -> CloseResult:
        return CloseResult(
            out_trade_no=prepared.out_trade_no,
            outcome=outcome,
            reason=reason,
            url=url,
            sign_type=prepared.sign_type,
            request_body=prepared.body,
            http_status=http_status,
            response_body=response_body,
            response_fields=MappingProxyType(dict(fields)),
            signature_verified=verified,
            elapsed=time.perf_counter() - started,
            failed_over_from=failed_over_from,
        )


def _read_some(response: requests.Response, remaining: float, read_timeout: float) -> bytes:
    """What has arrived of the body (one read from the socket, at most 8 KiB; b"" at its end), never past the deadline.

    Not iter_content(8192): it waits until 8192 bytes have come, so a body trickled in a byte at a time would
    hold the request (and outlive its claim) far beyond connect + read timeout. urllib3's errors are raised as
    requests' own, as iter_content would.
    """
    if remaining <= 0:
        raise TimeoutError(f"response not complete within the {read_timeout:g}s read timeout plus connect time")
    sock = getattr(getattr(response.raw, "connection", None), "sock", None)
    if sock is not None:
        sock.settimeout(min(read_timeout, remaining))
    try:
        return getattr(response.raw, "read1", response.raw.read)(8192)  # urllib3 < 2.3: no read1, the old wait
    except urllib3.exceptions.ReadTimeoutError as exc:
        raise requests.exceptions.ReadTimeout(exc) from exc
    except urllib3.exceptions.DecodeError as exc:
        raise requests.exceptions.ContentDecodingError(exc) from exc
    except urllib3.exceptions.SSLError as exc:
        raise requests.exceptions.SSLError(exc) from exc
    except urllib3.exceptions.HTTPError as exc:
        raise requests.exceptions.ChunkedEncodingError(exc) from exc


def _describe(exc: requests.RequestException) -> str:
    """A short, key-free description of a transport failure (the request body is never included)."""
    kinds = [
        (requests.ConnectTimeout, "connect timeout"),
        (requests.ReadTimeout, "read timeout"),
        (requests.exceptions.ChunkedEncodingError, "connection broken mid-response"),
        (requests.exceptions.SSLError, "TLS error"),
        (requests.ConnectionError, "connection error"),
    ]
    kind = next((label for cls, label in kinds if isinstance(exc, cls)), type(exc).__name__)
    detail = str(exc)  # names hosts and reasons, never the request body
    return f"{kind}: {detail[:300]}" if detail else kind


def _default_user_agent() -> str:
    from .. import __version__

    return f"django-wxpay-close/{__version__} python-requests/{requests.__version__}"
