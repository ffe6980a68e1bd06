"""WeChat Pay's payment result notifications, sent by the loopback simulator to the shop's live notify view."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from typing import Any

import pytest
import requests
from django.db import connections
from django.db.models import ProtectedError
from django.dispatch import Signal
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from django_wxpay_close import services, signals
from django_wxpay_close.models import (
    AuditTrailError,
    CloseAttempt,
    NotificationVerdict,
    Order,
    OrderState,
    PaymentNotification,
)
from django_wxpay_close.notifications import MAX_NOTIFICATION_BYTES, TRACE_BODY_BYTES
from django_wxpay_close.testing import API_KEY, MCH_ID, SUB_MCH_ID, Fault, WeChatPaySimulator
from django_wxpay_close.testing import OrderState as RemoteState
from django_wxpay_close.wechat import SignType, decode_xml, read_notification

from .conftest import OTHER_API_KEY, OTHER_MCH_ID

Verdict = NotificationVerdict


@pytest.fixture
def notify_url(live_server: Any, wxpay_settings: dict[str, Any]) -> str:
    """The example project's notify URL on the live server, with WXPAY_CLOSE pointing at the simulator."""
    return f"{live_server.url}{reverse('django_wxpay_close:payment_notification')}"


@pytest.fixture
def received() -> Iterator[Callable[[Signal], list[dict[str, Any]]]]:
    """`received(signal)` starts recording that signal's sends (their keyword arguments)."""
    connected: list[tuple[Signal, Callable[..., None]]] = []

    def listen(signal: Signal) -> list[dict[str, Any]]:
        calls: list[dict[str, Any]] = []

        def receiver(sender: Any, **kwargs: Any) -> None:
            calls.append(kwargs)

        signal.connect(receiver, sender=Order, weak=False)
        connected.append((signal, receiver))
        return calls

    yield listen
    for signal, receiver in connected:
        signal.disconnect(receiver, sender=Order)


def reply_of(answer: tuple[int, bytes]) -> dict[str, str]:
    status, body = answer
    assert status == 200
    return decode_xml(body)


def acknowledged(answer: tuple[int, bytes]) -> bool:
    reply = reply_of(answer)
    assert reply["return_code"] in ("SUCCESS", "FAIL"), reply
    return reply["return_code"] == "SUCCESS"


def the_notification() -> PaymentNotification:
    return PaymentNotification.objects.get()


def open_order(make_order: Callable[..., Order], number: str = "PAY-1", **fields: Any) -> Order:
    return make_order(number, amount=fields.pop("amount", 1000), currency=fields.pop("currency", "HKD"), **fields)


# -- a payment WeChat reports ------------------------------------------------------------------------


def test_a_signed_notification_marks_the_order_paid(make_order, simulator, notify_url):
    order = open_order(make_order)
    simulator.notify(notify_url, "PAY-1", total_fee=1000, fee_type="HKD")
    order.refresh_from_db()
    assert order.state == OrderState.PAID and order.closed_at is None


def test_a_recorded_payment_is_acknowledged_with_success_xml(make_order, simulator, notify_url):
    open_order(make_order)
    status, body = simulator.notify(notify_url, "PAY-1", total_fee=1000, fee_type="HKD")
    assert status == 200
    assert decode_xml(body) == {"return_code": "SUCCESS", "return_msg": "OK"}


def test_the_reply_is_served_as_text_xml(make_order, simulator, notify_url):
    open_order(make_order)
    body = simulator.notification_body("PAY-1", total_fee=1000, fee_type="HKD")
    response = requests.post(notify_url, data=body, headers={"Content-Type": "text/xml"}, timeout=10)
    assert response.headers["Content-Type"] == "text/xml; charset=utf-8"


def test_a_recorded_payment_sends_order_paid_recorded(make_order, simulator, notify_url, received):
    order = open_order(make_order)
    paid = received(signals.order_paid_recorded)
    simulator.notify(notify_url, "PAY-1", total_fee=1000, fee_type="HKD")
    assert [call["order"].pk for call in paid] == [order.pk]


def test_a_recorded_payment_leaves_a_verified_row_linked_to_the_order(make_order, simulator, notify_url):
    order = open_order(make_order)
    simulator.notify(notify_url, "PAY-1", total_fee=1000, fee_type="HKD")
    row = the_notification()
    sent = decode_xml(simulator.last_notification or b"")
    assert (row.verdict, row.signature_verified, row.order_id) == (Verdict.RECORDED_PAID, True, order.pk)
    assert (row.mch_id, row.sub_mch_id, row.out_trade_no, row.total_fee, row.fee_type, row.result_code) == (
        MCH_ID, SUB_MCH_ID, "PAY-1", "1000", "HKD", "SUCCESS")
    assert row.transaction_id == sent["transaction_id"]
    assert decode_xml(row.raw_body.encode()) == sent


def test_the_payment_time_is_wechats_time_end_in_beijing_time(make_order, simulator, notify_url):
    order = open_order(make_order)
    simulator.notify(notify_url, "PAY-1", total_fee=1000, fee_type="HKD")
    time_end = decode_xml(simulator.last_notification or b"")["time_end"]
    order.refresh_from_db()
    assert order.paid_at is not None
    beijing = timezone.get_fixed_timezone(timedelta(hours=8))
    assert order.paid_at.astimezone(beijing).strftime("%Y%m%d%H%M%S") == time_end
    assert abs(order.paid_at - timezone.now()) < timedelta(minutes=1)


def test_an_order_without_amount_or_currency_is_paid_whatever_the_amount(make_order, simulator, notify_url):
    order = make_order("PAY-1")
    assert acknowledged(simulator.notify(notify_url, "PAY-1", total_fee=1, fee_type="USD"))
    order.refresh_from_db()
    assert order.state == OrderState.PAID


def test_an_order_of_a_second_merchant_is_checked_with_that_merchants_key(make_order, simulator, notify_url):
    order = open_order(make_order, merchant="other")
    assert acknowledged(simulator.notify(notify_url, "PAY-1", total_fee=1000, fee_type="HKD", mch_id=OTHER_MCH_ID))
    order.refresh_from_db()
    assert order.state == OrderState.PAID


def test_a_notification_naming_no_sign_type_is_checked_with_a_configured_md5(make_order, simulator, notify_url,
                                                                             wxpay_settings):
    wxpay_settings["MERCHANTS"]["default"]["SIGN_TYPE"] = "MD5"
    order = open_order(make_order)
    assert acknowledged(simulator.notify(notify_url, "PAY-1", total_fee=1000, fee_type="HKD", sign_type=SignType.MD5))
    order.refresh_from_db()
    assert order.state == OrderState.PAID


# -- repeats -------------------------------------------------------------------------------------------


def test_a_replayed_notification_is_acknowledged_again(make_order, simulator, notify_url):
    open_order(make_order)
    assert acknowledged(simulator.notify(notify_url, "PAY-1", total_fee=1000, fee_type="HKD"))
    assert acknowledged(simulator.replay_last_notification(notify_url))


def test_a_replay_is_recorded_as_a_second_row_and_pays_nothing_twice(make_order, simulator, notify_url, received):
    order = open_order(make_order)
    paid = received(signals.order_paid_recorded)
    simulator.notify(notify_url, "PAY-1", total_fee=1000, fee_type="HKD")
    order.refresh_from_db()
    first_paid_at = order.paid_at
    simulator.replay_last_notification(notify_url)
    order.refresh_from_db()
    assert [row.verdict for row in PaymentNotification.objects.order_by("id")] == [
        Verdict.RECORDED_PAID, Verdict.ALREADY_PAID]
    assert order.state == OrderState.PAID and order.paid_at == first_paid_at
    assert len(paid) == 1


# -- notifications that are not believed -----------------------------------------------------------------


def test_a_tampered_notification_is_refused(make_order, simulator, notify_url):
    open_order(make_order)
    reply = reply_of(simulator.notify(notify_url, "PAY-1", total_fee=1000, fee_type="HKD", tamper=True))
    assert reply["return_code"] == "FAIL" and reply["return_msg"]


def test_a_tampered_notification_is_recorded_unverified_and_changes_nothing(make_order, simulator, notify_url,
                                                                            received):
    order = open_order(make_order)
    paid = received(signals.order_paid_recorded)
    simulator.notify(notify_url, "PAY-1", total_fee=1000, fee_type="HKD", tamper=True)
    row = the_notification()
    assert (row.verdict, row.signature_verified, row.order_id) == (Verdict.BAD_SIGNATURE, False, None)
    assert row.total_fee == "1001"  # stored as received
    order.refresh_from_db()
    assert order.state == OrderState.OPEN and order.paid_at is None and paid == []


def test_an_unsigned_notification_is_refused(make_order, simulator, notify_url):
    order = open_order(make_order)
    body = simulator.notification_body("PAY-1", total_fee=1000, fee_type="HKD")
    unsigned = re.sub(rb"<sign>.*?</sign>", b"", body)
    assert not acknowledged(simulator.post_notification(notify_url, unsigned))
    row = the_notification()
    assert (row.verdict, row.detail) == (Verdict.BAD_SIGNATURE, "the body carries no sign")
    order.refresh_from_db()
    assert order.state == OrderState.OPEN


def test_the_sign_type_is_the_configured_one_never_the_one_the_body_names(make_order, simulator, notify_url):
    order = open_order(make_order)  # the merchant is configured for HMAC-SHA256
    answer = simulator.notify(notify_url, "PAY-1", total_fee=1000, fee_type="HKD",
                              sign_type=SignType.MD5, claim_sign_type="MD5")
    assert not acknowledged(answer)
    row = the_notification()
    assert (row.verdict, row.signature_verified) == (Verdict.BAD_SIGNATURE, False)
    assert "never used to verify" in row.detail
    order.refresh_from_db()
    assert order.state == OrderState.OPEN


def test_a_notification_for_an_unknown_merchant_is_refused(make_order, notify_url):
    stranger = WeChatPaySimulator({"10009999": "STRANGERKEYSTRANGERKEYSTRANGERK0"})  # never started: it only signs
    body = stranger.notification_body("PAY-1", total_fee=1000, fee_type="HKD", mch_id="10009999")
    assert not acknowledged(stranger.post_notification(notify_url, body))
    row = the_notification()
    assert (row.verdict, row.signature_verified, row.mch_id) == (Verdict.UNKNOWN_MERCHANT, None, "10009999")


def test_an_oversize_body_is_refused_and_keeps_only_a_trace(simulator, notify_url):
    body = b"<xml><return_code>SUCCESS</return_code><pad>" + b"x" * MAX_NOTIFICATION_BYTES + b"</pad></xml>"
    assert not acknowledged(simulator.post_notification(notify_url, body))
    row = the_notification()
    assert row.verdict == Verdict.UNREADABLE and "limit" in row.detail
    assert len(row.raw_body) == TRACE_BODY_BYTES and row.body_size == MAX_NOTIFICATION_BYTES + 1


def test_a_body_with_a_dtd_is_refused(simulator, notify_url):
    body = (b'<?xml version="1.0"?><!DOCTYPE xml [<!ENTITY boom "SUCCESS">]>'
            b"<xml><return_code>&boom;</return_code></xml>")
    assert not acknowledged(simulator.post_notification(notify_url, body))
    row = the_notification()
    assert row.verdict == Verdict.UNREADABLE and row.signature_verified is None


def test_an_empty_body_is_refused(simulator, notify_url):
    assert not acknowledged(simulator.post_notification(notify_url, b""))
    assert the_notification().verdict == Verdict.UNREADABLE


def test_get_is_not_allowed(notify_url):
    response = requests.get(notify_url, timeout=10)
    assert response.status_code == 405
    assert not PaymentNotification.objects.exists()


# -- believed, but not a payment to record ----------------------------------------------------------------


def test_a_notification_for_an_unknown_order_is_refused_so_wechat_repeats_it(simulator, notify_url, transactional_db):
    body = simulator.notification_body("NOT-YET-COMMITTED", total_fee=1000, fee_type="HKD")
    reply = reply_of(simulator.post_notification(notify_url, body))
    assert reply["return_code"] == "FAIL"
    row = the_notification()
    assert (row.verdict, row.signature_verified, row.order_id) == (Verdict.UNKNOWN_ORDER, True, None)


def test_an_order_number_of_another_sub_merchant_is_an_unknown_order(make_order, simulator, notify_url):
    order = open_order(make_order)
    body = simulator.notification_body("PAY-1", total_fee=1000, fee_type="HKD", sub_mch_id="29999999")
    assert not acknowledged(simulator.post_notification(notify_url, body))
    assert the_notification().verdict == Verdict.UNKNOWN_ORDER
    order.refresh_from_db()
    assert order.state == OrderState.OPEN


def test_a_wrong_amount_is_not_recorded_as_paid(make_order, simulator, notify_url):
    order = open_order(make_order, amount=1000, currency="HKD")
    simulator.notify(notify_url, "PAY-1", total_fee=1, fee_type="HKD")
    order.refresh_from_db()
    assert order.state == OrderState.OPEN and order.paid_at is None
    row = the_notification()
    assert (row.verdict, row.order_id) == (Verdict.AMOUNT_MISMATCH, order.pk)
    assert "total_fee '1'" in row.detail and "1000" in row.detail


def test_a_wrong_amount_is_signalled_and_acknowledged(make_order, simulator, notify_url, received):
    order = open_order(make_order, amount=1000, currency="HKD")
    mismatches = received(signals.payment_mismatch)
    paid = received(signals.order_paid_recorded)
    # Acknowledged: a person has to look at it; a day of WeChat's repeats would not change that.
    assert acknowledged(simulator.notify(notify_url, "PAY-1", total_fee=1, fee_type="HKD"))
    assert [(call["order"].pk, call["notification"].verdict) for call in mismatches] == [
        (order.pk, Verdict.AMOUNT_MISMATCH)]
    assert paid == []


def test_a_wrong_currency_is_a_mismatch_too(make_order, simulator, notify_url, received):
    order = open_order(make_order, amount=1000, currency="HKD")
    mismatches = received(signals.payment_mismatch)
    simulator.notify(notify_url, "PAY-1", total_fee=1000, fee_type="USD")
    order.refresh_from_db()
    assert order.state == OrderState.OPEN
    assert len(mismatches) == 1 and "fee_type 'USD'" in the_notification().detail


def test_a_failed_payment_is_acknowledged_but_records_nothing(make_order, simulator, notify_url, received):
    order = open_order(make_order)
    paid = received(signals.order_paid_recorded)
    assert acknowledged(simulator.notify(notify_url, "PAY-1", total_fee=1000, fee_type="HKD", result_code="FAIL"))
    order.refresh_from_db()
    assert order.state == OrderState.OPEN and paid == []
    row = the_notification()
    assert (row.verdict, row.signature_verified, row.result_code) == (Verdict.NOT_SUCCESS, True, "FAIL")


# -- a payment for an order we closed ----------------------------------------------------------------------


def test_a_payment_for_a_closed_order_is_an_incident_and_the_order_stays_closed(make_order, simulator, notify_url):
    order = open_order(make_order, state=OrderState.CLOSED, closed_at=timezone.now(), remote=RemoteState.CLOSED)
    simulator.notify(notify_url, "PAY-1", total_fee=1000, fee_type="HKD")
    order.refresh_from_db()
    assert order.state == OrderState.CLOSED and order.paid_at is None
    row = the_notification()
    assert (row.verdict, row.signature_verified, row.order_id) == (Verdict.PAID_AFTER_CLOSE, True, order.pk)
    assert "refund" in row.detail


def test_a_payment_for_a_closed_order_is_signalled_and_acknowledged(make_order, simulator, notify_url, received):
    order = open_order(make_order, state=OrderState.CLOSED, closed_at=timezone.now(), remote=RemoteState.CLOSED)
    incidents = received(signals.payment_for_closed_order)
    assert acknowledged(simulator.notify(notify_url, "PAY-1", total_fee=1000, fee_type="HKD"))
    assert [(call["order"].pk, call["notification"].verdict) for call in incidents] == [
        (order.pk, Verdict.PAID_AFTER_CLOSE)]


def test_a_notification_during_an_in_flight_close_leaves_the_order_paid_never_closed(
        make_order, simulator, notify_url, wxpay_settings, received):
    wxpay_settings["READ_TIMEOUT"] = 5.0  # the delayed answer must still be read
    order = open_order(make_order)
    closed = received(signals.order_closed)
    # The close is applied when it arrives and answered 1.5 s later; the payment is notified in between.
    simulator.inject(Fault.DELAY, out_trade_no="PAY-1", delay=1.5)
    results: list[services.OrderCloseResult] = []

    def close_in_background() -> None:
        try:
            results.append(services.close_order(Order.objects.get(pk=order.pk)))
        finally:
            connections.close_all()  # this thread's own connection; left open it blocks dropping the test DB

    closer = threading.Thread(target=close_in_background)
    closer.start()
    deadline = time.monotonic() + 5
    while simulator.close_requests_for("PAY-1") == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert simulator.close_requests_for("PAY-1") == 1, "the close never reached the simulator"
    assert closer.is_alive(), "the close was answered before the notification could be sent"
    assert acknowledged(simulator.notify(notify_url, "PAY-1", total_fee=1000, fee_type="HKD"))
    closer.join(timeout=15)
    assert not closer.is_alive() and results

    order.refresh_from_db()
    assert order.state == OrderState.PAID and order.closed_at is None and closed == []
    attempt = CloseAttempt.objects.get(order=order)
    assert attempt.is_finished
    assert the_notification().verdict == Verdict.RECORDED_PAID


# -- the audit trail -----------------------------------------------------------------------------------------


def test_notification_rows_can_be_neither_edited_nor_deleted_and_protect_their_order(make_order, simulator,
                                                                                      notify_url):
    order = open_order(make_order)
    simulator.notify(notify_url, "PAY-1", total_fee=1000, fee_type="HKD")
    row = the_notification()
    row.detail = "rewritten"
    with pytest.raises(AuditTrailError):
        row.save()
    with pytest.raises(AuditTrailError):
        row.delete()
    with pytest.raises(AuditTrailError):
        PaymentNotification.objects.all().delete()
    with pytest.raises(AuditTrailError):
        PaymentNotification.objects.all().update(detail="rewritten")
    with pytest.raises(ProtectedError):
        order.delete()
    assert the_notification().detail == ""


def send_one_of_each(make_order: Callable[..., Order], simulator: WeChatPaySimulator, notify_url: str) -> Order:
    order = open_order(make_order)
    simulator.notify(notify_url, "PAY-1", total_fee=1000, fee_type="HKD", tamper=True)
    simulator.notify(notify_url, "PAY-1", total_fee=1000, fee_type="HKD", sign_type=SignType.MD5,
                     claim_sign_type="MD5")
    simulator.notify(notify_url, "PAY-1", total_fee=1, fee_type="HKD")
    simulator.notify(notify_url, "PAY-1", total_fee=1000, fee_type="HKD")
    simulator.replay_last_notification(notify_url)
    return order


def test_the_api_key_is_in_no_stored_row(make_order, simulator, notify_url):
    send_one_of_each(make_order, simulator, notify_url)
    stored = [str(value) for row in PaymentNotification.objects.values() for value in row.values()]
    assert len(stored) > 0
    assert not [value for value in stored if API_KEY in value or OTHER_API_KEY in value]


def test_the_api_key_is_on_no_admin_page(make_order, simulator, notify_url, admin_client: Client):
    order = send_one_of_each(make_order, simulator, notify_url)
    pages = [reverse("admin:django_wxpay_close_paymentnotification_changelist"),
             reverse("admin:django_wxpay_close_order_change", args=[order.pk])]
    pages += [reverse("admin:django_wxpay_close_paymentnotification_change", args=[pk])
              for pk in PaymentNotification.objects.values_list("pk", flat=True)]
    for page in pages:
        response = admin_client.get(page)
        assert response.status_code == 200, page
        assert API_KEY not in response.content.decode(), page


def test_the_order_page_lists_its_notifications(make_order, simulator, notify_url, admin_client: Client):
    order = send_one_of_each(make_order, simulator, notify_url)
    page = admin_client.get(reverse("admin:django_wxpay_close_order_change", args=[order.pk])).content.decode()
    assert "Payment notifications (newest first)" in page
    assert str(Verdict.AMOUNT_MISMATCH.label) in page and str(Verdict.ALREADY_PAID.label) in page


def test_the_admin_filters_notifications_by_verdict(make_order, simulator, notify_url, admin_client: Client):
    send_one_of_each(make_order, simulator, notify_url)
    changelist = reverse("admin:django_wxpay_close_paymentnotification_changelist")
    response = admin_client.get(changelist, {"verdict": Verdict.BAD_SIGNATURE})
    assert [row.verdict for row in response.context["cl"].result_list] == [Verdict.BAD_SIGNATURE] * 2


def test_the_admin_offers_no_way_to_add_change_or_delete_notifications(make_order, simulator, notify_url,
                                                                       admin_client: Client):
    open_order(make_order)
    simulator.notify(notify_url, "PAY-1", total_fee=1000, fee_type="HKD")
    row = the_notification()
    changelist = admin_client.get(reverse("admin:django_wxpay_close_paymentnotification_changelist"))
    assert changelist.context["cl"].model_admin.get_actions(changelist.wsgi_request) == {}
    assert admin_client.get(reverse("admin:django_wxpay_close_paymentnotification_add")).status_code == 403
    assert admin_client.post(reverse("admin:django_wxpay_close_paymentnotification_delete", args=[row.pk]),
                             {"post": "yes"}).status_code == 403
    admin_client.post(reverse("admin:django_wxpay_close_paymentnotification_change", args=[row.pk]),
                      {"detail": "rewritten"})
    assert the_notification().detail == ""


# -- the simulator's notifying side --------------------------------------------------------------------------


def test_the_simulator_marks_a_notified_order_paid_so_a_later_close_answers_orderpaid(make_order, simulator,
                                                                                      notify_url):
    open_order(make_order)
    simulator.notify(notify_url, "PAY-1", total_fee=1000, fee_type="HKD")
    assert simulator.order_state("PAY-1", mch_id=MCH_ID, sub_mch_id=SUB_MCH_ID) is RemoteState.PAID


def test_the_simulator_sends_notifications_to_loopback_urls_only(simulator):
    simulator.add_order("PAY-1", mch_id=MCH_ID, sub_mch_id=SUB_MCH_ID)
    with pytest.raises(ValueError, match="loopback"):
        simulator.notify("http://shop.example/wxpay/notify/", "PAY-1", total_fee=1000, fee_type="HKD")
    assert simulator.order_state("PAY-1", mch_id=MCH_ID, sub_mch_id=SUB_MCH_ID) is RemoteState.NOTPAY


def test_the_simulator_notifies_only_orders_it_knows(simulator):
    with pytest.raises(KeyError):
        simulator.notify("http://127.0.0.1:9/", "UNKNOWN", total_fee=1000, fee_type="HKD")


def test_a_simulated_notification_verifies_with_the_merchant_key_and_names_no_sign_type(simulator):
    notification = read_notification(simulator.notification_body("PAY-1", total_fee=1000, fee_type="HKD"))
    assert notification.verify(API_KEY, SignType.HMAC_SHA256)
    assert notification.claimed_sign_type == ""
    assert isinstance(notification.paid_at, datetime)
