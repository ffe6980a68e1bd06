"""What `close_expired_orders` prints and logs: the summary table, progress on and off a terminal, log records.

Flags and exit codes are tested in test_command.py.
"""

from __future__ import annotations

import json
import logging
import re
from io import StringIO
from typing import Any

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from django_wxpay_close.management.commands.close_expired_orders import _Progress
from django_wxpay_close.testing import Fault
from django_wxpay_close.testing import OrderState as RemoteState


class Terminal(StringIO):
    def isatty(self) -> bool:
        return True


def sweep(*, stdout: StringIO | None = None, stderr: StringIO | None = None, **options: Any) -> tuple[str, str]:
    """Run the command (exit status ignored: test_command.py owns it) and return (stdout, stderr)."""
    stdout, stderr = stdout or StringIO(), stderr or StringIO()
    options.setdefault("progress", "none")
    try:
        call_command("close_expired_orders", stdout=stdout, stderr=stderr, **options)
    except CommandError:
        pass
    return stdout.getvalue(), stderr.getvalue()


@pytest.fixture
def backlog(make_order: Any, simulator: Any) -> None:
    """Three closable orders of 'default', one of 'other', one paid at WeChat, one answering SYSTEMERROR."""
    for _ in range(3):
        make_order()
    make_order(merchant="other")
    make_order(remote=RemoteState.PAID)
    flaky = make_order()
    simulator.inject(Fault.SYSTEMERROR, out_trade_no=flaky.out_trade_no)


def test_the_summary_table_counts_each_outcome_per_merchant_with_totals(backlog):
    output, _ = sweep()

    lines = output.splitlines()
    assert lines[0].startswith("Swept 6 orders in ")
    assert lines[0].endswith(": 4 closed, 1 was already paid (ORDERPAID), 1 will be retried (SYSTEMERROR)")
    table = [line.split() for line in lines[1:6]]
    assert table == [
        ["outcome", "default", "other", "total"],
        ["closed", "3", "1", "4"],
        ["found_paid", "1", "0", "1"],
        ["retry_scheduled", "1", "0", "1"],
        ["total", "5", "1", "6"],
    ]


def test_the_summary_says_why_orders_were_not_closed(backlog):
    output, _ = sweep()

    why = output.split("Not closed, and why:\n", 1)[1].splitlines()
    assert sorted(line.split() for line in why) == [["1", "found_paid", "ORDERPAID"],
                                                     ["1", "retry_scheduled", "SYSTEMERROR"]]


def test_an_empty_run_says_there_was_nothing_to_do(transactional_db, wxpay_settings):
    output, _ = sweep()

    assert re.fullmatch(r"Swept 0 orders in \d+\.\ds: nothing to do\n", output)


def test_a_halted_merchant_is_named_on_stderr(make_order, wxpay_settings):
    make_order(), make_order()
    wxpay_settings["MERCHANTS"]["default"]["API_KEY"] = "WRONGKEY" * 4

    _, errors = sweep()

    assert errors.startswith("Merchant 'default' halted for this run: ")


def test_off_a_terminal_progress_is_periodic_timestamped_log_lines(backlog, monkeypatch):
    monkeypatch.setattr(_Progress, "LOG_EVERY_SECONDS", 0.0)

    output, _ = sweep(progress="auto", workers=1)

    progress = [line for line in output.splitlines() if " progress: " in line]
    assert len(progress) == 6
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ progress: 6 orders handled, 4 closed, [\d.]+/s", progress[-1])
    assert "\r" not in output  # no bar redraws in a log file


def test_on_a_terminal_progress_is_a_bar(backlog):
    output, _ = sweep(progress="auto", stdout=Terminal())

    assert "closing: 6 orders [" in output
    assert " progress: " not in output


def test_json_prints_nothing_but_the_summary_whatever_the_progress_mode(backlog, monkeypatch):
    monkeypatch.setattr(_Progress, "LOG_EVERY_SECONDS", 0.0)

    output, _ = sweep(json=True, progress="log", stdout=Terminal())

    summary = json.loads(output)
    assert summary["total"] == 6
    assert {"action": "retry_scheduled", "reason": "SYSTEMERROR", "count": 1} in summary["reasons"]


# -- structured logging -----------------------------------------------------------------------------


def close_records(caplog: pytest.LogCaptureFixture) -> dict[str, logging.LogRecord]:
    return {r.out_trade_no: r for r in caplog.records if r.name == "django_wxpay_close" and hasattr(r, "action")}


def test_each_close_is_logged_with_fields_a_log_shipper_can_index(make_order, simulator, caplog):
    caplog.set_level(logging.INFO, logger="django_wxpay_close")
    closed, flaky = make_order(), make_order()
    simulator.inject(Fault.SYSTEMERROR, out_trade_no=flaky.out_trade_no)

    sweep()

    records = close_records(caplog)
    assert set(records) == {closed.out_trade_no, flaky.out_trade_no}
    record = records[closed.out_trade_no]
    assert (record.levelname, record.order_id, record.merchant, record.outcome, record.action) == (
        "INFO", closed.pk, "default", "closed", "closed")
    assert isinstance(record.duration_ms, int) and record.duration_ms >= 0
    assert record.attempt_id == closed.close_attempts.get().pk
    assert (records[flaky.out_trade_no].outcome, records[flaky.out_trade_no].action) == (
        "retryable_error", "retry_scheduled")


def test_a_halted_merchant_is_logged_as_an_error_with_its_name(make_order, wxpay_settings, caplog):
    make_order(), make_order()
    wxpay_settings["MERCHANTS"]["default"]["API_KEY"] = "WRONGKEY" * 4

    sweep()

    [halt] = [r for r in caplog.records if r.getMessage().startswith("Stopped closing orders of merchant")]
    assert (halt.levelname, halt.merchant, halt.outcome) == ("ERROR", "default", "configuration_error")
