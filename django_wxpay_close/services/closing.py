"""The public ways to close orders and to ask WeChat about them, all on the engine: `sweep_expired_orders` (the
cron job), `close_orders` and `check_orders` (the admin actions), `close_order` and `check_order` (the shop's
code)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from datetime import datetime, timedelta
from itertools import chain
from typing import Any

from django.db.models.functions import Now
from django.utils import timezone

from ..conf import load_settings
from ..models import Order, OrderState, Trigger, write_database
from ..reports import CloseAction, CloseReport, OrderCloseResult
from ..selectors import (
    CLAIMED_ELSEWHERE,
    NOT_IN_FLIGHT,
    NOT_OPEN,
    TOO_YOUNG,
    orders_due_for_closing,
    orders_on_hold,
    why_not_closable,
)
from .decisions import QueryPurpose
from .engine import Engine
from .guards import DatabaseUnavailable
from .jobs import Job, order_result


def _run_chosen(engine: Engine, orders: Iterable[Order], **claim_values: Any) -> CloseReport:
    """Close (or, for a querying engine, ask about) orders a person or the shop's code chose, in batches."""
    chosen: Iterator[Order] = iter(orders)
    closing = engine.query is None

    def next_batch(size: int) -> list[Job] | None:
        batch = [order for _, order in zip(range(size), chosen, strict=False)]
        if not batch:
            return None
        candidates = Order.objects.using(engine.db).filter(
            NOT_IN_FLIGHT, pk__in=[order.pk for order in batch], state=OrderState.OPEN).order_by("pk")
        if closing:
            candidates = candidates.filter(created_at__lte=Now() - engine.settings.min_order_age)
        jobs, claimed = engine.claim(candidates, len(batch), **claim_values)
        taken = {order.pk for order in claimed}
        for order in batch:
            if order.pk not in taken:
                engine.report.add(order_result(order, CloseAction.SKIPPED, _why_not_claimed(engine, order)))
        return jobs

    return engine.run(next_batch)


def _close_chosen(engine: Engine, orders: Iterable[Order]) -> CloseReport:
    """A person's close lifts a hold and starts the order's retries and queries over."""
    return _run_chosen(engine, orders, on_hold=False, retry_count=0, needs_query=False, query_count=0)


def _why_not_claimed(engine: Engine, order: Order) -> str:
    order.refresh_from_db(using=engine.db)
    if engine.query is not None:
        return NOT_OPEN[OrderState(order.state)] if order.state != OrderState.OPEN else CLAIMED_ELSEWHERE
    # The claim asked the database's clock, this preview the host's: where they disagree, the claim was right.
    return why_not_closable(order, now=timezone.now(), min_order_age=engine.settings.min_order_age) or (
        CLAIMED_ELSEWHERE if order.in_flight else TOO_YOUNG)


def check_orders(
    orders: Iterable[Order], *, trigger: str = Trigger.CODE, user: Any = None, workers: int | None = None,
    on_result: Callable[[OrderCloseResult], None] | None = None,
) -> CloseReport:
    """Ask WeChat where each chosen open order stands (orderquery), the admin's "Check status at WeChat".

    A paid answer (with the amount checked) or a closed one settles the order; any other answer is recorded in
    the audit trail and on the order's last outcome, and changes nothing else.
    """
    settings = load_settings()
    engine = Engine(settings, trigger=trigger, user=user, workers=workers or settings.workers,
                    query=QueryPurpose.CHECK)
    engine.require_autocommit()
    engine.report.observer = on_result
    return _run_chosen(engine, orders)


def check_order(order: Order, *, trigger: str = Trigger.CODE, user: Any = None) -> OrderCloseResult:
    """Ask WeChat where one open order stands (as `check_orders`); `order` is refreshed."""
    results: list[OrderCloseResult] = []
    try:
        check_orders([order], trigger=trigger, user=user, workers=1, on_result=results.append)
    except DatabaseUnavailable as exc:
        raise DatabaseUnavailable(str(exc)) from exc
    order.refresh_from_db(using=write_database())
    return results[-1]


def close_order(order: Order, *, trigger: str = Trigger.CODE, user: Any = None) -> OrderCloseResult:
    """Close one order now (if it is open, old enough and not in flight elsewhere); `order` is refreshed.

    Raises `DatabaseUnavailable` if the database went away and stayed away while the close was under way.
    """
    engine = Engine(load_settings(), trigger=trigger, user=user, chosen=True)
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
    engine = Engine(settings, trigger=trigger, user=user, workers=workers or settings.workers, chosen=True)
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
    check_held: bool = False,
    on_result: Callable[[OrderCloseResult], None] | None = None,
) -> CloseReport:
    """Close every open order whose time has come, `workers` requests at a time; an order whose last close
    could not tell where it stands is asked about (orderquery) instead. With `check_held`, first ask WeChat about
    every open order on hold, so that only what WeChat itself cannot settle stays on hold.

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
        held = orders_on_hold(merchants=merchants, using=engine.db) if check_held else Order.objects.none()
        chunk = batch_size or settings.batch_size
        for order in chain(held.iterator(chunk_size=chunk),
                           (due[:limit] if limit else due).iterator(chunk_size=chunk)):
            api = "orderquery" if order.on_hold or order.needs_query else "closeorder"
            engine.report.add(order_result(order, CloseAction.SKIPPED, f"dry run: would send {api}"))
        return engine.report.finish()

    if check_held:
        checking = Engine(settings, trigger=trigger, workers=engine.workers, query=QueryPurpose.HELD,
                          report=engine.report)
        _check_held(checking, merchants)
        if checking.report.stopped_early:  # WeChat looks unreachable: the sweep would only fail the same way
            return checking.report
        engine.judgement.halted.update(checking.judgement.halted)

    left = limit

    def next_batch(size: int) -> list[Job] | None:
        nonlocal left
        size = size if left is None else min(size, left)
        if size <= 0:
            return None
        candidates = orders_due_for_closing(min_order_age=settings.min_order_age, merchants=merchants,
                                            exclude_merchants=list(engine.judgement.halted), older_than=older_than,
                                            using=engine.db)
        # Never an order this run gave back (its token stays on it; the engine leaves out those it still waits for or
        # lost to another claim): one run sends one request per order.
        candidates = candidates.exclude(claim_token=engine.token)
        if engine.failed_claims:
            candidates = candidates.exclude(pk__in=engine.failed_claims)
        jobs, claimed = engine.claim(candidates, size)
        if left is not None:
            left -= len(claimed)
        return jobs if claimed else None

    return engine.run(next_batch)


def _check_held(engine: Engine, merchants: list[str] | None) -> None:
    """Ask WeChat about every open order on hold, the oldest first, each once."""
    last: tuple[datetime, int] | None = None

    def next_batch(size: int) -> list[Job] | None:
        nonlocal last
        candidates = orders_on_hold(merchants=merchants, after=last, using=engine.db)
        jobs, claimed = engine.claim(candidates, size, retry_count=0)  # a query of a held order starts afresh
        if not claimed:
            return None
        last = max((order.created_at, order.pk) for order in claimed)
        return jobs

    engine.run(next_batch)
