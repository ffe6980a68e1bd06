"""The optional tasks: Celery's, run eagerly, and Django's Tasks framework's, on its immediate backend; and the
schedules docs/operations.md recommends for them (Celery beat, cron enqueueing the sweep)."""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from django.utils import timezone
from django.utils.module_loading import import_string

from django_wxpay_close import tasks
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


def test_sweep_task_checks_held_orders_at_wechat_like_the_command(celery_app, make_order):
    make_order(remote=RemoteState.CLOSED, on_hold=True)

    result = sweep_expired_orders_task.delay(check_held=True).get()

    assert result["by_action"] == {"already_closed": 1} and Order.objects.get().state == OrderState.CLOSED


def test_sweep_task_fails_on_a_configuration_error_like_the_command(celery_app, make_order, wxpay_settings):
    make_order()
    wxpay_settings["MERCHANTS"]["default"]["API_KEY"] = "WRONGKEY" * 4

    with pytest.raises(SweepProblems, match="hit a configuration error"):
        sweep_expired_orders_task.delay().get()
    Order.objects.update(due_at=timezone.now())  # the merchant's backoff, skipped

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


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    """`code` in a fresh interpreter with the test settings (so modules can be made unimportable first)."""
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "tests.settings"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          cwd=OPERATIONS_DOC.parent.parent, timeout=60)


def test_the_tasks_module_imports_without_celery():
    done = run_python(
        "import sys; sys.modules['celery'] = None\n"
        "import django; django.setup()\n"
        "from django_wxpay_close import tasks\n"
        "print(tasks.close_order_task.__name__, hasattr(tasks.close_order_task, 'delay'))\n"
    )
    assert (done.returncode, done.stdout.strip()) == (0, "close_order_task False"), done.stderr


# -- Django's Tasks framework (django.tasks, or the django-tasks backport on Django 5.2) ---------------------------


def installed_tasks_framework() -> ModuleType | None:
    """The framework tasks.py builds on: Django's own (6.0+), else the backport, else none."""
    for name in ("django.tasks", "django_tasks"):
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    return None


@pytest.fixture
def immediate_tasks(settings: Any) -> ModuleType:
    """The framework with its immediate backend: `enqueue()` runs the task before it returns the result."""
    framework = installed_tasks_framework()
    if framework is None:
        pytest.skip("needs Django's Tasks framework: Django 6.0+, or pip install django-wxpay-close[tasks]")
    settings.TASKS = {"default": {"BACKEND": f"{framework.__name__}.backends.immediate.ImmediateBackend"}}
    return framework


def documented_cron_enqueue() -> str:
    """The Python that the cron line between the tasks-enqueue markers of docs/operations.md runs."""
    text = OPERATIONS_DOC.read_text(encoding="utf-8")
    block = re.search(r"<!-- tasks-enqueue -->\s*```cron\n(.*?)```", text, re.DOTALL)
    assert block, "docs/operations.md lost its cron example for the Tasks framework"
    command = re.search(r'manage\.py shell --no-imports -c "(.*?)"', block[1])
    assert command, "the cron example no longer enqueues with manage.py shell --no-imports -c"
    return command[1]


def test_the_framework_tasks_are_djangos_own_where_django_has_them():
    builtin = pytest.importorskip("django.tasks", reason="django.tasks is new in Django 6.0")

    assert isinstance(tasks.close_order_job, builtin.Task)
    assert isinstance(tasks.sweep_expired_orders_job, builtin.Task)


def test_a_worker_finds_each_framework_task_at_its_module_path(immediate_tasks):
    jobs = [tasks.close_order_job, tasks.sweep_expired_orders_job]

    assert [job.module_path for job in jobs] == ["django_wxpay_close.tasks.close_order_job",
                                                 "django_wxpay_close.tasks.sweep_expired_orders_job"]
    assert [import_string(job.module_path) for job in jobs] == jobs


def test_enqueued_close_closes_one_order(immediate_tasks, make_order, simulator):
    order = make_order()

    result = tasks.close_order_job.enqueue(order.pk)

    assert result.status == immediate_tasks.TaskResultStatus.SUCCESSFUL
    assert result.return_value == {"order_id": order.pk, "out_trade_no": order.out_trade_no, "action": "closed",
                                   "outcome": "closed", "reason": ""}
    assert Order.objects.get(pk=order.pk).state == OrderState.CLOSED
    assert simulator.order_state(order.out_trade_no, mch_id=order.mch_id,
                                 sub_mch_id=order.sub_mch_id) == RemoteState.CLOSED


def test_enqueued_sweep_closes_expired_orders_and_returns_the_summary(immediate_tasks, make_order, simulator):
    expired, _ = make_order(), make_order(remote=RemoteState.PAID)

    result = tasks.sweep_expired_orders_job.enqueue()

    assert result.status == immediate_tasks.TaskResultStatus.SUCCESSFUL
    assert result.return_value == {"total": 2, "summary": "1 closed, 1 was already paid (ORDERPAID)",
                                   "by_action": {"closed": 1, "found_paid": 1}, "halted_merchants": {}, "ok": True}
    assert simulator.order_state(expired.out_trade_no, mch_id=expired.mch_id,
                                 sub_mch_id=expired.sub_mch_id) == RemoteState.CLOSED


def test_enqueued_sweep_takes_its_arguments_as_json(immediate_tasks, make_order, simulator):
    make_order(expired_for=timedelta(minutes=10))
    old = make_order(expired_for=timedelta(hours=3))
    make_order(merchant="other", expired_for=timedelta(hours=3))

    result = tasks.sweep_expired_orders_job.enqueue(merchants=["default"], older_than=7200)

    assert result.kwargs == {"merchants": ["default"], "older_than": 7200}
    assert [request.out_trade_no for request in simulator.requests] == [old.out_trade_no]


def test_enqueued_sweep_with_problems_fails_like_the_celery_task(immediate_tasks, make_order, wxpay_settings):
    make_order()
    wxpay_settings["MERCHANTS"]["default"]["API_KEY"] = "WRONGKEY" * 4

    result = tasks.sweep_expired_orders_job.enqueue()

    assert result.status == immediate_tasks.TaskResultStatus.FAILED
    [error] = result.errors
    assert error.exception_class is SweepProblems
    assert "hit a configuration error" in error.traceback


def test_enqueued_sweep_with_problems_succeeds_with_fail_on_error_false(immediate_tasks, make_order, wxpay_settings):
    make_order()
    wxpay_settings["MERCHANTS"]["default"]["API_KEY"] = "WRONGKEY" * 4

    result = tasks.sweep_expired_orders_job.enqueue(fail_on_error=False)

    assert result.status == immediate_tasks.TaskResultStatus.SUCCESSFUL
    assert result.return_value["ok"] is False
    assert "hit a configuration error" in result.return_value["summary"]


def test_the_documented_cron_line_enqueues_the_sweep(immediate_tasks, make_order):
    order = make_order()

    exec(documented_cron_enqueue(), {})  # noqa: S102 - our own documentation

    assert Order.objects.get(pk=order.pk).state == OrderState.CLOSED


def test_the_tasks_module_imports_without_a_tasks_framework():
    done = run_python(
        "import sys; sys.modules['django.tasks'] = sys.modules['django_tasks'] = None\n"
        "import django; django.setup()\n"
        "from django_wxpay_close import tasks\n"
        "print(*tasks.__all__)\n"
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["SweepProblems", "close_order_task", "sweep_expired_orders_task"]
