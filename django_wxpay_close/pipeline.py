"""How many closes run at once: database threads on either side of one event-loop thread for the network.

    starter threads ── claim check, sign, audit row ──▶ event loop: every request in flight at once
    recorder threads ◀── answer on the audit row and the order ──┘

A thread per request in flight (the obvious design) spends its CPU handing the GIL around once there are
dozens of them; here a few threads do the database work, which blocks, and one loop waits on the network
(docs/performance.md measures both). `concurrency` bounds the requests started and not yet answered, so
a crash leaves at most that many unfinished audit rows, each for a request that really went out.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Any, Generic, Protocol, TypeVar

from django.db import connections

from .wechat import CloseOrderClient, CloseResult, PreparedClose
from .wechat.async_sender import AsyncCloseSender

Job = TypeVar("Job")
Result = TypeVar("Result")

# Database threads per this many requests in flight, on each side of the loop. Sweeps of 4,000 orders at
# 32 workers and 50 ms, on PostgreSQL on two cores: one starter and one recorder 76-80 % of the latency
# limit, two of each 74-80 %, three 72 %, four 62-66 %: more threads mostly add database and GIL contention.
REQUESTS_PER_DATABASE_THREAD = 32


class Guard(Protocol[Result]):
    """Runs one order's step; an unexpected exception becomes that order's failed result (and a log line)."""

    def __call__(self, order: Any, step: Callable[[], Result | None]) -> Result | None: ...


@dataclass(frozen=True)
class Sending:
    """A started close: its audit row is written and its signed request is ready to go."""

    order: Any
    attempt: Any
    client: CloseOrderClient
    prepared: PreparedClose


class WorkerPool(Generic[Job, Result]):
    """Threads calling `handle(job)` in turn; each closes its database connections when it exits.

    `handle` returns the job's result for `on_result`, or None when something else reports it later.
    `order_of` names the order a job is about, for `guard`.
    """

    _STOP = object()

    def __init__(self, threads: int, handle: Callable[[Job], Result | None], on_result: Callable[[Result], None], *,
                 guard: Guard[Result], name: str, queue_size: int = 0,
                 order_of: Callable[[Job], Any] = lambda job: job) -> None:
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=queue_size)  # full: the submitter waits
        self._handle, self._on_result, self._guard, self._order_of = handle, on_result, guard, order_of
        self._threads = [threading.Thread(target=self._work, name=f"{name}-{n}", daemon=True) for n in range(threads)]
        for thread in self._threads:
            thread.start()

    def submit(self, job: Job) -> None:
        self._queue.put(job)

    def join(self) -> None:
        for _ in self._threads:
            self._queue.put(self._STOP)
        for thread in self._threads:
            thread.join()

    def _work(self) -> None:
        try:
            while (job := self._queue.get()) is not self._STOP:
                result = self._guard(self._order_of(job), lambda: self._handle(job))
                if result is not None:
                    self._on_result(result)
        finally:
            connections.close_all()


class ClosePipeline(Generic[Job, Result]):
    """Runs `start(job)`, sends what it started, then `record(answered(sending, result))`, `concurrency` at once.

    `start` returns a `Sending` to send, or the job's result when nothing is to be sent (skipped, say).
    `answered` runs in the loop's thread and must not touch the database; `record` does the writing.
    Use it as a context manager: leaving waits for every submitted job to be recorded.
    """

    def __init__(self, *, concurrency: int, start: Callable[[Job], Sending | Result],
                 answered: Callable[[Sending, CloseResult], Any], record: Callable[[Any], Result],
                 on_result: Callable[[Result], None], guard: Guard[Result]) -> None:
        self._concurrency = max(concurrency, 1)
        self._start, self._answered, self._on_result, self._guard = start, answered, on_result, guard
        self._in_flight = threading.BoundedSemaphore(self._concurrency)  # started, not yet answered
        # Answers waiting for their write: bounded too, so a slow database holds the starters back, not memory.
        self._unrecorded = threading.BoundedSemaphore(self._concurrency * 3)
        database_threads = -(-self._concurrency // REQUESTS_PER_DATABASE_THREAD)
        self._loop = asyncio.new_event_loop()
        # The blocking client's fallback (proxies aiohttp cannot use) needs a thread per request in flight.
        self._loop.set_default_executor(ThreadPoolExecutor(self._concurrency, thread_name_prefix="wxpay-send"))
        self._loop_thread = threading.Thread(target=self._loop.run_forever, name="wxpay-network", daemon=True)
        self._loop_thread.start()
        self._senders: dict[CloseOrderClient, AsyncCloseSender] = {}  # the loop's thread only
        self._tasks: set[asyncio.Task[None]] = set()  # the loop's thread only
        self._recorders: WorkerPool[Any, Result] = WorkerPool(  # unbounded queue: the loop must never wait
            database_threads, self._record, on_result, guard=guard, name="wxpay-record",
            order_of=lambda answered: answered.order,
        )
        self._record_answer = record
        self._starters: WorkerPool[Job, Result] = WorkerPool(
            database_threads, self._start_one, on_result, guard=guard, name="wxpay-start",
            queue_size=self._concurrency,
        )

    def __enter__(self) -> ClosePipeline[Job, Result]:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.join()

    def submit(self, job: Job) -> None:
        self._starters.submit(job)

    def join(self) -> None:
        """Wait until every submitted job is recorded, then stop the threads and the loop."""
        try:
            self._starters.join()
            asyncio.run_coroutine_threadsafe(self._drain(), self._loop).result()
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._loop_thread.join()
            self._loop.run_until_complete(self._loop.shutdown_default_executor())
            self._loop.close()
            self._recorders.join()

    # -- starter threads ---------------------------------------------------------------------

    def _start_one(self, job: Job) -> Result | None:
        self._unrecorded.acquire()
        self._in_flight.acquire()
        started: Sending | Result | None = None
        try:
            started = self._start(job)
        finally:
            if not isinstance(started, Sending):  # nothing to send, or start failed
                self._in_flight.release()
                self._unrecorded.release()
        if isinstance(started, Sending):
            self._loop.call_soon_threadsafe(self._spawn, started)
            return None
        return started

    # -- the loop's thread -------------------------------------------------------------------

    def _spawn(self, sending: Sending) -> None:
        task = self._loop.create_task(self._send(sending))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send(self, sending: Sending) -> None:
        try:
            result = await self._sender(sending.client).send(sending.prepared)
        except Exception as exc:  # a bug, not the network (the sender turns that into a result): report it
            failure = self._guard(sending.order, partial(_reraise, exc))
        else:
            failure = self._guard(sending.order, lambda: self._recorders.submit(self._answered(sending, result)))
        finally:
            self._in_flight.release()
        if failure is not None:
            self._unrecorded.release()
            self._on_result(failure)

    def _sender(self, client: CloseOrderClient) -> AsyncCloseSender:
        sender = self._senders.get(client)
        if sender is None:
            sender = self._senders[client] = AsyncCloseSender(client, concurrency=self._concurrency)
        return sender

    async def _drain(self) -> None:
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
        for sender in self._senders.values():
            await sender.aclose()

    # -- recorder threads --------------------------------------------------------------------

    def _record(self, answered: Any) -> Result:
        try:
            return self._record_answer(answered)
        finally:
            self._unrecorded.release()


def _reraise(exc: Exception) -> None:
    raise exc
