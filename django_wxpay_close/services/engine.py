"""The only code that calls WeChat and changes an order's state.

One close, start to finish, in one thread (`_Run.close`):
1. start: claim the order in one short transaction (a lease on the database's clock, so no two callers have
   closeorder in flight for it), then write the audit row of the request about to leave (after a lapsed
   claim, completing as abandoned the row it left unfinished, in the same transaction);
2. send the signed request with the blocking client; no database lock is held meanwhile;
3. record, in one transaction: apply the answer to the order (conditional on our claim and on the state the
   close started from) and complete the audit row.
Several orders are closed by a pool of worker threads, each doing whole closes one after another
(`_run_pool`); the pool size is the only knob, and nothing else hands work between threads.

These functions must not run inside `transaction.atomic()`: a rollback of the caller's transaction would
erase audit rows of requests that really went out. They raise `TransactionManagementError` if called that
way. `create_order` and `record_payment` send nothing and may run inside a transaction.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import timedelta
from functools import lru_cache
from typing import Any, TypeVar

from django.db import InterfaceError, OperationalError, connections, transaction
from django.db.models import F, Q
from django.db.models.functions import Now
from django.utils import timezone
from django.utils.translation import gettext_noop

from .. import signals
from ..conf import CloseSettings, load_settings
from ..models import ALLOWED_TRANSITIONS, CloseAttempt, Order, OrderState, Trigger, stored_text, write_database
from ..reports import CloseAction, CloseReport, OrderCloseResult
from ..selectors import CLAIMED_ELSEWHERE, TOO_YOUNG, claimable, orders_due_for_closing, why_not_closable
from ..wechat import (
    CloseOrderClient,
    CloseResult,
    InvalidRequestField,
    Merchant,
    Outcome,
    PreparedClose,
)
from .orders import InvalidTransition

logger = logging.getLogger("django_wxpay_close")
T = TypeVar("T")

# in the catalogue, and the admin translates them when it shows a stored reason.
MERCHANT_HALTED = gettext_noop(
    "its merchant is halted for this run: two of its orders in a row hit a configuration error")
ABANDONED = gettext_noop("no answer was recorded: the process stopped or lost its database")
# A merchant is halted for the rest of a run after this many of its orders in a row hit a configuration error:
# one such order may be poison (an order-specific FAIL), two in a row mean the key or sign type is wrong.
HALT_AFTER_CONFIGURATION_ERRORS = 2
# The circuit breaker: over the last BREAKER_WINDOW exchanges of a run, once at least BREAKER_MIN_EXCHANGES and
# at least BREAKER_SHARE of them failed in transport, WeChat is taken to be unreachable and the run stops.
BREAKER_WINDOW = 20
BREAKER_MIN_EXCHANGES = 5
BREAKER_SHARE = 0.8
# Reconnect delays (seconds) after a lost database connection; then the database counts as unavailable.
DATABASE_RETRY_DELAYS = (0.2, 0.5, 1.0, 2.0, 4.0)
_BOOKKEEPING = ("attempt_count", "last_attempt_at", "last_outcome", "last_error")  # written with every answer


class DatabaseUnavailable(Exception):
    """The database stayed away through every reconnect; `report` holds what the run did until then.

    Every answer that could not be written was logged at ERROR (out_trade_no, outcome, response body).
    """

    def __init__(self, message: str, report: CloseReport | None = None) -> None:
        super().__init__(message)
        self.report = report


def _require_autocommit(using: str) -> None:
    if transaction.get_connection(using).in_atomic_block:
        raise transaction.TransactionManagementError(
            "django_wxpay_close services send requests to WeChat and must run outside transaction.atomic(): "
            "a rollback would erase the audit rows of requests that really went out."
        )


@lru_cache(maxsize=64)
def _cached_client(merchant: Merchant, base_urls: tuple[str, ...], connect_timeout: float, read_timeout: float,
                   max_response_bytes: int, pool_size: int) -> CloseOrderClient:
    """One client (and so one connection pool) per merchant and endpoint settings, reused across calls."""
    return CloseOrderClient(merchant, base_urls=base_urls, connect_timeout=connect_timeout, read_timeout=read_timeout,
                            max_response_bytes=max_response_bytes, pool_size=pool_size)


def _client(settings: CloseSettings, merchant_name: str, pool_size: int) -> CloseOrderClient:
    return _cached_client(settings.merchants[merchant_name].merchant, settings.base_urls, settings.connect_timeout,
                          settings.read_timeout, settings.max_response_bytes, pool_size)


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


def _failed(order: Order, exc: Exception) -> OrderCloseResult:
    logger.error(
        "Closing order %s failed unexpectedly", order.out_trade_no, exc_info=exc,
        extra={"order_id": order.pk, "out_trade_no": order.out_trade_no, "merchant": order.merchant},
    )
    return _order_result(order, CloseAction.FAILED, f"{type(exc).__name__}: {exc}")


@dataclass(frozen=True)
class _Started:
    """A claimed order whose audit row is written and whose signed request is ready to leave."""

    order: Order
    attempt: CloseAttempt
    client: CloseOrderClient
    prepared: PreparedClose
    lease_from: float  # time.monotonic() just before the claim's lease was (re)started on the database


@dataclass(frozen=True)
class _Decision:
    """What an answer means for the order: the UPDATE to apply if the claim is still ours, and what to report."""

    action: CloseAction
    reason: str
    values: dict[str, Any]
    signal: Any = None
    signal_kwargs: dict[str, Any] = field(default_factory=dict)


class _Run:
    """One caller's closes: settings, the claim token, and what the run learnt (halted merchants, outages).

    Shared by the pool's workers; everything mutable is behind `_lock`.
    """

    def __init__(self, settings: CloseSettings, *, trigger: str, user: Any = None, workers: int = 1) -> None:
        self.settings = settings
        self.trigger = trigger
        self.user = user if getattr(user, "pk", None) is not None else None
        self.actor = self.user.get_username() if self.user is not None else ""
        self.db = write_database()
        # Every claim of this run carries this token; a release keeps it, so the run never claims an order twice.
        self.token = uuid.uuid4()
        self.pool_size = workers  # one kept-alive connection to WeChat per worker
        self.halted: dict[str, str] = {}
        self.database_error = ""
        self.stopped_early = ""
        self.interrupted = False  # Ctrl-C: claim nothing more, record what is in flight
        self._configuration_errors: Counter[str] = Counter()
        self._recent: deque[bool] = deque(maxlen=BREAKER_WINDOW)  # True: the exchange failed in transport
        self._lock = threading.Lock()

    @property
    def stopping(self) -> bool:
        return bool(self.database_error or self.stopped_early or self.interrupted)

    # -- what the run learns from answers ---------------------------------------------------------

    def _learn(self, order: Order, result: CloseResult) -> bool:
        """Note the answer; True if it spends one of the order's MAX_ATTEMPTS.

        A transport failure spends one only where the run has shown WeChat reachable (most of its recent
        exchanges got an answer): in an outage, or before the run could tell, it is retried for free, so hours
        of outage put nothing on hold. When most recent exchanges failed in transport, the run stops early.
        """
        with self._lock:
            transport_failure = result.outcome.failed_in_transport
            self._recent.append(transport_failure)
            failures = sum(self._recent)
            judged = len(self._recent) >= BREAKER_MIN_EXCHANGES
            outage = judged and failures >= BREAKER_SHARE * len(self._recent)
            if outage and not self.stopped_early:
                self.stopped_early = (f"WeChat looks unreachable: {failures} of the last {len(self._recent)} requests "
                                      f"failed in transport (last: {result.reason})")
                logger.error("Stopping the run early: %s", self.stopped_early, extra={"outcome": result.outcome.value})
            if result.outcome is Outcome.CONFIGURATION_ERROR:
                self._note_configuration_error(order.merchant, result.reason)
            elif result.signature_verified:  # a verified answer proves the key and sign type work
                self._configuration_errors[order.merchant] = 0
            return not transport_failure or (judged and not outage)

    def _note_configuration_error(self, merchant: str, reason: str) -> None:
        """Caller holds `_lock`. Two in a row halt the merchant for the rest of the run."""
        self._configuration_errors[merchant] += 1
        if self._configuration_errors[merchant] >= HALT_AFTER_CONFIGURATION_ERRORS:
            self._halt(merchant, reason)

    def _halt(self, merchant: str, reason: str) -> None:
        if merchant not in self.halted:
            self.halted[merchant] = reason
            logger.error("Stopped closing orders of merchant %r for this run: %s", merchant, reason,
                         extra={"merchant": merchant, "outcome": Outcome.CONFIGURATION_ERROR.value})

    # -- the database, reconnected when its connection is lost -------------------------------------

    def _with_database(self, step: Callable[[], T]) -> T:
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

    # -- one close ----------------------------------------------------------------------------------

    def close(self, claim: Callable[[], Order | None], chosen: Order | None = None) -> OrderCloseResult | None:
        """Claim an order with `claim`, send its close and record the answer; None when nothing was claimed.

        `chosen` is the order a person or the shop's code asked for, if any.
        """
        claimed: list[Order] = []  # what `claim` took, to report against if what follows fails
        try:
            started = self._start(claim, claimed, settle_always=chosen is not None)
            if not isinstance(started, _Started):
                return started
            lease_left = self.settings.claim_timeout.total_seconds() - (time.monotonic() - started.lease_from)
            if lease_left <= self.settings.longest_exchange.total_seconds():
                return self._with_database(lambda: self._not_sent(started, lease_left))
            return self._record(started, started.client.send(started.prepared))
        except DatabaseUnavailable as exc:
            with self._lock:
                self.database_error = self.database_error or str(exc)
            order = chosen or next(iter(claimed), None)
            return None if order is None else _order_result(order, CloseAction.FAILED, str(exc))
        except Exception as exc:  # noqa: BLE001 - one order's bug must not stop the others (or kill a worker)
            order = chosen or next(iter(claimed), None)
            if order is not None:  # it keeps this run's claim until the lease lapses: the next run tries again
                return _failed(order, exc)
            logger.error("Claiming an order failed unexpectedly", exc_info=exc)
            with self._lock:  # a bug in claiming would repeat for every order: stop
                self.stopped_early = self.stopped_early or f"claiming failed: {type(exc).__name__}: {exc}"
            return None

    def _start(self, claim: Callable[[], Order | None], claimed: list[Order], *,
               settle_always: bool) -> _Started | OrderCloseResult | None:
        """Claim an order (a fresh lease, committed at once), check and sign it, then write the audit row of the
        request about to leave, settling first what an earlier, lapsed claim left unfinished."""
        lease_from = time.monotonic()
        order = self._with_database(claim)
        if order is None:
            return None
        claimed.append(order)
        # claim_due read the order before claiming it: a claim_expires_at there is a claim that lapsed.
        lapsed = order.claim_expires_at is not None
        problem = self._configuration_problem(order)
        if problem:
            return self._with_database(lambda: self._settle_unsent(order, CloseAction.CONFIGURATION_ERROR, problem))
        client = _client(self.settings, order.merchant, self.pool_size)
        try:
            prepared = client.prepare(order.out_trade_no, sub_mch_id=order.sub_mch_id,
                                      sub_appid=order.sub_appid or None)
        except InvalidRequestField as exc:
            unbuildable = f"cannot build the request: {exc}"
            return self._with_database(lambda: self._settle_unsent(order, CloseAction.PUT_ON_HOLD, unbuildable))
        tries = 0

        def write_row() -> CloseAttempt:
            nonlocal tries
            tries += 1
            # A retry settles too: the try before may have written its row before the connection dropped.
            settle = lapsed or settle_always or tries > 1
            with transaction.atomic(using=self.db) if settle else nullcontext():
                if settle:  # rows an earlier holder left unfinished: no answer will come for them now
                    CloseAttempt.objects.using(self.db).filter(order=order).complete(reason=ABANDONED)
                return CloseAttempt.objects.using(self.db).create(
                    order=order, merchant=order.merchant, mch_id=order.mch_id, sub_mch_id=order.sub_mch_id,
                    out_trade_no=order.out_trade_no, trigger=self.trigger, user=self.user, actor=self.actor,
                    url=client.urls[0], sign_type=prepared.sign_type.value,
                    request_xml=prepared.body.decode("utf-8"),
                )

        return _Started(order, self._with_database(write_row), client, prepared, lease_from)

    def _configuration_problem(self, order: Order) -> str:
        if order.merchant in self.halted:
            return MERCHANT_HALTED
        configured = self.settings.merchants.get(order.merchant)
        if configured is None:
            return f"merchant {order.merchant!r} is not in WXPAY_CLOSE['MERCHANTS']"
        merchant = configured.merchant
        if (order.appid, order.mch_id) != (merchant.appid, merchant.mch_id):
            return (f"order was created for appid {order.appid}/mch_id {order.mch_id} but merchant "
                    f"{order.merchant!r} is configured with {merchant.appid}/{merchant.mch_id}")
        return ""

    def _settle_unsent(self, order: Order, action: CloseAction, problem: str) -> OrderCloseResult:
        """A claimed order found unsendable before its request was built: release it, backed off or on hold."""
        if problem == MERCHANT_HALTED:
            self._release(order, {})
            return _order_result(order, CloseAction.SKIPPED, problem)
        values: dict[str, Any] = {"last_error": problem}
        if action is CloseAction.CONFIGURATION_ERROR:
            with self._lock:
                self._note_configuration_error(order.merchant, problem)
            values.update(last_outcome=Outcome.CONFIGURATION_ERROR.value, **self._backoff(order, counted=True)[1])
        else:
            values.update(last_outcome=Outcome.CLIENT_BUG.value, on_hold=True, next_attempt_at=None)
        self._release(order, values)
        return _order_result(order, action, problem)

    def _release(self, order: Order, values: dict[str, Any]) -> int:
        """Write `values` and give the claim back, only while the claim is still ours."""
        return Order.objects.using(self.db).filter(pk=order.pk, claim_token=self.token, state=OrderState.OPEN).update(
            claim_expires_at=None, **values)

    def _not_sent(self, started: _Started, lease_left: float) -> OrderCloseResult:
        """The database took so long to write the claim and the row that the lease could not cover an exchange."""
        reason = (f"not sent: the database took so long to record the claim that only {max(lease_left, 0):.1f}s of "
                  "it was left, less than one exchange can take")
        with transaction.atomic(using=self.db):
            self._release(started.order, {})
            started.attempt.complete(reason=reason)
        logger.warning("closeorder %s %s", started.order.out_trade_no, reason,
                       extra={"order_id": started.order.pk, "out_trade_no": started.order.out_trade_no})
        return _order_result(started.order, CloseAction.SKIPPED, reason, attempt=started.attempt)

    def _record(self, started: _Started, result: CloseResult) -> OrderCloseResult:
        """Apply the answer to the order and complete its audit row, in one transaction (retried if the
        connection drops; if the database stays away the answer is logged, never lost silently)."""
        order = started.order
        decision = self._decide(order, result, counted=self._learn(order, result))
        tries = 0

        def write() -> OrderCloseResult:
            nonlocal tries
            tries += 1
            return self._write_answer(started, result, decision, retrying=tries > 1)

        try:
            return self._with_database(write)
        except DatabaseUnavailable:
            logger.error(
                "Could not record the answer to closeorder %s (outcome %s); its audit row stays unfinished and "
                "the order is closed again once its claim lapses. Response body: %s",
                order.out_trade_no, result.outcome.value, stored_text(result.response_body),
                extra={"order_id": order.pk, "out_trade_no": order.out_trade_no, "outcome": result.outcome.value,
                       "attempt_id": started.attempt.pk},
            )
            raise

    def _write_answer(self, started: _Started, result: CloseResult, decision: _Decision, *,
                      retrying: bool) -> OrderCloseResult:
        order, attempt = started.order, started.attempt
        answer = _audit_answer(result)
        with transaction.atomic(using=self.db):
            if retrying and CloseAttempt.objects.using(self.db).filter(
                    pk=attempt.pk, outcome=answer["outcome"], response_body=answer["response_body"]).exists():
                # The commit of the try before landed, though its acknowledgement was lost with the connection.
                return _order_result(order, decision.action, decision.reason, result=result, attempt=attempt)
            # The order first: its row lock keeps other sweepers off it until the answer is committed.
            applied = Order.objects.using(self.db).filter(
                pk=order.pk, claim_token=self.token, state=OrderState.OPEN).update(**decision.values)
            action, reason = decision.action, decision.reason
            if not applied:
                action, reason = self._not_applied(order, result, decision)
                answer["reason"] = "; ".join(filter(None, [result.reason, f"applied nothing: {reason}"]))
            if not attempt.complete(completed_at=timezone.now(), **answer):
                logger.error(
                    "The answer to closeorder %s (outcome %s) came after its audit row was completed as abandoned; "
                    "response body: %s", order.out_trade_no, result.outcome.value, answer["response_body"],
                    extra={"order_id": order.pk, "out_trade_no": order.out_trade_no, "attempt_id": attempt.pk})
            if applied and decision.signal is not None:
                signals.send_after_commit(decision.signal, order, using=self.db, attempt=attempt,
                                          **decision.signal_kwargs)
        logger.info(
            "closeorder %s: %s%s", order.out_trade_no, result.outcome.value, f" ({reason})" if reason else "",
            extra={"order_id": order.pk, "out_trade_no": order.out_trade_no, "merchant": order.merchant,
                   "outcome": result.outcome.value, "action": action.value, "duration_ms": answer["duration_ms"],
                   "attempt_id": attempt.pk},
        )
        return _order_result(order, action, reason, result=result, attempt=attempt)

    def _not_applied(self, order: Order, result: CloseResult, decision: _Decision) -> tuple[CloseAction, str]:
        """Why an answer's UPDATE found nothing to change: the state moved (a payment recorded meanwhile, say),
        or the claim was taken over. In the first case the exchange is still counted and the claim released."""
        current = Order.objects.using(self.db).filter(pk=order.pk).values("state", "claim_token").get()
        if current["state"] == OrderState.OPEN:
            return CloseAction.CLAIM_LOST, "its claim lapsed and another close took the order over"
        bookkeeping = {name: decision.values[name] for name in _BOOKKEEPING}
        Order.objects.using(self.db).filter(pk=order.pk, claim_token=self.token).update(
            claim_expires_at=None, **bookkeeping)
        if current["state"] == OrderState.PAID and result.outcome is Outcome.PAID:
            return CloseAction.FOUND_PAID, "the payment was recorded while the close was in flight"
        return CloseAction.FAILED, f"WeChat answered {result.outcome.value} but the order is now {current['state']}"

    def _backoff(self, order: Order, *, counted: bool) -> tuple[bool, dict[str, Any]]:
        """(retries spent, the UPDATE values) for a failure retried later; `counted` spends one of MAX_ATTEMPTS.

        The wait doubles with each failed exchange of the order, counted or not: RETRY_BACKOFF · 2^(n-1).
        """
        retries = order.retry_count + 1 if counted else order.retry_count
        if retries >= self.settings.max_attempts:
            return True, {"retry_count": retries}
        return False, {"retry_count": retries,
                       "next_attempt_at": Now() + self.settings.retry_delay(order.attempt_count + 1)}

    def _decide(self, order: Order, result: CloseResult, *, counted: bool) -> _Decision:
        """What WeChat's answer means for the order (docs/protocol.md#outcomes); nothing is written here."""
        outcome = result.outcome
        values: dict[str, Any] = {"attempt_count": F("attempt_count") + 1, "last_attempt_at": Now(),
                                  "last_outcome": outcome.value, "last_error": result.reason}
        failed = {"outcome": outcome, "reason": result.reason}

        def keep_open(action: CloseAction, signal: Any, reason: str = result.reason,
                      signal_kwargs: dict[str, Any] = failed, **updates: Any) -> _Decision:
            return _Decision(action, reason, {**values, **updates, "claim_expires_at": None}, signal, signal_kwargs)

        def change_state(target: str, action: CloseAction, signal: Any, reason: str = result.reason,
                         signal_kwargs: dict[str, Any] | None = None, **updates: Any) -> _Decision:
            if target not in ALLOWED_TRANSITIONS[OrderState.OPEN]:
                raise InvalidTransition(f"open -> {target} is not an allowed transition")
            return _Decision(action, reason, {**values, "state": target, "state_changed_at": Now(),
                                              "claim_expires_at": None, "next_attempt_at": None, **updates},
                             signal, signal_kwargs or {})

        if outcome is Outcome.PAID:
            return change_state(OrderState.PAID, CloseAction.FOUND_PAID, signals.order_found_paid,
                                retry_count=0, paid_at=Now())
        if outcome.order_is_closed:
            already = outcome is Outcome.ALREADY_CLOSED
            return change_state(OrderState.CLOSED, CloseAction.ALREADY_CLOSED if already else CloseAction.CLOSED,
                                signals.order_closed, signal_kwargs={"already_closed": already},
                                retry_count=0, closed_at=Now())
        if outcome.needs_attention:
            return keep_open(CloseAction.PUT_ON_HOLD, signals.close_failed, on_hold=True, next_attempt_at=None)

        # Retried later: a configuration error too, so one poison order does not stop its merchant for ever.
        spent, updates = self._backoff(order, counted=counted)
        action = CloseAction.CONFIGURATION_ERROR if outcome.halts_merchant else CloseAction.RETRY_SCHEDULED
        if not spent:
            return keep_open(action, signals.close_failed, **updates)
        exhausted = f"gave up after {updates['retry_count']} attempts; last: {result.reason or outcome.value}"
        exhausted_kwargs = {"outcome": outcome, "reason": exhausted}
        if outcome is Outcome.NOT_FOUND:
            # docs/protocol.md#outcomes: after the last retry an ORDERNOTEXIST order is terminal, never payable.
            return change_state(OrderState.UNKNOWN_TO_WECHAT, CloseAction.MARKED_UNKNOWN,
                                signals.close_attempts_exhausted, exhausted, exhausted_kwargs, **updates)
        return keep_open(CloseAction.PUT_ON_HOLD, signals.close_attempts_exhausted, exhausted, exhausted_kwargs,
                         on_hold=True, next_attempt_at=None, **updates)

    # -- claims -------------------------------------------------------------------------------------

    def claim_due(self, *, merchants: list[str] | None, older_than: timedelta | None) -> Order | None:
        """Claim the most overdue order nobody holds (SKIP LOCKED where supported); None when none is due.

        Never one this run claimed before: a release keeps the run's token on the order.
        """
        due = orders_due_for_closing(min_order_age=self.settings.min_order_age, merchants=merchants,
                                     exclude_merchants=list(self.halted), older_than=older_than)
        with transaction.atomic(using=self.db):
            order = due.using(self.db).exclude(claim_token=self.token).select_for_update(skip_locked=True).first()
            if order is None:
                return None
            # The row stays locked until this transaction ends, so what it was chosen by still holds. (SQLite has
            # no row locks, but refuses a write from a transaction another writer overtook: it is retried.)
            Order.objects.using(self.db).filter(pk=order.pk).update(
                claim_token=self.token, claim_expires_at=Now() + self.settings.claim_timeout)
        order.claim_token = self.token
        return order

    def claim_chosen(self, order: Order) -> Order | None:
        """Claim an order a person or the shop's code chose; a hold is lifted and the retry budget restarts."""
        fresh = Q(created_at__lte=Now() - self.settings.min_order_age)
        if self._take(order, fresh, on_hold=False, retry_count=0):
            order.on_hold, order.retry_count = False, 0
            return order
        return None

    def _take(self, order: Order, condition: Q, **values: Any) -> bool:
        claimed = Order.objects.using(self.db).filter(
            condition, claimable(), pk=order.pk, state=OrderState.OPEN,
        ).update(claim_token=self.token, claim_expires_at=Now() + self.settings.claim_timeout, **values)
        if claimed:
            order.claim_token = self.token
        return bool(claimed)

    def why_not_claimed(self, order: Order) -> str:
        order.refresh_from_db(using=self.db)
        # The claim asked the database's clock, this preview the host's: where they disagree, the claim was right.
        return why_not_closable(order, now=timezone.now(), min_order_age=self.settings.min_order_age) or (
            CLAIMED_ELSEWHERE if order.claim_expires_at is not None else TOO_YOUNG)


def _close_chosen(run: _Run, order: Order) -> OrderCloseResult:
    result = run.close(lambda: run.claim_chosen(order), order)
    if result is not None:
        return result
    try:
        return _order_result(order, CloseAction.SKIPPED, run.why_not_claimed(order))
    except Exception as exc:  # noqa: BLE001 - the lookup of why is only for the report
        return _failed(order, exc)


def _run_pool(run: _Run, report: CloseReport, workers: int, next_close: Callable[[], OrderCloseResult | None]) -> None:
    """`workers` threads, each closing one order after another until `next_close` has none or the run stops."""

    count = max(workers, 1)
    finished: list[bool] = []  # one True per worker done; appended by the workers themselves
    all_finished = threading.Event()

    def work() -> None:
        try:
            while not run.stopping and (result := next_close()) is not None:
                report.add(result)
        finally:
            connections.close_all()  # this thread's own connections
            finished.append(True)
            if len(finished) == count:
                all_finished.set()

    for n in range(count):
        threading.Thread(target=work, name=f"wxpay-close-{n}", daemon=True).start()
    # An Event, not Thread.join(): before Python 3.13 a join interrupted by Ctrl-C can mark a running thread as
    # stopped, so a second join would return while its worker still writes an answer.
    try:
        all_finished.wait()
    except KeyboardInterrupt:  # let each worker write the answer it waits for, then stop (a second Ctrl-C: now)
        run.interrupted = True
        all_finished.wait()
        raise


def _finish(run: _Run, report: CloseReport) -> CloseReport:
    report.halted_merchants.update(run.halted)
    report.stopped_early = run.stopped_early
    report.finish()
    if run.database_error:
        raise DatabaseUnavailable(run.database_error, report)
    return report


# -- public services ---------------------------------------------------------------------------------


def close_order(order: Order, *, trigger: str = Trigger.CODE, user: Any = None) -> OrderCloseResult:
    """Close one order now (if it is open, old enough and not in flight elsewhere); `order` is refreshed.

    Raises `DatabaseUnavailable` if the database went away and stayed away while the close was under way.
    """
    run = _Run(load_settings(), trigger=trigger, user=user)
    _require_autocommit(run.db)
    result = _close_chosen(run, order)
    if run.database_error:
        raise DatabaseUnavailable(run.database_error)
    order.refresh_from_db(using=run.db)
    return result


def close_orders(
    orders: Iterable[Order], *, trigger: str = Trigger.CODE, user: Any = None, workers: int | None = None,
    on_result: Callable[[OrderCloseResult], None] | None = None,
) -> CloseReport:
    """Close several chosen orders (the admin action) with `workers` threads."""
    settings = load_settings()
    workers = workers or settings.workers
    run = _Run(settings, trigger=trigger, user=user, workers=workers)
    _require_autocommit(run.db)
    report = CloseReport(observer=on_result)
    chosen: Iterator[Order] = iter(orders)
    lock = threading.Lock()

    def next_close() -> OrderCloseResult | None:
        with lock:
            order = next(chosen, None)
        return None if order is None else _close_chosen(run, order)

    _run_pool(run, report, workers, next_close)
    return _finish(run, report)


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
    """Close every open order past its payment window, each worker claiming one order when it can start it.

    Several sweepers (cron on many hosts) share a backlog without sending the same order twice: each order is
    claimed with a lease on the database's clock. A merchant with two configuration errors in a row is halted
    for the rest of the run; a run whose requests mostly fail in transport stops early (`stopped_early`).
    `batch_size` is the chunk a dry run reads at a time. Raises `DatabaseUnavailable` (with the report so far)
    when the database went away and stayed away.
    """
    settings = load_settings()
    workers = workers or settings.workers
    run = _Run(settings, trigger=trigger, workers=workers)
    _require_autocommit(run.db)
    report = CloseReport(observer=on_result)

    if dry_run:
        due = orders_due_for_closing(min_order_age=settings.min_order_age, merchants=merchants,
                                     older_than=older_than).using(run.db)
        for order in (due[:limit] if limit else due).iterator(chunk_size=batch_size or settings.batch_size):
            report.add(_order_result(order, CloseAction.SKIPPED, "dry run: would send closeorder"))
        return report.finish()

    budget = threading.Semaphore(limit) if limit is not None else None

    def next_close() -> OrderCloseResult | None:
        if budget is not None and not budget.acquire(blocking=False):
            return None
        result = run.close(lambda: run.claim_due(merchants=merchants, older_than=older_than))
        if result is None and budget is not None:
            budget.release()
        return result

    _run_pool(run, report, workers, next_close)
    return _finish(run, report)
