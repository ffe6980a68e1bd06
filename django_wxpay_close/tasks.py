"""Optional background tasks, for shops that run a task queue: the sweep and a single close.

- Celery (`pip install django-wxpay-close[celery]`): `close_order_task`, `sweep_expired_orders_task`.
- Django's Tasks framework (`django.tasks`, Django 6.0+; on Django 5.2 the `django-tasks` backport,
  `pip install django-wxpay-close[tasks]`): `close_order_job`, `sweep_expired_orders_job`.

Celery's `autodiscover_tasks()` imports this module and a Tasks-framework worker imports it by a task's module
path; nothing else in the app does. It imports without either framework (tooling that imports every module keeps
working): without Celery the Celery tasks are plain callables, without a Tasks framework the `*_job` names are
not defined.

Each job is one plain function, given to both frameworks, so the two integrations cannot drift. Arguments and
return values are JSON, as both frameworks require. Overlapping runs are safe: the sweep claims orders, so two
sweeps (or a sweep and an admin action) never send the same close twice.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from collections.abc import Callable
from datetime import timedelta
from typing import Any, ParamSpec, TypeVar

from .models import Order, Trigger, write_database
from .services import close_order, sweep_expired_orders

__all__ = ["SweepProblems", "close_order_task", "sweep_expired_orders_task"]

_F = TypeVar("_F", bound=Callable[..., Any])
_P = ParamSpec("_P")
_R = TypeVar("_R")

try:
    from celery import shared_task
except ImportError:  # Celery is optional: keep the module importable and the functions callable.

    def shared_task(*args: Any, **kwargs: Any) -> Callable[[_F], _F]:
        return lambda function: function


def _tasks_framework_decorator() -> Callable[..., Any] | None:
    """`task` of Django's own Tasks framework (Django 6.0+), else of the `django-tasks` backport, else None."""
    for module in ("django.tasks", "django_tasks"):
        try:
            decorator: Callable[..., Any] = importlib.import_module(module).task
        except ImportError:
            continue
        return decorator
    return None


class SweepProblems(RuntimeError):
    """The sweep ran but something needs a person (see the message and the admin's "needs attention")."""


def _close_order(order_id: int) -> dict[str, Any]:
    """Close one order now (e.g. enqueued by the shop when a checkout is abandoned); skips it if not closable."""
    order = Order.objects.using(write_database()).get(pk=order_id)
    result = close_order(order, trigger=Trigger.CODE)
    return {
        "order_id": result.order_id,
        "out_trade_no": result.out_trade_no,
        "action": result.action.value,
        "outcome": result.outcome.value if result.outcome else None,
        "reason": result.reason,
    }


def _sweep_expired_orders(
    *, merchants: list[str] | None = None, older_than: float | None = None, limit: int | None = None,
    batch_size: int | None = None, workers: int | None = None, dry_run: bool = False, fail_on_error: bool = True,
    check_held: bool = False,
) -> dict[str, Any]:
    """The `close_expired_orders` sweep; `older_than` in seconds (task arguments must be JSON); `check_held` as
    the command's `--check-held`.

    Like the command's non-zero exit, a run with problems (configuration error, orders put on hold, unexpected
    failures) raises `SweepProblems` unless `fail_on_error=False`, so the task shows as failed in monitoring.
    """
    report = sweep_expired_orders(
        trigger=Trigger.CODE, merchants=merchants, limit=limit, batch_size=batch_size, workers=workers,
        dry_run=dry_run, older_than=timedelta(seconds=older_than) if older_than is not None else None,
        check_held=check_held,
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


def _entry_point(job: Callable[_P, _R], name: str) -> Callable[_P, _R]:
    """`job` as this module's function `name`, with `job`'s signature and docstring.

    Each framework needs its own: Django's finds a task by its function's module path (so the function must be
    named as the module attribute holding the task), and Celery checks a call's arguments against the signature
    `inspect.getfullargspec` reports (which reads `__signature__`, not `__wrapped__`).
    """

    @functools.wraps(job)
    def entry_point(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        return job(*args, **kwargs)

    entry_point.__name__ = entry_point.__qualname__ = name
    entry_point.__signature__ = inspect.signature(job)  # type: ignore[attr-defined]
    return entry_point


close_order_task = shared_task(name="django_wxpay_close.close_order", ignore_result=False)(
    _entry_point(_close_order, "close_order_task")
)
sweep_expired_orders_task = shared_task(name="django_wxpay_close.sweep_expired_orders", ignore_result=False)(
    _entry_point(_sweep_expired_orders, "sweep_expired_orders_task")
)

_task = _tasks_framework_decorator()
if _task is not None:
    # On the default backend and queue (the backend validates them when this module is imported, so its QUEUES
    # must include "default"); `.using(backend=..., queue_name=...)` picks others when enqueueing.
    close_order_job = _task(_entry_point(_close_order, "close_order_job"))
    sweep_expired_orders_job = _task(_entry_point(_sweep_expired_orders, "sweep_expired_orders_job"))
    __all__ += ["close_order_job", "sweep_expired_orders_job"]
