"""Read-only queries: which orders are due for closing, which need a person."""

from __future__ import annotations

from collections.abc import Collection
from datetime import datetime, timedelta

from django.db.models import Q, QuerySet

from .models import CloseAttempt, Order, OrderState
from .wechat import Outcome


def claimable(now: datetime) -> Q:
    """Nobody holds the order, or their claim lapsed (their process died)."""
    return Q(claim_expires_at__isnull=True) | Q(claim_expires_at__lt=now)


def orders_due_for_closing(
    *,
    now: datetime,
    min_order_age: timedelta,
    merchants: Collection[str] | None = None,
    exclude_merchants: Collection[str] = (),
    older_than: timedelta | None = None,
) -> QuerySet[Order]:
    """Open orders past their deadline (and `older_than` past it), old enough, due for a retry, unclaimed."""
    deadline_cutoff = now - older_than if older_than else now
    queryset = Order.objects.filter(
        Q(next_attempt_at__isnull=True) | Q(next_attempt_at__lte=now),
        claimable(now),
        state=OrderState.OPEN,
        on_hold=False,
        payment_deadline__lte=deadline_cutoff,
        created_at__lte=now - min_order_age,
    )
    if merchants is not None:
        queryset = queryset.filter(merchant__in=merchants)
    if exclude_merchants:
        queryset = queryset.exclude(merchant__in=exclude_merchants)
    return queryset.order_by("payment_deadline", "id")


TOO_YOUNG = "younger than MIN_ORDER_AGE (WeChat mishandles closing a just-created order)"


def why_not_closable(order: Order, *, now: datetime, min_order_age: timedelta) -> str | None:
    """Why an explicit close would not be sent (None: it would be), as the admin preview and the service say it."""
    if order.state != OrderState.OPEN:
        return f"it is {OrderState(order.state).label.lower()}"
    if order.created_at > now - min_order_age:
        return TOO_YOUNG
    if order.claim_expires_at is not None and order.claim_expires_at >= now:
        return "a close is already in flight for it"
    return None


def orders_needing_attention() -> QuerySet[Order]:
    """On hold (untrusted answer, our bug, retries spent) or last refused for a configuration error."""
    return Order.objects.filter(state=OrderState.OPEN).filter(
        Q(on_hold=True) | Q(last_outcome=Outcome.CONFIGURATION_ERROR)
    )


def unfinished_attempts(*, started_before: datetime) -> QuerySet[CloseAttempt]:
    """Attempts whose process never recorded an answer: it crashed mid-request, or just before a request
    whose row was written ahead of a free slot left (pipeline.py)."""
    return CloseAttempt.objects.unfinished().filter(started_at__lt=started_before)
