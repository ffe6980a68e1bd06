"""The public ways to close orders, all on the engine: `sweep_expired_orders` (the cron job), `close_orders` (the
admin action) and `close_order` (the shop's code)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from datetime import timedelta
from typing import Any

from django.db.models import Q
from django.db.models.functions import Now
from django.utils import timezone

from ..conf import load_settings
from ..models import Order, OrderState, Trigger
from ..reports import CloseAction, CloseReport, OrderCloseResult
from ..selectors import CLAIMED_ELSEWHERE, TOO_YOUNG, orders_due_for_closing, why_not_closable
from .engine import DatabaseUnavailable, Engine
from .jobs import Job, order_result


def _close_chosen(engine: Engine, orders: Iterable[Order]) -> CloseReport:
    """Close orders a person or the shop's code chose: a hold is lifted and the retry budget restarts."""
    chosen: Iterator[Order] = iter(orders)
    min_age = engine.settings.min_order_age

    def next_batch(size: int) -> list[Job] | None:
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
                engine.report.add(order_result(order, CloseAction.SKIPPED, _why_not_claimed(engine, order)))
        return jobs

    return engine.run(next_batch)


def _why_not_claimed(engine: Engine, order: Order) -> str:
    order.refresh_from_db(using=engine.db)
    # The claim asked the database's clock, this preview the host's: where they disagree, the claim was right.
    return why_not_closable(order, now=timezone.now(), min_order_age=engine.settings.min_order_age) or (
        CLAIMED_ELSEWHERE if order.in_flight else TOO_YOUNG)


def close_order(order: Order, *, trigger: str = Trigger.CODE, user: Any = None) -> OrderCloseResult:
    """Close one order now (if it is open, old enough and not in flight elsewhere); `order` is refreshed.

    Raises `DatabaseUnavailable` if the database went away and stayed away while the close was under way.
    """
    engine = Engine(load_settings(), trigger=trigger, user=user)
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
    engine = Engine(settings, trigger=trigger, user=user, workers=workers or settings.workers)
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
    engine = Engine(settings, trigger=trigger, workers=workers or settings.workers)
    engine.require_autocommit()
    engine.report.observer = on_result

    if dry_run:
        due = orders_due_for_closing(min_order_age=settings.min_order_age, merchants=merchants,
                                     older_than=older_than, using=engine.db)
        for order in (due[:limit] if limit else due).iterator(chunk_size=batch_size or settings.batch_size):
            engine.report.add(order_result(order, CloseAction.SKIPPED, "dry run: would send closeorder"))
        return engine.report.finish()

    left = limit

    def next_batch(size: int) -> list[Job] | None:
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
