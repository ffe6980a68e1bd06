"""`manage.py close_expired_orders`: flags, exit status and summary (output polish: test_command_output.py)."""

from __future__ import annotations

import json
from datetime import timedelta
from io import StringIO
from typing import Any

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.utils import timezone

from django_wxpay_close.management.commands.close_expired_orders import parse_duration
from django_wxpay_close.reports import (
    EXIT_ATTENTION,
    EXIT_CONFIGURATION,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    CloseAction,
    CloseReport,
    interrupted_summary,
    merge_summaries,
    most_urgent,
    summarise,
    unusable_settings_summary,
)
from django_wxpay_close.models import Order, OrderState
from django_wxpay_close.selectors import WAITING_COUNT_LIMIT
from django_wxpay_close.testing import Fault
from django_wxpay_close.testing import OrderState as RemoteState


def run(*args: str, **options: Any) -> str:
    out = StringIO()
    call_command("close_expired_orders", *args, stdout=out, stderr=StringIO(), progress="none", **options)
    return out.getvalue()


def test_the_command_closes_expired_orders_and_exits_zero(make_order):
    orders = [make_order() for _ in range(3)]
    output = run()
    assert "3 closed" in output
    assert all(Order.objects.get(pk=o.pk).state == OrderState.CLOSED for o in orders)


def test_dry_run_reports_what_is_due_and_sends_nothing(make_order, simulator):
    make_order(), make_order()
    assert "2 orders are due" in run("--dry-run")
    assert simulator.requests == []


def test_limit_caps_the_orders_closed_in_one_run(make_order, simulator):
    for _ in range(5):
        make_order()
    run("--limit", "2", "--batch-size", "1", "--workers", "1")
    assert len(simulator.requests) == 2


def test_merchant_restricts_the_run_to_that_merchant(make_order, simulator):
    make_order(), make_order(merchant="other")
    run("--merchant", "other")
    assert [r.mch_id for r in simulator.requests] == [Order.objects.get(merchant="other").mch_id]


def test_older_than_only_takes_orders_expired_that_long_ago(make_order, simulator):
    make_order(expired_for=timedelta(minutes=10))
    old = make_order(expired_for=timedelta(hours=3))
    run("--older-than", "2h")
    assert [r.out_trade_no for r in simulator.requests] == [old.out_trade_no]


def test_json_prints_a_machine_readable_summary(make_order, simulator):
    make_order(), make_order(remote=RemoteState.PAID)
    summary = json.loads(run("--json"))
    assert summary["by_action"] == {"closed": 1, "found_paid": 1}
    assert summary["ok"] is True and summary["by_merchant"]["default"]["closed"] == 1


def test_retries_are_expected_and_exit_zero(make_order, simulator):
    make_order()
    simulator.inject(Fault.SYSTEMERROR)
    assert "1 will be retried" in run()


def test_a_configuration_error_exits_non_zero_for_cron_monitoring(make_order, wxpay_settings):
    wxpay_settings["MERCHANTS"]["default"]["API_KEY"] = "WRONGKEY" * 4
    make_order()
    with pytest.raises(CommandError, match="configuration error"):
        run()


def test_an_order_that_wechat_cannot_settle_exits_non_zero(make_order, simulator):
    make_order()
    simulator.inject(Fault.UNSIGNED)
    simulator.inject(Fault.UNSIGNED, api="orderquery")  # WeChat, asked, cannot settle it either
    run()  # the untrusted close: the next run asks WeChat
    with pytest.raises(CommandError, match="1 needs attention"):
        run()


def test_no_fail_on_error_exits_zero_despite_problems(make_order, wxpay_settings):
    wxpay_settings["MERCHANTS"]["default"]["API_KEY"] = "WRONGKEY" * 4
    make_order()
    assert "configuration error" in run("--no-fail-on-error")


def test_broken_settings_are_a_clear_command_error_and_nothing_is_sent(make_order, wxpay_settings, simulator):
    make_order()
    wxpay_settings["MERCHANTS"]["default"]["SIGN_TYPE"] = "SHA1"
    errors = StringIO()
    with pytest.raises(CommandError, match=r"WXPAY_CLOSE is not usable \(django_wxpay_close.E006\): nothing was sent"):
        call_command("close_expired_orders", stdout=StringIO(), stderr=errors)
    assert errors.getvalue().startswith("django_wxpay_close.E006: WXPAY_CLOSE['MERCHANTS']['default']['SIGN_TYPE']: "
                                        "unknown sign type 'SHA1'")
    assert simulator.requests == []


def test_each_kind_of_problem_has_an_exit_status_of_its_own(make_order, wxpay_settings, simulator):
    make_order()
    simulator.inject(Fault.UNSIGNED)
    simulator.inject(Fault.UNSIGNED, api="orderquery")
    run()
    with pytest.raises(CommandError) as on_hold:
        run()
    wxpay_settings["MERCHANTS"]["default"]["SIGN_TYPE"] = "SHA1"
    with pytest.raises(CommandError) as misconfigured:
        run()
    assert (on_hold.value.returncode, misconfigured.value.returncode) == (4, 3)


@pytest.mark.parametrize("flag, maximum", [("--workers", 64), ("--processes", 32)])
def test_workers_and_processes_beyond_their_maximum_are_a_clear_error(make_order, simulator, flag, maximum):
    make_order()
    with pytest.raises(CommandError, match=f"argument {flag}: '200000' is not a whole number from 1 to {maximum}$"):
        run(flag, "200000")
    assert simulator.requests == []


def test_two_processes_share_the_backlog_and_report_one_summary(make_order, simulator, start_sweeper):
    orders = [make_order() for _ in range(12)]
    simulator.latency = 0.05
    out, err = start_sweeper("--processes", "2", "--workers", "2").communicate(timeout=60)
    summary = json.loads(out)
    assert summary["processes"] == 2 and summary["by_action"] == {"closed": 12} and summary["exit_status"] == 0, err
    assert all(simulator.close_requests_for(o.out_trade_no) == 1 for o in orders)


def test_a_sweeper_process_that_printed_no_summary_fails_the_run_though_another_put_orders_on_hold():
    held = CloseReport()
    held.by_action[CloseAction.PUT_ON_HOLD] = 2
    held.by_merchant[("default", CloseAction.PUT_ON_HOLD)] = 2
    crashed = {"exit_status": -9, "problems": "a sweeper process exited with status -9"}
    merged = merge_summaries([summarise(held.finish(), dry_run=False), crashed])
    assert (merged["exit_status"], merged["ok"], merged["total"], merged["processes"]) == (EXIT_FAILED, False, 2, 2)
    assert merged["problems"] == "2 need attention; a sweeper process exited with status -9"


def test_a_sweeper_process_that_could_not_use_its_settings_makes_the_merged_run_a_configuration_error():
    closed = CloseReport()
    closed.by_action[CloseAction.CLOSED] = 3
    closed.by_merchant[("default", CloseAction.CLOSED)] = 3
    error = {"id": "django_wxpay_close.E005", "message": "WXPAY_CLOSE['MERCHANTS']['default']['API_KEY'] ...",
             "hint": ""}
    unusable = unusable_settings_summary([error], dry_run=False)
    merged = merge_summaries([summarise(closed.finish(), dry_run=False), unusable, unusable])
    assert (merged["exit_status"], merged["ok"], merged["total"]) == (EXIT_CONFIGURATION, False, 3)
    assert merged["configuration_errors"] == [error]
    assert merged["problems"] == "WXPAY_CLOSE is not usable (django_wxpay_close.E005): nothing was sent"


def test_interrupted_sweeper_processes_make_the_merged_run_interrupted_unless_something_worse_happened():
    held = CloseReport()
    held.by_action[CloseAction.PUT_ON_HOLD] = 1
    interrupted = interrupted_summary(CloseReport(), dry_run=False)
    assert interrupted["exit_status"] == EXIT_INTERRUPTED
    assert merge_summaries([interrupted, interrupted])["exit_status"] == EXIT_INTERRUPTED
    assert merge_summaries([interrupted, summarise(held.finish(), dry_run=False)])["exit_status"] == EXIT_ATTENTION


@pytest.mark.parametrize("statuses, winner", [
    ([0, 4, 6], 4), ([130, 1], 1), ([3, 5], 5), ([0, 0], 0), ([-9, 4], 1), ([], 0), ([130, 0], 130)])
def test_the_most_urgent_exit_status_wins_in_the_readmes_order(statuses, winner):
    assert most_urgent(statuses) == winner


def test_dry_run_lists_each_due_order(make_order, simulator):
    due = make_order()
    output = run("--dry-run", "--verbosity", "1")
    assert output.splitlines() == [f"{due.out_trade_no}  default  skipped (dry run: would send closeorder)",
                                   "Dry run: 1 order is due for closing; nothing was sent."]


def test_nothing_to_do_says_how_many_orders_wait_for_a_retry(make_order, simulator):
    waiting = make_order(due_at=timezone.now() + timedelta(minutes=3), attempt_count=1, retry_count=1)
    assert run().splitlines()[1] == (f"1 overdue order waits for a retry; the next is due at "
                                     f"{timezone.localtime(waiting.due_at):%Y-%m-%d %H:%M:%S %Z}.")


def test_nothing_to_do_counts_the_orders_waiting_for_a_retry_only_up_to_a_bound(make_order, settings):
    template = make_order(due_at=timezone.now() + timedelta(minutes=3), attempt_count=1, retry_count=1)
    fields = {f.attname: getattr(template, f.attname) for f in Order._meta.concrete_fields if not f.primary_key}
    Order.objects.bulk_create([Order(**{**fields, "out_trade_no": f"W{n:06d}"}) for n in range(WAITING_COUNT_LIMIT)])
    assert run().splitlines()[1] == (f"More than {WAITING_COUNT_LIMIT} overdue orders wait for a retry; the next is "
                                     f"due at {timezone.localtime(template.due_at):%Y-%m-%d %H:%M:%S %Z}.")


@pytest.mark.parametrize("text, expected", [("90s", 90), ("30m", 1800), ("2h", 7200), ("1d", 86400), ("1.5h", 5400)])
def test_durations_take_seconds_minutes_hours_and_days(text, expected):
    assert parse_duration(text) == timedelta(seconds=expected)


@pytest.mark.parametrize("text", ["", "10", "5 minutes", "-1h", "h"])
def test_malformed_durations_are_refused(text):
    with pytest.raises(ValueError):
        parse_duration(text)
