"""Every fault WeChat or the network can throw, through `manage.py close_expired_orders` and the simulator.

For each: the order's state, its retry schedule (retry_count, due_at), the audit row and the
command's exit status are what docs/protocol.md#outcomes says. Exit status: non-zero only for an alarm —
3 a configuration error, 4 an order put on hold, 1 an unexpected failure; a scheduled retry is routine (0).
Where tests/test_services.py does not already cover a fault, it also goes through `close_order()`.
"""

from __future__ import annotations

import io
import json
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import pytest
from django.utils import timezone
from django.core.management import call_command
from django.core.management.base import CommandError

from django_wxpay_close.conf import load_settings
from django_wxpay_close.models import CloseAttempt, Order, OrderState
from django_wxpay_close.services import CloseAction, close_order
from django_wxpay_close.services.judgement import MERCHANT_HALTED
from django_wxpay_close.testing import API_KEY, MCH_ID, SUB_MCH_ID, Fault, WeChatPaySimulator
from django_wxpay_close.testing import OrderState as RemoteState
from django_wxpay_close.wechat import CLOSEORDER_PATH, Outcome

from .conftest import OTHER_API_KEY, OTHER_MCH_ID


@dataclass(frozen=True)
class CommandRun:
    exit_status: int  # what manage.py would exit with: the CommandError's returncode
    summary: dict[str, Any]
    stdout: str
    stderr: str
    error: str


def run_sweep(*args: str, as_json: bool = True) -> CommandRun:
    stdout, stderr = io.StringIO(), io.StringIO()
    try:
        call_command("close_expired_orders", *(["--json"] if as_json else []), *args, stdout=stdout, stderr=stderr)
        status, error = 0, ""
    except CommandError as exc:
        status, error = exc.returncode, str(exc)
    summary = json.loads(stdout.getvalue()) if as_json else {}
    return CommandRun(status, summary, stdout.getvalue(), stderr.getvalue(), error)


def refreshed(order: Order) -> Order:
    order.refresh_from_db()
    return order


def last_attempt(order: Order) -> CloseAttempt:
    return order.close_attempts.order_by("-started_at", "-pk").first()


def assert_retry_scheduled(order: Order, *, retries: int, outcome: Outcome) -> None:
    """Open, not on hold, `retries` of MAX_ATTEMPTS spent, next try exactly RETRY_BACKOFF·2^(n-1) later after
    its n-th failed exchange."""
    order = refreshed(order)
    assert order.state == OrderState.OPEN and not order.on_hold and order.in_flight is False
    assert order.retry_count == retries and order.last_outcome == outcome
    assert order.due_at - order.last_attempt_at == load_settings().retry_delay(order.attempt_count)


def make_due(order: Order) -> None:
    """Stands in for waiting out the backoff."""
    Order.objects.filter(pk=order.pk).update(due_at=timezone.now())


def unused_loopback_url() -> str:
    """A loopback port nothing listens on: connecting is refused at once."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{probe.getsockname()[1]}"


@pytest.fixture
def unreachable_url() -> Iterator[str]:
    """A loopback listener whose accept queue is full and never drained: a connect to it times out."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(3):
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex(("127.0.0.1", port))
        fillers.append(filler)
    time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    for sock in [*fillers, listener]:
        sock.close()


@pytest.fixture
def secondary() -> Iterator[WeChatPaySimulator]:
    """The other region: a second simulator that knows the same merchants and orders."""
    with WeChatPaySimulator({MCH_ID: API_KEY, OTHER_MCH_ID: OTHER_API_KEY}) as sim:
        yield sim


# -- outcome unknown: retried with backoff, never an alarm ---------------------------------------------------


def test_an_answer_slower_than_the_read_timeout_is_retried_and_the_next_run_learns_it_was_closed(
    make_order: Callable[..., Order], simulator: WeChatPaySimulator, wxpay_settings: dict[str, Any],
) -> None:
    wxpay_settings["READ_TIMEOUT"] = 1.0
    order = make_order()
    simulator.inject(Fault.DELAY, out_trade_no=order.out_trade_no, delay=1.5)  # beyond READ_TIMEOUT; WeChat closes it

    run = run_sweep()

    assert run.exit_status == 0 and run.summary["by_action"] == {"retry_scheduled": 1}
    # A lone transport failure spends a retry: only a run that judges WeChat unreachable gives them back.
    assert_retry_scheduled(order, retries=1, outcome=Outcome.NETWORK_ERROR)
    attempt = last_attempt(order)
    assert attempt.is_finished and attempt.outcome == Outcome.NETWORK_ERROR and attempt.http_status is None
    assert attempt.reason.startswith("read timeout")
    make_due(order)

    assert run_sweep().summary["by_action"] == {"already_closed": 1}
    order = refreshed(order)
    assert order.state == OrderState.CLOSED and order.retry_count == 0
    assert last_attempt(order).outcome == Outcome.ALREADY_CLOSED


def test_a_refused_connection_is_retried_with_backoff(make_order: Callable[..., Order],
                                                      wxpay_settings: dict[str, Any]) -> None:
    wxpay_settings["BASE_URL"] = refused = unused_loopback_url()
    order = make_order()

    run = run_sweep()

    assert run.exit_status == 0
    assert_retry_scheduled(order, retries=1, outcome=Outcome.NETWORK_ERROR)
    attempt = last_attempt(order)
    assert attempt.reason.startswith("connection error") and attempt.http_status is None
    assert attempt.url == refused + CLOSEORDER_PATH and attempt.failed_over_from == ""
    # The summary names the URL that could not be reached: the first thing an operator checks.
    assert run.summary["reasons"] == [
        {"action": "retry_scheduled", "reason": f"connection error ({refused}{CLOSEORDER_PATH})", "count": 1}]


@pytest.mark.parametrize(("fault", "outcome", "http_status", "reason"), [
    (Fault.RESET_CONNECTION, Outcome.NETWORK_ERROR, None, "connection"),
    (Fault.DROP_CONNECTION, Outcome.NETWORK_ERROR, None, "connection"),
    (Fault.HTTP_502, Outcome.INVALID_RESPONSE, 502, "HTTP 502"),
    (Fault.HTTP_503, Outcome.INVALID_RESPONSE, 503, "HTTP 503"),
    (Fault.MALFORMED_BODY, Outcome.INVALID_RESPONSE, 200, "unreadable body"),
])
def test_an_answer_that_says_nothing_leaves_the_order_open_for_a_retry(
    make_order: Callable[..., Order], simulator: WeChatPaySimulator, fault: Fault, outcome: Outcome,
    http_status: int | None, reason: str,
) -> None:
    order, by_service = make_order(), make_order()
    for faulty in (order, by_service):
        simulator.inject(fault, out_trade_no=faulty.out_trade_no)

    assert close_order(by_service).action is CloseAction.RETRY_SCHEDULED
    run = run_sweep()  # by_service is not due again yet: only `order` is sent

    assert run.exit_status == 0 and run.summary["by_action"] == {"retry_scheduled": 1}
    assert_retry_scheduled(by_service, retries=1, outcome=outcome)
    assert_retry_scheduled(order, retries=1, outcome=outcome)
    attempt = last_attempt(order)
    assert attempt.is_finished and attempt.outcome == outcome and attempt.http_status == http_status
    assert reason in attempt.reason and attempt.signature_verified is None
    if http_status in (502, 503):
        assert "<html>" in attempt.response_body
    assert simulator.order_state(order.out_trade_no, mch_id=MCH_ID, sub_mch_id=SUB_MCH_ID) is RemoteState.NOTPAY


def test_systemerrors_then_success_are_retried_on_the_backoff_schedule_until_closed(
    make_order: Callable[..., Order], simulator: WeChatPaySimulator, wxpay_settings: dict[str, Any],
) -> None:
    wxpay_settings.update(RETRY_BACKOFF=timedelta(seconds=0.25), MAX_ATTEMPTS=3)
    order = make_order()
    simulator.inject(Fault.SYSTEMERROR, out_trade_no=order.out_trade_no, times=2)

    for retries in (1, 2):
        assert run_sweep().exit_status == 0
        assert_retry_scheduled(order, retries=retries, outcome=Outcome.RETRYABLE_ERROR)
        assert run_sweep().summary["total"] == 0, "a retry went out before its backoff"
        time.sleep((refreshed(order).due_at - refreshed(order).last_attempt_at).total_seconds() + 0.05)

    run = run_sweep()

    order = refreshed(order)
    assert run.exit_status == 0 and run.summary["by_action"] == {"closed": 1}
    assert order.state == OrderState.CLOSED and order.retry_count == 0
    assert list(order.close_attempts.order_by("started_at").values_list("outcome", flat=True)) == [
        Outcome.RETRYABLE_ERROR, Outcome.RETRYABLE_ERROR, Outcome.CLOSED]
    assert simulator.close_requests_for(order.out_trade_no) == 3


def test_systemerror_until_the_retries_run_out_asks_wechat_and_goes_on_hold_when_the_query_cannot_tell_either(
    make_order: Callable[..., Order], simulator: WeChatPaySimulator,
) -> None:
    order = make_order()
    for api in ("closeorder", "orderquery"):
        simulator.inject(Fault.SYSTEMERROR, out_trade_no=order.out_trade_no, times=None, api=api)
    statuses = []
    for _ in range(6):  # MAX_ATTEMPTS closes, then MAX_ATTEMPTS queries, one request per run
        statuses.append(run_sweep().exit_status)
        make_due(order)
    order = refreshed(order)
    assert statuses == [0, 0, 0, 0, 0, 4]
    assert order.state == OrderState.OPEN and order.on_hold and order.retry_count == 3
    assert simulator.close_requests_for(order.out_trade_no) == 3
    assert order.close_attempts.filter(api="orderquery").count() == 3
    assert run_sweep().summary["total"] == 0


def test_an_order_whose_answers_are_always_unreadable_goes_on_hold_after_its_retries_even_in_short_runs(
    make_order: Callable[..., Order], simulator: WeChatPaySimulator,
) -> None:
    order = make_order()
    for api in ("closeorder", "orderquery"):
        simulator.inject(Fault.MALFORMED_BODY, out_trade_no=order.out_trade_no, times=None, api=api)
    statuses = []
    for _ in range(6):  # runs of one exchange each (3 closes, 3 queries): every transport failure spends a retry
        statuses.append(run_sweep().exit_status)
        make_due(order)
    order = refreshed(order)
    assert statuses == [0, 0, 0, 0, 0, 4]
    assert order.state == OrderState.OPEN and order.on_hold and order.retry_count == 3
    assert order.close_attempts.count() == 6


def test_ordernotexist_until_the_retry_budget_is_spent_marks_the_order_unknown_to_wechat(
    make_order: Callable[..., Order], simulator: WeChatPaySimulator,
) -> None:
    order = make_order(remote=None)  # WeChat never heard of it
    for retries in (1, 2):
        assert run_sweep().exit_status == 0
        assert_retry_scheduled(order, retries=retries, outcome=Outcome.NOT_FOUND)
        make_due(order)

    assert run_sweep().summary["by_action"] == {"query_scheduled": 1}  # the last close: WeChat will be asked
    make_due(order)
    run = run_sweep()  # the query confirms it

    order = refreshed(order)
    assert run.exit_status == 0 and run.summary["by_action"] == {"unknown_to_wechat": 1}
    assert order.state == OrderState.UNKNOWN_TO_WECHAT and not order.on_hold
    assert list(order.close_attempts.order_by("pk").values_list("api", "err_code")) == [
        ("closeorder", "ORDERNOTEXIST")] * 3 + [("orderquery", "ORDERNOTEXIST")]
    assert run_sweep().summary["total"] == 0 and simulator.close_requests_for(order.out_trade_no) == 3


# -- configuration errors: the merchant stops for the run, loudly ------------------------------------------------


@pytest.mark.parametrize("how", ["SIGNERROR answer", "wrong API key (return_code FAIL)"])
def test_a_signerror_halts_only_its_merchant_while_the_other_merchants_orders_close_in_the_same_run(
    make_order: Callable[..., Order], simulator: WeChatPaySimulator, wxpay_settings: dict[str, Any], how: str,
) -> None:
    good = [make_order() for _ in range(5)]
    bad = [make_order(merchant="other") for _ in range(5)]
    if how == "SIGNERROR answer":
        for order in bad:
            simulator.inject(Fault.SIGNERROR, out_trade_no=order.out_trade_no)
    else:
        wxpay_settings["MERCHANTS"]["other"]["API_KEY"] = "WRONGKEY" * 4

    run = run_sweep("--workers", "2", as_json=False)

    assert run.exit_status == 3 and "configuration error" in run.error
    assert "Merchant 'other' halted for this run" in run.stderr
    assert all(refreshed(order).state == OrderState.CLOSED for order in good)
    sent_for_bad = [order for order in bad if simulator.close_requests_for(order.out_trade_no)]
    # Two in a row halt it; with two workers a third may have been in flight when the second answer came.
    assert 2 <= len(sent_for_bad) <= 3, "calls continued for a merchant whose key is rejected"
    for order in map(refreshed, bad):
        assert order.state == OrderState.OPEN and not order.on_hold
        assert order.in_flight is False
        if order in sent_for_bad:  # backed off like a retry, so the next run starts elsewhere
            assert order.last_outcome == Outcome.CONFIGURATION_ERROR and order.retry_count == 1
            assert order.due_at - order.last_attempt_at == load_settings().retry_backoff
            assert last_attempt(order).outcome == Outcome.CONFIGURATION_ERROR
        else:
            # Claimed with its batch before the halt: its row says it was not sent, and it is due again at once.
            assert all(attempt.has_no_answer and attempt.reason == MERCHANT_HALTED
                       for attempt in order.close_attempts.all())
            assert order.due_at <= timezone.now() and order.retry_count == 0


# -- untrusted answers: nothing changes, a person looks ---------------------------------------------------------


@pytest.mark.parametrize("fault", [Fault.BAD_SIGNATURE, Fault.UNSIGNED])
def test_a_success_body_that_is_not_correctly_signed_changes_nothing_and_fails_the_command_when_a_query_cannot_tell(
    make_order: Callable[..., Order], simulator: WeChatPaySimulator, fault: Fault,
) -> None:
    order, by_service = make_order(), make_order()
    for faulty in (order, by_service):
        for api in ("closeorder", "orderquery"):
            simulator.inject(fault, out_trade_no=faulty.out_trade_no, api=api)

    assert close_order(by_service).action is CloseAction.QUERY_SCHEDULED
    assert run_sweep().summary["by_action"] == {"query_scheduled": 1, "on_hold": 1}  # closes one, asks of the other
    run = run_sweep()

    assert run.exit_status == 4 and "attention" in run.error and run.summary["by_action"] == {"on_hold": 1}
    assert refreshed(by_service).on_hold and refreshed(by_service).state == OrderState.OPEN
    order = refreshed(order)
    assert order.state == OrderState.OPEN and order.on_hold and order.closed_at is None
    close = order.close_attempts.get(api="closeorder")
    assert close.outcome == Outcome.UNTRUSTED_RESPONSE and close.signature_verified is False
    assert close.http_status == 200 and close.result_code == "SUCCESS"
    assert last_attempt(order).api == "orderquery" and last_attempt(order).outcome == Outcome.UNTRUSTED_RESPONSE
    assert run_sweep().summary["total"] == 0, "an order on hold was sent again"


# -- regional failover ------------------------------------------------------------------------------------------


def test_a_refused_primary_region_fails_over_in_the_same_attempt_through_the_command(
    make_order: Callable[..., Order], simulator: WeChatPaySimulator, wxpay_settings: dict[str, Any],
) -> None:
    refused = unused_loopback_url()
    wxpay_settings.update(BASE_URL=refused, FAILOVER_BASE_URL=simulator.base_url)
    order = make_order()

    run = run_sweep()

    assert run.exit_status == 0 and refreshed(order).state == OrderState.CLOSED
    attempt = order.close_attempts.get()
    assert attempt.url == simulator.base_url + CLOSEORDER_PATH
    assert attempt.failed_over_from == refused + CLOSEORDER_PATH


def test_a_connect_timeout_on_the_primary_region_fails_over_in_the_same_attempt(
    make_order: Callable[..., Order], simulator: WeChatPaySimulator, wxpay_settings: dict[str, Any],
    unreachable_url: str,
) -> None:
    wxpay_settings.update(BASE_URL=unreachable_url, FAILOVER_BASE_URL=simulator.base_url, CONNECT_TIMEOUT=0.3)
    order = make_order()

    run = run_sweep()

    assert run.exit_status == 0 and refreshed(order).state == OrderState.CLOSED
    attempt = order.close_attempts.get()
    assert attempt.url == simulator.base_url + CLOSEORDER_PATH
    assert attempt.failed_over_from == unreachable_url + CLOSEORDER_PATH
    assert attempt.duration_ms >= 300


def test_a_read_timeout_never_fails_over(make_order: Callable[..., Order], simulator: WeChatPaySimulator,
                                         secondary: WeChatPaySimulator, wxpay_settings: dict[str, Any]) -> None:
    wxpay_settings.update(FAILOVER_BASE_URL=secondary.base_url, READ_TIMEOUT=1.0)
    order = make_order()
    secondary.add_order(order.out_trade_no, mch_id=MCH_ID, sub_mch_id=SUB_MCH_ID)
    simulator.inject(Fault.DELAY, out_trade_no=order.out_trade_no, delay=1.5)  # the request did reach WeChat

    run = run_sweep()

    assert run.exit_status == 0 and secondary.requests == []
    attempt = order.close_attempts.get()
    assert attempt.outcome == Outcome.NETWORK_ERROR and attempt.url == simulator.base_url + CLOSEORDER_PATH
    assert attempt.failed_over_from == ""


@pytest.mark.parametrize("fault", [Fault.SYSTEMERROR, Fault.ORDERNOTEXIST, Fault.SIGNERROR, Fault.ERR_CODE,
                                   Fault.RETURN_FAIL, Fault.HTTP_503, Fault.RESET_CONNECTION])
def test_an_answer_from_the_primary_region_never_fails_over(
    make_order: Callable[..., Order], simulator: WeChatPaySimulator, secondary: WeChatPaySimulator,
    wxpay_settings: dict[str, Any], fault: Fault,
) -> None:
    wxpay_settings["FAILOVER_BASE_URL"] = secondary.base_url
    order = make_order()
    secondary.add_order(order.out_trade_no, mch_id=MCH_ID, sub_mch_id=SUB_MCH_ID)
    simulator.inject(fault, out_trade_no=order.out_trade_no,
                     err_code="FREQUENCY_LIMITED" if fault is Fault.ERR_CODE else None)

    run_sweep()

    assert secondary.requests == [] and refreshed(order).state == OrderState.OPEN
    attempt = order.close_attempts.get(api="closeorder")
    assert attempt.url == simulator.base_url + CLOSEORDER_PATH and attempt.failed_over_from == ""
