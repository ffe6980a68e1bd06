"""Read-only queries: which orders are due for closing, which need a person.

What decides who may close an order, and when, is compared with the database's clock (`Now()`), never one
host's: sweepers on hosts whose clocks disagree still agree on which claims have lapsed and what is due.
"""

from __future__ import annotations

from collections.abc import Collection
from datetime import datetime, timedelta
from typing import Any

from django.db.models import Q, QuerySet
from django.db.models.functions import Now
from django.utils.translation import gettext_noop

from .models import Order, OrderState, write_database
from .wechat import Outcome


def orders_due_for_closing(
    *,
    min_order_age: timedelta,
    merchants: Collection[str] | None = None,
    exclude_merchants: Collection[str] = (),
    older_than: timedelta | None = None,
    using: str | None = None,
) -> QuerySet[Order]:
    """Open orders whose time has come (deadline, retry time or a lapsed lease: `due_at`), the earliest first.

    Served by the queue index: only due rows are read. `created_at` re-checks MIN_ORDER_AGE for orders whose
    due time was set without it (an order saved directly with a deadline shorter than the minimum age).
    """
    queryset = Order.objects.using(using or write_database()).filter(
        state=OrderState.OPEN,
        on_hold=False,
        due_at__lte=Now(),
        created_at__lte=Now() - min_order_age,
    )
    if older_than is not None:
        queryset = queryset.filter(payment_deadline__lte=Now() - older_than)
    if merchants is not None:
        queryset = queryset.filter(merchant__in=merchants)
    if exclude_merchants:
        queryset = queryset.exclude(merchant__in=exclude_merchants)
    return queryset.order_by("due_at", "id")


# Claimable now: no close or query in flight, or its lease has lapsed (on the database's clock).
NOT_IN_FLIGHT = Q(in_flight=False) | Q(due_at__lte=Now())


def orders_on_hold(*, merchants: Collection[str] | None = None, after: tuple[datetime, int] | None = None,
                   using: str | None = None) -> QuerySet[Order]:
    """Open orders on hold and not in flight, the oldest first (after `after`, a (created_at, id) already seen):
    what `--check-held` asks WeChat about. Served by the attention index, which holds only the orders on hold
    (and the few refused for configuration)."""
    queryset = Order.objects.using(using or write_database()).filter(
        NOT_IN_FLIGHT, state=OrderState.OPEN, on_hold=True)
    if merchants is not None:
        queryset = queryset.filter(merchant__in=merchants)
    if after is not None:  # keyset: each batch starts after the last, whatever was skipped or locked
        queryset = queryset.filter(Q(created_at__gt=after[0]) | Q(created_at=after[0], pk__gt=after[1]))
    return queryset.order_by("created_at", "id")


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
    if order.in_flight and order.due_at >= now:
        return CLAIMED_ELSEWHERE
    return None


# The waiting-for-retry summary counts this many at most, so that it costs the same after any outage.
WAITING_COUNT_LIMIT = 10_000


def orders_waiting() -> QuerySet[Order]:
    """Open orders that were tried and wait for their retry time. Served by the retry index."""
    return Order.objects.using(write_database()).filter(
        state=OrderState.OPEN, on_hold=False, in_flight=False, attempt_count__gt=0, due_at__gt=Now())


def orders_waiting_for_retry() -> dict[str, Any]:
    """How many orders wait for a retry (`count`, at most WAITING_COUNT_LIMIT, with `more` set beyond it), and
    when the next one is due (`next_at`)."""
    waiting = orders_waiting()
    count = waiting.order_by()[:WAITING_COUNT_LIMIT + 1].count()
    next_at = waiting.order_by("due_at").values_list("due_at", flat=True).first()
    return {"count": min(count, WAITING_COUNT_LIMIT), "more": count > WAITING_COUNT_LIMIT, "next_at": next_at}


def orders_needing_attention() -> QuerySet[Order]:
    """On hold (untrusted answer, our bug, retries spent, closed at WeChat after a payment was recorded) or, while
    open, last refused for a configuration error."""
    return Order.objects.filter(
        Q(on_hold=True) | Q(state=OrderState.OPEN, last_outcome=Outcome.CONFIGURATION_ERROR))
