"""The only code that calls WeChat and changes an order's state.

Rules every function here keeps:
- An order is *claimed* (a conditional UPDATE with a lease) before its request is built, so two
  callers (cron hosts, the admin, the command) never have closeorder in flight for the same order;
  no database lock is held while the request is in flight.
- The audit row is written before the request leaves and completed once after it (with several orders,
  by the threads of pipeline.py around one event loop; a result is reported once it is written).
- A state change is an UPDATE … WHERE state = <the state the close started from>.
- These functions must not run inside `transaction.atomic()`: a rollback of the caller's
  transaction would erase audit rows of requests that really went out. They raise
  `TransactionManagementError` if called that way. `create_order` and `record_payment` send
  nothing and may run inside a transaction.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import Enum
from functools import lru_cache
from typing import Any, TypeVar

from django.db import transaction
from django.utils import timezone

from . import signals
from .conf import CloseSettings, load_settings
from .models import ALLOWED_TRANSITIONS, CloseAttempt, Order, OrderState, Trigger
from .pipeline import ClosePipeline, Sending
from .selectors import claimable, orders_due_for_closing, why_not_closable
from .statements import Add, ClearIfClaimedBy, RowUpdate, update_rows
from .wechat import (
    CloseOrderClient,
    CloseResult,
    InvalidRequestField,
    Merchant,
    Outcome,
    PreparedClose,
    validate_out_trade_no,
)

__all__ = [
    "CloseAction",
    "OrderCloseResult",
    "CloseReport",
    "InvalidTransition",
    "close_order",
    "close_orders",
    "sweep_expired_orders",
    "create_order",
    "record_payment",
]

logger = logging.getLogger("django_wxpay_close")
T = TypeVar("T")


class CloseAction(str, Enum):
    """What the service did with one order; the summaries count these."""

    CLOSED = "closed"
    ALREADY_CLOSED = "already_closed"
    FOUND_PAID = "found_paid"
    RETRY_SCHEDULED = "retry_scheduled"
    MARKED_UNKNOWN = "unknown_to_wechat"  # ORDERNOTEXIST until retries ran out
    PUT_ON_HOLD = "on_hold"  # a person must look: untrusted answer, our bug, retries spent
    CONFIGURATION_ERROR = "configuration_error"  # wrong key/sign type/merchant: merchant halted for the run
    SKIPPED = "skipped"  # nothing sent; `reason` says why
    FAILED = "failed"  # an unexpected error on our side (logged with its traceback)

    @property
    def label(self) -> str:
        return _ACTION_LABELS[self]

    def counted(self, count: int) -> str:
        """'1 was already paid', '2 were already paid': the label with its count, grammatical."""
        return f"{count} {_ACTION_SINGULAR.get(self, self.label) if count == 1 else self.label}"

    @property
    def is_alarm(self) -> bool:
        """Something cron monitoring should hear about (non-zero exit status)."""
        return self in (CloseAction.CONFIGURATION_ERROR, CloseAction.PUT_ON_HOLD, CloseAction.FAILED)


_ACTION_LABELS = {
    CloseAction.CLOSED: "closed",
    CloseAction.ALREADY_CLOSED: "were already closed",
    CloseAction.FOUND_PAID: "were already paid",
    CloseAction.RETRY_SCHEDULED: "will be retried",
    CloseAction.MARKED_UNKNOWN: "were never known to WeChat",
    CloseAction.PUT_ON_HOLD: "need attention",
    CloseAction.CONFIGURATION_ERROR: "hit a configuration error",
    CloseAction.SKIPPED: "were skipped",
    CloseAction.FAILED: "failed unexpectedly",
}
_ACTION_SINGULAR = {
    CloseAction.ALREADY_CLOSED: "was already closed",
    CloseAction.FOUND_PAID: "was already paid",
    CloseAction.MARKED_UNKNOWN: "was never known to WeChat",
    CloseAction.PUT_ON_HOLD: "needs attention",
    CloseAction.SKIPPED: "was skipped",
}


CLAIMED_ELSEWHERE = "a close is already in flight for it"
MERCHANT_HALTED = "its merchant hit a configuration error earlier in this run"
RUN_INTERRUPTED = "the run was interrupted before its request left"
CLAIM_LAPSING = "its claim would have lapsed before the answer could come"
_LEASE_SPARE = timedelta(seconds=5)  # beyond the exchange(s) a claim must still cover when a row is written


class InvalidTransition(Exception):
    """A state change the transition table does not allow (e.g. a payment for a closed order)."""


@dataclass(frozen=True)
class OrderCloseResult:
    order_id: int
    out_trade_no: str
    merchant: str
    action: CloseAction
    reason: str = ""
    outcome: Outcome | None = None  # None when nothing was sent
    attempt_id: int | None = None
    duration: float = 0.0  # seconds spent on the HTTP exchange

    @property
    def summary_key(self) -> str:
        """A short, low-cardinality reason for summaries: the err_code or outcome, else the reason."""
        if self.reason:
            return self.reason.split(":", 1)[0]
        return self.outcome.value if self.outcome is not None else ""


_MAX_SUMMARY_KEYS = 100


@dataclass
class CloseReport:
    """Counts by action, merchant and reason: constant memory whatever the backlog."""

    by_action: Counter[CloseAction] = field(default_factory=Counter)
    by_merchant: Counter[tuple[str, CloseAction]] = field(default_factory=Counter)
    by_reason: Counter[tuple[CloseAction, str]] = field(default_factory=Counter)
    halted_merchants: dict[str, str] = field(default_factory=dict)
    started_at: datetime = field(default_factory=timezone.now)
    finished_at: datetime | None = None
    observer: Callable[[OrderCloseResult], None] | None = field(default=None, repr=False, compare=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, result: OrderCloseResult) -> None:
        with self._lock:
            self.by_action[result.action] += 1
            self.by_merchant[(result.merchant, result.action)] += 1
            key = (result.action, result.summary_key)
            if key in self.by_reason or len(self.by_reason) < _MAX_SUMMARY_KEYS:
                self.by_reason[key] += 1
            if result.action is CloseAction.CONFIGURATION_ERROR:
                self.halted_merchants.setdefault(result.merchant, result.reason)
            if self.observer:
                self.observer(result)

    def finish(self) -> CloseReport:
        self.finished_at = timezone.now()
        return self

    @property
    def total(self) -> int:
        return sum(self.by_action.values())

    @property
    def has_alarms(self) -> bool:
        return any(action.is_alarm for action in self.by_action)

    def sentence(self) -> str:
        """'3 closed, 1 was already paid, 1 will be retried (SYSTEMERROR)' — for people."""
        parts = []
        for action in CloseAction:
            count = self.by_action.get(action, 0)
            if not count:
                continue
            reasons = sorted(
                (reason for (reason_action, reason) in self.by_reason if reason_action is action and reason),
            )
            detail = f" ({'; '.join(reasons[:5])})" if reasons and action not in (CloseAction.CLOSED,) else ""
            parts.append(f"{action.counted(count)}{detail}")
        return ", ".join(parts) or "nothing to do"


def _require_autocommit() -> None:
    if transaction.get_connection().in_atomic_block:
        raise transaction.TransactionManagementError(
            "django_wxpay_close services send requests to WeChat and must run outside transaction.atomic(): "
            "a rollback would erase the audit rows of requests that really went out."
        )


@lru_cache(maxsize=64)
def _client(
    merchant: Merchant, base_urls: tuple[str, ...], connect_timeout: float, read_timeout: float,
    max_response_bytes: int, pool_size: int,
) -> CloseOrderClient:
    """One client (and so one connection pool) per merchant and endpoint config, reused across calls."""
    return CloseOrderClient(
        merchant, base_urls=base_urls, connect_timeout=connect_timeout, read_timeout=read_timeout,
        max_response_bytes=max_response_bytes, pool_size=pool_size,
    )


def _response_text(body: bytes) -> str:
    # Bytes that are not UTF-8 are kept visible as escapes; NUL is escaped too (PostgreSQL text refuses it).
    return body.decode("utf-8", "backslashreplace").replace("\x00", "\\x00")


def _audit_answer(result: CloseResult) -> dict[str, Any]:
    return {
        "url": result.url[:300],
        "failed_over_from": (result.failed_over_from or "")[:300],
        "duration_ms": round(result.elapsed * 1000),
        "http_status": result.http_status,
        "response_body": _response_text(result.response_body),
        "return_code": result.return_code[:16],
        "return_msg": result.return_msg[:128],
        "result_code": result.result_code[:16],
        "err_code": result.err_code[:32],
        "err_code_des": result.err_code_des[:128],
        "signature_verified": result.signature_verified,
        "outcome": result.outcome.value,
        "reason": result.reason,
    }


def _send_signal(signal: Any, order: Order, **kwargs: Any) -> None:
    def send() -> None:
        for receiver, response in signal.send_robust(sender=Order, order=order, **kwargs):
            if isinstance(response, Exception):
                logger.error(
                    "A receiver of a django_wxpay_close signal failed: %r", receiver,
                    exc_info=response, extra={"order_id": order.pk, "out_trade_no": order.out_trade_no},
                )

    if signal.has_listeners(Order):
        transaction.on_commit(send)


class _CloseRun:
    """One caller's batch: shared settings, clients, and the merchants halted in this run."""

    def __init__(self, settings: CloseSettings, *, trigger: str, user: Any = None, workers: int | None = None) -> None:
        self.settings = settings
        # One kept-alive connection to WeChat per request in flight: a pool smaller than that would open and
        # drop a TCP (and TLS) connection for each request beyond it (the concurrent sender sizes its own alike).
        self.pool_size = max(workers or 0, settings.workers)
        self.trigger = trigger
        self.user = user if getattr(user, "pk", None) is not None else None
        self.actor = self.user.get_username() if self.user is not None else ""
        self.halted: dict[str, str] = {}
        self._halt_lock = threading.Lock()
        # A row written ahead of a free slot waits at most one exchange (those in flight before it) and then
        # has its own, so its claim must cover both; with a CLAIM_TIMEOUT too short for that, rows are
        # written only for free slots, as before, rather than renewed for nothing or called off.
        exchange = settings.longest_exchange
        self.writes_ahead = settings.claim_timeout >= 2 * exchange + _LEASE_SPARE
        self._lease_needed = (2 if self.writes_ahead else 1) * exchange + _LEASE_SPARE

    def client_for(self, merchant_name: str) -> CloseOrderClient:
        s = self.settings
        return _client(
            s.merchants[merchant_name].merchant, s.base_urls, s.connect_timeout, s.read_timeout,
            s.max_response_bytes, self.pool_size,
        )

    def halt(self, merchant_name: str, reason: str) -> None:
        with self._halt_lock:
            if merchant_name not in self.halted:
                self.halted[merchant_name] = reason
                logger.error(
                    "Stopped closing orders of merchant %r for this run: %s", merchant_name, reason,
                    extra={"merchant": merchant_name, "outcome": Outcome.CONFIGURATION_ERROR.value},
                )

    # -- claims ------------------------------------------------------------------------------

    def claim_one(self, order: Order, *, now: datetime) -> str | None:
        """Claim `order` for this caller; None on success, else why it is not sent."""
        blocker = why_not_closable(order, now=now, min_order_age=self.settings.min_order_age)
        if blocker:
            return blocker
        token = uuid.uuid4()
        expires = now + self.settings.claim_timeout
        # An explicit close (admin, code) is a person's decision: it lifts a hold and restarts the retry budget.
        claimed = Order.objects.filter(claimable(now), pk=order.pk, state=OrderState.OPEN).update(
            claim_token=token, claim_expires_at=expires, on_hold=False, retry_count=0
        )
        if not claimed:
            order.refresh_from_db(fields=["state", "claim_expires_at"])
            return why_not_closable(order, now=now, min_order_age=self.settings.min_order_age) or CLAIMED_ELSEWHERE
        order.claim_token, order.claim_expires_at, order.on_hold, order.retry_count = token, expires, False, 0
        return None

    def claim_due_batch(self, *, now: datetime, limit: int, merchants: list[str] | None,
                        older_than: timedelta | None) -> list[Order]:
        """Claim up to `limit` due orders in one short transaction (SKIP LOCKED where supported)."""
        token = uuid.uuid4()
        expires = now + self.settings.claim_timeout
        due = orders_due_for_closing(
            now=now, min_order_age=self.settings.min_order_age, merchants=merchants,
            exclude_merchants=list(self.halted), older_than=older_than,
        )
        with transaction.atomic():
            ids = list(due.select_for_update(skip_locked=True).values_list("pk", flat=True)[:limit])
            if not ids:
                return []
            Order.objects.filter(claimable(now), pk__in=ids, state=OrderState.OPEN).update(
                claim_token=token, claim_expires_at=expires
            )
        return list(Order.objects.filter(pk__in=ids, claim_token=token).order_by("payment_deadline", "pk"))

    def _keep_claim(self, order: Order) -> bool:
        """Renew the lease if what is left of it could not cover the wait for a slot and a full exchange;
        False if it was lost."""
        now = timezone.now()
        if order.claim_expires_at and order.claim_expires_at - now > self._lease_needed:
            return True
        expires = now + self.settings.claim_timeout
        renewed = Order.objects.filter(pk=order.pk, claim_token=order.claim_token, state=OrderState.OPEN).update(
            claim_expires_at=expires
        )
        order.claim_expires_at = expires
        return bool(renewed)

    def _release(self, order: Order, **updates: Any) -> int:
        """Clear our claim (only if still ours) and apply bookkeeping; the state is left as it is."""
        return update_rows(self._release_update(order, **updates))[0]

    @staticmethod
    def _release_update(order: Order, **updates: Any) -> RowUpdate:
        mine = ClearIfClaimedBy(order.claim_token)
        # claim_token last: MySQL/MariaDB apply SET assignments left to right, each seeing the ones before it.
        return RowUpdate(Order, order.pk, {**updates, "claim_expires_at": mine, "claim_token": mine})

    # -- one order ---------------------------------------------------------------------------

    def claim_and_close(self, order: Order) -> OrderCloseResult:
        """An explicit close (code): claim the order, then close it, or say why it is not sent."""
        skip = self.claim_one(order, now=timezone.now())
        return _order_result(order, CloseAction.SKIPPED, skip) if skip else self.close_claimed(order)

    def claim_and_start_many(self, orders: Sequence[Order]) -> list[Sending | OrderCloseResult]:
        """Explicit closes among several (the admin action): claim each order, then start the claimed ones."""
        not_sent: dict[int, OrderCloseResult] = {}
        for index, order in enumerate(orders):
            blocker = _guarded(order, lambda: self.claim_one(order, now=timezone.now()))
            if blocker:
                not_sent[index] = blocker if isinstance(blocker, OrderCloseResult) else _order_result(
                    order, CloseAction.SKIPPED, blocker)
        started = iter(self.start_claimed_many([order for i, order in enumerate(orders) if i not in not_sent]))
        return [not_sent[i] if i in not_sent else next(started) for i in range(len(orders))]

    def close_claimed(self, order: Order) -> OrderCloseResult:
        """Send closeorder for an order this run has claimed, audit it and apply the answer, in this thread."""
        started = self.start_claimed(order)
        if not isinstance(started, Sending):
            return started
        return self.record(self.answered(started, started.client.send(started.prepared)))

    def start_claimed(self, order: Order) -> Sending | OrderCloseResult:
        """Everything before the request leaves: checks, signing, and the audit row it is sent under."""
        return self.start_claimed_many([order])[0]

    def start_claimed_many(self, orders: Sequence[Order]) -> list[Sending | OrderCloseResult]:
        """`start_claimed` for several orders, their audit rows written in one statement (one per order's result)."""
        return self.start_ready_many([self.check_and_sign(order) for order in orders])

    def check_and_sign(self, order: Order) -> _Ready | OrderCloseResult:
        """The checks and the signing of a claimed order, which need no request slot: the sweep does them
        before it queues the order, so a freed slot waits only for the audit rows (docs/performance.md:
        66-71 ms -> 65 ms per cycle at 32 workers, 75-77 % -> 78-82 % of the latency limit)."""
        return _guarded(order, lambda: self._check_and_sign(order))

    def start_ready_many(self, items: Sequence[_Ready | OrderCloseResult]) -> list[Sending | OrderCloseResult]:
        """Write the audit rows of checked and signed orders still to be sent, in one statement; results pass
        through. A merchant halted, or a lease lost, since an order was checked stops it here, before its row.
        """
        ready = [_guarded(item.order, lambda: self._still_to_send(item)) if isinstance(item, _Ready) else item
                 for item in items]
        going = [item for item in ready if isinstance(item, _Ready)]
        try:
            attempts = iter(CloseAttempt.start_many([item.audit_row for item in going]) if going else [])
        except Exception as exc:  # noqa: BLE001 - no row written and nothing sent: each of these orders fails alone
            return [_failed(item.order, exc) if isinstance(item, _Ready) else item for item in ready]
        return [Sending(item.order, next(attempts), item.client, item.prepared) if isinstance(item, _Ready) else item
                for item in ready]

    def _still_to_send(self, item: _Ready) -> _Ready | OrderCloseResult:
        if item.order.merchant in self.halted:
            return self._skip_halted(item.order)
        if not self._keep_claim(item.order):
            return _order_result(item.order, CloseAction.SKIPPED, CLAIMED_ELSEWHERE)
        return item

    def _skip_halted(self, order: Order) -> OrderCloseResult:
        self._release(order)
        return _order_result(order, CloseAction.SKIPPED, MERCHANT_HALTED)

    def _check_and_sign(self, order: Order) -> _Ready | OrderCloseResult:
        merchant_settings = self.settings.merchants.get(order.merchant)
        problem = None
        if order.merchant in self.halted:
            return self._skip_halted(order)
        if merchant_settings is None:
            problem = f"merchant {order.merchant!r} is not in WXPAY_CLOSE['MERCHANTS']"
        elif (order.appid, order.mch_id) != (merchant_settings.merchant.appid, merchant_settings.merchant.mch_id):
            problem = (
                f"order was created for appid {order.appid}/mch_id {order.mch_id} but merchant "
                f"{order.merchant!r} is configured with {merchant_settings.merchant.appid}/{merchant_settings.merchant.mch_id}"
            )
        if problem:
            self.halt(order.merchant, problem)
            self._release(order, last_outcome=Outcome.CONFIGURATION_ERROR.value, last_error=problem)
            return _order_result(order, CloseAction.CONFIGURATION_ERROR, problem)

        client = self.client_for(order.merchant)
        try:
            prepared = client.prepare(order.out_trade_no, sub_mch_id=order.sub_mch_id, sub_appid=order.sub_appid or None)
        except InvalidRequestField as exc:
            self._release(order, on_hold=True, last_outcome=Outcome.CLIENT_BUG.value, last_error=str(exc))
            return _order_result(order, CloseAction.PUT_ON_HOLD, f"cannot build the request: {exc}")
        audit_row = {
            "order": order, "merchant": order.merchant, "mch_id": order.mch_id, "sub_mch_id": order.sub_mch_id,
            "out_trade_no": order.out_trade_no, "trigger": self.trigger, "user": self.user, "actor": self.actor,
            "url": client.urls[0], "sign_type": prepared.sign_type.value, "request_xml": prepared.body.decode("utf-8"),
        }
        return _Ready(order, client, prepared, audit_row)

    def answered(self, sending: Sending, result: CloseResult) -> _Answered:
        """Decided the moment the answer arrives, not when it is written: a halt must stop sends at once."""
        return _Answered(sending.order, sending.attempt, result, self._decide(sending.order, result, timezone.now()))

    def withdraw(self, sending: Sending, interrupted: bool) -> _Withdrawn | None:
        """Whether a started close, its row written a moment ahead of its request, must stay unsent after all."""
        order, now = sending.order, timezone.now()
        if interrupted:
            reason = RUN_INTERRUPTED
        elif order.merchant in self.halted:
            reason = MERCHANT_HALTED
        elif order.claim_expires_at is None or order.claim_expires_at - now <= self.settings.longest_exchange:
            reason = CLAIM_LAPSING  # never sent without a lease that outlasts its exchange (`_keep_claim`)
        else:
            return None
        return _Withdrawn(order, sending.attempt, reason, now)

    def record(self, answered: _Answered | _Withdrawn) -> OrderCloseResult:
        """Write the answer on the audit row and its consequence on the order, in one statement where possible."""
        if isinstance(answered, _Withdrawn):
            return self._record_withdrawn(answered)
        order, attempt, result, decision = answered.order, answered.attempt, answered.result, answered.decision
        completion = attempt.completion(completed_at=decision.answered_at, **_audit_answer(result))
        completed, changed = update_rows(completion, decision.update)
        if completed:
            completion.apply_to(attempt)
        action, reason = decision.action, decision.reason
        if changed:
            decision.update.apply_to(order)
            if decision.signal is not None:
                _send_signal(decision.signal, order, attempt=attempt, **decision.signal_kwargs)
        else:  # a state change found the order no longer in the state the close started from
            self._release(order, **decision.bookkeeping)
            order.refresh_from_db(fields=["state"])
            action, reason = CloseAction.FAILED, f"WeChat answered {result.outcome.value} but the order is now {order.state}"
        logger.info(
            "closeorder %s: %s%s", order.out_trade_no, result.outcome.value, f" ({reason})" if reason else "",
            extra={"order_id": order.pk, "out_trade_no": order.out_trade_no, "merchant": order.merchant,
                   "outcome": result.outcome.value, "action": action.value, "duration_ms": attempt.duration_ms,
                   "attempt_id": attempt.pk},
        )
        return _order_result(order, action, reason, outcome=result.outcome, attempt=attempt, duration=result.elapsed)

    def _record_withdrawn(self, withdrawn: _Withdrawn) -> OrderCloseResult:
        """Complete the row of a request that never left, saying so, and give the order's claim back."""
        order, attempt = withdrawn.order, withdrawn.attempt
        completion = attempt.completion(completed_at=withdrawn.at, reason=f"not sent: {withdrawn.reason}")
        completed, _released = update_rows(completion, self._release_update(order))
        if completed:
            completion.apply_to(attempt)
        logger.info("closeorder %s not sent: %s", order.out_trade_no, withdrawn.reason,
                    extra={"order_id": order.pk, "out_trade_no": order.out_trade_no, "merchant": order.merchant,
                           "action": CloseAction.SKIPPED.value, "attempt_id": attempt.pk})
        return _order_result(order, CloseAction.SKIPPED, withdrawn.reason, attempt=attempt)

    def _decide(self, order: Order, result: CloseResult, now: datetime) -> _Decision:
        """What WeChat's answer means for the order (PROTOCOL.md's outcome table); nothing is written here."""
        outcome = result.outcome
        bookkeeping: dict[str, Any] = {
            "attempt_count": Add(1),
            "last_attempt_at": now,
            "last_outcome": outcome.value,
            "last_error": result.reason,
        }
        failed = {"outcome": outcome, "reason": result.reason}

        def keep_open(action: CloseAction, signal: Any, reason: str = result.reason,
                      signal_kwargs: dict[str, Any] = failed, **updates: Any) -> _Decision:
            return _Decision(now, action, reason, self._release_update(order, **bookkeeping, **updates),
                             bookkeeping, signal, signal_kwargs)

        def change_state(target: str, action: CloseAction, signal: Any, reason: str = result.reason,
                         signal_kwargs: dict[str, Any] | None = None, **updates: Any) -> _Decision:
            """Conditional on the state the close started from: if that moved, nothing lands (see record)."""
            if target not in ALLOWED_TRANSITIONS[order.state]:
                raise InvalidTransition(f"{order.state} -> {target} is not an allowed transition")
            values = {"state": target, "state_changed_at": now, "claim_token": None, "claim_expires_at": None,
                      **bookkeeping, **updates}
            update = RowUpdate(Order, order.pk, values, where={"state": order.state})
            return _Decision(now, action, reason, update, bookkeeping, signal, signal_kwargs or {})

        if outcome is Outcome.PAID:
            return change_state(OrderState.PAID, CloseAction.FOUND_PAID, signals.order_found_paid,
                                retry_count=0, next_attempt_at=None, paid_at=now)
        if outcome.order_is_closed:
            already = outcome is Outcome.ALREADY_CLOSED
            return change_state(OrderState.CLOSED, CloseAction.ALREADY_CLOSED if already else CloseAction.CLOSED,
                                signals.order_closed, signal_kwargs={"already_closed": already},
                                retry_count=0, next_attempt_at=None, closed_at=now)
        if outcome.halts_merchant:
            self.halt(order.merchant, result.reason)
            return keep_open(CloseAction.CONFIGURATION_ERROR, signals.close_failed,
                             next_attempt_at=now + self.settings.retry_backoff)
        if outcome.needs_attention:
            return keep_open(CloseAction.PUT_ON_HOLD, signals.close_failed, on_hold=True)

        retries = order.retry_count + 1
        if retries < self.settings.max_attempts:
            return keep_open(CloseAction.RETRY_SCHEDULED, signals.close_failed, retry_count=Add(1),
                             next_attempt_at=now + self.settings.retry_delay(retries))
        exhausted = f"gave up after {retries} attempts; last: {result.reason or outcome.value}"
        exhausted_kwargs = {"outcome": outcome, "reason": exhausted}
        if outcome is Outcome.NOT_FOUND:
            # PROTOCOL.md: after the last retry an ORDERNOTEXIST order is terminal and can never be paid.
            return change_state(OrderState.UNKNOWN_TO_WECHAT, CloseAction.MARKED_UNKNOWN,
                                signals.close_attempts_exhausted, exhausted, exhausted_kwargs, retry_count=retries)
        return keep_open(CloseAction.PUT_ON_HOLD, signals.close_attempts_exhausted, exhausted, exhausted_kwargs,
                         retry_count=retries, on_hold=True)


@dataclass(frozen=True)
class _Decision:
    """An answer's consequence: the order's UPDATE, then the action, reason and signal reported if it lands."""

    answered_at: datetime
    action: CloseAction
    reason: str
    update: RowUpdate
    bookkeeping: dict[str, Any]  # written alone (with the claim released) if a state change does not land
    signal: Any = None
    signal_kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class _Ready:
    """An order that passed its checks, with its signed request and the audit row to write before sending it."""

    order: Order
    client: CloseOrderClient
    prepared: PreparedClose
    audit_row: dict[str, Any]


@dataclass(frozen=True)
class _Withdrawn:
    """A started close that was not sent after all: its audit row is completed with why, and no answer."""

    order: Order
    attempt: CloseAttempt
    reason: str
    at: datetime


@dataclass(frozen=True)
class _Answered:
    """An answer between its arrival and its write: what was sent, what came back, what it means."""

    order: Order
    attempt: CloseAttempt
    result: CloseResult
    decision: _Decision


def _order_result(order: Order, action: CloseAction, reason: str = "", *, outcome: Outcome | None = None,
                  attempt: CloseAttempt | None = None, duration: float = 0.0) -> OrderCloseResult:
    return OrderCloseResult(
        order_id=order.pk, out_trade_no=order.out_trade_no, merchant=order.merchant, action=action,
        reason=reason, outcome=outcome, attempt_id=attempt.pk if attempt else None, duration=duration,
    )


def _guarded(order: Order | _Ready, close: Callable[[], T]) -> T | OrderCloseResult:
    """Isolate one order's unexpected failure: log it, report it, keep going with the others."""
    try:
        return close()
    except Exception as exc:  # noqa: BLE001 - one order's bug must not stop the others (or kill a worker)
        return _failed(order.order if isinstance(order, _Ready) else order, exc)


def _failed(order: Order, exc: Exception) -> OrderCloseResult:
    logger.error(
        "Closing order %s failed unexpectedly", order.out_trade_no, exc_info=exc,
        extra={"order_id": order.pk, "out_trade_no": order.out_trade_no, "merchant": order.merchant},
    )
    return OrderCloseResult(order_id=order.pk, out_trade_no=order.out_trade_no, merchant=order.merchant,
                            action=CloseAction.FAILED, reason=f"{type(exc).__name__}: {exc}")


# -- public services ---------------------------------------------------------------------------


def close_order(order: Order, *, trigger: str = Trigger.CODE, user: Any = None) -> OrderCloseResult:
    """Close one order now (if it is open, old enough and not in flight elsewhere); `order` is refreshed."""
    _require_autocommit()
    run = _CloseRun(load_settings(), trigger=trigger, user=user)
    result = _guarded(order, lambda: run.claim_and_close(order))
    order.refresh_from_db()
    return result


def close_orders(
    orders: Iterable[Order], *, trigger: str = Trigger.CODE, user: Any = None, workers: int | None = None,
    on_result: Callable[[OrderCloseResult], None] | None = None,
) -> CloseReport:
    """Close several chosen orders (the admin action), `workers` requests in flight at once (pipeline.py)."""
    _require_autocommit()
    settings = load_settings()
    workers = workers or settings.workers
    run = _CloseRun(settings, trigger=trigger, user=user, workers=workers)
    report = CloseReport(observer=on_result)
    with _pipeline(run, report, start=run.claim_and_start_many, workers=workers, waiting=workers * 2) as pipeline:
        for order in orders:
            pipeline.submit(order)
    return report.finish()


def _pipeline(run: _CloseRun, report: CloseReport, *, start: Callable[[list[Any]], list[Sending | OrderCloseResult]],
              workers: int, waiting: int) -> ClosePipeline[Any, OrderCloseResult]:
    """`workers` requests in flight at once; `start` takes chosen orders (the admin) or checked ones (the sweep)."""
    return ClosePipeline(concurrency=workers, start=start, answered=run.answered, withdraw=run.withdraw,
                         record=run.record, on_result=report.add, guard=_guarded, waiting=waiting,
                         write_ahead=run.writes_ahead)


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
    """Close every open order past its payment window, batch by batch, in constant memory.

    Each batch is claimed in one short transaction, so several sweepers (cron on many hosts)
    share a backlog without sending the same order twice. A merchant whose key is rejected is
    halted for the rest of the run; its other orders stay untouched.
    """
    _require_autocommit()
    settings = load_settings()
    batch_size = batch_size or settings.batch_size
    workers = workers or settings.workers
    run = _CloseRun(settings, trigger=trigger, workers=workers)
    report = CloseReport(observer=on_result)

    if dry_run:
        due = orders_due_for_closing(now=timezone.now(), min_order_age=settings.min_order_age,
                                     merchants=merchants, older_than=older_than)
        for order in (due[:limit] if limit else due).iterator(chunk_size=batch_size):
            report.add(_order_result(order, CloseAction.SKIPPED, "dry run: would send closeorder"))
        return report.finish()

    claimed_total = 0
    # This thread claims the next batch, and checks and signs its orders, while the last one's are being sent.
    with _pipeline(run, report, start=run.start_ready_many, workers=workers, waiting=batch_size + workers) as pipeline:
        while limit is None or claimed_total < limit:
            size = batch_size if limit is None else min(batch_size, limit - claimed_total)
            batch = run.claim_due_batch(now=timezone.now(), limit=size, merchants=merchants, older_than=older_than)
            if not batch:
                break
            claimed_total += len(batch)
            for order in batch:
                ready = run.check_and_sign(order)
                if isinstance(ready, _Ready):
                    pipeline.submit(ready)
                else:
                    pipeline.report(ready)
    return report.finish()


def create_order(
    *,
    out_trade_no: str,
    merchant: str = "default",
    amount: int | None = None,
    currency: str = "",
    created_at: datetime | None = None,
    payment_deadline: datetime | None = None,
    sub_mch_id: str | None = None,
    sub_appid: str | None = None,
) -> Order:
    """Record an order the shop just created at WeChat (unified order), snapshotting the merchant IDs."""
    settings = load_settings()
    if merchant not in settings.merchants:
        raise ValueError(f"merchant {merchant!r} is not in WXPAY_CLOSE['MERCHANTS']")
    validate_out_trade_no(out_trade_no)
    configured = settings.merchants[merchant].merchant
    created_at = created_at or timezone.now()
    return Order.objects.create(
        merchant=merchant, appid=configured.appid, mch_id=configured.mch_id,
        sub_mch_id=sub_mch_id or configured.sub_mch_id, sub_appid=sub_appid or configured.sub_appid or "",
        out_trade_no=out_trade_no, amount=amount, currency=currency, created_at=created_at,
        payment_deadline=payment_deadline or created_at + settings.payment_window,
    )


def record_payment(*, order: Order, paid_at: datetime | None = None) -> Order:
    """Mark an order PAID because WeChat's payment notification (or an order query) said so.

    Idempotent for an order already PAID; refuses a CLOSED order (WeChat cannot have taken that
    payment: investigate). Afterwards the sweep never sends closeorder for it.
    """
    paid_at = paid_at or timezone.now()
    for _ in range(3):  # the state may move under us once (a close landing); re-read and decide again
        order.refresh_from_db(fields=["state"])
        if order.state == OrderState.PAID:
            return order
        if OrderState.PAID not in ALLOWED_TRANSITIONS[order.state]:
            raise InvalidTransition(f"order {order.out_trade_no} is {order.state}; a payment cannot be recorded")
        if Order.objects.filter(pk=order.pk, state=order.state).update(
            state=OrderState.PAID, state_changed_at=timezone.now(), paid_at=paid_at
        ):
            order.refresh_from_db()
            _send_signal(signals.order_paid_recorded, order, attempt=None)
            return order
    raise InvalidTransition(f"order {order.out_trade_no} kept changing state; payment not recorded")
