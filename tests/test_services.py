"""The close service against the loopback simulator and a real database: docs/protocol.md#outcomes, applied."""

from __future__ import annotations

import sqlite3
import threading
import time
import uuid
from datetime import timedelta
from typing import Any

import pytest
import requests
from django.db import connection, connections, transaction
from django.db.models import ProtectedError
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from django_wxpay_close import signals
from django_wxpay_close.conf import load_settings
from django_wxpay_close.models import AuditTrailError, CloseAttempt, Order, OrderState, Trigger
from django_wxpay_close.selectors import orders_needing_attention
from django_wxpay_close.services import (
    CloseAction,
    InvalidTransition,
    ReorderVerdict,
    close_before_reorder,
    close_order,
    close_orders,
    create_order,
    record_payment,
    sweep_expired_orders,
)
from django_wxpay_close.services.judgement import MERCHANT_HALTED
from django_wxpay_close.testing import API_KEY, MCH_ID, SUB_MCH_ID, Fault
from django_wxpay_close.testing import OrderState as RemoteState
from django_wxpay_close.wechat import Outcome

from .conftest import wait_for


def remote_state(simulator: Any, order: Order) -> RemoteState | None:
    return simulator.order_state(order.out_trade_no, mch_id=order.mch_id, sub_mch_id=order.sub_mch_id)


@pytest.fixture
def received() -> Any:
    """Collects (signal name, kwargs) for every django_wxpay_close signal sent during the test."""
    seen: list[tuple[str, dict[str, Any]]] = []
    names = ["order_closed", "order_found_paid", "close_failed", "close_attempts_exhausted", "order_paid_recorded",
             "closed_after_payment", "order_settled_by_query"]
    receivers = {}
    for name in names:
        def receiver(sender: Any, _name: str = name, **kwargs: Any) -> None:
            seen.append((_name, kwargs))
        receivers[name] = receiver
        getattr(signals, name).connect(receiver, sender=Order, weak=False)
    yield seen
    for name, receiver in receivers.items():
        getattr(signals, name).disconnect(receiver, sender=Order)


def test_an_expired_open_order_is_closed_and_audited(make_order, simulator):
    order = make_order()

    result = close_order(order, trigger=Trigger.CODE)

    order.refresh_from_db()
    assert result.action is CloseAction.CLOSED
    assert order.state == OrderState.CLOSED and order.closed_at is not None and order.paid_at is None
    assert remote_state(simulator, order) is RemoteState.CLOSED
    attempt = order.close_attempts.get()
    assert attempt.outcome == Outcome.CLOSED and attempt.is_finished and attempt.signature_verified is True
    assert attempt.http_status == 200 and attempt.return_code == "SUCCESS" and attempt.result_code == "SUCCESS"
    assert f"<out_trade_no>{order.out_trade_no}</out_trade_no>" in attempt.request_xml
    assert "<return_code>" in attempt.response_body and attempt.url.startswith(simulator.base_url)
    assert order.attempt_count == 1 and order.in_flight is False


def test_an_order_already_closed_at_wechat_becomes_closed(make_order):
    order = make_order(remote=RemoteState.CLOSED)
    assert close_order(order).action is CloseAction.ALREADY_CLOSED
    order.refresh_from_db()
    assert order.state == OrderState.CLOSED


def test_an_order_paid_at_wechat_becomes_paid_never_closed_and_the_host_is_told(make_order, received):
    order = make_order(remote=RemoteState.PAID)

    result = close_order(order)

    order.refresh_from_db()
    assert result.action is CloseAction.FOUND_PAID
    assert order.state == OrderState.PAID and order.paid_at is not None and order.closed_at is None
    [(name, kwargs)] = received
    assert name == "order_found_paid" and kwargs["order"].pk == order.pk
    assert kwargs["attempt"].outcome == Outcome.PAID


def test_systemerror_keeps_the_order_open_and_schedules_a_retry_with_backoff(make_order, simulator, received):
    order = make_order()
    simulator.inject(Fault.SYSTEMERROR, out_trade_no=order.out_trade_no)
    before = timezone.now()

    result = close_order(order)

    order.refresh_from_db()
    assert result.action is CloseAction.RETRY_SCHEDULED
    assert order.state == OrderState.OPEN and order.retry_count == 1 and not order.on_hold
    assert before + timedelta(minutes=1) <= order.due_at <= timezone.now() + timedelta(minutes=1)
    assert order.last_outcome == Outcome.RETRYABLE_ERROR and "SYSTEMERROR" in order.last_error
    assert [name for name, _ in received] == ["close_failed"]


def test_retry_backoff_doubles_per_retry_up_to_its_cap(wxpay_settings):
    from django_wxpay_close.conf import load_settings

    wxpay_settings.update(RETRY_BACKOFF=timedelta(seconds=30), RETRY_BACKOFF_MAX=timedelta(minutes=2))
    delays = [load_settings().retry_delay(n) for n in range(1, 6)]
    assert delays == [timedelta(seconds=s) for s in (30, 60, 120, 120, 120)]


def test_ordernotexist_until_the_retries_run_out_is_confirmed_by_a_query_before_the_order_is_unknown_to_wechat(
        make_order, received):
    order = make_order(remote=None)  # the simulator has never heard of it: ORDERNOTEXIST

    actions = []
    for _ in range(4):  # MAX_ATTEMPTS (3 in the test settings) closes, then the query
        Order.objects.filter(pk=order.pk).update(due_at=timezone.now())
        order.refresh_from_db()
        actions.append(sweep_expired_orders().by_action)

    order.refresh_from_db()
    assert [list(a) for a in actions] == [[CloseAction.RETRY_SCHEDULED]] * 2 + [
        [CloseAction.QUERY_SCHEDULED], [CloseAction.MARKED_UNKNOWN]]
    assert order.state == OrderState.UNKNOWN_TO_WECHAT and order.attempt_count == 4
    assert received[-1][0] == "order_settled_by_query"


def test_systemerror_until_the_retries_run_out_goes_on_hold_once_the_query_cannot_tell_either(make_order, simulator):
    order = make_order()
    simulator.inject(Fault.SYSTEMERROR, times=None)
    simulator.inject(Fault.SYSTEMERROR, times=None, api="orderquery")
    for _ in range(6):  # MAX_ATTEMPTS closes, then MAX_ATTEMPTS queries
        Order.objects.filter(pk=order.pk).update(due_at=timezone.now())
        sweep_expired_orders()
    order.refresh_from_db()
    assert order.state == OrderState.OPEN and order.on_hold and order.retry_count == 3
    assert order.last_error.startswith("orderquery gave up after 3 attempts; last: SYSTEMERROR")
    assert sweep_expired_orders().total == 0  # held orders wait for a person


def test_a_success_body_with_a_bad_signature_changes_no_state_and_asks_wechat_next(make_order, simulator):
    order = make_order()
    simulator.inject(Fault.BAD_SIGNATURE)
    result = close_order(order)
    order.refresh_from_db()
    assert result.action is CloseAction.QUERY_SCHEDULED and result.outcome is Outcome.UNTRUSTED_RESPONSE
    assert order.state == OrderState.OPEN and order.needs_query and not order.on_hold
    assert order.close_attempts.get().signature_verified is False


def test_a_network_failure_keeps_the_order_open_for_a_retry(make_order, wxpay_settings):
    wxpay_settings["BASE_URL"] = "http://127.0.0.1:9"  # nothing listens there
    order = make_order()
    result = close_order(order)
    order.refresh_from_db()
    assert result.action is CloseAction.RETRY_SCHEDULED and result.outcome is Outcome.NETWORK_ERROR
    assert order.state == OrderState.OPEN and order.close_attempts.get().http_status is None


def test_a_refused_primary_region_fails_over_to_the_secondary_in_the_same_attempt(make_order, simulator, wxpay_settings):
    wxpay_settings.update(BASE_URL="http://127.0.0.1:9", FAILOVER_BASE_URL=simulator.base_url)
    order = make_order()
    assert close_order(order).action is CloseAction.CLOSED
    attempt = order.close_attempts.get()
    assert attempt.url.startswith(simulator.base_url) and attempt.failed_over_from.startswith("http://127.0.0.1:9")


def test_a_wrong_api_key_is_a_configuration_error_that_changes_no_state_and_backs_the_order_off(make_order,
                                                                                                wxpay_settings):
    wxpay_settings["MERCHANTS"]["default"]["API_KEY"] = "WRONGKEY" * 4
    order = make_order()
    result = close_order(order)
    order.refresh_from_db()
    assert result.action is CloseAction.CONFIGURATION_ERROR
    assert order.state == OrderState.OPEN and not order.on_hold
    assert order.retry_count == 1 and order.due_at is not None


def test_an_order_younger_than_the_minimum_age_is_skipped_without_sending(make_order, simulator):
    order = make_order(age=timedelta(minutes=2), expired_for=timedelta(minutes=1))
    result = close_order(order)
    assert result.action is CloseAction.SKIPPED and "MIN_ORDER_AGE" in result.reason
    assert simulator.requests == [] and not CloseAttempt.objects.exists()


@pytest.mark.parametrize("state", [OrderState.PAID, OrderState.CLOSED, OrderState.UNKNOWN_TO_WECHAT])
def test_an_order_that_is_not_open_is_skipped_without_sending(make_order, simulator, state):
    order = make_order(state=state)
    result = close_order(order)
    assert result.action is CloseAction.SKIPPED and simulator.requests == []


def test_an_order_claimed_by_another_caller_is_not_sent_twice(make_order, simulator):
    order = make_order()
    Order.objects.filter(pk=order.pk).update(in_flight=True, claim_token=uuid.uuid4(), due_at=timezone.now() + timedelta(minutes=1))
    result = close_order(order)
    assert result.action is CloseAction.SKIPPED and "in flight" in result.reason
    assert simulator.requests == []


def test_a_lapsed_claim_of_a_dead_process_is_taken_over(make_order):
    order = make_order()
    Order.objects.filter(pk=order.pk).update(in_flight=True, claim_token=uuid.uuid4(), due_at=timezone.now() - timedelta(seconds=1))
    assert sweep_expired_orders().by_action == {CloseAction.CLOSED: 1}


def test_the_audit_row_exists_before_the_request_is_answered(make_order, simulator):
    order = make_order()
    simulator.inject(Fault.DELAY, delay=0.6)
    def close_in_background() -> None:
        try:
            close_order(order)
        finally:
            connections.close_all()  # this thread's own connection; left open it blocks dropping the test DB

    worker = threading.Thread(target=close_in_background)
    worker.start()
    deadline = time.monotonic() + 5
    while not CloseAttempt.objects.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    in_flight = CloseAttempt.objects.get()
    assert not in_flight.is_finished and in_flight.outcome == ""
    assert simulator.close_requests_for(order.out_trade_no) <= 1
    worker.join()
    assert CloseAttempt.objects.get().outcome == Outcome.CLOSED


def test_the_service_refuses_to_run_inside_a_transaction(make_order, simulator):
    order = make_order()
    with pytest.raises(transaction.TransactionManagementError, match="outside transaction.atomic"):
        with transaction.atomic():
            close_order(order)
    assert simulator.requests == []


def test_audit_rows_can_be_neither_edited_nor_deleted_and_protect_their_order(make_order):
    order = make_order()
    close_order(order)
    attempt = CloseAttempt.objects.get()
    attempt.reason = "rewritten"
    with pytest.raises(AuditTrailError):
        attempt.save()
    with pytest.raises(AuditTrailError):
        attempt.delete()
    with pytest.raises(AuditTrailError):
        CloseAttempt.objects.all().delete()
    with pytest.raises(AuditTrailError):
        CloseAttempt.objects.all().update(reason="rewritten")
    with pytest.raises(ProtectedError):
        order.delete()
    assert not attempt.complete(reason="second answer")
    assert CloseAttempt.objects.get().reason == ""


def test_completing_an_audit_row_takes_the_answer_only_never_the_request(make_order, simulator):
    order = make_order()
    attempt = CloseAttempt.objects.create(order=order, merchant=order.merchant, mch_id=order.mch_id,
                                          sub_mch_id=order.sub_mch_id, out_trade_no=order.out_trade_no,
                                          trigger=Trigger.CODE, url=simulator.base_url, sign_type="HMAC-SHA256",
                                          request_xml="<xml>as sent</xml>")
    with pytest.raises(AuditTrailError, match="request_xml"):
        attempt.complete(request_xml="<xml>rewritten</xml>", reason="answered")
    attempt = CloseAttempt.objects.get(pk=attempt.pk)
    assert attempt.request_xml == "<xml>as sent</xml>" and not attempt.is_finished


def _unfinished_rows(order: Order, count: int) -> list[CloseAttempt]:
    return [CloseAttempt.objects.create(order=order, merchant=order.merchant, mch_id=order.mch_id,
                                        sub_mch_id=order.sub_mch_id, out_trade_no=order.out_trade_no,
                                        trigger=Trigger.CODE, url="https://loopback/pay/closeorder",
                                        sign_type="HMAC-SHA256", request_xml=f"<xml>request {n}</xml>")
            for n in range(count)]


def _answer(n: int) -> dict[str, Any]:
    return {"outcome": Outcome.CLOSED.value, "return_code": "SUCCESS", "http_status": 200, "duration_ms": n,
            "response_body": f"<xml>answer {n}</xml>", "signature_verified": True}


def test_rows_completed_together_each_keep_their_own_answer(make_order):
    rows = _unfinished_rows(make_order(), 3)
    assert CloseAttempt.objects.complete_each({row: _answer(n) for n, row in enumerate(rows)}) == 3
    stored = CloseAttempt.objects.order_by("pk")
    assert [(row.response_body, row.duration_ms, row.outcome) for row in stored] == [
        (f"<xml>answer {n}</xml>", n, Outcome.CLOSED) for n in range(3)]
    assert all(row.completed_at is not None and row.request_xml == f"<xml>request {n}</xml>"
               for n, row in enumerate(stored))


def test_rows_completed_together_that_share_a_value_each_keep_their_own_answer(make_order):
    rows = _unfinished_rows(make_order(), 6)
    assert CloseAttempt.objects.complete_each({row: _answer(n % 2) for n, row in enumerate(rows)}) == 6
    assert [(row.response_body, row.duration_ms) for row in CloseAttempt.objects.order_by("pk")] == [
        (f"<xml>answer {n % 2}</xml>", n % 2) for n in range(6)]


def test_completing_rows_together_leaves_a_row_completed_before_untouched_and_uncounted(make_order):
    rows = _unfinished_rows(make_order(), 2)
    rows[0].complete(reason="abandoned")
    assert CloseAttempt.objects.complete_each({row: _answer(n) for n, row in enumerate(rows)}) == 1
    first = CloseAttempt.objects.get(pk=rows[0].pk)
    assert (first.reason, first.response_body) == ("abandoned", "")


@pytest.fixture
def sqlite_variable_limit_999():
    """SQLite as Django assumes it (999 parameters per statement) on this test's connection; other backends as
    they are."""
    if connection.vendor != "sqlite":
        yield
        return
    connection.ensure_connection()
    previous = connection.connection.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, 999)
    yield
    connection.connection.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, previous)


def test_completing_more_rows_together_than_one_statement_can_carry_completes_every_one(
        make_order, sqlite_variable_limit_999):
    rows = _unfinished_rows(make_order(), 300)  # 1,500 parameters and more: beyond 999 in one statement
    assert CloseAttempt.objects.complete_each({row: _answer(n) for n, row in enumerate(rows)}) == 300
    assert sorted(CloseAttempt.objects.values_list("duration_ms", flat=True)) == list(range(300))


def test_rows_are_completed_with_their_answers_only(make_order):
    row = _unfinished_rows(make_order(), 1)[0]
    with pytest.raises(AuditTrailError, match="request_xml"):
        CloseAttempt.objects.complete_each({row: {**_answer(0), "request_xml": "<xml>rewritten</xml>"}})
    assert not CloseAttempt.objects.get(pk=row.pk).is_finished


def test_the_api_key_is_stored_nowhere_in_the_audit_trail(make_order, simulator):
    orders = [make_order(), make_order(remote=RemoteState.PAID), make_order(remote=None)]
    simulator.inject(Fault.BAD_SIGNATURE, out_trade_no=orders[0].out_trade_no)
    for order in orders:
        close_order(order)
    for row in CloseAttempt.objects.values():
        assert API_KEY not in " ".join(str(value) for value in row.values())


def test_a_signal_carries_the_order_as_it_is_after_the_change(make_order, received):
    close_order(make_order())
    [(name, kwargs)] = received
    order = kwargs["order"]
    assert name == "order_closed" and order.state == OrderState.CLOSED and order.attempt_count == 1
    assert order.closed_at is not None and order.in_flight is False


def test_a_failing_signal_receiver_does_not_undo_the_close(make_order):
    def broken_receiver(**kwargs: Any) -> None:
        raise RuntimeError("the shop's receiver has a bug")

    signals.order_closed.connect(broken_receiver, sender=Order, weak=False)
    try:
        order = make_order()
        assert close_order(order).action is CloseAction.CLOSED
    finally:
        signals.order_closed.disconnect(broken_receiver, sender=Order)
    order.refresh_from_db()
    assert order.state == OrderState.CLOSED


# -- the sweep ------------------------------------------------------------------------------------


def test_the_sweep_closes_only_orders_that_are_due(make_order, simulator):
    due = [make_order() for _ in range(3)]
    make_order(expired_for=-timedelta(minutes=5))  # deadline still ahead
    make_order(age=timedelta(minutes=2), expired_for=timedelta(minutes=1))  # too young
    make_order(on_hold=True)
    make_order(due_at=timezone.now() + timedelta(minutes=5))
    make_order(state=OrderState.PAID)

    report = sweep_expired_orders()

    assert report.by_action == {CloseAction.CLOSED: 3}
    assert {r.out_trade_no for r in simulator.requests} == {o.out_trade_no for o in due}


def test_the_sweep_honours_limit_merchant_and_older_than(make_order, simulator):
    for _ in range(3):
        make_order()
    old = make_order(expired_for=timedelta(hours=3))
    other = make_order(merchant="other")

    assert sweep_expired_orders(older_than=timedelta(hours=2)).total == 1
    assert sweep_expired_orders(merchants=["other"]).total == 1
    assert sweep_expired_orders(limit=2).total == 2
    assert {old.out_trade_no, other.out_trade_no} <= {r.out_trade_no for r in simulator.requests}


def test_a_dry_run_lists_due_orders_and_sends_nothing(make_order, simulator):
    for _ in range(4):
        make_order()
    report = sweep_expired_orders(dry_run=True)
    assert report.total == 4 and simulator.requests == []
    assert set(Order.objects.values_list("state", flat=True)) == {OrderState.OPEN}


def test_two_configuration_errors_in_a_row_halt_only_that_merchant_for_the_run(make_order, wxpay_settings, simulator):
    wxpay_settings["MERCHANTS"]["other"]["API_KEY"] = "WRONGKEY" * 4
    good = [make_order() for _ in range(3)]
    bad = [make_order(merchant="other") for _ in range(4)]

    report = sweep_expired_orders(workers=1)

    assert report.by_merchant[("default", CloseAction.CLOSED)] == 3
    assert report.by_merchant[("other", CloseAction.CONFIGURATION_ERROR)] == 2
    assert sum(1 for r in simulator.requests if r.mch_id == bad[0].mch_id) == 2
    assert "other" in report.halted_merchants and report.has_alarms
    assert all(o.state == OrderState.OPEN for o in Order.objects.filter(merchant="other"))
    assert all(Order.objects.get(pk=o.pk).state == OrderState.CLOSED for o in good)


def test_an_order_that_hit_a_configuration_error_is_backed_off_like_a_retry(make_order, simulator):
    order = make_order()
    simulator.inject(Fault.RETURN_FAIL, out_trade_no=order.out_trade_no)
    assert sweep_expired_orders().by_action == {CloseAction.CONFIGURATION_ERROR: 1}
    order.refresh_from_db()
    assert order.retry_count == 1 and order.due_at is not None and not order.on_hold


def test_one_poison_order_does_not_halt_its_merchant(make_order, simulator):
    poison = make_order(expired_for=timedelta(hours=2))  # the most overdue: tried first
    others = [make_order() for _ in range(3)]
    simulator.inject(Fault.RETURN_FAIL, out_trade_no=poison.out_trade_no)

    report = sweep_expired_orders(workers=1)

    assert report.by_action == {CloseAction.CONFIGURATION_ERROR: 1, CloseAction.CLOSED: 3}
    assert report.halted_merchants == {}
    assert all(Order.objects.get(pk=o.pk).state == OrderState.CLOSED for o in others)


def test_an_order_of_a_halted_merchant_chosen_by_hand_is_skipped_and_released(make_order, wxpay_settings, simulator):
    wxpay_settings["MERCHANTS"]["other"]["API_KEY"] = "WRONGKEY" * 4
    orders = [make_order(merchant="other") for _ in range(3)]
    report = close_orders(Order.objects.filter(pk__in=[o.pk for o in orders]).order_by("pk"), workers=1)
    assert report.by_action == {CloseAction.CONFIGURATION_ERROR: 2, CloseAction.SKIPPED: 1}
    assert report.by_reason[(CloseAction.SKIPPED, MERCHANT_HALTED.split(":", 1)[0])] == 1
    assert len(simulator.requests) == 2
    assert Order.objects.get(pk=orders[2].pk).in_flight is False


def test_the_sweep_sends_each_order_exactly_once_with_many_workers(make_order, simulator):
    orders = [make_order() for _ in range(60)]
    report = sweep_expired_orders(workers=8, batch_size=7)
    assert report.by_action == {CloseAction.CLOSED: 60}
    assert all(simulator.close_requests_for(o.out_trade_no) == 1 for o in orders)
    assert CloseAttempt.objects.filter(outcome=Outcome.CLOSED).count() == 60


def test_a_sweep_with_more_workers_than_configured_keeps_one_connection_per_worker(make_order, simulator):
    # WORKERS is 4 in settings; a run with 12 must not open and drop a connection (a TLS handshake at
    # WeChat) for every request beyond the 4th.
    simulator.latency = 0.05
    for _ in range(72):
        make_order()
    report = sweep_expired_orders(workers=12, batch_size=24)
    assert report.by_action == {CloseAction.CLOSED: 72}
    assert simulator.connections_opened <= 12


# -- the host shop's entry points ---------------------------------------------------------------------


def test_create_order_snapshots_the_merchant_ids_and_the_payment_window(wxpay_settings, transactional_db):
    created = timezone.now() - timedelta(minutes=1)
    order = create_order(out_trade_no="SHOP-1", amount=1999, currency="HKD", created_at=created)
    assert (order.appid, order.mch_id, order.sub_mch_id) == ("wx2421b1c4370ec43b", MCH_ID, SUB_MCH_ID)
    assert order.payment_deadline == created + timedelta(minutes=30)
    assert order.state == OrderState.OPEN


@pytest.mark.parametrize("bad", ["", "x" * 33, "has space", "订单1", "a/b"])
def test_create_order_refuses_an_invalid_out_trade_no(wxpay_settings, transactional_db, bad):
    with pytest.raises(ValueError, match="out_trade_no"):
        create_order(out_trade_no=bad)
    assert not Order.objects.exists()


def test_create_order_refuses_an_unknown_merchant(wxpay_settings, transactional_db):
    with pytest.raises(ValueError, match="nowhere"):
        create_order(out_trade_no="SHOP-2", merchant="nowhere")


def test_a_recorded_payment_keeps_the_sweep_from_ever_closing_the_order(make_order, simulator, received):
    order = make_order()
    record_payment(order=order)
    assert order.state == OrderState.PAID and order.paid_at is not None
    assert record_payment(order=order).state == OrderState.PAID  # idempotent
    assert sweep_expired_orders().total == 0 and simulator.requests == []
    assert [name for name, _ in received] == ["order_paid_recorded"]


def test_wechat_closing_an_order_paid_meanwhile_is_an_incident_put_before_a_person(make_order, simulator, received,
                                                                                   caplog):
    order = make_order()
    simulator.inject(Fault.DELAY, out_trade_no=order.out_trade_no, delay=0.5)
    results: list[Any] = []
    closing = threading.Thread(target=lambda: results.append(close_order(order)))
    closing.start()
    wait_for(lambda: simulator.requests != [], timeout=5)
    record_payment(order=Order.objects.get(pk=order.pk))  # a payment notification lands meanwhile
    closing.join()

    [result] = results
    assert result.action is CloseAction.PUT_ON_HOLD and "payment was recorded" in result.reason
    order.refresh_from_db()
    assert order.state == OrderState.PAID and order.on_hold and order.closed_at is None
    assert Order.objects.filter(pk=order.pk).filter(pk__in=orders_needing_attention()).exists()
    assert [name for name, _ in received] == ["order_paid_recorded", "closed_after_payment"]
    assert any(record.levelname == "ERROR" and order.out_trade_no in record.getMessage() for record in caplog.records)


def test_a_payment_cannot_be_recorded_for_a_closed_order(make_order):
    order = make_order(state=OrderState.CLOSED)
    with pytest.raises(InvalidTransition):
        record_payment(order=order)


def test_an_unexpected_error_in_one_order_is_reported_and_the_others_still_close(make_order, simulator,
                                                                                 database_fault):
    orders = [make_order() for _ in range(4)]
    broken = orders[1].out_trade_no
    database_fault("closeattempt", "INSERT", out_trade_no=broken)
    report = sweep_expired_orders(workers=2)
    assert report.by_action == {CloseAction.CLOSED: 3, CloseAction.FAILED: 1} and report.has_alarms
    assert simulator.close_requests_for(broken) == 0
    assert Order.objects.get(out_trade_no=broken).state == OrderState.OPEN


def test_a_failure_writing_one_answer_is_reported_for_it_and_the_other_answers_are_written(make_order,
                                                                                           database_fault):
    orders = [make_order() for _ in range(4)]
    broken = orders[2].out_trade_no
    database_fault("closeattempt", "UPDATE", out_trade_no=broken)
    report = sweep_expired_orders(workers=3)
    assert report.by_action == {CloseAction.CLOSED: 3, CloseAction.FAILED: 1}
    states = dict(Order.objects.values_list("out_trade_no", "state"))
    assert states.pop(broken) == OrderState.OPEN and set(states.values()) == {OrderState.CLOSED}
    assert CloseAttempt.objects.get(out_trade_no=broken).completed_at is None  # sent, answer not recorded: true


def test_a_bug_while_sending_one_order_is_reported_for_it_and_its_row_says_it_was_not_sent(make_order, simulator,
                                                                                          monkeypatch):
    orders = [make_order() for _ in range(3)]
    broken = orders[1].out_trade_no
    send = requests.Session.send

    def fails_for_the_broken_order(session: requests.Session, request: Any, **kwargs: Any) -> Any:
        if broken.encode() in request.body:
            raise RuntimeError("a bug below the client")
        return send(session, request, **kwargs)

    monkeypatch.setattr(requests.Session, "send", fails_for_the_broken_order)
    report = sweep_expired_orders(workers=3)
    assert report.by_action == {CloseAction.CLOSED: 2, CloseAction.FAILED: 1} and report.has_alarms
    row = CloseAttempt.objects.get(out_trade_no=broken)
    assert row.reason == "not sent: RuntimeError: a bug below the client" and row.has_no_answer
    assert Order.objects.get(out_trade_no=broken).state == OrderState.OPEN
    assert simulator.close_requests_for(broken) == 0


def test_the_admin_action_keeps_as_many_requests_in_flight_as_it_has_workers(make_order, simulator):
    orders = [make_order() for _ in range(6)]
    simulator.latency = 1.0  # a request sent after another's answer arrives at least this much later
    report = close_orders(Order.objects.filter(pk__in=[order.pk for order in orders]), workers=6)
    arrivals = sorted(request.received_at for request in simulator.requests)
    assert report.by_action == {CloseAction.CLOSED: 6}
    assert arrivals[-1] - arrivals[0] < 1.0, "a request waited for another's answer before it was sent"


def test_when_the_audit_rows_cannot_be_written_nothing_is_sent_and_each_order_is_reported_once(
    make_order, simulator, database_fault,
):
    for _ in range(3):
        make_order()
    database_fault("closeattempt", "INSERT")
    report = sweep_expired_orders(workers=4)
    assert report.by_action == {CloseAction.FAILED: 3} and report.has_alarms
    assert simulator.requests == [] and CloseAttempt.objects.count() == 0
    assert set(Order.objects.values_list("state", flat=True)) == {OrderState.OPEN}


def test_a_failing_observer_loses_its_reports_but_not_the_closes(make_order, simulator, caplog):
    for _ in range(6):
        make_order()

    def on_result(result: Any) -> None:
        raise BrokenPipeError("stdout went away")

    report = sweep_expired_orders(workers=2, on_result=on_result)
    assert report.by_action == {CloseAction.CLOSED: 6}
    assert set(Order.objects.values_list("state", flat=True)) == {OrderState.CLOSED}
    assert "Reporting a close result failed" in caplog.text


def test_a_failing_observer_does_not_stop_the_sweep_on_an_order_settled_before_sending(
    make_order, wxpay_settings, simulator, caplog,
):
    # An order of a merchant missing from the settings is settled while the sweep checks it, before it is queued.
    unconfigured = make_order(merchant="other")
    del wxpay_settings["MERCHANTS"]["other"]
    good = [make_order() for _ in range(3)]

    def on_result(result: Any) -> None:
        raise BrokenPipeError("stdout went away")

    report = sweep_expired_orders(workers=2, on_result=on_result)
    assert report.by_action == {CloseAction.CLOSED: 3, CloseAction.CONFIGURATION_ERROR: 1}
    assert all(Order.objects.get(pk=o.pk).state == OrderState.CLOSED for o in good)
    assert Order.objects.get(pk=unconfigured.pk).state == OrderState.OPEN
    assert "Reporting a close result failed" in caplog.text


def test_the_sweep_reports_an_order_only_once_its_answer_is_written(make_order, simulator):
    for _ in range(12):
        make_order()
    seen_in_database = []

    def on_result(result: Any) -> None:
        seen_in_database.append(Order.objects.get(pk=result.order_id).state)

    report = sweep_expired_orders(workers=4, on_result=on_result)
    assert report.by_action == {CloseAction.CLOSED: 12}
    assert seen_in_database == [OrderState.CLOSED] * 12


def test_answers_that_come_back_together_are_written_together(make_order, simulator):
    simulator.latency = 0.05
    for _ in range(16):
        make_order()
    audit_table = connection.ops.quote_name(CloseAttempt._meta.db_table)
    with CaptureQueriesContext(connection) as queries:
        report = sweep_expired_orders(workers=16)
    assert report.by_action == {CloseAction.CLOSED: 16}
    completions = [query for query in queries.captured_queries if query["sql"].startswith(f"UPDATE {audit_table}")]
    assert 1 <= len(completions) <= 4, "16 answers, one UPDATE each"


def test_an_answer_is_written_without_waiting_for_slower_ones(make_order, simulator):
    fast, slow = make_order(), make_order()
    simulator.inject(Fault.DELAY, out_trade_no=slow.out_trade_no, delay=0.6)
    slow_row_when_fast_was_reported: list[bool] = []

    def on_result(result: Any) -> None:
        if result.order_id == fast.pk:
            slow_row_when_fast_was_reported.append(CloseAttempt.objects.get(order=slow).is_finished)

    report = close_orders([fast, slow], workers=2, on_result=on_result)
    assert report.by_action == {CloseAction.CLOSED: 2}
    assert slow_row_when_fast_was_reported == [False]


def test_the_order_passed_to_close_order_is_refreshed_and_can_be_closed_again(make_order, simulator):
    order = make_order()
    simulator.inject(Fault.SYSTEMERROR, out_trade_no=order.out_trade_no)
    assert close_order(order).action is CloseAction.RETRY_SCHEDULED
    assert order.in_flight is False and order.retry_count == 1
    assert close_order(order).action is CloseAction.CLOSED


# -- closing the old order before the shop creates a new one for the same purchase ----------------------------------


def test_before_a_reorder_an_unpaid_order_is_closed_and_a_new_one_may_be_created(make_order, simulator):
    answer = close_before_reorder(make_order())
    assert answer.verdict is ReorderVerdict.CREATE_NEW and answer.may_create_new_order
    assert answer.order.state == OrderState.CLOSED and answer.result.action is CloseAction.CLOSED


def test_before_a_reorder_an_order_the_payer_paid_says_do_not_create_a_new_one(make_order):
    answer = close_before_reorder(make_order(remote=RemoteState.PAID))
    assert answer.verdict is ReorderVerdict.ALREADY_PAID and not answer.may_create_new_order
    assert answer.order.state == OrderState.PAID


def test_before_a_reorder_an_order_already_closed_needs_no_request(make_order, simulator):
    answer = close_before_reorder(make_order(state=OrderState.CLOSED))
    assert answer.verdict is ReorderVerdict.CREATE_NEW and simulator.requests == [] and answer.result is None


def test_before_a_reorder_a_just_created_order_says_when_it_can_be_closed(make_order, simulator):
    order = make_order(age=timedelta(minutes=1), expired_for=timedelta(0))
    answer = close_before_reorder(order)
    assert answer.verdict is ReorderVerdict.TOO_YOUNG and simulator.requests == []
    assert answer.retry_at == order.created_at + timedelta(minutes=5)


def test_a_persons_close_of_an_order_whose_retries_were_spent_starts_a_fresh_retry_budget(make_order, simulator):
    order = make_order(on_hold=True, retry_count=3, attempt_count=3)  # held after MAX_ATTEMPTS failures
    simulator.inject(Fault.SYSTEMERROR, out_trade_no=order.out_trade_no)

    result = close_order(order)

    assert result.action is CloseAction.RETRY_SCHEDULED
    assert order.retry_count == 1 and not order.on_hold and order.state == OrderState.OPEN


def test_before_a_reorder_an_outcome_that_wechat_cannot_tell_either_says_retry(make_order, simulator):
    order = make_order()
    for api in ("closeorder", "orderquery"):  # the close, and the query that follows it
        simulator.inject(Fault.SYSTEMERROR, out_trade_no=order.out_trade_no, api=api)
    answer = close_before_reorder(order)
    assert answer.verdict is ReorderVerdict.UNKNOWN and not answer.may_create_new_order
    assert answer.retry_at == answer.order.due_at and answer.order.state == OrderState.OPEN
