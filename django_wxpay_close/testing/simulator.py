"""A loopback WeChat Pay Global server for tests, demos and benchmarks.

It answers `POST /pay/closeorder` and `POST /pay/orderquery` the way WeChat does (docs/protocol.md) from an
in-memory order table, signs with the shared `wechat.signing` module and can misbehave on demand (`Fault`), so the
client and everything built on it run end to end over real sockets without reaching WeChat. It also plays WeChat's
notifying side (`notifier.NotifyingSide`): `notify()` marks an order paid and POSTs a signed payment result
notification to a loopback URL. It imports nothing from Django.
"""

from __future__ import annotations

import contextlib
import itertools
import socket
import threading
from collections import Counter
from collections.abc import Iterable, Mapping
from types import TracebackType

from .answering import DEFAULT_FEE_TYPE, DEFAULT_TOTAL_FEE, AnsweringSide, RecordedRequest
from .httpserver import SimulatorHTTPServer
from .notifier import NotifyingSide
from .scenarios import (
    API_KEY,
    APPID,
    MCH_ID,
    REQUIRED_FIELDS,
    SUB_MCH_ID,
    Api,
    Fault,
    FaultRule,
    OrderKey,
    OrderState,
    Payment,
    UnknownOrders,
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
    "Payment",
    "RecordedRequest",
    "UnknownOrders",
    "WeChatPaySimulator",
]

class WeChatPaySimulator(AnsweringSide, NotifyingSide):
    """A threaded HTTP server on 127.0.0.1 that plays WeChat Pay's closeorder and orderquery endpoints.

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
        self._amounts: dict[OrderKey, tuple[int, str]] = {}
        self._payments: dict[OrderKey, Payment] = {}
        self._faults: list[FaultRule] = []
        self._log: list[RecordedRequest] = []
        self._request_counts: dict[Api, Counter[OrderKey]] = {"closeorder": Counter(), "orderquery": Counter()}
        self._request_counts_by_number: dict[Api, Counter[str]] = {"closeorder": Counter(), "orderquery": Counter()}
        self._connections: set[socket.socket] = set()
        self._connections_opened = 0
        self._stopping = threading.Event()
        self._server: SimulatorHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._last_notification: bytes | None = None
        self._transaction_numbers = itertools.count(1)

    # -- lifecycle -----------------------------------------------------------------------------------

    def start(self) -> WeChatPaySimulator:
        if self._server is not None or self._stopping.is_set():
            raise RuntimeError("a simulator starts once; create a new one")
        self._server = SimulatorHTTPServer(self.address, self)
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
        self,
        out_trade_no: str,
        *,
        mch_id: str,
        sub_mch_id: str,
        state: OrderState | str = OrderState.NOTPAY,
        total_fee: int = DEFAULT_TOTAL_FEE,
        fee_type: str = DEFAULT_FEE_TYPE,
    ) -> OrderKey:
        """Create (or overwrite) one order of `total_fee` in `fee_type`: the payment a query reports once it is
        PAID or REFUND (unless `notify()` recorded another)."""
        key = OrderKey(mch_id, sub_mch_id, out_trade_no)
        with self._lock:
            self._orders[key] = OrderState(state)
            self._amounts[key] = (total_fee, fee_type)
            self._payments.pop(key, None)
        return key

    def add_orders(
        self,
        out_trade_nos: Iterable[str],
        *,
        mch_id: str,
        sub_mch_id: str,
        state: OrderState | str = OrderState.NOTPAY,
    ) -> None:
        """Create many orders of one sub-merchant (of the default amount) under a single lock acquisition."""
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

    def payment(self, out_trade_no: str, *, mch_id: str, sub_mch_id: str) -> Payment | None:
        """What a query reports as paid for this order (its transaction_id, amount, time), None if not paid."""
        key = OrderKey(mch_id, sub_mch_id, out_trade_no)
        with self._lock:
            state = self._orders.get(key)
            return self._payment_of(key) if state is not None and state.is_paid else None

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
        api: Api = "closeorder",
    ) -> FaultRule:
        """Misbehave for the next `times` valid `api` requests (None: always) for `out_trade_no` (None: any).

        Faults replace the answer to a correctly signed request only; an invalid request gets WeChat's normal
        refusal and uses up no fault. The earliest injected matching rule wins. `delay` (seconds) comes on
        top of the global latency for any fault. `apply` is for DELAY only (see `Fault.DELAY`; default True).
        """
        fault = Fault(fault)
        if api not in REQUIRED_FIELDS:
            raise ValueError(f"api must be 'closeorder' or 'orderquery', not {api!r}")
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
            apply=fault is Fault.DELAY and apply is not False, err_code=err_code or fault.err_code, api=api,
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
        return self._requests_for("closeorder", out_trade_no)

    def close_request_counts(self) -> dict[OrderKey, int]:
        """POST /pay/closeorder bodies received per order key (valid or not), e.g. to assert at most one each."""
        with self._lock:
            return dict(self._request_counts["closeorder"])

    def query_requests_for(self, out_trade_no: str) -> int:
        """How many POST /pay/orderquery bodies named this out_trade_no (any merchant, valid or not)."""
        return self._requests_for("orderquery", out_trade_no)

    def query_request_counts(self) -> dict[OrderKey, int]:
        """POST /pay/orderquery bodies received per order key (valid or not)."""
        with self._lock:
            return dict(self._request_counts["orderquery"])

    def _requests_for(self, api: Api, out_trade_no: str) -> int:
        with self._lock:
            return self._request_counts_by_number[api][out_trade_no]

    def reset_log(self) -> None:
        with self._lock:
            self._log.clear()
            for api in REQUIRED_FIELDS:
                self._request_counts[api].clear()
                self._request_counts_by_number[api].clear()

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
