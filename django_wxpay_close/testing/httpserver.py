"""The simulator's HTTP side: a threaded HTTP/1.1 server whose every decision is the simulator's (`respond`).

It keeps connections alive as a web server's front end does, sends an answer in one write, can answer late,
hang up, or reset a connection mid-body, and lets the simulator cut every open connection when it stops.
"""

from __future__ import annotations

import selectors
import socket
import socketserver
import struct
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Protocol

from ..wechat import DEFAULT_MAX_BODY_BYTES

__all__ = ["HTML_CONTENT_TYPE", "Reply", "SimulatorHTTPServer", "XML_CONTENT_TYPE"]

XML_CONTENT_TYPE = "text/xml; charset=utf-8"
HTML_CONTENT_TYPE = "text/html; charset=utf-8"


@dataclass(frozen=True)
class Reply:
    """What the request handler sends; decided under the lock, sent outside it."""

    status: int | None  # None: send nothing and close the connection
    body: bytes = b""
    content_type: str = XML_CONTENT_TYPE
    delay: float = 0.0  # seconds to wait before sending
    reset_after: int | None = None  # send this many body bytes, then reset the connection


class Responder(Protocol):
    """What the server asks of the simulator; all under the simulator's lock, never while sleeping."""

    _stopping: threading.Event

    def _respond(self, method: str, target: str, body: bytes) -> Reply: ...

    def _track(self, connection: socket.socket) -> bool: ...

    def _untrack(self, connection: socket.socket) -> None: ...


class SimulatorHTTPServer(ThreadingHTTPServer):
    daemon_threads = True  # a hung client never keeps the process alive
    request_queue_size = 256  # benchmarks open many connections at once
    timeout = 0  # handle_request() is only called once a connection is pending: never wait in it

    def __init__(self, address: tuple[str, int], simulator: Responder) -> None:
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
    server: SimulatorHTTPServer

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

    def _send(self, reply: Reply) -> None:
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
