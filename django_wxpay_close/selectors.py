"""Read-only queries: which orders are due for closing, which need a person.

What decides who may close an order, and when, is compared with the database's clock (`Now()`), never one
host's: sweepers on hosts whose clocks disagree still agree on which claims have lapsed and what is due.
"""

from __future__ import annotations

from collections.abc import Collection
from datetime import datetime, timedelta
from typing import Any

from django.db.models import Count, Min, Q, QuerySet
from django.db.models.functions import Now
from django.utils.translation import gettext_noop

from .models import Order, OrderState
from .wechat import Outcome


def claimable() -> Q:
    """Nobody holds the order, or their claim lapsed (their process died or stalled)."""
    return Q(claim_expires_at__isnull=True) | Q(claim_expires_at__lt=Now())


def orders_due_for_closing(
    *,
    min_order_age: timedelta,
    merchants: Collection[str] | None = None,
    exclude_merchants: Collection[str] = (),
    older_than: timedelta | None = None,
) -> QuerySet[Order]:
    """Open orders past their deadline (and `older_than` past it), old enough, due for a retry, unclaimed;
    the most overdue first."""
    queryset = Order.objects.filter(
        Q(next_attempt_at__isnull=True) | Q(next_attempt_at__lte=Now()),
        claimable(),
        state=OrderState.OPEN,
        on_hold=False,
        payment_deadline__lte=Now() - older_than if older_than else Now(),
        created_at__lte=Now() - min_order_age,
    )
    if merchants is not None:
        queryset = queryset.filter(merchant__in=merchants)
    if exclude_merchants:
        queryset = queryset.exclude(merchant__in=exclude_merchants)
    return queryset.order_by("payment_deadline", "id")


# Reasons an explicit close is not sent. Stored and compared as they are, so plain English: gettext_noop only puts
# them in the catalogue, and the admin translates them when it shows one.
TOO_YOUNG = gettext_noop("younger than MIN_ORDER_AGE (WeChat mishandles closing a just-created order)")
CLAIMED_ELSEWHERE = gettext_noop("a close is already in flight for it")
NOT_OPEN = {
    OrderState.CLOSED: gettext_noop("it is closed"),
    OrderState.PAID: gettext_noop("it is paid"),
    OrderState.UNKNOWN_TO_WECHAT: gettext_noop("it was never known to WeChat"),
}


def why_not_closable(order: Order, *, now: datetime, min_order_age: timedelta) -> str | None:
    """Why an explicit close would not be sent (None: it would be), for the admin's preview and reports.

    A preview on this host's clock: the claim itself asks the database's clock again.
    """
    if order.state != OrderState.OPEN:
        return NOT_OPEN[OrderState(order.state)]
    if order.created_at > now - min_order_age:
        return TOO_YOUNG
    if order.claim_expires_at is not None and order.claim_expires_at >= now:
        return CLAIMED_ELSEWHERE
    return None


def orders_waiting_for_retry() -> dict[str, Any]:
    """How many overdue open orders wait for their backoff to pass, and when the next one is due."""
    waiting = Order.objects.filter(state=OrderState.OPEN, on_hold=False, payment_deadline__lte=Now(),
                                   next_attempt_at__gt=Now())
    return waiting.aggregate(count=Count("pk"), next_at=Min("next_attempt_at"))


def orders_needing_attention() -> QuerySet[Order]:
    """On hold (untrusted answer, our bug, retries spent) or last refused for a configuration error."""
    return Order.objects.filter(state=OrderState.OPEN).filter(
        Q(on_hold=True) | Q(last_outcome=Outcome.CONFIGURATION_ERROR)
    )
