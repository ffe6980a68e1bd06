"""How many closes run at once: database threads on either side of one event-loop thread for the network.

    starter threads ── audit rows (after `start`'s checks) ──▶ event loop: every request in flight at once
    recorder threads ◀── answer on the audit row and the order ──┘

A thread per request in flight (the obvious design) spends its CPU handing the GIL around once there are
dozens of them; here a few threads do the database work, which blocks, and one loop waits on the network
(docs/performance.md measures both). Work that needs no request slot belongs before `submit`: the sweep
checks and signs each order in the thread that claims them. The starters also write a few audit rows ahead
of the free slots (one per `REQUESTS_PER_ROW_AHEAD` requests), so a slot freed by an answer is refilled by the
loop at once rather than after a round trip to the database and two thread hand-offs. `concurrency` bounds
the requests in flight; a crash leaves at most that many unfinished audit rows plus the rows written ahead,
whose requests had not left yet. A row written ahead whose close must not go out any more (its merchant
halted, the caller interrupted, its claim about to lapse) is completed as not sent, through `withdraw`.
"""

from __future__ import annotations

import asyncio
import collections
import logging
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

logger = logging.getLogger("django_wxpay_close")
Job = TypeVar("Job")
Result = TypeVar("Result")

# Database threads per this many requests in flight. A starter writes the audit rows of every slot freed
# since its last statement in one INSERT, so one keeps up with 32 requests; two starters only added
# contention (75-77 % of the latency limit against 79-81 %). A recorder writes one answer per round trip,
# which made one recorder the ceiling of a 32-worker sweep on PostgreSQL on two cores: 417-422 closes/s at
# zero latency against 498-509 with two, and 380-403 against 432-456 at 50 ms (alternated pairs).
REQUESTS_PER_STARTER = 32
REQUESTS_PER_RECORDER = 16
# Audit rows written ahead of a free slot, per this many requests in flight. A starter's round trip plus its
# two hand-offs took 8 of a slot's 65 ms at 32 workers and 50 ms on two cores; with rows ahead the loop
# refills a slot at once: 86-90 % -> 93-96 % of the latency limit in alternated pairs (docs/performance.md).
REQUESTS_PER_ROW_AHEAD = 4


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


class ClosePipeline(Generic[Job, Result]):
    """Runs `start(jobs)`, sends what it started, then `record(answered)`, with `concurrency` requests in flight.

    `start` gets the jobs waiting when a starter thread comes round (at most as many as there are free
    slots and rows still to write ahead, so the audit rows of a busy sweep go in one statement) and returns,
    for each, a `Sending` to send or the job's result when nothing is to be sent (skipped, say).
    `answered(sending, result)` runs in the loop's thread and must not touch the database; `record` does
    the writing, one answer per statement (writing queued answers together was slower: building one long
    statement holds the GIL against the loop, docs/performance.md).
    `withdraw(sending, interrupted)` runs in the loop's thread just before a started close is sent (its row
    may have been written a little ahead): None sends it; anything else is recorded instead of an answer.
    `interrupted` is true once the caller left on an exception: nothing more may be sent. `write_ahead`
    False: rows only for free slots (a row written ahead waits up to one exchange for its slot).
    `waiting` jobs may be queued before `submit` blocks: a sweep queues a claimed batch's worth and more,
    so the starter still has orders while the next batch is claimed. Use it as a context manager: leaving
    waits for every submitted job to be recorded; leaving on an exception (Ctrl-C, a failed claim) first
    drops the jobs not yet started, so nothing more is sent, and waits only for the requests in flight.
    """

    def __init__(self, *, concurrency: int, start: Callable[[list[Job]], list[Sending | Result]],
                 answered: Callable[[Sending, CloseResult], Any], withdraw: Callable[[Sending, bool], Any | None],
                 record: Callable[[Any], Result], on_result: Callable[[Result], None], guard: Guard[Result],
                 waiting: int, write_ahead: bool = True) -> None:
        self._concurrency = max(concurrency, 1)
        self._rows_ahead = -(-self._concurrency // REQUESTS_PER_ROW_AHEAD) if write_ahead else 0
        self._start, self._answered, self._withdraw, self._record = start, answered, withdraw, record
        self._on_result, self._guard = on_result, guard
        # Audit rows written and not yet answered (or withdrawn): what a crash can leave unfinished.
        self._started = threading.BoundedSemaphore(self._concurrency + self._rows_ahead)
        self._interrupted = False
        # Answers waiting for their write: bounded too, so a slow database holds the starters back, not memory.
        self._unrecorded = threading.BoundedSemaphore(self._concurrency * 3)
        self._loop = asyncio.new_event_loop()
        # The blocking client's fallback (proxies aiohttp cannot use) needs a thread per request in flight.
        self._loop.set_default_executor(ThreadPoolExecutor(self._concurrency, thread_name_prefix="wxpay-send"))
        self._loop_thread = threading.Thread(target=self._loop.run_forever, name="wxpay-network", daemon=True)
        self._loop_thread.start()
        self._senders: dict[CloseOrderClient, AsyncCloseSender] = {}  # the loop's thread only
        self._tasks: set[asyncio.Task[None]] = set()  # the loop's thread only
        self._to_send: collections.deque[Sending] = collections.deque()  # the loop's thread only: rows written
        self._sending = 0  # the loop's thread only: tasks holding one of the `concurrency` slots
        self._jobs: queue.Queue[Any] = queue.Queue(maxsize=max(waiting, 1))  # full: the submitter waits
        self._answers: queue.Queue[Any] = queue.Queue()  # unbounded (`_unrecorded` bounds it): the loop never waits
        self._starters = _threads(self._run_starter, "wxpay-start", -(-self._concurrency // REQUESTS_PER_STARTER))
        self._recorders = _threads(self._run_recorder, "wxpay-record", -(-self._concurrency // REQUESTS_PER_RECORDER))

    def __enter__(self) -> ClosePipeline[Job, Result]:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc_info: object) -> None:
        if exc_type is not None:
            self._interrupted = True  # the loop withdraws what it has not sent yet
            while _next_waiting(self._jobs) is not _NONE_WAITING:
                pass  # a claimed order dropped here keeps its claim until it lapses, as after a crash
        self.join()

    def submit(self, job: Job) -> None:
        self._jobs.put(job)

    def report(self, result: Result) -> None:
        """Hand a result on (also one the caller settled without sending); a failing observer (a closed
        stdout, say) must stop neither a thread of the pipeline nor the caller's loop."""
        try:
            self._on_result(result)
        except Exception:  # noqa: BLE001 - the close itself is done and recorded; only its report failed
            logger.exception("Reporting a close result failed")

    def join(self) -> None:
        """Wait until every submitted job is recorded, then stop the threads and the loop."""
        try:
            for _ in self._starters:
                self._jobs.put(_STOP)
            for thread in self._starters:
                thread.join()
            asyncio.run_coroutine_threadsafe(self._drain(), self._loop).result()
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._loop_thread.join()
            self._loop.run_until_complete(self._loop.shutdown_default_executor())
            self._loop.close()
            for _ in self._recorders:
                self._answers.put(_STOP)
            for thread in self._recorders:
                thread.join()

    # -- starter threads ---------------------------------------------------------------------

    def _run_starter(self) -> None:
        try:
            stopping = False
            while not stopping and (job := self._jobs.get()) is not _STOP:
                jobs, stopping = self._take_more([job])
                self._start_jobs(jobs)
        finally:
            connections.close_all()

    def _take_more(self, jobs: list[Job]) -> tuple[list[Job], bool]:
        """Slots for `jobs[0]` (waiting for them), then more queued jobs while slots are free and jobs wait.

        True as the second value when the stop marker came up: this thread stops after starting these.
        """
        self._unrecorded.acquire()
        self._started.acquire()
        while self._unrecorded.acquire(blocking=False):
            if not self._started.acquire(blocking=False):
                self._unrecorded.release()
                break
            job = _next_waiting(self._jobs)
            if job is _NONE_WAITING or job is _STOP:
                self._started.release()
                self._unrecorded.release()
                return jobs, job is _STOP
            jobs.append(job)
        return jobs, False

    def _start_jobs(self, jobs: list[Job]) -> None:
        if self._interrupted:  # dropped like the jobs still queued: no row, and the claims lapse
            for _ in jobs:
                self._started.release()
                self._unrecorded.release()
            return
        try:
            started = self._start(jobs)
        except Exception as exc:  # noqa: BLE001 - `start` isolates orders itself; this is a bug around it
            started = [self._guard(job, partial(_reraise, exc)) for job in jobs]  # type: ignore[misc]
        sending = [item for item in started if isinstance(item, Sending)]
        if sending:
            self._loop.call_soon_threadsafe(self._spawn_all, sending)
        for item in started:
            if not isinstance(item, Sending):
                self._started.release()
                self._unrecorded.release()
                if item is not None:
                    self.report(item)

    # -- the loop's thread -------------------------------------------------------------------

    def _spawn_all(self, started: list[Sending]) -> None:
        self._to_send.extend(started)
        self._fill_slots()

    def _fill_slots(self) -> None:
        while self._to_send and self._sending < self._concurrency:
            self._sending += 1
            task = self._loop.create_task(self._send(self._to_send.popleft()))
            self._tasks.add(task)
            task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            # `_send` hands every failure to the guard; only a guard (or a logger) that itself fails gets here.
            logger.error("A close's send task failed outside its guard", exc_info=exc)

    async def _send(self, sending: Sending) -> None:
        # A task spawned by `_fill_slots` takes its first step only after the task that freed the slot has
        # decided its answer, so a halt decided there is seen by `withdraw` here.
        try:
            try:
                if (instead := self._withdraw(sending, self._interrupted)) is None:
                    result = await self._sender(sending.client).send(sending.prepared)
            finally:
                self._sending -= 1
                self._fill_slots()
            failure = self._guard(sending.order, lambda: self._answers.put(
                self._answered(sending, result) if instead is None else instead))
        except Exception as exc:  # a bug, not the network (the sender turns that into a result): report it
            failure = self._guard(sending.order, partial(_reraise, exc))
        finally:
            self._started.release()
        if failure is not None:
            self._unrecorded.release()
            self.report(failure)

    def _sender(self, client: CloseOrderClient) -> AsyncCloseSender:
        sender = self._senders.get(client)
        if sender is None:
            sender = self._senders[client] = AsyncCloseSender(client, concurrency=self._concurrency)
        return sender

    async def _drain(self) -> None:
        # Every task was spawned before this runs (call_soon_threadsafe keeps order). Done tasks leave the set
        # here, not only through their done callback: from Python 3.12 on, gather() over tasks that are all
        # done returns without yielding to the loop, so a callback still queued would never run.
        while self._tasks:
            tasks = list(self._tasks)
            await asyncio.gather(*tasks, return_exceptions=True)
            self._tasks.difference_update(tasks)
        for sender in self._senders.values():
            await sender.aclose()

    # -- recorder threads --------------------------------------------------------------------

    def _run_recorder(self) -> None:
        try:
            while (answered := self._answers.get()) is not _STOP:
                result = self._guard(answered.order, lambda: self._record(answered))
                self._unrecorded.release()
                if result is not None:
                    self.report(result)
        finally:
            connections.close_all()


_STOP, _NONE_WAITING = object(), object()


def _next_waiting(items: queue.Queue[Any]) -> Any:
    try:
        return items.get_nowait()
    except queue.Empty:
        return _NONE_WAITING


def _threads(target: Callable[[], None], name: str, count: int) -> list[threading.Thread]:
    threads = [threading.Thread(target=target, name=f"{name}-{n}", daemon=True) for n in range(count)]
    for thread in threads:
        thread.start()
    return threads


def _reraise(exc: Exception) -> None:
    raise exc
