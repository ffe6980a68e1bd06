"""One signed POST over requests' public API: a kept-alive session, a size cap, an overall deadline per URL, and
failover to the next base URL when the first could not even be connected to.

Every API of the package (closeorder, orderquery) goes through `Transport.post`; nothing here knows what the
body means. It never raises for anything the network or the server can do: it returns a `TransportFailure`.
"""

from __future__ import annotations

import http.cookiejar
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import requests
import urllib3
from requests.adapters import HTTPAdapter

from .outcomes import Outcome

__all__ = ["Answer", "Delivery", "Transport", "TransportFailure"]

READ_CHUNK = 8192


@dataclass(frozen=True)
class Answer:
    """What came back from one URL: the HTTP status and the body, at most the size cap."""

    status: int
    body: bytes


@dataclass(frozen=True)
class TransportFailure:
    """Why no answer came back, and whether the request can have reached the server at all."""

    reason: str
    never_connected: bool = False
    outcome: Outcome = Outcome.NETWORK_ERROR


@dataclass(frozen=True)
class Delivery:
    """The outcome of `Transport.post`: the URL that answered (or was tried last) and what it gave."""

    url: str
    reply: Answer | TransportFailure
    failed_over_from: str | None = None  # the first URL that was never connected to, if any


class BodyTooLarge(Exception):
    """The answer grew past the size cap; reading stopped there."""


class Transport:
    """POSTs XML bodies to `{base}{path}` for each base URL in turn, over one `requests.Session`.

    A later base URL is used only when an earlier one could not even be connected to: a request that may have
    arrived, or any answer, is never sent elsewhere. Proxy and CA settings from the environment are resolved once,
    here, not per call; redirects are not followed and the adapter makes no retries of its own.
    """

    def __init__(
        self,
        base_urls: Sequence[str],
        *,
        connect_timeout: float,
        read_timeout: float,
        max_response_bytes: int,
        pool_size: int,
        user_agent: str,
    ) -> None:
        if not base_urls:
            raise ValueError("base_urls needs at least one URL")
        self.base_urls = tuple(url.rstrip("/") for url in base_urls)
        self.timeout = (connect_timeout, read_timeout)
        self.deadline = connect_timeout + read_timeout  # per URL, body download included
        self.max_response_bytes = max_response_bytes
        self.session = requests.Session()
        adapter = HTTPAdapter(pool_connections=len(self.base_urls), pool_maxsize=max(pool_size, 1), max_retries=0)
        self.session.mount("https://", adapter)
        self.session.mount("http://", adapter)
        # Only these headers: no Accept-Encoding, so the size cap counts the bytes WeChat sent, never a decompression.
        self.session.headers.clear()
        self.session.headers.update({"User-Agent": user_agent, "Content-Type": "text/xml; charset=utf-8"})
        # A cookie WeChat or a proxy sets is never sent back: every request stands alone.
        self.session.cookies.set_policy(http.cookiejar.DefaultCookiePolicy(allowed_domains=[]))
        self._send_options: dict[str, dict[str, Any]] = {}
        for base in self.base_urls:
            resolved = self.session.merge_environment_settings(base + "/", {}, None, None, None)
            self._send_options[base] = {key: resolved[key] for key in ("proxies", "verify", "cert")}
        self.session.trust_env = False
        self._prepared: dict[str, requests.PreparedRequest] = {}  # by URL, without a body

    def close(self) -> None:
        """Close the kept-alive connections; a later `post` opens new ones."""
        self.session.close()

    def post(self, path: str, body: bytes) -> Delivery:
        failed_over_from: str | None = None
        for index, base in enumerate(self.base_urls):
            url = base + path
            reply = self._attempt(url, body, self._send_options[base])
            if isinstance(reply, TransportFailure) and reply.never_connected and index + 1 < len(self.base_urls):
                failed_over_from = failed_over_from or url
                continue
            return Delivery(url, reply, failed_over_from)
        raise AssertionError("unreachable: the last URL always returns")

    def _attempt(self, url: str, body: bytes, options: dict[str, Any]) -> Answer | TransportFailure:
        deadline = time.monotonic() + self.deadline
        try:
            response = self.session.send(self._request(url, body), stream=True, timeout=self.timeout,
                                         allow_redirects=False, **options)
        except requests.RequestException as exc:
            return TransportFailure(_describe(exc), never_connected=_never_connected(exc))
        # Closing a response whose body was not read to its end drops its connection instead of reusing it.
        with response:
            try:
                return Answer(response.status_code, self._read_body(response, deadline))
            except requests.RequestException as exc:
                return TransportFailure(_describe(exc))
            except BodyTooLarge:
                return TransportFailure(f"response body exceeds the {self.max_response_bytes}-byte limit",
                                        outcome=Outcome.INVALID_RESPONSE)
            except TimeoutError as exc:
                return TransportFailure(str(exc))

    def _request(self, url: str, body: bytes) -> requests.PreparedRequest:
        """The URL's request as the session prepares it (method, URL, our headers), prepared once and copied
        per call with this body: requests' documented prepared-request path, without merging the session's
        settings again for every close."""
        template = self._prepared.get(url)
        if template is None:  # a URL requests refuses raises here, inside the caller's handling, on every call
            template = self._prepared[url] = self.session.prepare_request(requests.Request("POST", url))
        request = template.copy()
        request.prepare_body(body, None)
        return request

    def _read_body(self, response: requests.Response, deadline: float) -> bytes:
        """The body, read as it arrives, never past the size cap nor the deadline."""
        received = bytearray()
        while chunk := self._read_some(response.raw, deadline):
            received += chunk
            if len(received) > self.max_response_bytes:
                raise BodyTooLarge
        return bytes(received)

    def _read_some(self, raw: urllib3.BaseHTTPResponse, deadline: float) -> bytes:
        """What has arrived of the body (b"" at its end), waiting no longer than the deadline.

        `read1`, not `iter_content(8192)`: the latter waits until 8192 bytes have come, so a body trickled a byte
        at a time would hold the request far beyond its deadline. Each wait is bounded by the read timeout; when
        less than that is left, a timer shuts the socket at the deadline so the last wait ends there too.
        """
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(self._too_late())
        watchdog = None
        if remaining < self.timeout[1]:
            watchdog = threading.Timer(remaining, _shut_down, (raw,))
            watchdog.daemon = True
            watchdog.start()
        try:
            chunk = raw.read1(READ_CHUNK)
        except urllib3.exceptions.HTTPError as exc:
            if watchdog is not None and time.monotonic() >= deadline:  # the watchdog broke the connection
                raise TimeoutError(self._too_late()) from None
            raise _as_requests_error(exc) from exc
        finally:
            if watchdog is not None:
                watchdog.cancel()
        if not chunk and watchdog is not None and time.monotonic() >= deadline:
            raise TimeoutError(self._too_late())  # the watchdog's shutdown reads as the end of the body
        return chunk

    def _too_late(self) -> str:
        return f"response not complete within the {self.timeout[1]:g}s read timeout plus connect time"


def _shut_down(raw: urllib3.BaseHTTPResponse) -> None:
    """Unblock a read waiting past the deadline; the response is then closed, its connection not reused."""
    try:
        raw.shutdown()
    except (ValueError, RuntimeError, OSError):  # no socket (a mocked body), already released, already closed
        pass


def _as_requests_error(exc: urllib3.exceptions.HTTPError) -> requests.RequestException:
    """urllib3's errors while reading a body, as requests' own (what iter_content raises)."""
    if isinstance(exc, urllib3.exceptions.ReadTimeoutError):
        return requests.exceptions.ReadTimeout(exc)
    if isinstance(exc, urllib3.exceptions.DecodeError):
        return requests.exceptions.ContentDecodingError(exc)
    if isinstance(exc, urllib3.exceptions.SSLError):
        return requests.exceptions.SSLError(exc)
    return requests.exceptions.ChunkedEncodingError(exc)


def _never_connected(exc: requests.RequestException) -> bool:
    """True when the request cannot have reached the server (refused, unresolvable, connect timeout)."""
    if isinstance(exc, requests.ConnectTimeout):
        return True
    if isinstance(exc, requests.ConnectionError) and exc.args:
        reason = getattr(exc.args[0], "reason", None)
        return isinstance(reason, urllib3.exceptions.NewConnectionError)
    return False


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
