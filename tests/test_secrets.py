"""The API key, made recognisable, runs every path of the app and shows up nowhere a person or a disk could see it.

Looked for in: every database row the app or the admin wrote, every log record of every logger at DEBUG
(message, extras, formatted traceback), every exception message, every admin page, all command output.
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from django.apps import apps
from django.contrib.auth import get_user_model
from django.core.exceptions import ImproperlyConfigured
from django.core.management import call_command
from django.core.management.base import CommandError, SystemCheckError
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from django_wxpay_close.conf import load_settings
from django_wxpay_close.models import CloseAttempt, Order
from django_wxpay_close.services import ABANDONED, close_order, close_orders, sweep_expired_orders
from django_wxpay_close.testing import MCH_ID, Fault, WeChatPaySimulator
from django_wxpay_close.wechat import CLOSEORDER_PATH, CloseOrderClient

from .conftest import OTHER_API_KEY, OTHER_MCH_ID

CANARY_KEY = "LEAKCANARY0LEAKCANARY1LEAKCANARY"  # 32 characters: a real-looking key nobody could miss
WRONG_CANARY_KEY = "WRONGCANARY0WRONGCANARY1WRONGCAN"  # a mistyped key is a secret too
assert len(CANARY_KEY) == len(WRONG_CANARY_KEY) == 32


@pytest.fixture
def simulator() -> Iterator[WeChatPaySimulator]:
    """Overrides conftest's: WeChat knows the canary key for the default merchant."""
    with WeChatPaySimulator({MCH_ID: CANARY_KEY, OTHER_MCH_ID: OTHER_API_KEY}) as sim:
        yield sim


@pytest.fixture
def canary_settings(wxpay_settings: dict[str, Any]) -> dict[str, Any]:
    wxpay_settings["MERCHANTS"]["default"]["API_KEY"] = CANARY_KEY
    wxpay_settings["MERCHANTS"]["other"]["API_KEY"] = WRONG_CANARY_KEY
    wxpay_settings.update(MAX_ATTEMPTS=2, RETRY_BACKOFF=timedelta(seconds=1))
    return wxpay_settings


class Seen:
    """Everything a person, a log shipper or a backup could see, gathered as text."""

    def __init__(self) -> None:
        self.texts: list[tuple[str, str]] = []

    def add(self, where: str, text: Any) -> None:
        self.texts.append((where, str(text)))

    def exception(self, where: str, exc: BaseException) -> None:
        self.add(where, f"{exc!s} {exc!r} {exc.__cause__!r} {exc.__context__!r}")

    def leaks(self) -> list[str]:
        needles = [CANARY_KEY, CANARY_KEY.lower(), WRONG_CANARY_KEY, WRONG_CANARY_KEY.lower()]
        return [where for where, text in self.texts if any(needle in text for needle in needles)]


def command(seen: Seen, *args: str) -> None:
    stdout, stderr = io.StringIO(), io.StringIO()
    try:
        call_command(*args, stdout=stdout, stderr=stderr)
    except (CommandError, SystemCheckError) as exc:
        seen.exception(f"exception of {args}", exc)
    seen.add(f"stdout of {args}", stdout.getvalue())
    seen.add(f"stderr of {args}", stderr.getvalue())


def test_the_api_key_appears_in_no_row_log_exception_admin_page_or_command_output(
    make_order: Any, simulator: WeChatPaySimulator, canary_settings: dict[str, Any], caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)  # the root logger: every logger's records
    seen = Seen()

    # Every answer WeChat or the network can give, through the command (table and JSON) and the service.
    closes, paid, closed_before = make_order(), make_order(remote="PAID"), make_order(remote="CLOSED")
    for fault in (Fault.SYSTEMERROR, Fault.BAD_SIGNATURE, Fault.UNSIGNED, Fault.HTTP_502, Fault.RESET_CONNECTION,
                  Fault.MALFORMED_BODY, Fault.ORDERNOTEXIST, Fault.XML_FORMAT_ERROR, Fault.RETURN_FAIL):
        simulator.inject(fault, out_trade_no=make_order().out_trade_no)
    canary_settings["READ_TIMEOUT"] = 1.0
    simulator.inject(Fault.DELAY, out_trade_no=make_order().out_trade_no, delay=1.2)  # beyond READ_TIMEOUT
    make_order(remote=None)
    for _ in range(3):
        make_order(merchant="other")  # its key is wrong: WeChat refuses, the merchant halts
    command(seen, "close_expired_orders", "--workers", "4")
    Order.objects.update(due_at=timezone.now())
    command(seen, "close_expired_orders", "--json")
    command(seen, "close_expired_orders", "--dry-run")

    # The admin action, as a superuser.
    user = get_user_model().objects.create_superuser("ops", "ops@example.com", "not-a-secret")
    client = Client()
    client.force_login(user)
    by_admin = [make_order().pk for _ in range(3)]
    response = client.post(reverse("admin:django_wxpay_close_order_changelist"),
                           {"action": "close_selected_orders", "_selected_action": by_admin, "confirm": "yes"},
                           follow=True)
    seen.add("admin action result page", response.content.decode())

    # Failover from a refused region, and a code-triggered close.
    canary_settings.update(BASE_URL="http://127.0.0.1:9", FAILOVER_BASE_URL=simulator.base_url)
    close_order(make_order())
    close_orders([make_order()])
    canary_settings.update(BASE_URL=simulator.base_url, FAILOVER_BASE_URL=None)

    # The settings objects people print while debugging.
    seen.add("repr of the settings", repr(load_settings()))
    seen.add("repr of the merchant", repr(load_settings().merchants["default"]))
    merchant = load_settings().merchants["default"].merchant
    seen.add("repr of a client", repr(CloseOrderClient(merchant, base_urls=[simulator.base_url])))

    # Every admin page that shows an order or an attempt.
    pages = [reverse("admin:django_wxpay_close_order_changelist"),
             reverse("admin:django_wxpay_close_order_changelist") + "?attention=yes",
             reverse("admin:django_wxpay_close_closeattempt_changelist")]
    pages += [reverse("admin:django_wxpay_close_order_change", args=[pk]) for pk in Order.objects.values_list("pk", flat=True)]
    pages += [reverse("admin:django_wxpay_close_closeattempt_change", args=[pk])
              for pk in CloseAttempt.objects.values_list("pk", flat=True)]
    for page in pages:
        response = client.get(page)
        assert response.status_code == 200, page
        seen.add(f"admin page {page}", response.content.decode())

    # Settings the app refuses: a key of the wrong length, with the canary in it.
    canary_settings["MERCHANTS"]["default"]["API_KEY"] = CANARY_KEY + "X"
    command(seen, "check")
    command(seen, "close_expired_orders")
    for refused in (lambda: close_order(Order.objects.first()), sweep_expired_orders, load_settings):
        with pytest.raises(ImproperlyConfigured) as caught:
            refused()
        seen.exception("ImproperlyConfigured", caught.value)

    # Every row in every table the app and the admin wrote to.
    for model in [*apps.get_app_config("django_wxpay_close").get_models(), apps.get_model("admin", "LogEntry")]:
        for row in model.objects.values():
            seen.add(f"{model.__name__} row", row)
    formatter = logging.Formatter("%(name)s %(levelname)s %(message)s")
    for record in caplog.records:
        seen.add(f"log record of {record.name}", f"{formatter.format(record)} {record.__dict__!r}")

    # The paths really ran: every kind of outcome is in the audit, and the requests carried signatures.
    outcomes = set(CloseAttempt.objects.values_list("outcome", flat=True))
    assert {"closed", "already_closed", "paid", "retryable_error", "untrusted_response", "invalid_response",
            "network_error", "not_found", "client_bug", "configuration_error"} <= outcomes
    assert CloseAttempt.objects.filter(trigger="admin").exists()
    assert CloseAttempt.objects.exclude(failed_over_from="").filter(url__endswith=CLOSEORDER_PATH).exists()
    assert all("<sign>" in xml for xml in CloseAttempt.objects.values_list("request_xml", flat=True))
    assert len(caplog.records) > 20 and len(seen.texts) > 50

    assert seen.leaks() == []


@pytest.mark.postgres
def test_the_api_key_appears_in_no_output_of_a_sweeper_process_even_one_killed_mid_request(
    make_order: Any, simulator: WeChatPaySimulator, canary_settings: dict[str, Any], start_sweeper: Any,
) -> None:
    seen = Seen()
    for _ in range(4):
        make_order()
    make_order(merchant="other")  # wrong key: the process halts that merchant and exits non-zero
    simulator.inject(Fault.BAD_SIGNATURE, out_trade_no=make_order().out_trade_no)

    simulator.latency = 1.5  # the first process dies with its requests in flight
    killed = start_sweeper("--workers", "2", log_level="DEBUG")
    deadline = time.monotonic() + 20
    while len(simulator.requests) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    killed.kill()
    seen.add("killed process output", killed.communicate())
    simulator.latency = 0.0
    Order.objects.update(due_at=timezone.now() - timedelta(seconds=1))  # as if the claims had lapsed

    exit_statuses = []
    for as_json in (False, True):
        finished = start_sweeper("--workers", "2", as_json=as_json, log_level="DEBUG")
        stdout, stderr = finished.communicate(timeout=60)
        seen.add(f"process output (json={as_json})", stdout + stderr)
        exit_statuses.append(finished.returncode)
        Order.objects.update(due_at=timezone.now())
    for model in apps.get_app_config("django_wxpay_close").get_models():
        for row in model.objects.values():
            seen.add(f"{model.__name__} row", row)

    # The wrong key raised the alarm (3; 4 where the untrusted answer's hold came first), its error on stderr.
    assert all(status in (3, 4) for status in exit_statuses), exit_statuses
    # The killed process's rows were settled as abandoned by the next run, and read here too.
    assert CloseAttempt.objects.filter(reason=ABANDONED).exists() and "DEBUG" in "".join(text for _, text in seen.texts)
    assert seen.leaks() == []
