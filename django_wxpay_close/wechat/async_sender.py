"""Many closeorder requests in flight on one thread: `CloseOrderClient.send`'s exchange over aiohttp.

Why a second transport: a sweep with a blocking client needs a thread per request in flight, and at 32 of
them the threads spend more CPU handing the GIL around than sending (docs/performance.md). One event loop
multiplexes them instead. Everything but the socket work is the client's own: the signed bytes, the
headers, the failover rule, the timeouts, the size cap and the reading of the answer (`client.exchange`),
so a close means the same whichever transport carried it.
"""

from __future__ import annotations

import asyncio
import os
import ssl
from typing import Any

import aiohttp
import certifi
from requests.utils import select_proxy

from .client import (
    Answer,
    BodyTooLarge,
    CloseOrderClient,
    CloseResult,
    PreparedClose,
    TransportFailure,
    body_too_large,
    deadline_passed,
    described,
)

__all__ = ["AsyncCloseSender"]

_READ_CHUNK = 8192


class AsyncCloseSender:
    """Sends `client`'s prepared requests from the running event loop, up to `concurrency` at once.

    Create, use and `aclose()` it in one event loop. Settings aiohttp cannot honour the way requests does
    (a SOCKS or HTTPS proxy, a client certificate) are not dropped: those requests go through the
    blocking client in the loop's thread pool instead.
    """

    def __init__(self, client: CloseOrderClient, *, concurrency: int) -> None:
        self.client = client
        self._routes: dict[str, dict[str, Any]] | None = _routes(client)
        self._session: aiohttp.ClientSession | None = None
        self._concurrency = max(concurrency, 1)

    @property
    def uses_event_loop(self) -> bool:
        """False when the environment's proxy or certificate settings send it through the blocking client."""
        return self._routes is not None

    async def send(self, prepared: PreparedClose) -> CloseResult:
        if self._routes is None:
            return await asyncio.get_running_loop().run_in_executor(None, self.client.send, prepared)
        exchange = self.client.exchange(prepared)
        url = next(exchange)
        while True:
            try:
                url = exchange.send(await self._attempt(url, prepared.body))
            except StopIteration as done:
                return done.value

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _open_session(self) -> aiohttp.ClientSession:
        connect, read = self.client.timeout
        return aiohttp.ClientSession(
            # One kept-alive connection per request in flight, as the blocking client's pool keeps per worker.
            connector=aiohttp.TCPConnector(limit=self._concurrency),
            headers=dict(self.client.session.headers),
            # `total` is per URL, body download included: the blocking client's deadline.
            timeout=aiohttp.ClientTimeout(total=self.client.deadline, sock_connect=connect, sock_read=read),
            cookie_jar=aiohttp.DummyCookieJar(),
            auto_decompress=False,  # as the blocking client: the body's bytes are parsed as they came
            trust_env=False,  # proxies and CA bundle were resolved from the environment once, by the client
        )

    async def _attempt(self, url: str, body: bytes) -> Answer | TransportFailure:
        assert self._routes is not None
        if self._session is None:
            self._session = self._open_session()
        try:
            return await self._post(url, body, self._routes[url])
        except BodyTooLarge:
            return body_too_large(self.client.max_response_bytes)
        except aiohttp.ConnectionTimeoutError as exc:
            return TransportFailure(described("connect timeout", exc), never_connected=True)
        except aiohttp.SocketTimeoutError as exc:
            return TransportFailure(described("read timeout", exc))
        except asyncio.TimeoutError:  # the deadline (TimeoutError itself from Python 3.11 on)
            return TransportFailure(deadline_passed(self.client.timeout[1]))
        except aiohttp.ClientSSLError as exc:
            return TransportFailure(described("TLS error", exc))
        except aiohttp.ClientConnectorError as exc:  # refused, unresolvable, unreachable: nothing was sent
            return TransportFailure(described("connection error", exc), never_connected=True)
        except aiohttp.ClientPayloadError as exc:
            return TransportFailure(described("connection broken mid-response", exc))
        except (aiohttp.ClientError, OSError) as exc:
            return TransportFailure(described("connection error", exc))

    async def _post(self, url: str, body: bytes, route: dict[str, Any]) -> Answer:
        assert self._session is not None
        async with self._session.post(url, data=body, allow_redirects=False, **route) as response:
            received = bytearray()
            while chunk := await response.content.read(_READ_CHUNK):
                received += chunk
                if len(received) > self.client.max_response_bytes:
                    raise BodyTooLarge
            return Answer(status=response.status, body=bytes(received))


def _routes(client: CloseOrderClient) -> dict[str, dict[str, Any]] | None:
    """aiohttp's `proxy` and `ssl` arguments per URL, from what requests resolved; None if it cannot match them."""
    routes = {}
    for url in client.urls:
        options = client.send_options(url)
        proxy = select_proxy(url, options.get("proxies") or {})
        if options.get("cert") or (proxy and not proxy.lower().startswith("http://")):
            return None
        routes[url] = {"proxy": proxy, "ssl": _tls_context(options.get("verify", True)) if url.startswith("https:") else True}
    return routes


def _tls_context(verify: bool | str) -> ssl.SSLContext | bool:
    """The CA bundle requests would use: certifi's, or REQUESTS_CA_BUNDLE's file or folder; False: no check."""
    if verify is False:
        return False
    if verify is True:
        return ssl.create_default_context(cafile=certifi.where())
    if os.path.isdir(verify):
        return ssl.create_default_context(capath=verify)
    return ssl.create_default_context(cafile=verify)
