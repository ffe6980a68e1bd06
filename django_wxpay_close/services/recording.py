"""How the engine's database thread records answers: the orders' new states and the audit rows' answers.

Together (`write_together`): the answers taken so far in one transaction, one UPDATE per group of orders with
equal decisions, then one UPDATE that gives each audit row its own answer. One at a time (`write_answer`,
`release_unsent`, `record_failure`), each in its own transaction, when the group could not be committed: that is
also where the rare cases are settled (an answer committed before its acknowledgement was lost, a late answer
kept on a row of its own, an answer whose order's state moved while it was in flight).

Every change is conditional on the run's claim token and on the order still being open. Nothing here reports or
logs an answer: the engine does, with what these functions return.
"""

from __future__ import annotations

import logging
import uuid
from collections import defaultdict

from django.db import transaction
from django.utils.translation import gettext_noop

from .. import signals
from ..models import CloseAttempt, Order, OrderState
from ..reports import CloseAction
from .decisions import Decision, after_state_moved, release
from .jobs import Answer, Verdict, audit_answer

__all__ = ["LATE_ANSWER", "Regroup", "record_failure", "release_unsent", "write_answer", "write_together"]

logger = logging.getLogger("django_wxpay_close")

LATE_ANSWER = gettext_noop("answered after another close took the order over")


class Regroup(Exception):
    """The answers written together must be written one at a time instead (nothing of the try was committed)."""


def write_together(using: str, token: uuid.UUID, verdicts: list[Verdict], unsent: list[Answer]) -> None:
    """All these answers in one transaction, or nothing of them: raises `Regroup` when a group changed fewer
    orders than it holds (a claim lost, a state moved) or an audit row was completed meanwhile (a late answer).
    A lost connection or any other error is raised as it is, with nothing committed."""
    groups: dict[tuple[tuple[str, str], ...], list[Verdict]] = defaultdict(list)
    for verdict in verdicts:
        groups[verdict.decision.group_key].append(verdict)
    with transaction.atomic(using=using):
        # The orders first: their row locks keep other sweepers off them until the answers are committed.
        for group in groups.values():
            ids = [verdict.answer.job.order.pk for verdict in group]
            changed = Order.objects.using(using).filter(
                pk__in=ids, claim_token=token, state=OrderState.OPEN).update(**group[0].decision.values)
            if changed != len(ids):
                raise Regroup
        answers = {verdict.answer.job.attempt: audit_answer(verdict.result) for verdict in verdicts}
        if CloseAttempt.objects.using(using).complete_each(answers) != len(verdicts):
            raise Regroup  # one was settled as abandoned meanwhile: a late answer, kept on its own
        release_unsent(using, token, unsent)
        for verdict in verdicts:
            _send_signal(using, verdict.decision, verdict.answer.job.order, verdict.answer.job.attempt)


def release_unsent(using: str, token: uuid.UUID, unsent: list[Answer]) -> None:
    """Give back the orders whose requests were not sent, and complete their rows with the reason."""
    if not unsent:
        return
    ids = [answer.job.order.pk for answer in unsent]
    Order.objects.using(using).filter(pk__in=ids, claim_token=token, state=OrderState.OPEN).update(**release())
    by_reason: dict[str, list[int]] = defaultdict(list)
    for answer in unsent:
        by_reason[answer.not_sent].append(answer.job.attempt.pk)
    for reason, attempt_ids in by_reason.items():
        CloseAttempt.objects.using(using).filter(pk__in=attempt_ids).complete(reason=reason)


def record_failure(answer: Answer) -> str:
    """Sending failed on our side (a bug): the row says so; the order's claim lapses and a later run retries it.
    Returns the reason."""
    assert answer.error is not None
    reason = f"{type(answer.error).__name__}: {answer.error}"
    answer.job.attempt.complete(reason=f"not sent: {reason}")
    return reason


def write_answer(using: str, token: uuid.UUID, verdict: Verdict) -> tuple[CloseAction, str]:
    """One answer in its own transaction, however it turned out; returns the action and reason to report.
    An answer whose write committed before (its acknowledgement lost with the connection) is left as it is."""
    job, result, decision = verdict.answer.job, verdict.result, verdict.decision
    answer = audit_answer(result)
    with transaction.atomic(using=using):
        if CloseAttempt.objects.using(using).filter(
                pk=job.attempt.pk, outcome=answer["outcome"], response_body=answer["response_body"]).exists():
            return decision.action, decision.reason  # the commit of the try before landed
        applied = Order.objects.using(using).filter(
            pk=job.order.pk, claim_token=token, state=OrderState.OPEN).update(**decision.values)
        action, reason = decision.action, decision.reason
        if not applied:
            action, reason = _not_applied(using, token, verdict)
            answer["reason"] = "; ".join(filter(None, [result.reason, f"applied nothing: {reason}"]))
        if not job.attempt.complete(**answer):  # settled as abandoned by the close that took the order over
            if action is not CloseAction.CLAIM_LOST:  # (else the reason says so already)
                answer["reason"] = "; ".join(filter(None, [answer["reason"], LATE_ANSWER]))
            job.attempt.keep_late_answer(**answer)
            action, reason = CloseAction.CLAIM_LOST, LATE_ANSWER
        if applied:
            _send_signal(using, decision, job.order, job.attempt)
    return action, reason


def _not_applied(using: str, token: uuid.UUID, verdict: Verdict) -> tuple[CloseAction, str]:
    """An answer's UPDATE found nothing to change: the claim was taken over, or the state moved while the close
    was in flight (a payment recorded, say); then the exchange is still counted and the claim given back."""
    order, result = verdict.answer.job.order, verdict.result
    current = Order.objects.using(using).filter(pk=order.pk).values("state", "claim_token").get()
    if current["claim_token"] != token or current["state"] == OrderState.OPEN:
        return CloseAction.CLAIM_LOST, LATE_ANSWER
    moved = after_state_moved(current["state"], result, verdict.decision)
    Order.objects.using(using).filter(pk=order.pk, claim_token=token).update(**moved.values)
    if moved.signal is not None:  # an incident: WeChat closed an order a payment was recorded for
        logger.error("closeorder %s: %s", order.out_trade_no, moved.reason,
                     extra={"order_id": order.pk, "out_trade_no": order.out_trade_no})
        _send_signal(using, moved, order, None)
    return moved.action, moved.reason


def _send_signal(using: str, decision: Decision, order: Order, attempt: CloseAttempt | None) -> None:
    """The decision's signal, sent once the transaction it was written in commits."""
    if decision.signal is not None:
        signals.send_after_commit(decision.signal, order, using=using, attempt=attempt, **decision.signal_kwargs)
