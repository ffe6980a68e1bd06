"""The public notify URL under a flood: bounded traces, a shared rate bound, genuine notifications always
recorded, the prune command; and concurrent copies of one notification, through a real server."""

from __future__ import annotations

import hashlib
import os
import shlex
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
import requests
from django.db import connection
from django.urls import reverse
from django.utils import timezone

from django_wxpay_close import signals
from django_wxpay_close.models import (
    AuditTrailError,
    NotificationVerdict,
    Order,
    OrderState,
    PaymentNotification,
    UnauthenticatedNotificationCount,
    stored_text,
)
from django_wxpay_close.notifications import MAX_NOTIFICATION_BYTES, TRACE_BODY_BYTES
from django_wxpay_close.testing import APPID, WeChatPaySimulator
from django_wxpay_close.wechat import decode_xml

from .conftest import ROOT, close_settings_as_json

Verdict = NotificationVerdict
GARBAGE = b"<xml>" + b"A" * (MAX_NOTIFICATION_BYTES - 11) + b"</xml>"  # readable, names no merchant: 64 KiB - 1
NOT_XML = b"\xff\xfe" + b"A" * 4000


@pytest.fixture
def notify_url(live_server: Any, wxpay_settings: dict[str, Any]) -> str:
    return f"{live_server.url}{reverse('django_wxpay_close:payment_notification')}"


@pytest.fixture
def traces_per_minute(wxpay_settings: dict[str, Any]) -> Callable[[int], None]:
    def bound(traces: int) -> None:
        wxpay_settings["NOTIFICATION_TRACES_PER_MINUTE"] = traces
    return bound


@pytest.fixture
def mismatches() -> Any:
    calls: list[dict[str, Any]] = []

    def receiver(sender: Any, **kwargs: Any) -> None:
        calls.append(kwargs)

    signals.payment_mismatch.connect(receiver, sender=Order, weak=False)
    yield calls
    signals.payment_mismatch.disconnect(receiver, sender=Order)


def answered(answer: tuple[int, bytes]) -> str:
    status, body = answer
    assert status == 200
    return decode_xml(body)["return_code"]


def open_order(make_order: Callable[..., Order], number: str = "PAY-1", **fields: Any) -> Order:
    return make_order(number, amount=1000, currency="HKD", **fields)


def minute_rows() -> list[UnauthenticatedNotificationCount]:
    return list(UnauthenticatedNotificationCount.objects.all())


# -- what an unauthenticated body keeps -------------------------------------------------------------------------


def test_an_unreadable_body_keeps_its_size_hash_first_bytes_and_client_address_only(simulator, notify_url):
    assert answered(simulator.post_notification(notify_url, NOT_XML)) == "FAIL"
    row = PaymentNotification.objects.get()
    assert row.verdict == Verdict.UNREADABLE and row.signature_verified is None
    assert (row.body_size, row.body_sha256) == (len(NOT_XML), hashlib.sha256(NOT_XML).hexdigest())
    assert row.raw_body == stored_text(NOT_XML[:TRACE_BODY_BYTES])
    assert row.client_address == "127.0.0.1"


def test_a_body_whose_signature_does_not_verify_keeps_only_its_first_bytes(make_order, simulator, notify_url):
    open_order(make_order)
    simulator.notify(notify_url, "PAY-1", total_fee=1000, fee_type="HKD", tamper=True)
    row = PaymentNotification.objects.get()
    assert (row.verdict, row.signature_verified, row.out_trade_no) == (Verdict.BAD_SIGNATURE, False, "PAY-1")
    assert row.body_size == len(simulator.last_notification or b"") > TRACE_BODY_BYTES == len(row.raw_body)


def test_a_body_naming_no_configured_merchant_keeps_only_its_first_bytes(notify_url, transactional_db):
    stranger = WeChatPaySimulator({"10009999": "STRANGERKEYSTRANGERKEYSTRANGERK0"})  # never started: it only signs
    body = stranger.notification_body("PAY-1", total_fee=1000, fee_type="HKD", mch_id="10009999")
    stranger.post_notification(notify_url, body)
    row = PaymentNotification.objects.get()
    assert (row.verdict, row.mch_id, row.body_size) == (Verdict.UNKNOWN_MERCHANT, "10009999", len(body))
    assert row.raw_body == body[:TRACE_BODY_BYTES].decode()


def test_a_verified_notification_keeps_its_whole_body_with_its_size_and_hash(make_order, simulator, notify_url):
    open_order(make_order)
    simulator.notify(notify_url, "PAY-1", total_fee=1000, fee_type="HKD")
    sent = simulator.last_notification or b""
    row = PaymentNotification.objects.get()
    assert (row.verdict, row.raw_body.encode()) == (Verdict.RECORDED_PAID, sent)
    assert (row.body_size, row.body_sha256, row.client_address) == (
        len(sent), hashlib.sha256(sent).hexdigest(), "127.0.0.1")


def test_a_forwarded_for_header_is_never_taken_as_the_client_address(simulator, notify_url):
    requests.post(notify_url, data=b"junk", headers={"X-Forwarded-For": "203.0.113.9"}, timeout=10)
    assert PaymentNotification.objects.get().client_address == "127.0.0.1"


# -- the rate bound ---------------------------------------------------------------------------------------------


def test_past_the_bound_unauthenticated_bodies_are_answered_fail_and_counted_without_a_row(
        simulator, notify_url, traces_per_minute):
    traces_per_minute(3)
    answers = [answered(simulator.post_notification(notify_url, GARBAGE)) for _ in range(10)]
    assert answers == ["FAIL"] * 10
    rows = minute_rows()  # one per minute the test ran in: the bound is per minute
    assert sum(row.unknown_merchant for row in rows) == 10
    assert PaymentNotification.objects.count() == sum(row.traced for row in rows) <= 3 * len(rows)
    assert all(row.traced <= 3 and row.untraced == row.received - row.traced for row in rows)


def test_the_count_says_why_each_body_was_refused(make_order, simulator, notify_url, traces_per_minute):
    traces_per_minute(1)
    open_order(make_order)
    simulator.post_notification(notify_url, NOT_XML)
    simulator.notify(notify_url, "PAY-1", total_fee=1000, fee_type="HKD", tamper=True)
    simulator.notify(notify_url, "PAY-1", total_fee=1000, fee_type="HKD", tamper=True)
    rows = minute_rows()
    assert (sum(r.unreadable for r in rows), sum(r.bad_signature for r in rows), sum(r.unknown_merchant for r in rows)
            ) == (1, 2, 0)


def test_a_genuine_notification_is_recorded_however_far_past_the_bound(make_order, simulator, notify_url,
                                                                       traces_per_minute):
    traces_per_minute(1)
    order = open_order(make_order)
    for _ in range(5):
        simulator.post_notification(notify_url, GARBAGE)
    assert answered(simulator.notify(notify_url, "PAY-1", total_fee=1000, fee_type="HKD")) == "SUCCESS"
    order.refresh_from_db()
    assert order.state == OrderState.PAID
    assert PaymentNotification.objects.filter(verdict=Verdict.RECORDED_PAID, signature_verified=True).count() == 1


def test_verified_notifications_are_never_counted_against_the_bound(make_order, simulator, notify_url,
                                                                    traces_per_minute):
    traces_per_minute(1)
    open_order(make_order)
    simulator.notify(notify_url, "PAY-1", total_fee=1000, fee_type="HKD")
    for _ in range(3):
        simulator.replay_last_notification(notify_url)
    assert PaymentNotification.objects.filter(signature_verified=True).count() == 4
    assert minute_rows() == []


def test_a_flood_is_logged_once_a_minute_and_its_untraced_bodies_not_at_all(simulator, notify_url,
                                                                            traces_per_minute, caplog):
    traces_per_minute(2)
    with caplog.at_level("INFO", logger="django_wxpay_close"):
        for _ in range(12):
            simulator.post_notification(notify_url, GARBAGE)
    flood_lines = [r for r in caplog.records if r.getMessage().startswith("More than 2 unauthenticated")]
    per_body_lines = [r for r in caplog.records if r.getMessage().startswith("Payment notification for")]
    assert len(per_body_lines) == PaymentNotification.objects.count() <= 2 * len(minute_rows())
    assert len(flood_lines) <= len(minute_rows())


@pytest.mark.postgres
def test_the_bound_holds_for_concurrent_requests_to_a_threaded_server(simulator, notify_url, traces_per_minute):
    traces_per_minute(5)
    start = threading.Barrier(8)

    def flood() -> None:
        start.wait()
        for _ in range(6):
            simulator.post_notification(notify_url, GARBAGE)

    threads = [threading.Thread(target=flood) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    rows = minute_rows()
    assert sum(row.received for row in rows) == 48
    assert PaymentNotification.objects.count() == sum(row.traced for row in rows) <= 5 * len(rows)


def test_the_bound_is_a_setting_with_a_system_check(settings):
    from django_wxpay_close.conf import inspect_settings

    settings.WXPAY_CLOSE = {**settings.WXPAY_CLOSE, "NOTIFICATION_TRACES_PER_MINUTE": 0}
    assert "django_wxpay_close.E009" in {problem.id for problem in inspect_settings()[1]}
    settings.WXPAY_CLOSE = {**settings.WXPAY_CLOSE, "NOTIFICATION_TRACES_PER_MINUTE": 5000}
    assert "django_wxpay_close.W004" in {problem.id for problem in inspect_settings()[1]}


# -- pruning: only old unauthenticated traces ------------------------------------------------------------------


def old_and_new_rows(make_order: Callable[..., Order]) -> dict[str, PaymentNotification]:
    order = open_order(make_order)
    long_ago = timezone.now() - timedelta(days=40)
    rows = {
        "old_trace": PaymentNotification.objects.create(received_at=long_ago, verdict=Verdict.UNREADABLE),
        "old_forgery": PaymentNotification.objects.create(received_at=long_ago, verdict=Verdict.BAD_SIGNATURE,
                                                          signature_verified=False, out_trade_no="PAY-1"),
        "old_verified": PaymentNotification.objects.create(received_at=long_ago, verdict=Verdict.RECORDED_PAID,
                                                           signature_verified=True, order=order),
        "old_unknown_order": PaymentNotification.objects.create(received_at=long_ago, verdict=Verdict.UNKNOWN_ORDER,
                                                                signature_verified=True),
        "new_trace": PaymentNotification.objects.create(verdict=Verdict.UNREADABLE),
    }
    UnauthenticatedNotificationCount.objects.create(interval_start=long_ago.replace(second=0, microsecond=0),
                                                    unreadable=9, traced=1)
    UnauthenticatedNotificationCount.objects.create(interval_start=timezone.now().replace(second=0, microsecond=0),
                                                    unreadable=1, traced=1)
    return rows


def run_prune(wxpay_settings: dict[str, Any], *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "tests.subprocess_settings",
           "WXPAY_TEST_DB_NAME": str(connection.settings_dict["NAME"]),
           "WXPAY_TEST_CLOSE": close_settings_as_json(wxpay_settings)}
    return subprocess.run([sys.executable, str(ROOT / "manage.py"), "prune_notification_traces", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def test_the_prune_command_deletes_old_unauthenticated_traces_and_their_counts_only(make_order, wxpay_settings):
    rows = old_and_new_rows(make_order)
    done = run_prune(wxpay_settings, "--older-than", "30d")
    assert done.returncode == 0, done.stderr
    assert "Deleted 2 unauthenticated notification traces and 1 per-minute counts" in done.stdout
    kept = set(PaymentNotification.objects.values_list("pk", flat=True))
    assert kept == {rows[name].pk for name in ("old_verified", "old_unknown_order", "new_trace")}
    assert [row.unreadable for row in minute_rows()] == [1]


def test_the_prune_command_dry_run_deletes_nothing(make_order, wxpay_settings):
    old_and_new_rows(make_order)
    done = run_prune(wxpay_settings, "--dry-run")
    assert done.returncode == 0, done.stderr
    assert "Would delete 2 unauthenticated notification traces and 1 per-minute counts" in done.stdout
    assert (PaymentNotification.objects.count(), len(minute_rows())) == (5, 2)


def test_the_prune_command_refuses_a_duration_it_cannot_read_with_exit_status_2(wxpay_settings, transactional_db):
    done = run_prune(wxpay_settings, "--older-than", "soon")
    assert done.returncode == 2
    assert "'soon' is not a positive duration like 12h or 30d" in done.stderr
    assert "invalid age value" not in done.stderr


def test_traces_cannot_be_deleted_or_edited_other_than_by_the_prune(make_order):
    old_and_new_rows(make_order)
    with pytest.raises(AuditTrailError):
        PaymentNotification.objects.unauthenticated().delete()
    with pytest.raises(AuditTrailError):
        PaymentNotification.objects.unauthenticated().update(detail="rewritten")
    with pytest.raises(AuditTrailError):
        PaymentNotification.objects.unauthenticated().first().delete()


# -- a payment to another app -----------------------------------------------------------------------------------


def test_a_signed_notification_for_another_appid_is_not_recorded_as_paid(make_order, simulator, notify_url,
                                                                         mismatches):
    order = open_order(make_order)
    body = simulator.notification_body("PAY-1", total_fee=1000, fee_type="HKD", appid="wx0000000000000000")
    assert answered(simulator.post_notification(notify_url, body)) == "SUCCESS"  # a person must look, not WeChat
    order.refresh_from_db()
    row = PaymentNotification.objects.get()
    assert order.state == OrderState.OPEN
    assert (row.verdict, row.signature_verified, row.order_id) == (Verdict.APP_MISMATCH, True, order.pk)
    assert "appid 'wx0000000000000000'" in row.detail and APPID in row.detail
    assert [call["notification"].pk for call in mismatches] == [row.pk]


def test_a_signed_notification_naming_another_sub_appid_is_not_recorded_as_paid(make_order, simulator, notify_url):
    order = open_order(make_order, sub_appid="wxsub0000000000001")
    body = simulator.notification_body("PAY-1", total_fee=1000, fee_type="HKD", sub_appid="wxsub0000000000002")
    simulator.post_notification(notify_url, body)
    order.refresh_from_db()
    assert order.state == OrderState.OPEN
    assert PaymentNotification.objects.get().verdict == Verdict.APP_MISMATCH


def test_a_notification_with_the_orders_sub_appid_or_none_is_recorded(make_order, simulator, notify_url):
    first = open_order(make_order, "PAY-1", sub_appid="wxsub0000000000001")
    second = open_order(make_order, "PAY-2", sub_appid="wxsub0000000000001")
    simulator.post_notification(notify_url, simulator.notification_body(
        "PAY-1", total_fee=1000, fee_type="HKD", sub_appid="wxsub0000000000001"))
    simulator.post_notification(notify_url, simulator.notification_body("PAY-2", total_fee=1000, fee_type="HKD"))
    assert {Order.objects.get(pk=o.pk).state for o in (first, second)} == {OrderState.PAID}


# -- concurrent copies of one notification ----------------------------------------------------------------------


@pytest.mark.postgres
def test_twenty_concurrent_copies_of_one_notification_say_recorded_exactly_once(make_order, simulator, notify_url):
    order = open_order(make_order)
    paid: list[Order] = []

    def on_paid(sender: Any, order: Order, **kwargs: Any) -> None:
        paid.append(order)

    signals.order_paid_recorded.connect(on_paid, sender=Order, weak=False)
    body = simulator.notification_body("PAY-1", total_fee=1000, fee_type="HKD")
    start = threading.Barrier(20)
    answers: list[str] = []

    def deliver() -> None:
        start.wait()
        answers.append(answered(simulator.post_notification(notify_url, body, timeout=30)))

    threads = [threading.Thread(target=deliver) for _ in range(20)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        signals.order_paid_recorded.disconnect(on_paid, sender=Order)
    verdicts = Counter(PaymentNotification.objects.values_list("verdict", flat=True))
    assert answers == ["SUCCESS"] * 20
    assert verdicts == {Verdict.RECORDED_PAID: 1, Verdict.ALREADY_PAID: 19}
    assert [o.pk for o in paid] == [order.pk]


# -- trying the endpoint by hand: the simulator's command line --------------------------------------------------


def notify_from_the_command_line(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "django_wxpay_close.testing", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)


def test_the_simulators_command_line_sends_a_signed_notification_that_pays_the_order(make_order, notify_url):
    order = open_order(make_order)
    done = notify_from_the_command_line("--notify", notify_url, "--out-trade-no", "PAY-1", "--total-fee", "1000",
                                        "--fee-type", "HKD")
    assert done.returncode == 0, done.stderr
    assert "HTTP 200" in done.stdout and "SUCCESS" in done.stdout
    order.refresh_from_db()
    assert order.state == OrderState.PAID
    assert PaymentNotification.objects.get().verdict == Verdict.RECORDED_PAID


def test_the_command_line_prints_a_curl_that_repeats_the_same_notification(make_order, notify_url):
    open_order(make_order)
    done = notify_from_the_command_line("--notify", notify_url, "--out-trade-no", "PAY-1", "--total-fee", "1000",
                                        "--fee-type", "HKD")
    curl = next(line for line in done.stdout.splitlines() if line.startswith("curl "))
    repeated = subprocess.run(shlex.split(curl), capture_output=True, text=True, timeout=60)
    assert decode_xml(repeated.stdout.encode())["return_code"] == "SUCCESS"
    assert list(PaymentNotification.objects.order_by("pk").values_list("verdict", flat=True)) == [
        Verdict.RECORDED_PAID, Verdict.ALREADY_PAID]


def test_the_command_line_exits_1_when_the_shop_refuses_the_notification(make_order, notify_url):
    done = notify_from_the_command_line("--notify", notify_url, "--out-trade-no", "NO-SUCH-ORDER")
    assert done.returncode == 1
    assert PaymentNotification.objects.get().verdict == Verdict.UNKNOWN_ORDER


def test_the_command_line_sends_notifications_to_loopback_urls_only():
    done = notify_from_the_command_line("--notify", "https://shop.example.com/wxpay/notify/")
    assert done.returncode == 2 and "loopback" in done.stderr
