"""The optional Celery tasks, run eagerly, and the Celery-beat schedule docs/operations.md recommends."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from django_wxpay_close.models import Order, OrderState
from django_wxpay_close.tasks import SweepProblems, close_order_task, sweep_expired_orders_task
from django_wxpay_close.testing import OrderState as RemoteState

OPERATIONS_DOC = Path(__file__).resolve().parent.parent / "docs" / "operations.md"


@pytest.fixture
def celery_app() -> Iterator[Any]:
    celery = pytest.importorskip("celery", reason="Celery is optional: pip install django-wxpay-close[celery]")
    app = celery.Celery("wxpay_close_tests", set_as_current=True)
    app.conf.update(task_always_eager=True, task_eager_propagates=True, broker_url="memory://",
                    result_backend="cache+memory://")
    app.finalize()
    yield app


def documented_beat_schedule() -> dict[str, Any]:
    """Execute the settings snippet between the beat-schedule markers of docs/operations.md."""
    text = OPERATIONS_DOC.read_text(encoding="utf-8")
    block = re.search(r"<!-- beat-schedule -->\s*```python\n(.*?)```", text, re.DOTALL)
    assert block, "docs/operations.md lost its Celery beat example"
    namespace: dict[str, Any] = {}
    exec(compile(block[1], str(OPERATIONS_DOC), "exec"), namespace)  # noqa: S102 - our own documentation
    return namespace["CELERY_BEAT_SCHEDULE"]


def test_the_tasks_are_registered_under_stable_names(celery_app):
    assert close_order_task.name == "django_wxpay_close.close_order"
    assert sweep_expired_orders_task.name == "django_wxpay_close.sweep_expired_orders"
    assert {close_order_task.name, sweep_expired_orders_task.name} <= set(celery_app.tasks)


def test_close_order_task_closes_one_order(celery_app, make_order):
    order = make_order()

    result = close_order_task.delay(order.pk).get()

    assert result == {"order_id": order.pk, "out_trade_no": order.out_trade_no, "action": "closed",
                      "outcome": "closed", "reason": ""}
    assert Order.objects.get(pk=order.pk).state == OrderState.CLOSED


def test_sweep_task_closes_expired_orders_and_summarises(celery_app, make_order):
    make_order(), make_order(remote=RemoteState.PAID)

    result = sweep_expired_orders_task.delay().get()

    assert result["by_action"] == {"closed": 1, "found_paid": 1} and result["ok"] is True
    assert result["summary"] == "1 closed, 1 was already paid (ORDERPAID)"


def test_sweep_task_takes_older_than_in_seconds(celery_app, make_order, simulator):
    make_order(expired_for=timedelta(minutes=10))
    old = make_order(expired_for=timedelta(hours=3))

    sweep_expired_orders_task.delay(older_than=7200).get()

    assert [request.out_trade_no for request in simulator.requests] == [old.out_trade_no]


def test_sweep_task_fails_on_a_configuration_error_like_the_command(celery_app, make_order, wxpay_settings):
    make_order()
    wxpay_settings["MERCHANTS"]["default"]["API_KEY"] = "WRONGKEY" * 4

    with pytest.raises(SweepProblems, match="hit a configuration error"):
        sweep_expired_orders_task.delay().get()
    Order.objects.update(next_attempt_at=None)  # the merchant's backoff, skipped

    assert sweep_expired_orders_task.delay(fail_on_error=False).get()["ok"] is False


def test_the_documented_beat_schedule_runs_the_sweep_every_minute(celery_app, make_order):
    from celery.beat import Scheduler

    celery_app.conf.beat_schedule = documented_beat_schedule()
    scheduler = Scheduler(app=celery_app, lazy=True)
    scheduler.setup_schedule()
    entry = scheduler.schedule["wxpay-close-expired-orders"]
    order = make_order()

    result = scheduler.apply_async(entry, advance=False)

    assert entry.schedule.run_every == timedelta(minutes=1)
    assert result.get()["by_action"] == {"closed": 1}
    assert Order.objects.get(pk=order.pk).state == OrderState.CLOSED


def test_the_tasks_module_imports_without_celery():
    code = (
        "import sys; sys.modules['celery'] = None\n"
        "import django; django.setup()\n"
        "from django_wxpay_close import tasks\n"
        "print(tasks.close_order_task.__name__, hasattr(tasks.close_order_task, 'delay'))\n"
    )
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "tests.settings"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          cwd=OPERATIONS_DOC.parent.parent, timeout=60)
    assert (done.returncode, done.stdout.strip()) == (0, "close_order_task False"), done.stderr
