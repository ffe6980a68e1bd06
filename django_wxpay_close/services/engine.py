"""The engine: one order from the claim to the wire and back. The sweep, the admin actions, `close_order` and
`check_orders` all run on it. What it sends for an order is a close, or a query when the order's last close could
not tell where it stands (`needs_query`) or when the caller asks WeChat (`query`).

In each process one thread (the caller's) does all the database work and a pool of workers does only HTTP:
1. claim: one transaction takes a batch of due orders (SELECT … FOR UPDATE SKIP LOCKED, then one UPDATE that
   moves each order's `due_at` to its lease's expiry, on the database's clock) and writes the batch's audit
   rows (one bulk INSERT), after settling as abandoned the rows a lapsed claim left unfinished;
2. send: the committed batch goes to the pool; a worker sends a request only while its lease still covers a
   whole exchange, and never for a merchant halted meanwhile or once the run is stopping;
3. record: as answers come back, this thread writes them together, once half the workers' worth are in or the
   first has waited WRITE_AFTER: the orders first (one UPDATE per group of equal decisions, conditional on our
   claim and on the open state), then the audit rows (one UPDATE that gives each row its own answer); when that
   cannot be committed, one answer per transaction (the statements of both are in recording.py).
At most 3 x workers orders are claimed and unanswered at once (one request per worker, and up to two batches
of `workers` waiting behind them): a kill leaves no more unfinished rows than that, and the next close of each of
those orders settles them.

These functions must not run inside `transaction.atomic()`: a rollback of the caller's transaction would
erase audit rows of requests that really went out. They raise `TransactionManagementError` if called that way.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any, TypeVar

from django.db import InterfaceError, OperationalError, connections, transaction
from django.db.models import F, QuerySet
from django.db.models.functions import Now
from django.utils.translation import gettext_noop

from ..conf import CloseSettings
from ..models import CloseAttempt, Order, OrderState, write_database
from ..reports import CloseAction, CloseReport
from ..wechat import QueryResult
from .decisions import QueryPurpose, decide, decide_query, release
from .guards import DatabaseUnavailable, first_ctrl_c_calls, require_autocommit, with_database
from .jobs import Answer, Job, Unsendable, Verdict, answered, failed, order_result, prepare, unwritten
from .judgement import MERCHANT_HALTED, Judgement
from .recording import record_failure, release_unsent, write_answer, write_together

logger = logging.getLogger("django_wxpay_close")
T = TypeVar("T")

ABANDONED = gettext_noop("no answer was recorded: the process stopped or lost its database")
STOPPING = gettext_noop("not sent: the run was stopping")
# Claimed and unanswered orders: a new batch (at least `workers` orders) is claimed when fewer than REFILL_BELOW x
# workers are left, up to MAX_UNFINISHED x workers: a worker never waits for a claim, a claim is large enough to be
# cheap per order, and a kill leaves a bounded number of rows.
REFILL_BELOW = 2
MAX_UNFINISHED = 3
# Answers are written together once half the workers' worth have come back, or once the oldest has waited this
# long: fewer, larger transactions when answers trickle in (a few workers, a slow WeChat), at most this much later.
WRITE_AFTER = 0.05


class Engine:
    """One caller's requests: settings, the claim token, the judgement, and the pool.

    `query` makes every request an orderquery with that purpose; `chosen` closes every order (a person or the
    shop's code chose to close them); otherwise each order gets what it needs next (`needs_query`).
    """

    def __init__(self, settings: CloseSettings, *, trigger: str, user: Any = None, workers: int = 1,
                 query: QueryPurpose | None = None, chosen: bool = False, report: CloseReport | None = None) -> None:
        self.settings = settings
        self.query = query
        self.chosen = chosen
        self.trigger = trigger
        self.user = user if getattr(user, "pk", None) is not None else None
        self.actor = self.user.get_username() if self.user is not None else ""
        self.db = write_database()
        self.token = uuid.uuid4()  # every claim of this run carries it
        self.workers = max(workers, 1)
        self.judgement = Judgement()
        self.database_error = ""
        self.interrupted = False  # Ctrl-C: claim nothing more, send nothing more, record what is in flight
        self.claiming_failed = ""  # a bug in claiming would repeat for every order: the run stops
        self.failed_claims: set[int] = set()  # orders whose claim cannot be written: not tried again this run
        self.report = report or CloseReport()
        self._unwritten: list[Verdict | Answer] = []
        # Never claimed again by this run (with the orders it gave back, which keep its token): those whose answers
        # are not written yet (taken over and due again meanwhile, the pending answer would pass for the new
        # claim's), and those another claim took over.
        self._awaited: set[int] = set()
        self._taken_over: set[int] = set()
        self._first_unwritten_at = 0.0  # time.monotonic() when the oldest of them was taken

    def require_autocommit(self) -> None:
        require_autocommit(self.db)

    def _interrupt(self) -> None:
        self.interrupted = True

    def purpose_for(self, order: Order) -> QueryPurpose | None:
        if self.query is not None:
            return self.query
        return QueryPurpose.SETTLE if order.needs_query and not self.chosen else None

    @property
    def stopping(self) -> str:
        if self.database_error or self.judgement.unreachable or self.interrupted or self.claiming_failed:
            return STOPPING
        return ""

    # -- 1. claim ---------------------------------------------------------------------------------------

    def claim(self, candidates: QuerySet[Order], size: int, **values: Any) -> tuple[list[Job], list[Order]]:
        """Claim up to `size` orders of `candidates` and write their audit rows, in one transaction.

        Returns the jobs ready to send and every order claimed (those found unsendable are settled in the same
        transaction). Retried whole after a lost connection: a claim that committed before its acknowledgement
        was lost holds its orders until their leases lapse, and the next close of each settles its row.
        """
        lease_ends = time.monotonic() + self.settings.claim_timeout.total_seconds()
        selected: list[Order] = []
        if self._awaited or self._taken_over:
            candidates = candidates.exclude(pk__in=self._awaited | self._taken_over)

        def step() -> tuple[list[Job], list[Order], list[Unsendable]]:
            with transaction.atomic(using=self.db):
                # The rows stay locked until this transaction ends, so what they were chosen by still holds.
                orders = list(candidates.select_for_update(skip_locked=True)[:size])
                selected[:] = orders
                if not orders:
                    return [], [], []
                Order.objects.using(self.db).filter(pk__in=[order.pk for order in orders]).update(
                    claim_token=self.token, in_flight=True, due_at=Now() + self.settings.claim_timeout, **values)
                lapsed = [order.pk for order in orders if order.in_flight]
                for order in orders:  # as the claim left them (a fresh retry budget, say): answers are decided on it
                    for name, value in values.items():
                        setattr(order, name, value)
                if lapsed:  # rows an earlier holder left unfinished: no answer will come for them now
                    CloseAttempt.objects.using(self.db).filter(order__in=lapsed).complete(reason=ABANDONED)
                jobs: list[Job] = []
                unsendable: list[Unsendable] = []
                for order in orders:
                    prepared = prepare(order, self, lease_ends)
                    if isinstance(prepared, Job):
                        jobs.append(prepared)
                    else:
                        unsendable.append(prepared)
                self._write_rows(jobs)
                for problem in unsendable:  # given back, backed off or on hold
                    Order.objects.using(self.db).filter(pk=problem.order.pk).update(**release(**problem.values))
            return jobs, orders, unsendable

        try:
            jobs, orders, unsendable = with_database(self.db, step)
        except DatabaseUnavailable:
            raise
        except Exception as exc:  # noqa: BLE001 - nothing of the batch was claimed or sent (rolled back)
            if not selected:
                raise
            if len(selected) > 1:  # find the order whose claim or row cannot be written: one at a time
                single = [self.claim(candidates.filter(pk=order.pk), 1, **values) for order in list(selected)]
                return ([job for jobs, _ in single for job in jobs],
                        [order for _, claimed in single for order in claimed])
            order = selected[0]
            logger.error("Claiming order %s failed unexpectedly; nothing was sent", order.out_trade_no, exc_info=exc,
                         extra={"order_id": order.pk, "out_trade_no": order.out_trade_no, "merchant": order.merchant})
            self.failed_claims.add(order.pk)
            self.report.add(order_result(order, CloseAction.FAILED, f"{type(exc).__name__}: {exc}"))
            return [], [order]
        for order in orders:
            order.claim_token, order.in_flight = self.token, True
        self._awaited.update(job.order.pk for job in jobs)
        for problem in unsendable:
            if problem.action is CloseAction.CONFIGURATION_ERROR:
                self.judgement.configuration_error(problem.order.merchant, problem.reason)
            self.report.add(order_result(problem.order, problem.action, problem.reason))
        return jobs, orders

    def _write_rows(self, jobs: list[Job]) -> None:
        rows = [job.attempt for job in jobs]
        if connections[self.db].features.can_return_rows_from_bulk_insert:
            CloseAttempt.objects.using(self.db).bulk_create(rows)
        else:  # the engine completes each row by its id: without RETURNING, insert one by one to learn them
            for row in rows:
                row.save(using=self.db)

    # -- 2. send (in the pool's workers: HTTP only, no database) ---------------------------------------

    def exchange(self, job: Job) -> Answer:
        try:
            why = self._why_not_send(job)
            if why:
                return Answer(job, not_sent=why)
            result = job.send()
            outlived_lease = time.monotonic() >= job.lease_ends
            spends_retry = self.judgement.learn(job.order.pk, job.order.merchant, result,
                                                outlived_lease=outlived_lease)
            return Answer(job, result, outlived_lease=outlived_lease, spends_retry=spends_retry)
        except Exception as exc:  # noqa: BLE001 - one order's bug must not stop the others
            return Answer(job, error=exc)

    def _why_not_send(self, job: Job) -> str:
        if self.stopping:
            return self.stopping
        if job.order.merchant in self.judgement.halted:
            return MERCHANT_HALTED
        lease_left = job.lease_ends - time.monotonic()
        if lease_left <= self.settings.longest_exchange.total_seconds():
            return (f"not sent: only {max(lease_left, 0):.1f}s of its claim was left when its turn came, less than "
                    "one exchange can take")
        return ""

    # -- 3. record ----------------------------------------------------------------------------------

    def take(self, answer: Answer) -> None:
        """Decide what an answer means for its order, to be written with the next few."""
        job, result = answer.job, answer.result
        if not self._unwritten:
            self._first_unwritten_at = time.monotonic()
        if result is None:
            self._unwritten.append(answer)
            return
        if isinstance(result, QueryResult):
            assert job.purpose is not None
            decision = decide_query(job.order, result, self.settings, spends_retry=answer.spends_retry,
                                    purpose=job.purpose)
        else:
            decision = decide(job.order, result, self.settings, spends_retry=answer.spends_retry)
        self._unwritten.append(Verdict(answer, decision))

    def give_back_retries(self) -> None:
        """The run judged WeChat unreachable: the retries its recent transport failures spent were not the
        order's doing. Called once every answer is written."""
        order_ids = self.judgement.given_back
        if order_ids and not self.database_error:
            Order.objects.using(self.db).filter(pk__in=order_ids, state=OrderState.OPEN, retry_count__gt=0).update(
                retry_count=F("retry_count") - 1)

    def write(self) -> None:
        """Write the answers taken so far, together; if that fails, one answer per transaction. An answer leaves
        the list only once it is committed, so an interrupted write is written again."""
        taken = [(item.answer if isinstance(item, Verdict) else item).job.order.pk for item in self._unwritten]
        self._write_taken()
        self._awaited.difference_update(taken)  # written, or logged for good: these may be claimed again

    def _write_taken(self) -> None:
        if self.database_error:  # the database stayed away: what cannot be written is logged, never dropped
            for item in self._unwritten:
                self._log_unwritten(item)
            self._unwritten.clear()
        if not self._unwritten:
            return
        if self._written_together(self._unwritten):
            self._unwritten.clear()
            return

        def one_by_one() -> None:
            while self._unwritten:
                item = self._unwritten[0]
                try:
                    self._write_one(item)
                except (OperationalError, InterfaceError):
                    raise  # reconnect, then go on from this answer
                except Exception as exc:  # noqa: BLE001 - one answer's write must not stop the others'
                    self._log_unwritten(item, exc)
                self._unwritten.pop(0)

        try:
            with_database(self.db, one_by_one)
        except DatabaseUnavailable as exc:
            self.database_error = self.database_error or str(exc)
            for item in self._unwritten:
                self._log_unwritten(item)
            self._unwritten.clear()

    def _written_together(self, pending: list[Verdict | Answer]) -> bool:
        """All these answers in one transaction; False (nothing written) when anything is off: a lost connection,
        a claim lost, a state moved, an order to be looked at on its own."""
        verdicts = [item for item in pending if isinstance(item, Verdict)]
        unsent = [item for item in pending if isinstance(item, Answer)]
        if any(item.error is not None for item in unsent):
            return False
        try:
            write_together(self.db, self.token, verdicts, unsent)
        except (OperationalError, InterfaceError) as exc:
            logger.warning("Lost the database connection (%s); writing the answers again one by one", exc)
            connections[self.db].close()
            return False
        except Exception:  # noqa: BLE001 - Regroup, or found out one by one: which answer cannot be written
            return False
        for verdict in verdicts:
            self._report(verdict.answer, verdict.decision.action, verdict.decision.reason)
        for answer in unsent:
            self.report.add(order_result(answer.job.order, CloseAction.SKIPPED, answer.not_sent,
                                          attempt=answer.job.attempt))
        return True

    def _write_one(self, item: Verdict | Answer) -> None:
        """One answer in its own transaction, reported once it is committed."""
        if isinstance(item, Verdict):
            action, reason = write_answer(self.db, self.token, item)
            if action is CloseAction.CLAIM_LOST:
                self._taken_over.add(item.answer.job.order.pk)
            self._report(item.answer, action, reason)
        elif item.error is not None:  # sending failed on our side (a bug)
            with transaction.atomic(using=self.db):
                reason = record_failure(item)
            self.report.add(failed(item, reason, item.error))
        else:
            with transaction.atomic(using=self.db):
                release_unsent(self.db, self.token, [item])
            self.report.add(order_result(item.job.order, CloseAction.SKIPPED, item.not_sent, attempt=item.job.attempt))

    def _report(self, answer: Answer, action: CloseAction, reason: str) -> None:
        self.report.add(answered(answer, action, reason))

    def _log_unwritten(self, item: Verdict | Answer, exc: BaseException | None = None) -> None:
        answer = item.answer if isinstance(item, Verdict) else item
        why = f"{type(exc).__name__}: {exc}" if exc is not None else self.database_error
        self.report.add(unwritten(answer, why, exc))

    # -- the loop -----------------------------------------------------------------------------------

    def run(self, next_batch: Callable[[int], list[Job] | None]) -> CloseReport:
        """Claim with `next_batch(size)` (None: nothing more to claim) while there is room, send through the
        pool, write the answers as they come. Ctrl-C: claim and send nothing more, write what is in flight."""
        in_flight: dict[Future[Answer], Job] = {}
        exhausted = False
        pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="wxpay-close")
        try:
            with first_ctrl_c_calls(self._interrupt):
                while True:
                    if not exhausted and not self.stopping and len(in_flight) < REFILL_BELOW * self.workers:
                        jobs = self._claimed(next_batch, MAX_UNFINISHED * self.workers - len(in_flight))
                        exhausted = jobs is None
                        for job in jobs or []:
                            in_flight[pool.submit(self.exchange, job)] = job
                        if jobs is not None and not in_flight:
                            continue  # every order claimed was unsendable: claim again
                    if not in_flight:
                        break
                    done, _ = wait(in_flight, timeout=self._write_due_in(), return_when=FIRST_COMPLETED)
                    for future in done:
                        self.take(future.result())
                        del in_flight[future]
                    if self._write_due_in() == 0 or not in_flight:
                        self.write()
                self.write()
                try:
                    with_database(self.db, self.give_back_retries)
                except DatabaseUnavailable as exc:
                    self.database_error = self.database_error or str(exc)
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
        self.report.halted_merchants.update(self.judgement.halted)
        self.report.stopped_early = self.judgement.unreachable or self.claiming_failed
        self.report.finish()
        if self.database_error:
            raise DatabaseUnavailable(self.database_error, self.report)
        if self.interrupted:
            raise KeyboardInterrupt
        return self.report

    def _write_due_in(self) -> float | None:
        """Seconds until the answers taken so far are to be written (0: now); None when there are none."""
        if not self._unwritten:
            return None
        if len(self._unwritten) * 2 >= self.workers:
            return 0
        return max(self._first_unwritten_at + WRITE_AFTER - time.monotonic(), 0)

    def _claimed(self, next_batch: Callable[[int], list[Job] | None], size: int) -> list[Job] | None:
        try:
            return next_batch(size)
        except DatabaseUnavailable as exc:
            self.database_error = self.database_error or str(exc)
            return None
        except Exception as exc:  # noqa: BLE001 - reported as the reason the run stopped early
            logger.error("Claiming orders failed unexpectedly", exc_info=exc)
            self.claiming_failed = f"claiming failed: {type(exc).__name__}: {exc}"
            return None

