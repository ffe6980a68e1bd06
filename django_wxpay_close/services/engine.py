"""The close engine: one order from the claim to the wire and back. The sweep, the admin action and
`close_order` all run on it.

In each process one thread (the caller's) does all the database work and a pool of workers does only HTTP:
1. claim: one transaction takes a batch of due orders (SELECT … FOR UPDATE SKIP LOCKED, then one UPDATE that
   moves each order's `due_at` to its lease's expiry, on the database's clock) and writes the batch's audit
   rows (one bulk INSERT), after settling as abandoned the rows a lapsed claim left unfinished;
2. send: the committed batch goes to the pool; a worker sends a request only while its lease still covers a
   whole exchange, and never for a merchant halted meanwhile or once the run is stopping;
3. record: as answers come back, this thread writes them a few per transaction: the orders first (one UPDATE
   per group of equal decisions, conditional on our claim and on the open state), then each audit row.
At most two batches (2 x workers orders) are claimed and unanswered at once: a kill leaves no more unfinished
rows than that, and the next close of each of those orders settles them.

These functions must not run inside `transaction.atomic()`: a rollback of the caller's transaction would
erase audit rows of requests that really went out. They raise `TransactionManagementError` if called that way.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from datetime import timedelta
from functools import lru_cache
from typing import Any, TypeVar

from django.db import InterfaceError, OperationalError, connections, transaction
from django.db.models import F, Q, QuerySet
from django.db.models.functions import Now
from django.utils import timezone
from django.utils.translation import gettext_noop

from .. import signals
from ..conf import CloseSettings, load_settings
from ..models import CloseAttempt, Order, OrderState, Trigger, stored_text, write_database
from ..reports import CloseAction, CloseReport, OrderCloseResult
from ..selectors import CLAIMED_ELSEWHERE, TOO_YOUNG, orders_due_for_closing, why_not_closable
from ..wechat import CloseOrderClient, CloseResult, InvalidRequestField, Merchant, Outcome, PreparedClose
from .decisions import Decision, decide, release
from .decisions import backoff as backoff_values
from .judgement import MERCHANT_HALTED, Judgement

logger = logging.getLogger("django_wxpay_close")
T = TypeVar("T")

ABANDONED = gettext_noop("no answer was recorded: the process stopped or lost its database")
STOPPING = gettext_noop("not sent: the run was stopping")
LATE_ANSWER = gettext_noop("answered after another close took the order over")
# Reconnect delays (seconds) after a lost database connection; then the database counts as unavailable.
DATABASE_RETRY_DELAYS = (0.2, 0.5, 1.0, 2.0, 4.0)
# Claimed and unanswered orders: a new batch is claimed when fewer than REFILL_BELOW x workers are left, up to
# MAX_UNFINISHED x workers (so a worker never waits for a claim, and a kill leaves a bounded number of rows).
REFILL_BELOW = 1.5
MAX_UNFINISHED = 2


class DatabaseUnavailable(Exception):
    """The database stayed away through every reconnect; `report` holds what the run did until then.

    Every answer that could not be written was logged at ERROR (out_trade_no, outcome, response body).
    """

    def __init__(self, message: str, report: CloseReport | None = None) -> None:
        super().__init__(message)
        self.report = report


@lru_cache(maxsize=64)
def _cached_client(merchant: Merchant, base_urls: tuple[str, ...], connect_timeout: float, read_timeout: float,
                   max_response_bytes: int, pool_size: int) -> CloseOrderClient:
    """One client (and so one connection pool) per merchant and endpoint settings, reused across calls."""
    return CloseOrderClient(merchant, base_urls=base_urls, connect_timeout=connect_timeout, read_timeout=read_timeout,
                            max_response_bytes=max_response_bytes, pool_size=pool_size)


def _audit_answer(result: CloseResult) -> dict[str, Any]:
    return {
        "url": result.url[:300],
        "failed_over_from": (result.failed_over_from or "")[:300],
        "duration_ms": round(result.elapsed * 1000),
        "http_status": result.http_status,
        "response_body": stored_text(result.response_body),
        "return_code": result.return_code[:16],
        "return_msg": result.return_msg[:128],
        "result_code": result.result_code[:16],
        "err_code": result.err_code[:32],
        "err_code_des": result.err_code_des[:128],
        "signature_verified": result.signature_verified,
        "outcome": result.outcome.value,
        "reason": result.reason,
    }


def _order_result(order: Order, action: CloseAction, reason: str = "", *, result: CloseResult | None = None,
                  attempt: CloseAttempt | None = None) -> OrderCloseResult:
    return OrderCloseResult(
        order_id=order.pk, out_trade_no=order.out_trade_no, merchant=order.merchant, action=action, reason=reason,
        outcome=result.outcome if result else None, attempt_id=attempt.pk if attempt else None,
        duration=result.elapsed if result else 0.0, url=result.url if result else "",
    )


@dataclass(frozen=True)
class _Job:
    """A claimed order whose audit row is committed and whose signed request is ready to leave."""

    order: Order
    attempt: CloseAttempt
    client: CloseOrderClient
    prepared: PreparedClose
    lease_ends: float  # time.monotonic() by which the lease has surely ended (measured from before the claim)


@dataclass(frozen=True)
class _Unsendable:
    """A claimed order whose request cannot be built or must not be sent: its UPDATE and what to report."""

    order: Order
    action: CloseAction
    reason: str
    values: dict[str, Any]


@dataclass(frozen=True)
class _Answer:
    """What a worker brings back: WeChat's answer, or why the request was not sent."""

    job: _Job
    result: CloseResult | None = None
    not_sent: str = ""
    outlived_lease: bool = False  # the exchange ended after the lease: another close may have the order now
    spends_retry: bool = False  # a failure spends one of the order's retries (the run's judgement)
    error: BaseException | None = None  # a bug in sending (the client never raises for the network's doing)


@dataclass(frozen=True)
class _Verdict:
    """An answer with what it means for its order, waiting to be written."""

    answer: _Answer
    decision: Decision


class _Engine:
    """One caller's closes: settings, the claim token, the judgement, and the pool."""

    def __init__(self, settings: CloseSettings, *, trigger: str, user: Any = None, workers: int = 1) -> None:
        self.settings = settings
        self.trigger = trigger
        self.user = user if getattr(user, "pk", None) is not None else None
        self.actor = self.user.get_username() if self.user is not None else ""
        self.db = write_database()
        self.token = uuid.uuid4()  # every claim of this run carries it
        self.workers = max(workers, 1)
        self.judgement = Judgement()
        self.database_error = ""
        self.interrupted = False  # Ctrl-C: claim nothing more, send nothing more, record what is in flight
        self.failed_claims: set[int] = set()  # orders whose claim cannot be written: not tried again this run
        self.report = CloseReport()
        self._unwritten: list[_Verdict | _Answer] = []

    @property
    def stopping(self) -> str:
        if self.database_error or self.judgement.unreachable or self.interrupted:
            return STOPPING
        return ""

    def require_autocommit(self) -> None:
        if transaction.get_connection(self.db).in_atomic_block:
            raise transaction.TransactionManagementError(
                "django_wxpay_close services send requests to WeChat and must run outside transaction.atomic(): "
                "a rollback would erase the audit rows of requests that really went out."
            )

    # -- the database, reconnected when its connection is lost -------------------------------------

    def with_database(self, step: Callable[[], T]) -> T:
        """Run `step` (one transaction, or a read); after a lost connection reconnect and run it again."""
        for delay in (*DATABASE_RETRY_DELAYS, None):
            try:
                return step()
            except (OperationalError, InterfaceError) as exc:
                connections[self.db].close()  # the next query opens a new connection
                if delay is None:
                    first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                    raise DatabaseUnavailable(f"the database is unavailable: {first_line}") from exc
                logger.warning("Lost the database connection (%s); reconnecting in %.1fs", exc, delay)
                time.sleep(delay)
        raise AssertionError("unreachable: the last try raises")

    # -- 1. claim ---------------------------------------------------------------------------------------

    def claim(self, candidates: QuerySet[Order], size: int, **values: Any) -> tuple[list[_Job], list[Order]]:
        """Claim up to `size` orders of `candidates` and write their audit rows, in one transaction.

        Returns the jobs ready to send and every order claimed (those found unsendable are settled in the same
        transaction). Retried whole after a lost connection: a claim that committed before its acknowledgement
        was lost holds its orders until their leases lapse, and the next close of each settles its row.
        """
        lease_ends = time.monotonic() + self.settings.claim_timeout.total_seconds()
        selected: list[Order] = []

        def step() -> tuple[list[_Job], list[Order], list[_Unsendable]]:
            with transaction.atomic(using=self.db):
                # The rows stay locked until this transaction ends, so what they were chosen by still holds.
                orders = list(candidates.select_for_update(skip_locked=True)[:size])
                selected[:] = orders
                if not orders:
                    return [], [], []
                Order.objects.using(self.db).filter(pk__in=[order.pk for order in orders]).update(
                    claim_token=self.token, in_flight=True, due_at=Now() + self.settings.claim_timeout, **values)
                lapsed = [order.pk for order in orders if order.in_flight]
                if lapsed:  # rows an earlier holder left unfinished: no answer will come for them now
                    CloseAttempt.objects.using(self.db).filter(order__in=lapsed).complete(reason=ABANDONED)
                jobs: list[_Job] = []
                unsendable: list[_Unsendable] = []
                for order in orders:
                    prepared = self._prepare(order, lease_ends)
                    (jobs if isinstance(prepared, _Job) else unsendable).append(prepared)  # type: ignore[arg-type]
                self._write_rows(jobs)
                for problem in unsendable:  # given back, backed off or on hold
                    Order.objects.using(self.db).filter(pk=problem.order.pk).update(**release(**problem.values))
            return jobs, orders, unsendable

        try:
            jobs, orders, unsendable = self.with_database(step)
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
            self.report.add(_order_result(order, CloseAction.FAILED, f"{type(exc).__name__}: {exc}"))
            return [], [order]
        for order in orders:
            order.claim_token, order.in_flight = self.token, True
        for problem in unsendable:
            if problem.action is CloseAction.CONFIGURATION_ERROR:
                self.judgement.configuration_error(problem.order.merchant, problem.reason)
            self.report.add(_order_result(problem.order, problem.action, problem.reason))
        return jobs, orders

    def _prepare(self, order: Order, lease_ends: float) -> _Job | _Unsendable:
        """Check and sign the order's request, or say why it cannot be sent."""
        problem = self._configuration_problem(order)
        if problem:
            spent, values = backoff_values(order, self.settings, spends_retry=True)
            return _Unsendable(order, CloseAction.PUT_ON_HOLD if spent else CloseAction.CONFIGURATION_ERROR, problem,
                               {"last_error": problem, "last_outcome": Outcome.CONFIGURATION_ERROR.value,
                                "on_hold": spent, **values})
        configured = self.settings.merchants[order.merchant].merchant
        client = _cached_client(configured, self.settings.base_urls, self.settings.connect_timeout,
                                self.settings.read_timeout, self.settings.max_response_bytes, self.workers)
        try:
            prepared = client.prepare(order.out_trade_no, sub_mch_id=order.sub_mch_id,
                                      sub_appid=order.sub_appid or None)
        except InvalidRequestField as exc:
            unbuildable = f"cannot build the request: {exc}"
            return _Unsendable(order, CloseAction.PUT_ON_HOLD, unbuildable,
                               {"last_error": unbuildable, "last_outcome": Outcome.CLIENT_BUG.value, "on_hold": True})
        attempt = CloseAttempt(
            order=order, merchant=order.merchant, mch_id=order.mch_id, sub_mch_id=order.sub_mch_id,
            out_trade_no=order.out_trade_no, trigger=self.trigger, user=self.user, actor=self.actor,
            url=client.urls[0], sign_type=prepared.sign_type.value, request_xml=prepared.body.decode("utf-8"),
        )
        return _Job(order, attempt, client, prepared, lease_ends)

    def _write_rows(self, jobs: list[_Job]) -> None:
        rows = [job.attempt for job in jobs]
        if connections[self.db].features.can_return_rows_from_bulk_insert:
            CloseAttempt.objects.using(self.db).bulk_create(rows)
        else:  # the engine completes each row by its id: without RETURNING, insert one by one to learn them
            for row in rows:
                row.save(using=self.db)

    def _configuration_problem(self, order: Order) -> str:
        configured = self.settings.merchants.get(order.merchant)
        if configured is None:
            return f"merchant {order.merchant!r} is not in WXPAY_CLOSE['MERCHANTS']"
        merchant = configured.merchant
        if (order.appid, order.mch_id) != (merchant.appid, merchant.mch_id):
            return (f"order was created for appid {order.appid}/mch_id {order.mch_id} but merchant "
                    f"{order.merchant!r} is configured with {merchant.appid}/{merchant.mch_id}")
        return ""

    # -- 2. send (in the pool's workers: HTTP only, no database) ---------------------------------------

    def exchange(self, job: _Job) -> _Answer:
        try:
            why = self._why_not_send(job)
            if why:
                return _Answer(job, not_sent=why)
            result = job.client.send(job.prepared)
            outlived_lease = time.monotonic() >= job.lease_ends
            spends_retry = self.judgement.learn(job.order.pk, job.order.merchant, result,
                                                outlived_lease=outlived_lease)
            return _Answer(job, result, outlived_lease=outlived_lease, spends_retry=spends_retry)
        except Exception as exc:  # noqa: BLE001 - one order's bug must not stop the others
            return _Answer(job, error=exc)

    def _why_not_send(self, job: _Job) -> str:
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

    def take(self, answer: _Answer) -> None:
        """Decide what an answer means for its order, to be written with the next few."""
        if answer.result is None:
            self._unwritten.append(answer)
            return
        decision = decide(answer.job.order, answer.result, self.settings, spends_retry=answer.spends_retry)
        self._unwritten.append(_Verdict(answer, decision))

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
        if self.database_error:  # the database stayed away: what cannot be written is logged, never dropped
            for item in self._unwritten:
                self._log_unwritten(item)
            self._unwritten.clear()
        if not self._unwritten:
            return
        try:
            self._write_together(self._unwritten)
            self._unwritten.clear()
            return
        except _Regroup:
            pass

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
            self.with_database(one_by_one)
        except DatabaseUnavailable as exc:
            self.database_error = self.database_error or str(exc)
            for item in self._unwritten:
                self._log_unwritten(item)
            self._unwritten.clear()

    def _write_together(self, pending: list[_Verdict | _Answer]) -> None:
        """All these answers in one transaction: each group of equal decisions is one UPDATE of its orders.
        Raises `_Regroup` (nothing written) when anything is off: a lost connection, a group that changed
        fewer orders than it holds (a claim lost, a state moved), an order to be looked at on its own."""
        verdicts = [item for item in pending if isinstance(item, _Verdict)]
        unsent = [item for item in pending if isinstance(item, _Answer)]
        if any(item.error is not None for item in unsent):
            raise _Regroup
        groups: dict[tuple[tuple[str, str], ...], list[_Verdict]] = defaultdict(list)
        for verdict in verdicts:
            groups[verdict.decision.group_key].append(verdict)
        try:
            with transaction.atomic(using=self.db):
                # The orders first: their row locks keep other sweepers off them until the answers are committed.
                for group in groups.values():
                    ids = [verdict.answer.job.order.pk for verdict in group]
                    changed = Order.objects.using(self.db).filter(
                        pk__in=ids, claim_token=self.token, state=OrderState.OPEN).update(**group[0].decision.values)
                    if changed != len(ids):
                        raise _Regroup
                for verdict in verdicts:
                    assert verdict.answer.result is not None
                    if not verdict.answer.job.attempt.complete(**_audit_answer(verdict.answer.result)):
                        raise _Regroup  # settled as abandoned meanwhile: a late answer, kept on its own
                self._release_unsent(unsent)
                for verdict in verdicts:
                    self._applied(verdict)
        except (OperationalError, InterfaceError) as exc:
            logger.warning("Lost the database connection (%s); writing the answers again one by one", exc)
            connections[self.db].close()
            raise _Regroup from None
        except _Regroup:
            raise
        except Exception:  # noqa: BLE001 - found out one by one: which answer cannot be written
            raise _Regroup from None
        for verdict in verdicts:
            self._report(verdict.answer, verdict.decision.action, verdict.decision.reason)
        for answer in unsent:
            self.report.add(_order_result(answer.job.order, CloseAction.SKIPPED, answer.not_sent,
                                          attempt=answer.job.attempt))

    def _release_unsent(self, unsent: list[_Answer]) -> None:
        if not unsent:
            return
        ids = [answer.job.order.pk for answer in unsent]
        Order.objects.using(self.db).filter(pk__in=ids, claim_token=self.token, state=OrderState.OPEN).update(
            **release())
        by_reason: dict[str, list[int]] = defaultdict(list)
        for answer in unsent:
            by_reason[answer.not_sent].append(answer.job.attempt.pk)
        for reason, attempt_ids in by_reason.items():
            CloseAttempt.objects.using(self.db).filter(pk__in=attempt_ids).complete(reason=reason)

    def _write_one(self, item: _Verdict | _Answer) -> None:
        """One answer in its own transaction, however it turned out; an answer whose write committed before
        (its acknowledgement lost with the connection, or the run interrupted) is only reported."""
        if isinstance(item, _Answer):
            with transaction.atomic(using=self.db):
                if item.error is not None:
                    self._failed(item)
                else:
                    self._release_unsent([item])
            if item.error is None:
                self.report.add(_order_result(item.job.order, CloseAction.SKIPPED, item.not_sent,
                                              attempt=item.job.attempt))
            return
        job, result, decision = item.answer.job, item.answer.result, item.decision
        assert result is not None
        answer = _audit_answer(result)
        with transaction.atomic(using=self.db):
            if CloseAttempt.objects.using(self.db).filter(
                    pk=job.attempt.pk, outcome=answer["outcome"], response_body=answer["response_body"]).exists():
                # The commit of the try before landed, though its acknowledgement was lost with the connection.
                self._report(item.answer, decision.action, decision.reason)
                return
            applied = Order.objects.using(self.db).filter(
                pk=job.order.pk, claim_token=self.token, state=OrderState.OPEN).update(**decision.values)
            action, reason = decision.action, decision.reason
            if not applied:
                action, reason = self._not_applied(job.order, result, decision)
                answer["reason"] = "; ".join(filter(None, [result.reason, f"applied nothing: {reason}"]))
            if not job.attempt.complete(**answer):
                CloseAttempt.objects.using(self.db).create(
                    order=job.order, late_answer_to=job.attempt, merchant=job.order.merchant,
                    mch_id=job.order.mch_id, sub_mch_id=job.order.sub_mch_id, out_trade_no=job.order.out_trade_no,
                    trigger=self.trigger, user=self.user, actor=self.actor, sign_type=job.attempt.sign_type,
                    request_xml="", started_at=job.attempt.started_at, completed_at=timezone.now(),
                    **{**answer, "reason": "; ".join(
                        filter(None, [answer["reason"], LATE_ANSWER]))})
                action, reason = CloseAction.CLAIM_LOST, LATE_ANSWER
            if applied:
                self._applied(item)
        self._report(item.answer, action, reason)

    def _not_applied(self, order: Order, result: CloseResult, decision: Decision) -> tuple[CloseAction, str]:
        """Why an answer's UPDATE found nothing to change: the claim was taken over, or the state moved (a
        payment recorded meanwhile, say). In the second case the exchange is still counted and the claim given
        back; WeChat's 'closed' for an order we hold paid is an incident, put before a person."""
        current = Order.objects.using(self.db).filter(pk=order.pk).values("state", "claim_token").get()
        if current["claim_token"] != self.token or current["state"] == OrderState.OPEN:
            return CloseAction.CLAIM_LOST, LATE_ANSWER
        bookkeeping = {name: decision.values[name] for name in
                       ("attempt_count", "last_attempt_at", "last_outcome", "last_error", "in_flight")}
        mine = Order.objects.using(self.db).filter(pk=order.pk, claim_token=self.token)
        if current["state"] == OrderState.PAID and result.outcome is Outcome.PAID:
            mine.update(**bookkeeping)
            return CloseAction.FOUND_PAID, "the payment was recorded while the close was in flight"
        if current["state"] == OrderState.PAID and result.outcome.order_is_closed:
            reason = ("WeChat answered that the order is closed, but a payment was recorded for it: check the "
                      "payment at WeChat and refund or fulfil it")
            mine.update(**{**bookkeeping, "last_error": reason}, on_hold=True)
            logger.error("closeorder %s: %s", order.out_trade_no, reason,
                         extra={"order_id": order.pk, "out_trade_no": order.out_trade_no})
            signals.send_after_commit(signals.closed_after_payment, order, using=self.db, attempt=None,
                                      outcome=result.outcome, reason=reason)
            return CloseAction.PUT_ON_HOLD, reason
        mine.update(**bookkeeping)
        return CloseAction.FAILED, f"WeChat answered {result.outcome.value} but the order is now {current['state']}"

    def _applied(self, verdict: _Verdict) -> None:
        decision = verdict.decision
        if decision.signal is not None:
            signals.send_after_commit(decision.signal, verdict.answer.job.order, using=self.db,
                                      attempt=verdict.answer.job.attempt, **decision.signal_kwargs)

    def _report(self, answer: _Answer, action: CloseAction, reason: str) -> None:
        order, result = answer.job.order, answer.result
        assert result is not None
        logger.info(
            "closeorder %s: %s%s", order.out_trade_no, result.outcome.value, f" ({reason})" if reason else "",
            extra={"order_id": order.pk, "out_trade_no": order.out_trade_no, "merchant": order.merchant,
                   "outcome": result.outcome.value, "action": action.value,
                   "duration_ms": round(result.elapsed * 1000), "attempt_id": answer.job.attempt.pk},
        )
        self.report.add(_order_result(order, action, reason, result=result, attempt=answer.job.attempt))

    def _failed(self, answer: _Answer) -> None:
        """Sending failed on our side (a bug): the row says so, the order is given back for a later run."""
        order, exc = answer.job.order, answer.error
        reason = f"{type(exc).__name__}: {exc}"
        logger.error("Closing order %s failed unexpectedly", order.out_trade_no, exc_info=exc,
                     extra={"order_id": order.pk, "out_trade_no": order.out_trade_no, "merchant": order.merchant})
        answer.job.attempt.complete(reason=f"not sent: {reason}")
        self.report.add(_order_result(order, CloseAction.FAILED, reason, attempt=answer.job.attempt))

    def _log_unwritten(self, item: _Verdict | _Answer, exc: BaseException | None = None) -> None:
        """An answer that cannot be written (the database is away, or refuses it) is logged whole, never dropped;
        its row stays unfinished, and the order is closed again once its claim lapses."""
        answer = item.answer if isinstance(item, _Verdict) else item
        order, result = answer.job.order, answer.result
        why = f"{type(exc).__name__}: {exc}" if exc is not None else self.database_error
        logger.error(
            "Could not record the answer to closeorder %s (outcome %s): %s. Its audit row stays unfinished and "
            "the order is closed again once its claim lapses. Response body: %s", order.out_trade_no,
            result.outcome.value if result else "not sent", why, stored_text(result.response_body) if result else "",
            exc_info=exc, extra={"order_id": order.pk, "out_trade_no": order.out_trade_no,
                                 "attempt_id": answer.job.attempt.pk,
                                 "outcome": result.outcome.value if result else ""},
        )
        self.report.add(_order_result(order, CloseAction.FAILED, why, result=result, attempt=answer.job.attempt))

    # -- the loop -----------------------------------------------------------------------------------

    def run(self, next_batch: Callable[[int], list[_Job] | None]) -> CloseReport:
        """Claim with `next_batch(size)` (None: nothing more to claim) while there is room, send through the
        pool, write the answers as they come. Ctrl-C: claim and send nothing more, write what is in flight."""
        in_flight: dict[Future[_Answer], _Job] = {}
        exhausted = False
        pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="wxpay-close")
        try:
            while True:
                try:
                    if not exhausted and not self.stopping and len(in_flight) < REFILL_BELOW * self.workers:
                        jobs = self._claimed(next_batch, MAX_UNFINISHED * self.workers - len(in_flight))
                        exhausted = jobs is None
                        for job in jobs or []:
                            in_flight[pool.submit(self.exchange, job)] = job
                        if jobs is not None and not in_flight:
                            continue  # every order claimed was unsendable: claim again
                    if not in_flight:
                        break
                    done, _ = wait(in_flight, return_when=FIRST_COMPLETED)
                    for future in done:
                        self.take(future.result())
                        del in_flight[future]
                    self.write()
                except KeyboardInterrupt:
                    if self.interrupted:
                        raise  # a second Ctrl-C: stop now; unfinished rows are settled by the next close
                    self.interrupted = True
            self.write()
            try:
                self.with_database(self.give_back_retries)
            except DatabaseUnavailable as exc:
                self.database_error = self.database_error or str(exc)
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
        self.report.halted_merchants.update(self.judgement.halted)
        self.report.stopped_early = self.judgement.unreachable
        self.report.finish()
        if self.database_error:
            raise DatabaseUnavailable(self.database_error, self.report)
        if self.interrupted:
            raise KeyboardInterrupt
        return self.report

    def _claimed(self, next_batch: Callable[[int], list[_Job] | None], size: int) -> list[_Job] | None:
        try:
            return next_batch(size)
        except DatabaseUnavailable as exc:
            self.database_error = self.database_error or str(exc)
            return None


class _Regroup(Exception):
    """The answers written together must be written one by one instead (nothing of the try was committed)."""


# -- public services ---------------------------------------------------------------------------------


def _close_chosen(engine: _Engine, orders: Iterable[Order]) -> CloseReport:
    """Close orders a person or the shop's code chose: a hold is lifted and the retry budget restarts."""
    chosen: Iterator[Order] = iter(orders)
    min_age = engine.settings.min_order_age

    def next_batch(size: int) -> list[_Job] | None:
        batch = [order for _, order in zip(range(size), chosen, strict=False)]
        if not batch:
            return None
        candidates = Order.objects.using(engine.db).filter(
            Q(in_flight=False) | Q(due_at__lte=Now()),
            pk__in=[order.pk for order in batch], state=OrderState.OPEN, created_at__lte=Now() - min_age,
        ).order_by("pk")
        jobs, claimed = engine.claim(candidates, len(batch), on_hold=False, retry_count=0)
        taken = {order.pk for order in claimed}
        for order in batch:
            if order.pk not in taken:
                engine.report.add(_order_result(order, CloseAction.SKIPPED, _why_not_claimed(engine, order)))
        return jobs

    return engine.run(next_batch)


def _why_not_claimed(engine: _Engine, order: Order) -> str:
    order.refresh_from_db(using=engine.db)
    # The claim asked the database's clock, this preview the host's: where they disagree, the claim was right.
    return why_not_closable(order, now=timezone.now(), min_order_age=engine.settings.min_order_age) or (
        CLAIMED_ELSEWHERE if order.in_flight else TOO_YOUNG)


def close_order(order: Order, *, trigger: str = Trigger.CODE, user: Any = None) -> OrderCloseResult:
    """Close one order now (if it is open, old enough and not in flight elsewhere); `order` is refreshed.

    Raises `DatabaseUnavailable` if the database went away and stayed away while the close was under way.
    """
    engine = _Engine(load_settings(), trigger=trigger, user=user)
    engine.require_autocommit()
    results: list[OrderCloseResult] = []
    engine.report.observer = results.append
    try:
        _close_chosen(engine, [order])
    except DatabaseUnavailable as exc:
        raise DatabaseUnavailable(str(exc)) from exc
    order.refresh_from_db(using=engine.db)
    return results[-1]


def close_orders(
    orders: Iterable[Order], *, trigger: str = Trigger.CODE, user: Any = None, workers: int | None = None,
    on_result: Callable[[OrderCloseResult], None] | None = None,
) -> CloseReport:
    """Close several chosen orders (the admin action) with `workers` HTTP workers."""
    settings = load_settings()
    engine = _Engine(settings, trigger=trigger, user=user, workers=workers or settings.workers)
    engine.require_autocommit()
    engine.report.observer = on_result
    return _close_chosen(engine, orders)


def sweep_expired_orders(
    *,
    trigger: str = Trigger.COMMAND,
    merchants: list[str] | None = None,
    older_than: timedelta | None = None,
    limit: int | None = None,
    batch_size: int | None = None,
    workers: int | None = None,
    dry_run: bool = False,
    on_result: Callable[[OrderCloseResult], None] | None = None,
) -> CloseReport:
    """Close every open order whose time has come, `workers` requests at a time.

    Several sweepers (cron on many hosts) share a backlog without sending the same order twice: each order is
    claimed with a lease on the database's clock. A merchant with two configuration errors in a row is halted
    for the rest of the run; a run whose requests mostly fail in transport stops early (`stopped_early`).
    `batch_size` is the chunk a dry run reads at a time. Raises `DatabaseUnavailable` (with the report so far)
    when the database went away and stayed away.
    """
    settings = load_settings()
    engine = _Engine(settings, trigger=trigger, workers=workers or settings.workers)
    engine.require_autocommit()
    engine.report.observer = on_result

    if dry_run:
        due = orders_due_for_closing(min_order_age=settings.min_order_age, merchants=merchants,
                                     older_than=older_than, using=engine.db)
        for order in (due[:limit] if limit else due).iterator(chunk_size=batch_size or settings.batch_size):
            engine.report.add(_order_result(order, CloseAction.SKIPPED, "dry run: would send closeorder"))
        return engine.report.finish()

    left = limit

    def next_batch(size: int) -> list[_Job] | None:
        nonlocal left
        size = size if left is None else min(size, left)
        if size <= 0:
            return None
        candidates = orders_due_for_closing(min_order_age=settings.min_order_age, merchants=merchants,
                                            exclude_merchants=list(engine.judgement.halted), older_than=older_than,
                                            using=engine.db)
        # Never an order this run claimed before (its token stays on it): one run sends for an order once.
        candidates = candidates.exclude(claim_token=engine.token)
        if engine.failed_claims:
            candidates = candidates.exclude(pk__in=engine.failed_claims)
        jobs, claimed = engine.claim(candidates, size)
        if left is not None:
            left -= len(claimed)
        return jobs if claimed else None

    return engine.run(next_batch)
