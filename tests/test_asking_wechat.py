"""Where a close cannot tell, the app asks WeChat (orderquery) before a person must: after an unclear close, for
orders on hold (`--check-held`), in close_before_reorder and in the admin's "Check status at WeChat"
(docs/operations.md#when-the-app-asks-wechat). Only what WeChat itself cannot settle stays on hold."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from django.utils import timezone

from django_wxpay_close import signals
from django_wxpay_close.models import CloseAttempt, Order, OrderState
from django_wxpay_close.services import (
    CloseAction,
    ReorderVerdict,
    check_orders,
    close_before_reorder,
    close_order,
    lift_hold,
    sweep_expired_orders,
)
from django_wxpay_close.testing import MCH_ID, SUB_MCH_ID, Fault, WeChatPaySimulator
from django_wxpay_close.testing import OrderState as RemoteState
from django_wxpay_close.wechat import Outcome

from .test_fault_matrix import make_due, refreshed, run_sweep


@pytest.fixture
def settled() -> Iterator[list[dict[str, Any]]]:
    """The keyword arguments of every order_settled_by_query and payment_mismatch signal, with its name."""
    log: list[dict[str, Any]] = []

    def receiver(sender: Any, signal: Any, **kwargs: Any) -> None:
        name = "settled" if signal is signals.order_settled_by_query else "mismatch"
        log.append({"signal": name, **kwargs})

    for signal in (signals.order_settled_by_query, signals.payment_mismatch):
        signal.connect(receiver, sender=Order, weak=False)
    yield log
    for signal in (signals.order_settled_by_query, signals.payment_mismatch):
        signal.disconnect(receiver, sender=Order)


def set_remote(simulator: WeChatPaySimulator, order: Order, state: RemoteState) -> None:
    simulator.set_state(order.out_trade_no, state, mch_id=MCH_ID, sub_mch_id=SUB_MCH_ID)


def closed_unclearly(order: Order, simulator: WeChatPaySimulator) -> None:
    """One close whose answer cannot be believed (unsigned): the order is left for a query."""
    simulator.inject(Fault.UNSIGNED, out_trade_no=order.out_trade_no)
    assert sweep_expired_orders().by_action == {CloseAction.QUERY_SCHEDULED: 1}
    order = refreshed(order)
    assert order.needs_query and not order.on_hold and order.state == OrderState.OPEN


def queries(order: Order) -> list[CloseAttempt]:
    return list(order.close_attempts.filter(api="orderquery").order_by("pk"))


# -- after an unclear close ----------------------------------------------------------------------------------


def test_an_unclear_close_is_followed_by_a_query_in_the_next_sweep_not_by_a_hold(make_order, simulator):
    order = make_order()
    closed_unclearly(order, simulator)

    sweep_expired_orders()

    assert simulator.query_requests_for(order.out_trade_no) == 1
    [query] = queries(refreshed(order))
    assert query.trade_state == "NOTPAY" and query.outcome == "payable" and query.signature_verified is True
    assert query.request_xml.startswith("<xml>") and "<out_trade_no>" in query.request_xml
    assert query.completed_at is not None and query.response_body.startswith("<xml>")


def test_a_query_that_says_closed_settles_the_order_as_closed_and_says_so(make_order, simulator, settled):
    order = make_order()
    closed_unclearly(order, simulator)
    set_remote(simulator, order, RemoteState.CLOSED)

    assert sweep_expired_orders().by_action == {CloseAction.ALREADY_CLOSED: 1}

    order = refreshed(order)
    assert order.state == OrderState.CLOSED and order.closed_at is not None and not order.needs_query
    [signal] = settled
    assert signal["signal"] == "settled" and signal["state"] == OrderState.CLOSED and signal["trade_state"] == "CLOSED"
    assert signal["attempt"] == queries(order)[0]


@pytest.mark.parametrize("answer, settled_as", [(Fault.REVOKED, OrderState.CLOSED), (Fault.REFUND, OrderState.PAID)])
def test_a_query_that_says_revoked_or_refund_settles_the_order_as_closed_or_paid(
        make_order, simulator, answer, settled_as):
    order = make_order()
    closed_unclearly(order, simulator)
    simulator.inject(answer, out_trade_no=order.out_trade_no, api="orderquery")

    sweep_expired_orders()

    assert refreshed(order).state == settled_as and queries(order)[0].trade_state == answer.value


def test_a_query_that_says_paid_for_the_orders_amount_marks_it_paid(make_order, simulator, settled):
    order = make_order(amount=1, currency="CNY")  # what the simulator reports a paid order's payment as
    closed_unclearly(order, simulator)
    set_remote(simulator, order, RemoteState.PAID)

    assert sweep_expired_orders().by_action == {CloseAction.FOUND_PAID: 1}

    order = refreshed(order)
    assert order.state == OrderState.PAID and order.paid_at is not None and order.closed_at is None
    assert [(s["signal"], s["state"], s["trade_state"]) for s in settled] == [("settled", "paid", "SUCCESS")]


def test_a_query_that_says_paid_for_another_amount_marks_nothing_paid_and_puts_the_order_on_hold(
        make_order, simulator, settled):
    order = make_order(amount=500, currency="CNY")
    closed_unclearly(order, simulator)
    set_remote(simulator, order, RemoteState.PAID)  # paid 1 CNY, the simulator's default payment

    run = run_sweep()

    order = refreshed(order)
    assert run.exit_status == 4 and run.summary["by_action"] == {"on_hold": 1}
    assert order.state == OrderState.OPEN and order.on_hold and order.paid_at is None
    assert "total_fee '1' but the order's amount is 500" in order.last_error
    assert [(s["signal"], s["notification"]) for s in settled] == [("mismatch", None)]


def test_a_still_payable_order_is_closed_again_after_its_query(make_order, simulator):
    order = make_order()
    closed_unclearly(order, simulator)
    assert sweep_expired_orders().by_action == {CloseAction.RETRY_SCHEDULED: 1}  # NOTPAY: close it again

    assert sweep_expired_orders().by_action == {CloseAction.CLOSED: 1}

    order = refreshed(order)
    assert order.state == OrderState.CLOSED and simulator.close_requests_for(order.out_trade_no) == 2
    assert [row.api for row in order.close_attempts.order_by("pk")] == ["closeorder", "orderquery", "closeorder"]


def test_a_payerror_order_is_closed_again_after_its_query(make_order, simulator):
    order = make_order()
    closed_unclearly(order, simulator)
    set_remote(simulator, order, RemoteState.PAYERROR)

    sweep_expired_orders()
    sweep_expired_orders()

    assert refreshed(order).state == OrderState.CLOSED and queries(order)[0].trade_state == "PAYERROR"


def test_an_order_still_payable_whose_second_close_is_unclear_too_goes_on_hold_without_a_second_query(
        make_order, simulator):
    order = make_order()
    closed_unclearly(order, simulator)
    sweep_expired_orders()  # the query: NOTPAY
    simulator.inject(Fault.UNSIGNED, out_trade_no=order.out_trade_no)

    run = run_sweep()

    order = refreshed(order)
    assert run.exit_status == 4 and order.on_hold and not order.needs_query
    assert simulator.query_requests_for(order.out_trade_no) == 1 and order.query_count == 1
    assert run_sweep().summary["total"] == 0


def test_a_payment_in_progress_is_never_closed_and_is_asked_about_again_later(make_order, simulator):
    order = make_order()
    closed_unclearly(order, simulator)
    set_remote(simulator, order, RemoteState.USERPAYING)

    assert sweep_expired_orders().by_action == {CloseAction.QUERY_SCHEDULED: 1}

    order = refreshed(order)
    assert order.state == OrderState.OPEN and order.needs_query and not order.on_hold
    assert order.due_at > timezone.now() and simulator.close_requests_for(order.out_trade_no) == 1
    set_remote(simulator, order, RemoteState.PAID)
    make_due(order)
    assert sweep_expired_orders().by_action == {CloseAction.FOUND_PAID: 1}


def test_a_payment_in_progress_past_every_retry_goes_on_hold_still_open(make_order, simulator, wxpay_settings):
    wxpay_settings["MAX_ATTEMPTS"] = 2
    order = make_order()
    closed_unclearly(order, simulator)
    set_remote(simulator, order, RemoteState.USERPAYING)

    for _ in range(2):
        make_due(order)
        sweep_expired_orders()

    order = refreshed(order)
    assert order.on_hold and order.state == OrderState.OPEN and simulator.close_requests_for(order.out_trade_no) == 1
    assert order.last_error.startswith("the payer was still paying after 2 queries")


def test_a_person_closing_an_order_that_waits_for_a_query_sends_a_close(make_order, simulator):
    order = make_order()
    closed_unclearly(order, simulator)

    result = close_order(order)

    assert result.action is CloseAction.CLOSED and simulator.query_requests_for(order.out_trade_no) == 0
    assert not refreshed(order).needs_query


# -- orders on hold: --check-held ----------------------------------------------------------------------------


def held_by_a_client_bug(make_order: Callable[..., Order], simulator: WeChatPaySimulator, **fields: Any) -> Order:
    """An order on hold since before anything asked WeChat about it (our request was refused as malformed)."""
    order = make_order(**fields)
    simulator.inject(Fault.XML_FORMAT_ERROR, out_trade_no=order.out_trade_no)
    assert close_order(order).action is CloseAction.PUT_ON_HOLD
    return refreshed(order)


def test_check_held_settles_a_held_order_that_wechat_says_is_closed(make_order, simulator):
    order = held_by_a_client_bug(make_order, simulator)
    set_remote(simulator, order, RemoteState.CLOSED)

    run = run_sweep("--check-held")

    order = refreshed(order)
    assert run.exit_status == 0 and run.summary["by_action"] == {"already_closed": 1}
    assert order.state == OrderState.CLOSED and not order.on_hold


def test_check_held_closes_a_still_payable_held_order_in_the_same_run(make_order, simulator):
    order = held_by_a_client_bug(make_order, simulator)

    run = run_sweep("--check-held")

    assert run.exit_status == 0 and run.summary["by_action"] == {"retry_scheduled": 1, "closed": 1}
    assert refreshed(order).state == OrderState.CLOSED


def test_check_held_leaves_on_hold_what_wechat_cannot_settle_with_the_querys_answer_as_the_reason(
        make_order, simulator):
    order = held_by_a_client_bug(make_order, simulator)
    simulator.inject(Fault.SYSTEMERROR, out_trade_no=order.out_trade_no, api="orderquery")

    run = run_sweep("--check-held")

    order = refreshed(order)
    assert run.exit_status == 4 and order.on_hold and order.last_error == "orderquery: SYSTEMERROR: System error"


def test_check_held_does_not_close_again_an_order_whose_close_after_a_query_was_unclear(make_order, simulator):
    order = make_order()
    closed_unclearly(order, simulator)
    sweep_expired_orders()  # NOTPAY
    simulator.inject(Fault.UNSIGNED, out_trade_no=order.out_trade_no)
    sweep_expired_orders()  # unclear again: on hold

    run = run_sweep("--check-held")

    order = refreshed(order)
    assert run.exit_status == 4 and order.on_hold and simulator.close_requests_for(order.out_trade_no) == 2
    assert "still payable" in order.last_error and simulator.query_requests_for(order.out_trade_no) == 2


def test_check_held_lifts_the_hold_of_an_order_whose_payer_is_paying_and_asks_again_later(
        make_order, simulator, wxpay_settings):
    wxpay_settings["MAX_ATTEMPTS"] = 1
    order = make_order()
    simulator.inject(Fault.SYSTEMERROR, out_trade_no=order.out_trade_no, api="orderquery")
    closed_unclearly(order, simulator)
    sweep_expired_orders()  # the query fails and its only retry is spent: on hold
    assert refreshed(order).on_hold and refreshed(order).retry_count == 1
    wxpay_settings["MAX_ATTEMPTS"] = 2
    set_remote(simulator, order, RemoteState.USERPAYING)

    assert run_sweep("--check-held").summary["by_action"] == {"query_scheduled": 1}

    order = refreshed(order)
    assert not order.on_hold and order.needs_query and order.due_at > timezone.now() and order.retry_count == 1


def test_check_held_asks_about_each_held_order_once_per_run(make_order, simulator):
    held = [held_by_a_client_bug(make_order, simulator) for _ in range(5)]
    for order in held:
        simulator.inject(Fault.SYSTEMERROR, out_trade_no=order.out_trade_no, api="orderquery")

    run = run_sweep("--check-held", "--workers", "2")

    assert run.summary["by_action"] == {"on_hold": 5}
    assert all(simulator.query_requests_for(order.out_trade_no) == 1 for order in held)


def test_lifting_a_hold_lets_the_next_unclear_close_ask_wechat_again(make_order, simulator):
    order = make_order()
    closed_unclearly(order, simulator)
    sweep_expired_orders()
    simulator.inject(Fault.UNSIGNED, out_trade_no=order.out_trade_no)
    sweep_expired_orders()
    assert refreshed(order).on_hold and refreshed(order).query_count == 1

    lift_hold([order])

    assert refreshed(order).query_count == 0 and not refreshed(order).on_hold


def test_check_held_runs_as_cron_runs_it_in_its_own_process(make_order, simulator, start_sweeper):
    order = held_by_a_client_bug(make_order, simulator)
    set_remote(simulator, order, RemoteState.PAID)

    out, err = start_sweeper("--check-held").communicate(timeout=60)

    assert json.loads(out)["by_action"] == {"found_paid": 1}, err
    assert refreshed(order).state == OrderState.PAID


def test_a_dry_run_with_check_held_lists_the_held_orders_it_would_ask_about(make_order, simulator):
    order = held_by_a_client_bug(make_order, simulator)
    results: list[Any] = []

    sweep_expired_orders(dry_run=True, check_held=True, on_result=results.append)

    assert [(r.out_trade_no, r.reason) for r in results] == [(order.out_trade_no, "dry run: would send orderquery")]
    assert simulator.query_requests_for(order.out_trade_no) == 0


# -- a person asks: check_orders (the admin's "Check status at WeChat") --------------------------------------


def test_a_check_of_a_paid_order_marks_it_paid(make_order, simulator):
    order = make_order(remote=RemoteState.PAID)

    report = check_orders([order])

    assert report.by_action == {CloseAction.FOUND_PAID: 1} and refreshed(order).state == OrderState.PAID
    assert simulator.close_requests_for(order.out_trade_no) == 0


def test_a_check_of_a_payable_order_records_the_answer_and_changes_nothing_else(make_order, simulator):
    order = make_order(expired_for=-timezone.timedelta(minutes=20))  # still in its payment window
    due_at = order.due_at

    report = check_orders([order])

    order = refreshed(order)
    assert report.by_action == {CloseAction.CHECKED: 1}
    assert order.state == OrderState.OPEN and order.due_at == due_at and not order.in_flight
    assert order.last_outcome == "payable" and order.last_error.startswith("orderquery: trade_state NOTPAY")
    assert queries(order)[0].trade_state == "NOTPAY"


def test_a_check_of_a_held_order_that_is_still_payable_leaves_the_hold_to_a_person(make_order, simulator):
    order = held_by_a_client_bug(make_order, simulator)

    assert check_orders([order]).by_action == {CloseAction.CHECKED: 1}

    assert refreshed(order).on_hold and simulator.close_requests_for(order.out_trade_no) == 1


def test_a_check_skips_an_order_that_is_not_open(make_order, simulator):
    order = make_order(remote=RemoteState.CLOSED)
    close_order(order)

    report = check_orders([order])

    assert report.by_action == {CloseAction.SKIPPED: 1} and simulator.query_requests_for(order.out_trade_no) == 0


def test_a_query_that_is_not_believed_is_audited_with_its_failure(make_order, simulator):
    order = make_order()
    simulator.inject(Fault.BAD_SIGNATURE, out_trade_no=order.out_trade_no, api="orderquery")

    check_orders([order])

    [query] = queries(order)
    assert query.outcome == Outcome.UNTRUSTED_RESPONSE and query.signature_verified is False and query.trade_state == ""
    assert refreshed(order).state == OrderState.OPEN


# -- close_before_reorder: decisive wherever WeChat knows ----------------------------------------------------


def test_reorder_after_an_unclear_close_of_a_paid_order_says_already_paid(make_order, simulator):
    order = make_order(remote=RemoteState.PAID)
    simulator.inject(Fault.SYSTEMERROR, out_trade_no=order.out_trade_no)

    answer = close_before_reorder(order)

    assert answer.verdict is ReorderVerdict.ALREADY_PAID and answer.order.state == OrderState.PAID


def test_reorder_after_an_unclear_close_of_a_payable_order_closes_it_again_and_says_create_new(
        make_order, simulator):
    order = make_order()
    simulator.inject(Fault.SYSTEMERROR, out_trade_no=order.out_trade_no)

    answer = close_before_reorder(order)

    assert answer.verdict is ReorderVerdict.CREATE_NEW and answer.order.state == OrderState.CLOSED
    assert [row.api for row in order.close_attempts.order_by("pk")] == ["closeorder", "orderquery", "closeorder"]


def test_reorder_after_an_unclear_close_of_a_closed_order_says_create_new(make_order, simulator):
    order = make_order(remote=RemoteState.CLOSED)
    simulator.inject(Fault.UNSIGNED, out_trade_no=order.out_trade_no)

    assert close_before_reorder(order).verdict is ReorderVerdict.CREATE_NEW


def test_reorder_while_the_payer_is_paying_says_try_again_later(make_order, simulator):
    order = make_order(remote=RemoteState.USERPAYING)  # closeorder answers it SYSTEMERROR

    answer = close_before_reorder(order)

    assert answer.verdict is ReorderVerdict.UNKNOWN and answer.retry_at is not None
    assert "USERPAYING" in answer.reason and simulator.close_requests_for(order.out_trade_no) == 1


# -- the same care as closes: claims across sweepers ---------------------------------------------------------


@pytest.mark.postgres
@pytest.mark.slow
def test_sweeper_processes_and_a_person_checking_never_have_two_queries_of_one_order_in_flight(
        make_order, simulator, start_sweeper, wxpay_settings):
    wxpay_settings.update(READ_TIMEOUT=10.0, WORKERS=4)
    orders = [make_order() for _ in range(60)]
    Order.objects.update(needs_query=True)  # every one's last close could not tell
    simulator.latency = 0.02

    sweepers = [start_sweeper("--workers", "4") for _ in range(3)]
    checked = check_orders(Order.objects.order_by("pk")[:30], workers=4)
    outputs = [sweeper.communicate(timeout=60) for sweeper in sweepers]

    assert [sweeper.returncode for sweeper in sweepers] == [0, 0, 0], [err for _, err in outputs]
    swept = sum(json.loads(out)["by_action"].get("retry_scheduled", 0) for out, _ in outputs)
    assert swept == 60 and checked.total == 30  # the sweepers asked about every order once, whoever checked too
    # Still payable, each was closed again, by whichever sweeper came next: once.
    assert set(simulator.close_request_counts().values()) <= {1}
    rows = CloseAttempt.objects.filter(api="orderquery")
    assert CloseAttempt.objects.count() == len(simulator.requests) and not CloseAttempt.objects.unfinished().exists()
    for order in orders:  # a person's check and a sweeper's query of one order never overlap
        windows = list(rows.filter(order=order).order_by("started_at").values_list("started_at", "completed_at"))
        assert all(earlier[1] <= later[0] for earlier, later in zip(windows, windows[1:])), order.out_trade_no


# -- the whole picture -----------------------------------------------------------------------------------------


def test_sweeps_over_every_unclear_scenario_leave_on_hold_only_what_wechat_itself_cannot_settle(
        make_order, simulator, wxpay_settings):
    wxpay_settings["MAX_ATTEMPTS"] = 2
    unclear_closes = [(Fault.UNSIGNED, {}), (Fault.BAD_SIGNATURE, {}), (Fault.ERR_CODE, {"err_code": "NEWCODE"}),
                      (Fault.SYSTEMERROR, {}), (Fault.MALFORMED_BODY, {}), (Fault.HTTP_503, {})]
    settles = {}  # order -> the state WeChat's answer to a query settles it in
    for fault, options in unclear_closes:
        for remote, ends in [(RemoteState.NOTPAY, OrderState.CLOSED), (RemoteState.PAID, OrderState.PAID),
                             (RemoteState.CLOSED, OrderState.CLOSED)]:
            order = make_order(remote=remote)
            simulator.inject(fault, out_trade_no=order.out_trade_no, times=None, **options)
            if remote is RemoteState.NOTPAY:  # payable, but its close stays unclear: WeChat confirms nothing
                settles[order] = OrderState.OPEN
            else:
                settles[order] = ends
    never_created = make_order(remote=None)
    settles[never_created] = OrderState.UNKNOWN_TO_WECHAT
    cannot_tell = make_order()
    for api in ("closeorder", "orderquery"):
        simulator.inject(Fault.SYSTEMERROR, out_trade_no=cannot_tell.out_trade_no, times=None, api=api)
    settles[cannot_tell] = OrderState.OPEN

    for _ in range(8):  # cron runs, each after the backoff has passed
        sweep_expired_orders(workers=4)
        Order.objects.filter(state=OrderState.OPEN, on_hold=False).update(due_at=timezone.now())

    assert {order.out_trade_no: refreshed(order).state for order in settles} == {
        order.out_trade_no: state for order, state in settles.items()}
    held = set(Order.objects.filter(on_hold=True).values_list("out_trade_no", flat=True))
    assert held == {order.out_trade_no for order, state in settles.items() if state == OrderState.OPEN}
    assert all(simulator.query_requests_for(order.out_trade_no) >= 1 for order in settles)
    assert not Order.objects.filter(state=OrderState.OPEN, on_hold=False).exists()
