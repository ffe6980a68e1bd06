"""Optional Celery tasks (`pip install django-wxpay-close[celery]`), for shops that already run Celery.

Celery's `autodiscover_tasks()` imports this module; nothing else in the app does. Without Celery installed it
still imports (the functions are then plain callables), so tooling that imports every module keeps working.

Both tasks are thin wrappers around the services and return JSON-serialisable summaries. Overlapping runs are
safe: the sweep claims orders, so two sweeps (or a sweep and an admin action) never send the same close twice.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any, TypeVar

from .models import Order, Trigger
from .services import close_order, sweep_expired_orders

__all__ = ["SweepProblems", "close_order_task", "sweep_expired_orders_task"]

_F = TypeVar("_F", bound=Callable[..., Any])

try:
    from celery import shared_task
except ImportError:  # Celery is optional: keep the module importable and the functions callable.

    def shared_task(*args: Any, **kwargs: Any) -> Callable[[_F], _F]:
        return lambda function: function


class SweepProblems(RuntimeError):
    """The sweep ran but something needs a person (see the message and the admin's "needs attention")."""


@shared_task(name="django_wxpay_close.close_order", ignore_result=False)
def close_order_task(order_id: int) -> dict[str, Any]:
    """Close one order now (e.g. enqueued by the shop when a checkout is abandoned); skips it if not closable."""
    order = Order.objects.get(pk=order_id)
    result = close_order(order, trigger=Trigger.CODE)
    return {
        "order_id": result.order_id,
        "out_trade_no": result.out_trade_no,
        "action": result.action.value,
        "outcome": result.outcome.value if result.outcome else None,
        "reason": result.reason,
    }


@shared_task(name="django_wxpay_close.sweep_expired_orders", ignore_result=False)
def sweep_expired_orders_task(
    *, merchants: list[str] | None = None, older_than: float | None = None, limit: int | None = None,
    batch_size: int | None = None, workers: int | None = None, dry_run: bool = False, fail_on_error: bool = True,
) -> dict[str, Any]:
    """The `close_expired_orders` sweep; `older_than` in seconds (Celery kwargs must be JSON).

    Like the command's non-zero exit, a run with problems (configuration error, orders put on hold, unexpected
    failures) raises `SweepProblems` unless `fail_on_error=False`, so the task shows as FAILURE in monitoring.
    """
    report = sweep_expired_orders(
        trigger=Trigger.CODE, merchants=merchants, limit=limit, batch_size=batch_size, workers=workers,
        dry_run=dry_run, older_than=timedelta(seconds=older_than) if older_than is not None else None,
    )
    if report.has_alarms and fail_on_error:
        raise SweepProblems(f"sweep_expired_orders finished with problems: {report.sentence()}")
    return {
        "total": report.total,
        "summary": report.sentence(),
        "by_action": {action.value: count for action, count in report.by_action.items()},
        "halted_merchants": dict(report.halted_merchants),
        "ok": not report.has_alarms,
    }
