"""The sweep engine when things go wrong around it: clocks that disagree, a database that stalls, drops its
connections or goes away, WeChat out for hours, a poison order, an answer that comes after a takeover.

Faults are injected where they happen: a sweeper process with its clock shifted (libfaketime), triggers
that stall or fail writes in the database, `pg_terminate_backend`, the simulator's own faults. Tests marked
`postgres` need a server database several processes share; the stalls and the terminated connections are
PostgreSQL's (pg_sleep, pg_terminate_backend).
"""

from __future__ import annotations

import io
import json
import signal
import threading
import time
import uuid
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connection, connections
from django.db.models import Q
from django.utils import timezone

from django_wxpay_close.models import CloseAttempt, Order, OrderState
from django_wxpay_close.services import ABANDONED, CloseAction, close_order, sweep_expired_orders
from django_wxpay_close.services.engine import STOPPING
from django_wxpay_close.services.judgement import BREAKER_MIN_EXCHANGES
from django_wxpay_close.testing import OrderState as RemoteState
from django_wxpay_close.testing import MCH_ID, SUB_MCH_ID, Fault, OrderKey, WeChatPaySimulator
from django_wxpay_close.wechat import Outcome

from .conftest import require_faketime, wait_for


def each_sent_once(simulator: WeChatPaySimulator, orders: list[Order]) -> bool:
    counts = simulator.close_request_counts()
    return all(counts.get(OrderKey(MCH_ID, SUB_MCH_ID, o.out_trade_no), 0) == 1 for o in orders)


def finished(process: Any, timeout: float = 90) -> tuple[int, str, str]:
    out, err = process.communicate(timeout=timeout)
    return process.returncode, out, err


def run_command(*args: str) -> tuple[int, str]:
    out = io.StringIO()
    try:
        call_command("close_expired_orders", "--json", *args, stdout=out, stderr=io.StringIO())
        return 0, out.getvalue()
    except CommandError as exc:
        return exc.returncode, out.getvalue()


def terminate_other_connections() -> int:
    """What an operator's `pg_terminate_backend` (or a database failover) does to every sweeper's connection."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                       "WHERE datname = current_database() AND pid <> pg_backend_pid()")
        return int(cursor.fetchone()[0])


# A lease short enough to lapse within a test, long enough for a whole exchange (1 s connect + 2 s read, E010)
# with 2 s to spare for a claimed order to wait for its worker.
LAPSING_CLAIM = timedelta(seconds=5)


def wait_until_every_claim_lapsed() -> None:
    """Until no order is held by a claim whose lease still runs (one whose acknowledgement was lost, say)."""
    wait_for(lambda: not Order.objects.filter(in_flight=True, due_at__gt=timezone.now()).exists(),
             timeout=LAPSING_CLAIM.total_seconds() + 2)


def allow_connections(allowed: bool) -> None:
    """Open or close the test database to new connections (from the server's maintenance database: PostgreSQL
    refuses to close the database a session is connected to)."""
    import psycopg

    options = connection.settings_dict
    with psycopg.connect(host=options["HOST"], port=options["PORT"] or 5432, user=options["USER"],
                         password=options["PASSWORD"] or None, dbname="postgres", autocommit=True) as admin:
        admin.execute(f'ALTER DATABASE "{options["NAME"]}" WITH ALLOW_CONNECTIONS {str(allowed).lower()}')


# -- clocks ------------------------------------------------------------------------------------------------------


@pytest.mark.postgres
@pytest.mark.slow
def test_a_sweeper_whose_clock_runs_minutes_ahead_neither_steals_a_claim_nor_closes_an_order_too_early(
    wxpay_settings: dict[str, Any], make_order: Callable[..., Order], simulator: WeChatPaySimulator,
    start_sweeper: Callable[..., Any], reliability_figures: Callable[..., None],
) -> None:
    require_faketime()
    del wxpay_settings["CLAIM_TIMEOUT"]  # the default, 2 minutes: a host 150 s ahead would see every claim lapsed
    backlog = [make_order() for _ in range(300)]
    inside_window = make_order(expired_for=-timedelta(seconds=60))  # its deadline is a minute away
    too_young = make_order(age=timedelta(minutes=3), expired_for=timedelta(minutes=1))  # 3 of MIN_ORDER_AGE's 5
    simulator.latency = 0.05

    sweepers = [start_sweeper("--workers", "8"), start_sweeper("--workers", "8", clock_offset="+150s")]
    results = [finished(sweeper) for sweeper in sweepers]

    assert [status for status, _, _ in results] == [0, 0], [err for _, _, err in results]
    assert each_sent_once(simulator, backlog)
    assert simulator.close_requests_for(inside_window.out_trade_no) == 0
    assert simulator.close_requests_for(too_young.out_trade_no) == 0
    assert Order.objects.filter(state=OrderState.CLOSED).count() == len(backlog)
    closed_by = [json.loads(out)["by_action"].get("closed", 0) for _, out, _ in results]
    assert sum(closed_by) == len(backlog) and all(closed_by), "one sweeper did all the work: no race was run"
    reliability_figures(orders=len(backlog), clock_offset_s=150, closed_by_each_sweeper=closed_by,
                        requests=len(simulator.requests), double_sends=len(simulator.requests) - len(backlog))


@pytest.mark.postgres
@pytest.mark.slow
def test_a_sweeper_paused_past_its_leases_records_its_late_answers_and_does_not_judge_wechat_unreachable(
    wxpay_settings: dict[str, Any], make_order: Callable[..., Order], simulator: WeChatPaySimulator,
    start_sweeper: Callable[..., Any],
) -> None:
    wxpay_settings.update(CONNECT_TIMEOUT=0.5, READ_TIMEOUT=1.5, CLAIM_TIMEOUT=timedelta(seconds=3))
    orders = [make_order() for _ in range(16)]
    simulator.latency = 0.5
    paused = start_sweeper("--workers", "8")
    wait_for(lambda: len(simulator.requests) >= 8, timeout=20)
    paused.send_signal(signal.SIGSTOP)  # its requests are answered, its deadlines and leases pass
    try:
        # A worker sends only while its lease covers a whole exchange: once the leases lapse, the deadlines have.
        wait_for(lambda: not Order.objects.filter(in_flight=True, due_at__gt=timezone.now()).exists(), timeout=10)
        simulator.latency = 0.0
        assert run_command("--workers", "4")[0] == 0  # another sweeper takes every lapsed order over
    finally:
        paused.send_signal(signal.SIGCONT)
    status, out, err = finished(paused)

    summary = json.loads(out)
    assert status == 1 and not summary["stopped_early"], err  # answered after a takeover: not an outage
    assert summary["by_action"].get("claim_lost", 0) >= 1
    assert set(Order.objects.values_list("state", flat=True)) == {OrderState.CLOSED}
    # Every answer WeChat sent is in the trail: a late one on its own row, tied to its request's row.
    answered = CloseAttempt.objects.exclude(outcome="")
    assert answered.count() == len(simulator.requests)
    late = answered.filter(late_answer_to__isnull=False)
    assert late.exists() and all(row.late_answer_to.has_no_answer for row in late)
    assert not CloseAttempt.objects.unfinished().exists()


# -- a database that stalls, drops connections, goes away -----------------------------------------------------------


@pytest.mark.postgres
@pytest.mark.slow
def test_answer_writes_stalled_past_their_claims_close_every_order_once_and_keep_every_answer(
    wxpay_settings: dict[str, Any], make_order: Callable[..., Order], simulator: WeChatPaySimulator,
    start_sweeper: Callable[..., Any], database_fault: Callable[..., None], on_postgres: bool,
    reliability_figures: Callable[..., None],
) -> None:
    if not on_postgres:
        pytest.skip("the stall is pg_sleep() in a trigger")
    wxpay_settings.update(CONNECT_TIMEOUT=0.5, READ_TIMEOUT=1.0, CLAIM_TIMEOUT=timedelta(seconds=2))
    orders = [make_order() for _ in range(16)]
    database_fault("closeattempt", "UPDATE", delay=2.5)  # every answer's write outlasts the 2 s claim

    results = [finished(s) for s in [start_sweeper("--workers", "4"), start_sweeper("--workers", "4")]]

    # An order whose answer is being written is locked: no other sweeper sends for it. An answer that waits
    # behind a stalled write can outlive its lease: another sweeper may then close the order again (WeChat
    # answers ORDERCLOSED), and the late answer is kept on a row of its own and reported (exit status 1).
    assert all(status in (0, 1) for status, _, _ in results), [err for _, _, err in results]
    assert set(Order.objects.values_list("state", flat=True)) == {OrderState.CLOSED}
    assert not CloseAttempt.objects.unfinished().exists()
    counts = simulator.close_request_counts()
    sent = [counts.get(OrderKey(MCH_ID, SUB_MCH_ID, order.out_trade_no), 0) for order in orders]
    assert all(n >= 1 for n in sent)
    answered = CloseAttempt.objects.exclude(outcome="")
    assert answered.count() == len(simulator.requests), "an answer the simulator sent is missing from the trail"
    late = answered.filter(Q(late_answer_to__isnull=False) | Q(reason__contains="applied nothing")).count()
    assert late == sum(sent) - len(orders)
    reliability_figures(orders=len(orders), claim_timeout_s=2, answer_write_stall_s=2.5,
                        requests=len(simulator.requests), second_sends=len(simulator.requests) - len(orders),
                        answers_lost=len(simulator.requests) - answered.count())


@pytest.mark.postgres
@pytest.mark.slow
def test_terminated_database_connections_lose_no_answer(
    wxpay_settings: dict[str, Any], make_order: Callable[..., Order], simulator: WeChatPaySimulator,
    start_sweeper: Callable[..., Any], on_postgres: bool, reliability_figures: Callable[..., None],
) -> None:
    if not on_postgres:
        pytest.skip("connections are terminated with pg_terminate_backend")
    wxpay_settings.update(CONNECT_TIMEOUT=1.0, READ_TIMEOUT=2.0, CLAIM_TIMEOUT=LAPSING_CLAIM)
    orders = [make_order() for _ in range(60)]
    simulator.latency = 0.3
    sweeper = start_sweeper("--workers", "6", log_level="WARNING")
    wait_for(lambda: len(simulator.requests) >= 10, timeout=20)
    terminated = terminate_other_connections()
    time.sleep(0.5)
    terminated += terminate_other_connections()
    status, _, err = finished(sweeper)
    # A claim whose commit landed while its acknowledgement was lost is held until it lapses: the next run.
    wait_until_every_claim_lapsed()
    assert run_command()[0] == 0

    assert status == 0, err
    assert "Lost the database connection" in err and "Traceback" not in err
    assert set(Order.objects.values_list("state", flat=True)) == {OrderState.CLOSED}
    # Every answer the simulator sent is on its row: one completed row per request, with that answer.
    for order in orders:
        received = [r.answer for r in simulator.requests if r.out_trade_no == order.out_trade_no]
        answered = list(CloseAttempt.objects.filter(order=order).exclude(outcome="").order_by("started_at", "pk"))
        assert ["SUCCESS" if a.outcome == Outcome.CLOSED else a.err_code for a in answered] == received
    # A row without a request is one a lost acknowledgement left behind, settled as abandoned.
    assert not CloseAttempt.objects.unfinished().exists()
    # A row written ahead whose lease ran short while the database was away says it was not sent.
    assert all(reason == ABANDONED or reason.startswith("not sent")
               for reason in CloseAttempt.objects.filter(outcome="").values_list("reason", flat=True))
    reliability_figures(orders=len(orders), connections_terminated=terminated, requests=len(simulator.requests),
                        answers_lost=0, rows_settled_as_abandoned=CloseAttempt.objects.filter(reason=ABANDONED).count())


@pytest.mark.postgres
@pytest.mark.slow
def test_terminated_database_connections_lose_no_query_answer(
    wxpay_settings: dict[str, Any], make_order: Callable[..., Order], simulator: WeChatPaySimulator,
    start_sweeper: Callable[..., Any], on_postgres: bool,
) -> None:
    if not on_postgres:
        pytest.skip("connections are terminated with pg_terminate_backend")
    wxpay_settings.update(CONNECT_TIMEOUT=1.0, READ_TIMEOUT=2.0, CLAIM_TIMEOUT=LAPSING_CLAIM)
    orders = [make_order(remote=RemoteState.CLOSED) for _ in range(40)]
    Order.objects.update(needs_query=True)  # each one's last close could not tell: the sweep asks WeChat
    simulator.latency = 0.3
    sweeper = start_sweeper("--workers", "6", log_level="WARNING")
    wait_for(lambda: len(simulator.requests) >= 10, timeout=20)
    terminate_other_connections()
    status, _, err = finished(sweeper)
    wait_until_every_claim_lapsed()  # a claim whose acknowledgement was lost lapses: the next run takes its orders
    assert run_command()[0] == 0

    assert status == 0, err
    assert "Lost the database connection" in err and "Traceback" not in err
    assert set(Order.objects.values_list("state", flat=True)) == {OrderState.CLOSED}
    assert simulator.close_request_counts() == {}
    for order in orders:  # every answer WeChat sent is on its row
        received = [r.answer for r in simulator.requests if r.out_trade_no == order.out_trade_no]
        answered = CloseAttempt.objects.filter(order=order).exclude(outcome="").order_by("started_at", "pk")
        assert [row.trade_state for row in answered] == received
    assert not CloseAttempt.objects.unfinished().exists()


@pytest.mark.postgres
@pytest.mark.slow
def test_a_database_that_stays_away_stops_the_sweep_with_its_answers_logged_and_exit_status_5(
    wxpay_settings: dict[str, Any], make_order: Callable[..., Order], simulator: WeChatPaySimulator,
    start_sweeper: Callable[..., Any], on_postgres: bool,
) -> None:
    if not on_postgres:
        pytest.skip("the database is closed to new connections with ALTER DATABASE ... ALLOW_CONNECTIONS")
    wxpay_settings.update(READ_TIMEOUT=3.0, CLAIM_TIMEOUT=timedelta(seconds=10))
    orders = [make_order() for _ in range(20)]
    simulator.latency = 0.8  # the database goes away while four answers are on their way
    sweeper = start_sweeper("--workers", "4", as_json=False)
    wait_for(lambda: len(simulator.requests) >= 4, timeout=20)
    allow_connections(False)
    try:
        terminate_other_connections()
        status, out, err = finished(sweeper)
    finally:
        allow_connections(True)

    assert status == 5
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("CommandError:")]
    assert len(errors) == 1 and "the database is unavailable" in errors[0]
    in_flight = {r.out_trade_no for r in simulator.requests}
    for number in in_flight:  # each answer it held is in the log, with its body, never lost silently
        assert f"Could not record the answer to closeorder {number} (outcome closed)" in err
    assert "<return_code><![CDATA[SUCCESS]]></return_code>" in err  # the response body, as received
    assert len(simulator.requests) < len(orders), "it kept claiming after the database went away"


@pytest.mark.postgres
def test_ctrl_c_stops_the_sweep_claiming_and_records_the_answers_in_flight(
    make_order: Callable[..., Order], simulator: WeChatPaySimulator, start_sweeper: Callable[..., Any],
) -> None:
    for _ in range(30):
        make_order()
    simulator.latency = 0.5
    sweeper = start_sweeper("--workers", "2", as_json=False)
    wait_for(lambda: len(simulator.requests) >= 2, timeout=20)
    sweeper.send_signal(signal.SIGINT)
    status, _, err = finished(sweeper)

    assert status == 130 and "interrupted" in err and "Traceback" not in err
    sent = len(simulator.requests)
    assert 2 <= sent <= 4, f"{sent} requests went out after Ctrl-C"  # at most one more per worker
    assert not CloseAttempt.objects.unfinished().exists()
    answered = CloseAttempt.objects.exclude(outcome="")
    assert answered.count() == sent == Order.objects.filter(state=OrderState.CLOSED).count()
    # The rows written ahead for orders claimed but not yet sent say so; those orders are due again.
    assert set(CloseAttempt.objects.filter(outcome="").values_list("reason", flat=True)) <= {STOPPING}
    assert not Order.objects.filter(in_flight=True).exists()


# -- WeChat out for hours, a poison order ---------------------------------------------------------------------------


def test_a_run_whose_requests_mostly_fail_in_transport_stops_early_with_exit_status_6(
    make_order: Callable[..., Order], simulator: WeChatPaySimulator,
) -> None:
    for _ in range(40):
        make_order()
    simulator.inject(Fault.DROP_CONNECTION, times=None)

    status, out = run_command("--workers", "2")

    summary = json.loads(out)
    assert status == 6 and "WeChat looks unreachable" in summary["stopped_early"]
    # Every order claimed is reported once: sent, or queued behind the breaker and not sent.
    not_sent = summary["by_action"].get("skipped", 0)
    assert len(simulator.requests) < 40 and summary["total"] == len(simulator.requests) + not_sent
    assert not Order.objects.filter(on_hold=True).exists()


def test_hours_of_outage_put_nothing_on_hold_and_every_order_closes_once_wechat_answers(
    wxpay_settings: dict[str, Any], make_order: Callable[..., Order], simulator: WeChatPaySimulator,
) -> None:
    wxpay_settings.update(MAX_ATTEMPTS=3)
    orders = [make_order() for _ in range(12)]
    simulator.inject(Fault.HTTP_503, times=None)
    statuses = []
    for _ in range(8):  # cron runs through the outage; each runs once the backoff has passed
        statuses.append(run_command("--workers", "4")[0])
        Order.objects.update(due_at=timezone.now())
    assert set(statuses) == {6}
    assert not Order.objects.filter(on_hold=True).exists()
    assert set(Order.objects.values_list("retry_count", flat=True)) == {0}

    simulator.clear_faults()
    status, out = run_command("--workers", "4")

    assert status == 0 and json.loads(out)["by_action"] == {"closed": len(orders)}
    assert set(Order.objects.values_list("state", flat=True)) == {OrderState.CLOSED}


def test_a_lone_transport_failure_in_a_healthy_run_spends_a_retry(
    make_order: Callable[..., Order], simulator: WeChatPaySimulator,
) -> None:
    orders = [make_order() for _ in range(BREAKER_MIN_EXCHANGES + 3)]
    failing = orders[-1]
    simulator.inject(Fault.HTTP_502, out_trade_no=failing.out_trade_no)
    assert sweep_expired_orders(workers=1).by_action == {CloseAction.CLOSED: len(orders) - 1,
                                                          CloseAction.RETRY_SCHEDULED: 1}
    failing.refresh_from_db()
    assert failing.retry_count == 1


def test_a_poison_order_is_backed_off_so_the_next_run_starts_elsewhere(
    make_order: Callable[..., Order], simulator: WeChatPaySimulator,
) -> None:
    poison = make_order(expired_for=timedelta(hours=2))
    simulator.inject(Fault.RETURN_FAIL, out_trade_no=poison.out_trade_no, times=None)
    sweep_expired_orders(workers=1)
    later = [make_order() for _ in range(3)]

    report = sweep_expired_orders(workers=1)

    assert report.by_action == {CloseAction.CLOSED: 3} and report.halted_merchants == {}
    assert simulator.close_requests_for(poison.out_trade_no) == 1
    assert all(Order.objects.get(pk=o.pk).state == OrderState.CLOSED for o in later)


# -- one run, one claim per order ----------------------------------------------------------------------------------


def test_a_sweep_never_claims_an_order_twice_even_when_its_retry_falls_due_mid_run(
    wxpay_settings: dict[str, Any], make_order: Callable[..., Order], simulator: WeChatPaySimulator,
) -> None:
    wxpay_settings.update(RETRY_BACKOFF=timedelta(milliseconds=1), RETRY_BACKOFF_MAX=timedelta(milliseconds=1))
    flaky = make_order(expired_for=timedelta(hours=1))
    simulator.inject(Fault.SYSTEMERROR, out_trade_no=flaky.out_trade_no, times=None)
    others = [make_order() for _ in range(6)]
    simulator.latency = 0.02  # the flaky order is due again long before the run ends

    report = sweep_expired_orders(workers=2)

    assert report.total == 1 + len(others)
    assert report.by_action == {CloseAction.RETRY_SCHEDULED: 1, CloseAction.CLOSED: len(others)}
    assert simulator.close_requests_for(flaky.out_trade_no) == 1


def test_an_answer_that_comes_after_another_caller_took_the_order_over_is_recorded_and_applies_nothing(
    make_order: Callable[..., Order], simulator: WeChatPaySimulator,
) -> None:
    order = make_order()
    simulator.inject(Fault.DELAY, out_trade_no=order.out_trade_no, delay=0.6)
    results: list[Any] = []

    def close() -> None:
        try:
            results.append(close_order(order))
        finally:
            connections.close_all()

    worker = threading.Thread(target=close)
    worker.start()
    wait_for(lambda: simulator.requests != [], timeout=5)
    # Another sweeper's claim, as after a lapse: a new token and lease.
    Order.objects.filter(pk=order.pk).update(claim_token=uuid.uuid4(),
                                             due_at=timezone.now() + timedelta(minutes=1))
    worker.join()

    [result] = results
    assert result.action is CloseAction.CLAIM_LOST and result.outcome is Outcome.CLOSED
    attempt = CloseAttempt.objects.get()
    assert attempt.outcome == Outcome.CLOSED and "applied nothing" in attempt.reason
    order.refresh_from_db()
    assert order.state == OrderState.OPEN and order.attempt_count == 0


def test_a_sweep_never_claims_again_an_order_whose_answer_it_is_still_waiting_for(
    make_order: Callable[..., Order], simulator: WeChatPaySimulator,
) -> None:
    slow = make_order(expired_for=timedelta(hours=1))  # the first claimed
    simulator.inject(Fault.DELAY, out_trade_no=slow.out_trade_no, delay=0.8)
    others = [make_order() for _ in range(40)]
    simulator.latency = 0.05  # the run claims again and again while the slow answer is on its way
    reports: list[Any] = []

    def sweep() -> None:
        try:
            reports.append(sweep_expired_orders(workers=2))
        finally:
            connections.close_all()

    sweeper = threading.Thread(target=sweep)
    sweeper.start()
    wait_for(lambda: simulator.close_requests_for(slow.out_trade_no) == 1, timeout=5)
    # Taken over by another sweeper, which gave it back unsent: due again, first in line, another run's token on it.
    Order.objects.filter(pk=slow.pk).update(claim_token=uuid.uuid4(), in_flight=False,
                                            due_at=timezone.now() - timedelta(hours=2))
    sweeper.join()

    [report] = reports
    assert simulator.close_requests_for(slow.out_trade_no) == 1
    assert report.by_action == {CloseAction.CLOSED: len(others), CloseAction.CLAIM_LOST: 1}
