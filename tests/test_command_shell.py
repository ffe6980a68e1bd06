"""`manage.py close_expired_orders` run from a shell, as cron runs it: exit statuses, what it says, `--json`.

call_command skips Django's system checks and argparse's exit, so these tests start a real process
(tests/subprocess_settings.py, configured through the environment).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from django.db import connection

from django_wxpay_close.models import CloseAttempt, Order
from django_wxpay_close.services.engine import STOPPING
from django_wxpay_close.testing import Fault, WeChatPaySimulator

from .conftest import ROOT, close_settings_as_json, merchant_config, wait_for

GOOD_MERCHANT = merchant_config()

# The broken settings a new user might write, and the check each must be reported by.
BROKEN_SETTINGS = {
    "an API key of 5 characters": ({"MERCHANTS": {"default": {**GOOD_MERCHANT, "API_KEY": "short"}}},
                                   "django_wxpay_close.E005"),
    "an ftp:// base URL": ({"MERCHANTS": {"default": GOOD_MERCHANT}, "BASE_URL": "ftp://apihk.mch.weixin.qq.com"},
                           "django_wxpay_close.E007"),
    "sign type SHA1": ({"MERCHANTS": {"default": {**GOOD_MERCHANT, "SIGN_TYPE": "SHA1"}}},
                       "django_wxpay_close.E006"),
    'WORKERS "many"': ({"MERCHANTS": {"default": GOOD_MERCHANT}, "WORKERS": "many"}, "django_wxpay_close.E009"),
    "no MERCHANTS": ({"BASE_URL": "https://apihk.mch.weixin.qq.com"}, "django_wxpay_close.E002"),
    "no WXPAY_CLOSE": (None, "django_wxpay_close.E001"),
}
ALL_AT_ONCE = {"MERCHANTS": {"default": {**GOOD_MERCHANT, "API_KEY": "short", "SIGN_TYPE": "SHA1"}},
               "BASE_URL": "ftp://apihk.mch.weixin.qq.com", "WORKERS": "many"}


def manage(*args: str, wxpay_close: Any = ALL_AT_ONCE, **env: str) -> subprocess.CompletedProcess[str]:
    """`python manage.py close_expired_orders ARGS` in a shell, with WXPAY_CLOSE as given (None: no setting)."""
    environment = {**os.environ, "DJANGO_SETTINGS_MODULE": "tests.subprocess_settings",
                   "WXPAY_TEST_CLOSE": json.dumps(wxpay_close), **env}
    return subprocess.run([sys.executable, "manage.py", "close_expired_orders", *args], cwd=ROOT, env=environment,
                          capture_output=True, text=True, timeout=60)


# -- an unusable WXPAY_CLOSE ---------------------------------------------------------------------------------


@pytest.mark.parametrize("broken", list(BROKEN_SETTINGS))
def test_unusable_settings_exit_3_naming_the_check_that_reports_them(broken):
    wxpay_close, check_id = BROKEN_SETTINGS[broken]

    done = manage(wxpay_close=wxpay_close)

    assert done.returncode == 3, done.stderr
    last_line = done.stderr.rstrip().splitlines()[-1]
    assert last_line.startswith("CommandError: close_expired_orders: WXPAY_CLOSE is not usable (")
    assert check_id in last_line and "nothing was sent" in last_line
    assert "SystemCheckError" not in done.stderr and "Traceback" not in done.stderr


def test_every_problem_is_listed_on_stderr_with_its_id_and_hint():
    done = manage()

    errors = done.stderr.splitlines()
    for check_id in ("E005", "E006", "E007", "E009"):
        assert any(line.startswith(f"django_wxpay_close.{check_id}: ") for line in errors), done.stderr
    assert "\tHINT: Copy it from the merchant platform (API security); it is never shown here." in errors
    assert "short" not in done.stderr  # not even a wrong key is echoed


def test_json_prints_a_summary_that_says_the_settings_are_unusable():
    done = manage("--json")

    summary = json.loads(done.stdout)
    assert (done.returncode, summary["exit_status"], summary["ok"], summary["total"]) == (3, 3, False, 0)
    assert [error["id"] for error in summary["configuration_errors"]] == [
        "django_wxpay_close.E006", "django_wxpay_close.E005", "django_wxpay_close.E007", "django_wxpay_close.E009"]
    assert summary["problems"].startswith("WXPAY_CLOSE is not usable (django_wxpay_close.E006, ")


def test_no_fail_on_error_does_not_hide_settings_the_sweep_cannot_use():
    done = manage("--no-fail-on-error", "--json")

    assert (done.returncode, json.loads(done.stdout)["exit_status"]) == (3, 3)


def test_skip_checks_still_refuses_unusable_settings_with_3():
    done = manage("--skip-checks")

    assert done.returncode == 3 and "django_wxpay_close.E005" in done.stderr


def test_another_apps_failed_system_check_still_fails_as_for_any_django_command():
    # No template engine: the admin's check admin.E403 fails; WXPAY_CLOSE itself is fine.
    done = manage(wxpay_close={"MERCHANTS": {"default": GOOD_MERCHANT}}, WXPAY_TEST_SETTINGS='{"TEMPLATES": []}')

    assert done.returncode == 1
    assert done.stderr.startswith("SystemCheckError: System check identified some issues:")
    assert "admin.E403" in done.stderr and "django_wxpay_close" not in done.stderr


def test_another_apps_failed_check_is_reported_beside_unusable_settings_and_fails_with_1():
    done = manage(WXPAY_TEST_SETTINGS='{"TEMPLATES": []}')

    assert done.returncode == 1
    assert "admin.E403" in done.stderr and "django_wxpay_close.E005" in done.stderr


# -- usage errors --------------------------------------------------------------------------------------------


def test_an_unknown_merchant_is_a_usage_error_naming_the_configured_ones():
    two = {"MERCHANTS": {"default": GOOD_MERCHANT, "hk-store": GOOD_MERCHANT}}

    done = manage("--merchant", "nosuch", wxpay_close=two)

    assert done.returncode == 2
    assert done.stderr.rstrip().splitlines()[-1] == (
        "CommandError: --merchant 'nosuch': not in WXPAY_CLOSE['MERCHANTS'], which names 'default', 'hk-store'")


@pytest.mark.parametrize("flag, value, message", [
    ("--limit", "0", "argument --limit: '0' is not a whole number of at least 1"),
    ("--batch-size", "lots", "argument --batch-size: 'lots' is not a whole number of at least 1"),
    ("--workers", "65", "argument --workers: '65' is not a whole number from 1 to 64"),
    ("--processes", "0", "argument --processes: '0' is not a whole number from 1 to 32"),
    ("--older-than", "5x", "argument --older-than: '5x' is not a duration like 90s, 30m, 2h or 1d"),
])
def test_a_bad_argument_exits_2_saying_what_was_expected(flag, value, message):
    done = manage(flag, value, wxpay_close={"MERCHANTS": {"default": GOOD_MERCHANT}})

    assert done.returncode == 2
    assert done.stderr.rstrip().splitlines()[-1] == f"manage.py close_expired_orders: error: {message}"


# -- several sweeper processes -------------------------------------------------------------------------------


@pytest.fixture
def start_in_terminal(wxpay_settings: dict[str, Any], transactional_db: None
                      ) -> Iterator[Callable[..., subprocess.Popen[str]]]:
    """Starts `manage.py close_expired_orders ARGS` on this test's database and simulator (WXPAY_CLOSE as it is
    when started) as a shell starts a job: the leader of its own process group, which a Ctrl-C in the terminal
    signals as a whole."""
    started: list[subprocess.Popen[str]] = []

    def start(*args: str, **env: str) -> subprocess.Popen[str]:
        environment = {**os.environ, "DJANGO_SETTINGS_MODULE": "tests.subprocess_settings",
                       "WXPAY_TEST_DB_NAME": str(connection.settings_dict["NAME"]),
                       "WXPAY_TEST_CLOSE": close_settings_as_json(wxpay_settings), **env}
        process = subprocess.Popen([sys.executable, "manage.py", "close_expired_orders", *args], cwd=ROOT,
                                   env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                   start_new_session=True)
        started.append(process)
        return process

    yield start
    for process in started:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.communicate()


def test_a_sweeper_process_that_cannot_use_its_settings_makes_the_run_exit_3(make_order, start_in_terminal):
    make_order()
    # The settings the parent read were usable; the ones its sweeper processes read are not.
    child_settings = json.dumps({"MERCHANTS": {"default": {**GOOD_MERCHANT, "API_KEY": "short"}}})

    sweep = start_in_terminal("--processes", "2", "--json", WXPAY_TEST_CHILD_CLOSE=child_settings)
    out, err = sweep.communicate(timeout=60)

    summary = json.loads(out)
    assert (sweep.returncode, summary["exit_status"], summary["processes"]) == (3, 3, 2), err
    assert [error["id"] for error in summary["configuration_errors"]] == ["django_wxpay_close.E005"]
    assert summary["problems"] == "WXPAY_CLOSE is not usable (django_wxpay_close.E005): nothing was sent"
    assert "Traceback" not in err


def test_ctrl_c_under_processes_exits_130_with_every_process_summarised_and_no_traceback(
    make_order: Callable[..., Order], simulator: WeChatPaySimulator, start_in_terminal: Callable[..., Any],
    wxpay_settings: dict[str, Any],
) -> None:
    for _ in range(60):  # 15 s of work at least: the Ctrl-C comes long before the end
        make_order()
    wxpay_settings["READ_TIMEOUT"] = 5.0  # every answer arrives in time
    simulator.latency = 1.0
    sweep = start_in_terminal("--processes", "2", "--workers", "2", "--json")
    # Both sweeper processes are past their start (each claims with a token of its own): Ctrl-C in the terminal.
    wait_for(lambda: Order.objects.exclude(claim_token=None).values("claim_token").distinct().count() == 2,
             timeout=30)
    os.killpg(sweep.pid, signal.SIGINT)
    out, err = sweep.communicate(timeout=60)

    summary = json.loads(out)
    assert (sweep.returncode, summary["exit_status"], summary["interrupted"]) == (130, 130, True), err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert err.rstrip().splitlines()[-1] == (
        "CommandError: close_expired_orders was interrupted; the closes in flight were recorded")
    sent = len(simulator.requests)
    assert sent < 60, "the processes kept claiming after Ctrl-C"
    assert not CloseAttempt.objects.unfinished().exists()
    # Claimed with a batch but not yet sent at the Ctrl-C: their rows say "not sent", the orders are due again.
    not_sent = CloseAttempt.objects.filter(outcome="", reason=STOPPING).count()
    assert CloseAttempt.objects.exclude(outcome="").count() == sent
    assert summary["by_action"] == {"closed": sent, **({"skipped": not_sent} if not_sent else {})}


def test_ctrl_c_is_never_forgiven_by_no_fail_on_error(
    make_order: Callable[..., Order], simulator: WeChatPaySimulator, start_in_terminal: Callable[..., Any],
    wxpay_settings: dict[str, Any],
) -> None:
    for _ in range(40):  # 20 s of work at least: the Ctrl-C comes long before the end
        make_order()
    wxpay_settings["READ_TIMEOUT"] = 5.0  # every answer arrives in time
    simulator.inject(Fault.XML_FORMAT_ERROR, times=None)  # every request refused as malformed: each order on hold (4)
    simulator.latency = 1.0
    sweep = start_in_terminal("--workers", "2", "--json", "--no-fail-on-error")
    wait_for(lambda: Order.objects.filter(on_hold=True).exists(), timeout=30)
    os.killpg(sweep.pid, signal.SIGINT)
    out, err = sweep.communicate(timeout=60)

    summary = json.loads(out)
    assert summary["exit_status"] == 4 and summary["interrupted"] is True  # what happened: holds outrank Ctrl-C
    assert sweep.returncode == 130, err  # forgiving the holds leaves the interruption
    assert "Traceback" not in err
