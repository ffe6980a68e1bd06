"""What one closeorder answer means for its order (docs/protocol.md#outcomes), as the UPDATE to apply.

Pure: nothing here reads or writes the database. The engine applies a decision's `values` with one UPDATE
conditional on its claim and on the order still being open, and sends `signal` once that is committed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from django.db.models import F
from django.db.models.functions import Now

from .. import signals
from ..conf import CloseSettings
from ..models import ALLOWED_TRANSITIONS, Order, OrderState
from ..reports import CloseAction
from ..wechat import CloseResult, Outcome


@dataclass(frozen=True)
class Decision:
    """The UPDATE to apply to the order if the claim is still ours, and what to report."""

    action: CloseAction
    reason: str
    values: dict[str, Any]
    signal: Any = None
    signal_kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def group_key(self) -> tuple[tuple[str, str], ...]:
        """Decisions with equal keys apply the same UPDATE, so one statement can apply them all."""
        return tuple(sorted((name, repr(value)) for name, value in self.values.items()))


def release(**values: Any) -> dict[str, Any]:
    """The values that give a claim back: the order is due again at once (or as `values` say)."""
    return {"in_flight": False, "due_at": Now(), **values}


def backoff(order: Order, settings: CloseSettings, *, spends_retry: bool) -> tuple[bool, dict[str, Any]]:
    """(retries spent, the UPDATE values) for a failure tried again later.

    The wait doubles with each failed exchange of the order, counted or not: RETRY_BACKOFF · 2^(n-1).
    """
    retries = order.retry_count + 1 if spends_retry else order.retry_count
    if retries >= settings.max_attempts:
        return True, {"retry_count": retries}
    return False, {"retry_count": retries, "due_at": Now() + settings.retry_delay(order.attempt_count + 1)}


def decide(order: Order, result: CloseResult, settings: CloseSettings, *, spends_retry: bool) -> Decision:
    """What WeChat's answer means for the order; `spends_retry` says whether a failure spends one of
    MAX_ATTEMPTS (the run's judgement decides that, see judgement.py)."""
    outcome = result.outcome
    bookkeeping: dict[str, Any] = {"attempt_count": F("attempt_count") + 1, "last_attempt_at": Now(),
                                   "last_outcome": outcome.value, "last_error": result.reason, "in_flight": False}
    failed = {"outcome": outcome, "reason": result.reason}

    def keep_open(action: CloseAction, signal: Any, reason: str = result.reason,
                  signal_kwargs: dict[str, Any] = failed, **updates: Any) -> Decision:
        return Decision(action, reason, {**bookkeeping, **updates}, signal, signal_kwargs)

    def change_state(target: str, action: CloseAction, signal: Any, reason: str = result.reason,
                     signal_kwargs: dict[str, Any] | None = None, **updates: Any) -> Decision:
        if target not in ALLOWED_TRANSITIONS[OrderState.OPEN]:
            raise ValueError(f"open -> {target} is not an allowed transition")
        return Decision(action, reason, {**bookkeeping, "state": target, "state_changed_at": Now(), **updates},
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
        return keep_open(CloseAction.PUT_ON_HOLD, signals.close_failed, on_hold=True)

    # Retried later: a configuration error too, so one poison order does not stop its merchant for ever.
    spent, updates = backoff(order, settings, spends_retry=spends_retry)
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
                     on_hold=True, **updates)


def after_state_moved(state: str, result: CloseResult, decision: Decision) -> Decision:
    """The order left the open state while its close was in flight (a payment recorded meanwhile): what the
    answer means now. Only the exchange's bookkeeping is written, and the claim given back."""
    bookkeeping = {name: decision.values[name] for name in
                   ("attempt_count", "last_attempt_at", "last_outcome", "last_error", "in_flight")}
    if state == OrderState.PAID and result.outcome is Outcome.PAID:
        return Decision(CloseAction.FOUND_PAID, "the payment was recorded while the close was in flight", bookkeeping)
    if state == OrderState.PAID and result.outcome.order_is_closed:
        reason = ("WeChat answered that the order is closed, but a payment was recorded for it: check the payment "
                  "at WeChat and refund or fulfil it")
        return Decision(CloseAction.PUT_ON_HOLD, reason, {**bookkeeping, "last_error": reason, "on_hold": True},
                        signals.closed_after_payment, {"outcome": result.outcome, "reason": reason})
    return Decision(CloseAction.FAILED, f"WeChat answered {result.outcome.value} but the order is now {state}",
                    bookkeeping)
