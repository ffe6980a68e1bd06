"""The sweep's concurrent sender means the same as the blocking client: same bytes out, same reading of what comes back.

Everything here talks to real sockets on 127.0.0.1: the simulator, or a raw server that answers with bytes
chosen per test (a trickle, an oversized body, a redirect) and records what it received.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from django_wxpay_close.testing import API_KEY, APPID, MCH_ID, SUB_MCH_ID, Fault, WeChatPaySimulator
from django_wxpay_close.wechat import CloseOrderClient, CloseResult, Merchant, Outcome, PreparedClose
from django_wxpay_close.wechat.async_sender import AsyncCloseSender

from .raw_http import Answer as Reply
from .raw_http import RawHTTPServer

MERCHANT = Merchant(APPID, MCH_ID, SUB_MCH_ID, API_KEY)


@pytest.fixture
def raw_server() -> Iterator[Callable[..., RawHTTPServer]]:
    servers: list[RawHTTPServer] = []

    def start(reply: Reply, tls: ssl.SSLContext | None = None) -> RawHTTPServer:
        servers.append(RawHTTPServer(reply, tls))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def http_answer(status: str, body: bytes, *headers: str) -> Reply:
    def reply(connection: socket.socket) -> None:
        head = "\r\n".join([f"HTTP/1.1 {status}", f"Content-Length: {len(body)}", "Connection: close", *headers])
        connection.sendall(head.encode() + b"\r\n\r\n" + body)

    return reply


def send_concurrently(client: CloseOrderClient, prepared: list[PreparedClose]) -> list[CloseResult]:
    async def run() -> list[CloseResult]:
        sender = AsyncCloseSender(client, concurrency=len(prepared))
        try:
            return list(await asyncio.gather(*(sender.send(request) for request in prepared)))
        finally:
            await sender.aclose()

    return asyncio.run(run())


def send_one(client: CloseOrderClient, out_trade_no: str = "ORDER-1") -> CloseResult:
    return send_concurrently(client, [client.prepare(out_trade_no)])[0]


def kind(reason: str) -> str:
    return reason.split(":")[0]


FAULTS = [None, Fault.ORDERPAID, Fault.ORDERCLOSED, Fault.SYSTEMERROR, Fault.SIGNERROR, Fault.RETURN_FAIL,
          Fault.DROP_CONNECTION, Fault.RESET_CONNECTION, Fault.HTTP_502, Fault.BAD_SIGNATURE, Fault.UNSIGNED,
          Fault.MALFORMED_BODY]


@pytest.mark.parametrize("fault", FAULTS, ids=lambda fault: fault.value if fault else "SUCCESS")
def test_every_answer_and_fault_means_what_it_means_to_the_blocking_client(fault: Fault | None) -> None:
    with WeChatPaySimulator(unknown_orders="open") as simulator:
        with CloseOrderClient(MERCHANT, base_urls=[simulator.base_url], read_timeout=2) as client:
            results = []
            for send, number in ((client.close_order, "BLOCKING-1"), (lambda n: send_one(client, n), "LOOP-1")):
                if fault:
                    simulator.inject(fault)
                results.append(send(number))
    blocking, concurrent = results
    assert (concurrent.outcome, concurrent.http_status, concurrent.signature_verified, kind(concurrent.reason)) == (
        blocking.outcome, blocking.http_status, blocking.signature_verified, kind(blocking.reason))


def test_the_request_bytes_and_headers_are_the_blocking_clients(raw_server: Callable[..., RawHTTPServer]) -> None:
    server = raw_server(http_answer("200 OK", b"<xml></xml>"))
    with CloseOrderClient(MERCHANT, base_urls=[server.url]) as client:
        prepared = client.prepare("ORDER-1")
        send_concurrently(client, [prepared])
        client.send(prepared)
    concurrent, blocking = (request.partition(b"\r\n\r\n") for request in server.requests)
    assert concurrent[2] == blocking[2] == prepared.body

    def headers(head: bytes) -> dict[str, str]:
        lines = head.decode().split("\r\n")
        return {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines[1:])}

    assert headers(concurrent[0]) == headers(blocking[0])
    assert concurrent[0].split(b"\r\n")[0] == b"POST /pay/closeorder HTTP/1.1"


def test_many_requests_are_in_flight_at_once_from_one_thread() -> None:
    with WeChatPaySimulator(unknown_orders="open", latency=0.5) as simulator:
        with CloseOrderClient(MERCHANT, base_urls=[simulator.base_url]) as client:
            results = send_concurrently(client, [client.prepare(f"ORDER-{n}") for n in range(20)])
        arrivals = sorted(request.received_at for request in simulator.requests)
    assert {result.outcome for result in results} == {Outcome.CLOSED}
    assert arrivals[-1] - arrivals[0] < 0.5, "a request waited for another's answer before it was sent"


def test_an_oversized_answer_is_invalid_response(raw_server: Callable[..., RawHTTPServer]) -> None:
    server = raw_server(http_answer("200 OK", b"<xml>" + b"x" * 5000 + b"</xml>"))
    with CloseOrderClient(MERCHANT, base_urls=[server.url], max_response_bytes=1000) as client:
        result = send_one(client)
    assert result.outcome is Outcome.INVALID_RESPONSE and "1000-byte limit" in result.reason


def test_an_answer_still_trickling_in_at_the_deadline_is_network_error(raw_server: Callable[..., RawHTTPServer]) -> None:
    def trickle(connection: socket.socket) -> None:
        connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n")
        for _ in range(100):
            time.sleep(0.05)
            connection.sendall(b"x")

    server = raw_server(trickle)
    with CloseOrderClient(MERCHANT, base_urls=[server.url], connect_timeout=0.2, read_timeout=0.4) as client:
        started = time.monotonic()
        result = send_one(client)
    assert result.outcome is Outcome.NETWORK_ERROR and "read timeout plus connect time" in result.reason
    assert time.monotonic() - started < 2


def test_a_silent_server_is_a_read_timeout(raw_server: Callable[..., RawHTTPServer]) -> None:
    server = raw_server(lambda connection: time.sleep(1.5))
    with CloseOrderClient(MERCHANT, base_urls=[server.url], read_timeout=0.3) as client:
        result = send_one(client)
    assert result.outcome is Outcome.NETWORK_ERROR and kind(result.reason) == "read timeout"


def test_a_redirect_is_not_followed(raw_server: Callable[..., RawHTTPServer]) -> None:
    server = raw_server(http_answer("302 Found", b"", "Location: http://127.0.0.1:9/elsewhere"))
    with CloseOrderClient(MERCHANT, base_urls=[server.url]) as client:
        result = send_one(client)
    assert (result.outcome, result.http_status, len(server.requests)) == (Outcome.INVALID_RESPONSE, 302, 1)


def unused_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_a_refused_primary_fails_over_to_the_next_url() -> None:
    refused = f"http://127.0.0.1:{unused_port()}"
    with WeChatPaySimulator(unknown_orders="open") as simulator:
        with CloseOrderClient(MERCHANT, base_urls=[refused, simulator.base_url]) as client:
            result = send_one(client)
    assert result.outcome is Outcome.CLOSED
    assert result.failed_over_from == refused + "/pay/closeorder" and result.url.startswith(simulator.base_url)


def test_a_read_timeout_does_not_fail_over(raw_server: Callable[..., RawHTTPServer]) -> None:
    silent = raw_server(lambda connection: time.sleep(1.5))
    with WeChatPaySimulator(unknown_orders="open") as simulator:
        with CloseOrderClient(MERCHANT, base_urls=[silent.url, simulator.base_url], read_timeout=0.3) as client:
            result = send_one(client)
        assert simulator.requests == []
    assert result.outcome is Outcome.NETWORK_ERROR and result.failed_over_from is None


def test_an_http_proxy_from_the_environment_is_used(raw_server: Callable[..., RawHTTPServer],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    proxy = raw_server(http_answer("200 OK", b"<xml></xml>"))
    monkeypatch.setenv("HTTP_PROXY", proxy.url)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    with CloseOrderClient(MERCHANT, base_urls=["http://wechat.invalid"]) as client:
        sender = AsyncCloseSender(client, concurrency=1)
        send_one(client)
    assert sender.uses_event_loop
    assert proxy.requests[0].startswith(b"POST http://wechat.invalid/pay/closeorder HTTP/1.1\r\n")


def test_a_socks_proxy_sends_through_the_blocking_client_rather_than_around_the_proxy(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "socks5://127.0.0.1:1080")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    with CloseOrderClient(MERCHANT, base_urls=["https://api.mch.weixin.qq.com"]) as client:
        sent: list[Any] = []
        monkeypatch.setattr(client, "send", lambda prepared: sent.append(prepared) or "blocking")
        sender = AsyncCloseSender(client, concurrency=1)
        prepared = client.prepare("ORDER-1")

        async def send() -> Any:
            return await sender.send(prepared)

        assert not sender.uses_event_loop
        assert asyncio.run(send()) == "blocking" and sent == [prepared]


@pytest.fixture(scope="module")
def self_signed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ssl.SSLContext]:
    """A certificate for 127.0.0.1 that no CA bundle trusts, and a server context that presents it."""
    if not shutil.which("openssl"):
        pytest.skip("needs the openssl command to make a certificate")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    return cert, context


def test_https_is_verified_against_the_ca_bundle_requests_would_use(raw_server: Callable[..., RawHTTPServer],
                                                                    self_signed: tuple[Path, ssl.SSLContext],
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    cert, context = self_signed
    server = raw_server(http_answer("200 OK", b"<xml></xml>"), context)
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(cert))
    with CloseOrderClient(MERCHANT, base_urls=[server.url]) as client:
        concurrent, blocking = send_one(client), client.close_order("ORDER-2")
    assert concurrent.http_status == blocking.http_status == 200 and len(server.requests) == 2


def test_an_untrusted_certificate_is_a_tls_error_and_nothing_is_sent(raw_server: Callable[..., RawHTTPServer],
                                                                    self_signed: tuple[Path, ssl.SSLContext],
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    server = raw_server(http_answer("200 OK", b"<xml></xml>"), self_signed[1])
    monkeypatch.delenv("REQUESTS_CA_BUNDLE", raising=False)
    monkeypatch.delenv("CURL_CA_BUNDLE", raising=False)
    with CloseOrderClient(MERCHANT, base_urls=[server.url]) as client:
        concurrent, blocking = send_one(client), client.close_order("ORDER-2")
    assert kind(concurrent.reason) == kind(blocking.reason) == "TLS error"
    assert concurrent.outcome is blocking.outcome is Outcome.NETWORK_ERROR and server.requests == []
