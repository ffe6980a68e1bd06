"""What one answer means for its order, as the UPDATE to apply: a closeorder answer (docs/protocol.md#outcomes)
in `decide`, an orderquery answer (docs/protocol.md#orderquery) in `decide_query`.

Pure: nothing here reads or writes the database. The engine applies a decision's `values` with one UPDATE
conditional on its claim and on the order still being open, and sends `signal` once that is committed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from django.db.models import F
from django.db.models.functions import Now

from .. import signals
from ..conf import CloseSettings
from ..models import ALLOWED_TRANSITIONS, Order, OrderState
from ..reports import CloseAction
from ..wechat import CloseResult, Outcome, QueryResult, QueryVerdict
from .orders import paid_amount_mismatch


class QueryPurpose(str, Enum):
    """Why an order is asked about (orderquery), which decides what a "still payable" or unclear answer does."""

    SETTLE = "settle"  # the sweep's own: a close could not tell (the order's `needs_query`)
    HELD = "held"  # reconciling orders on hold (the sweep's --check-held)
    CHECK = "check"  # a person or the shop's code asked: only a paid or closed answer changes the order


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


def ask_wechat(reason: str) -> dict[str, Any]:
    """The values that make an order's next request an orderquery, now, with a fresh retry budget."""
    return {"needs_query": True, "retry_count": 0, "due_at": Now(), "last_error": f"{reason}; asking WeChat"}


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
    # A close that cannot tell where the order stands asks WeChat once before a person must (docs/operations.md);
    # once a query has answered, an unclear close goes on hold: the answer is in the trail.
    may_ask = order.query_count == 0
    if outcome.needs_attention:
        if may_ask and outcome is not Outcome.CLIENT_BUG:  # our own malformed request needs a person in any case
            return keep_open(CloseAction.QUERY_SCHEDULED, signals.close_failed, **ask_wechat(result.reason))
        return keep_open(CloseAction.PUT_ON_HOLD, signals.close_failed, on_hold=True)

    # Retried later: a configuration error too, so one poison order does not stop its merchant for ever.
    spent, updates = backoff(order, settings, spends_retry=spends_retry)
    action = CloseAction.CONFIGURATION_ERROR if outcome.halts_merchant else CloseAction.RETRY_SCHEDULED
    if not spent:
        return keep_open(action, signals.close_failed, **updates)
    exhausted = f"gave up after {updates['retry_count']} attempts; last: {result.reason or outcome.value}"
    exhausted_kwargs = {"outcome": outcome, "reason": exhausted}
    if may_ask and not outcome.halts_merchant:  # transport failures, SYSTEMERROR, ORDERNOTEXIST
        return keep_open(CloseAction.QUERY_SCHEDULED, signals.close_failed, exhausted, exhausted_kwargs,
                         **ask_wechat(exhausted))
    if outcome is Outcome.NOT_FOUND:
        # docs/protocol.md#outcomes: after the last retry an ORDERNOTEXIST order is terminal, never payable.
        return change_state(OrderState.UNKNOWN_TO_WECHAT, CloseAction.MARKED_UNKNOWN,
                            signals.close_attempts_exhausted, exhausted, exhausted_kwargs, **updates)
    return keep_open(CloseAction.PUT_ON_HOLD, signals.close_attempts_exhausted, exhausted, exhausted_kwargs,
                     on_hold=True, **updates)


def decide_query(order: Order, result: QueryResult, settings: CloseSettings, *, spends_retry: bool,
                 purpose: QueryPurpose) -> Decision:
    """What WeChat's orderquery answer means for the order (docs/operations.md#when-the-app-asks-wechat).

    Paid (with the amount checked) and closed settle the order whatever the purpose; otherwise a check only
    records the answer, while the sweep closes a still-payable order again (once), looks again later at a
    payment in progress, and puts on hold only what WeChat itself cannot settle.
    """
    verdict, failure = result.verdict, result.failure
    bookkeeping: dict[str, Any] = {"attempt_count": F("attempt_count") + 1, "last_attempt_at": Now(),
                                   "last_outcome": result.outcome_value, "last_error": f"orderquery: {result.reason}",
                                   "in_flight": False}
    if result.trade_state is not None:
        bookkeeping["query_count"] = F("query_count") + 1
    as_before: dict[str, Any] = {"due_at": order.due_at}  # the claim moved it to the lease's end

    def settle(target: str, action: CloseAction, **updates: Any) -> Decision:
        if target not in ALLOWED_TRANSITIONS[OrderState.OPEN]:
            raise ValueError(f"open -> {target} is not an allowed transition")
        trade_state = result.trade_state.value if result.trade_state else ""
        return Decision(action, result.reason, {
            **bookkeeping, "state": target, "state_changed_at": Now(), "on_hold": False, "needs_query": False,
            "retry_count": 0, **updates}, signals.order_settled_by_query, {"state": target, "trade_state": trade_state})

    def keep_open(action: CloseAction, reason: str = result.reason, signal: Any = None,
                  signal_kwargs: dict[str, Any] | None = None, **updates: Any) -> Decision:
        return Decision(action, reason, {**bookkeeping, **updates}, signal, signal_kwargs or {})

    def hold(reason: str, **updates: Any) -> Decision:
        return keep_open(CloseAction.PUT_ON_HOLD, reason, signals.close_attempts_exhausted,
                         {"outcome": failure, "reason": reason}, on_hold=True, needs_query=False,
                         last_error=reason, **as_before, **updates)

    if verdict is QueryVerdict.PAID:
        mismatch = paid_amount_mismatch(order, total_fee=result.response_fields.get("total_fee", ""),
                                        total_fee_amount=result.total_fee, fee_type=result.fee_type)
        if not mismatch:
            return settle(OrderState.PAID, CloseAction.FOUND_PAID, paid_at=Now())
        reason = f"WeChat says it is paid ({result.reason}), but {mismatch}: check the payment at WeChat"
        return keep_open(CloseAction.PUT_ON_HOLD, reason, signals.payment_mismatch,
                         {"notification": None, "reason": reason}, on_hold=True, needs_query=False,
                         last_error=reason, **as_before)
    if verdict is QueryVerdict.CLOSED:
        return settle(OrderState.CLOSED, CloseAction.ALREADY_CLOSED, closed_at=Now())
    if purpose is QueryPurpose.CHECK:
        return keep_open(CloseAction.CHECKED, result.reason, **as_before)
    if verdict is QueryVerdict.NOT_FOUND:  # the close said so too, or the order was never seen by WeChat
        return settle(OrderState.UNKNOWN_TO_WECHAT, CloseAction.MARKED_UNKNOWN)
    if verdict is QueryVerdict.PAYABLE:
        if purpose is QueryPurpose.HELD and order.query_count > 0:
            return hold(f"{result.reason}: still payable, and the close after an earlier query could not tell "
                        "either: close it once the cause is fixed")
        return keep_open(CloseAction.RETRY_SCHEDULED, f"{result.reason}: closing it again", needs_query=False,
                         on_hold=False, retry_count=0, due_at=Now())
    if verdict is QueryVerdict.PAYING:  # never close a payment in progress: ask again after the retry delay
        spent, values = backoff(order, settings, spends_retry=True)
        if spent:
            return hold(f"the payer was still paying after {values['retry_count']} queries ({result.reason})")
        return keep_open(CloseAction.QUERY_SCHEDULED, f"{result.reason}: asking again later", needs_query=True,
                         on_hold=False, **values)
    assert failure is not None  # QueryVerdict.UNKNOWN: WeChat did not say
    if purpose is QueryPurpose.HELD or failure.needs_attention:
        return hold(f"orderquery: {result.reason}")
    spent, values = backoff(order, settings, spends_retry=spends_retry)
    if spent:
        return hold(f"orderquery gave up after {values['retry_count']} attempts; last: {result.reason}", **values)
    action = CloseAction.CONFIGURATION_ERROR if failure.halts_merchant else CloseAction.QUERY_SCHEDULED
    return keep_open(action, result.reason, signals.close_failed, {"outcome": failure, "reason": result.reason},
                     needs_query=True, **values)


def after_state_moved(state: str, result: CloseResult | QueryResult, decision: Decision) -> Decision:
    """The order left the open state while its close or query was in flight (a payment recorded meanwhile): what
    the answer means now. Only the exchange's bookkeeping is written, and the claim given back."""
    bookkeeping = {name: decision.values[name] for name in
                   ("attempt_count", "last_attempt_at", "last_outcome", "last_error", "in_flight")}
    if isinstance(result, QueryResult):
        return Decision(CloseAction.CHECKED, f"the order became {state} while the query was in flight", bookkeeping)
    if state == OrderState.PAID and result.outcome is Outcome.PAID:
        return Decision(CloseAction.FOUND_PAID, "the payment was recorded while the close was in flight", bookkeeping)
    if state == OrderState.PAID and result.outcome.order_is_closed:
        reason = ("WeChat answered that the order is closed, but a payment was recorded for it: check the payment "
                  "at WeChat and refund or fulfil it")
        return Decision(CloseAction.PUT_ON_HOLD, reason, {**bookkeeping, "last_error": reason, "on_hold": True},
                        signals.closed_after_payment, {"outcome": result.outcome, "reason": reason})
    return Decision(CloseAction.FAILED, f"WeChat answered {result.outcome.value} but the order is now {state}",
                    bookkeeping)
