"""A sweeper killed with SIGKILL mid-request: its audit rows stay unfinished, its claims lapse, the next run finishes.

PostgreSQL only: a real `manage.py close_expired_orders` process shares the test database.

What is provable after a SIGKILL: the audit row is written before the request leaves, so every request the
simulator received has a row; a row is completed only with an answer the process received, so a request
whose answer had not been sent when the process died stays unfinished. Killing while every worker waits on
the simulator's latency (and before the first answer could leave) makes the unfinished rows exactly the
requests in flight plus the rows written ahead of a free request slot (one per four workers), whose
requests never left.
"""

from __future__ import annotations

import io
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import pytest
from django.core.management import call_command
from django.utils import timezone

from django_wxpay_close.models import CloseAttempt, Order, OrderState
from django_wxpay_close.selectors import unfinished_attempts
from django_wxpay_close.testing import MCH_ID, SUB_MCH_ID, WeChatPaySimulator
from django_wxpay_close.testing import OrderState as RemoteState
from django_wxpay_close.wechat import Outcome

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

ORDERS = 30
WORKERS = 4
ROWS_AHEAD = 1  # pipeline.REQUESTS_PER_ROW_AHEAD: one audit row written ahead per four requests in flight
LATENCY = 1.5  # seconds every answer waits; the simulator applies the close when the request arrives
# Must exceed CONNECT_TIMEOUT + READ_TIMEOUT (conf.py E010), and cover twice that + 5 s for rows to be
# written ahead of a free slot (a wait for the slot, then the exchange: services._CloseRun.writes_ahead).
CLAIM_TIMEOUT = timedelta(seconds=10)


@dataclass(frozen=True)
class Crash:
    killed_at: float  # time.time()
    in_flight: frozenset[str]  # out_trade_nos the simulator received and had not answered at the kill
    written_ahead: frozenset[str]  # rows the dead process wrote for requests it had not sent yet
    claimed: frozenset[str]  # orders the dead process still held a claim on
    orders: tuple[Order, ...]


def wait_for(condition: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s")
        time.sleep(0.01)


def sweep() -> None:
    """The next cron run, in this process."""
    call_command("close_expired_orders", "--json", stdout=io.StringIO())


@pytest.fixture
def crash(wxpay_settings: dict[str, Any], simulator: WeChatPaySimulator, make_order: Callable[..., Order],
          start_sweeper: Callable[..., Any]) -> Crash:
    """A sweeper killed with SIGKILL while all its workers wait for answers."""
    wxpay_settings.update(CONNECT_TIMEOUT=0.5, READ_TIMEOUT=2.0, CLAIM_TIMEOUT=CLAIM_TIMEOUT)
    orders = tuple(make_order() for _ in range(ORDERS))
    simulator.latency = LATENCY
    sweeper = start_sweeper("--workers", str(WORKERS), "--batch-size", "10")
    wait_for(lambda: len(simulator.requests) >= WORKERS, timeout=20)
    time.sleep(0.2)  # let any straggler that was about to send do so
    os.kill(sweeper.pid, signal.SIGKILL)
    killed_at = time.time()
    sweeper.wait()
    simulator.latency = 0.0
    received = simulator.requests
    assert all(r.received_at + LATENCY > killed_at for r in received), "an answer left before the kill"
    claimed = Order.objects.filter(claim_expires_at__gt=timezone.now()).values_list("out_trade_no", flat=True)
    in_flight = frozenset(r.out_trade_no for r in received)
    rows = frozenset(CloseAttempt.objects.values_list("out_trade_no", flat=True))
    return Crash(killed_at, in_flight, rows - in_flight, frozenset(claimed), orders)


def test_a_killed_sweeper_leaves_its_in_flight_requests_and_its_rows_written_ahead_unfinished(
    crash: Crash, simulator: WeChatPaySimulator,
):
    unfinished = CloseAttempt.objects.unfinished()
    assert len(crash.in_flight) == WORKERS
    # Not lost: every request WeChat received has its row. Not invented beyond the bound: the only rows
    # without a request are the ones written ahead of a free slot.
    assert sorted(unfinished.values_list("out_trade_no", flat=True)) == sorted(crash.in_flight | crash.written_ahead)
    assert len(crash.written_ahead) == ROWS_AHEAD
    assert CloseAttempt.objects.count() == unfinished.count() == len(simulator.requests) + ROWS_AHEAD
    assert all(a.outcome == "" and a.http_status is None for a in unfinished)
    assert set(unfinished_attempts(started_before=timezone.now()).values_list("out_trade_no", flat=True)) == set(
        crash.in_flight | crash.written_ahead)
    # WeChat did close them (the answers never arrived); locally they are still open, and still claimed.
    for number in crash.in_flight:
        assert simulator.order_state(number, mch_id=MCH_ID, sub_mch_id=SUB_MCH_ID) is RemoteState.CLOSED
    for number in crash.written_ahead:
        assert simulator.close_requests_for(number) == 0
    assert crash.in_flight | crash.written_ahead <= crash.claimed
    assert set(Order.objects.values_list("state", flat=True)) == {OrderState.OPEN}


def test_the_next_run_leaves_a_dead_sweepers_orders_alone_until_their_claim_expires(crash: Crash,
                                                                                   simulator: WeChatPaySimulator):
    sent_before = simulator.close_request_counts()

    sweep()

    for order in crash.orders:
        order.refresh_from_db()
        if order.out_trade_no in crash.claimed:
            assert order.state == OrderState.OPEN
            assert simulator.close_requests_for(order.out_trade_no) == sum(
                count for key, count in sent_before.items() if key.out_trade_no == order.out_trade_no)
        else:
            assert order.state == OrderState.CLOSED


def test_the_next_run_after_the_claims_expire_finishes_the_dead_sweepers_orders_correctly(
    crash: Crash, simulator: WeChatPaySimulator, reliability_figures: Callable[..., None],
):
    wait_for(lambda: not Order.objects.filter(claim_expires_at__gt=timezone.now()).exists(),
             timeout=CLAIM_TIMEOUT.total_seconds() + 2)

    sweep()

    assert set(Order.objects.values_list("state", flat=True)) == {OrderState.CLOSED}
    for number in crash.in_flight:
        # The second close learns what the first one did: ORDERCLOSED, so CLOSED (idempotent), not an error.
        dead, finished = CloseAttempt.objects.filter(out_trade_no=number).order_by("started_at")
        assert not dead.is_finished and finished.outcome == Outcome.ALREADY_CLOSED
        assert simulator.close_requests_for(number) == 2
    for number in crash.written_ahead:  # its first request never left: the next run's is its only one
        dead, finished = CloseAttempt.objects.filter(out_trade_no=number).order_by("started_at")
        assert not dead.is_finished and finished.outcome == Outcome.CLOSED
    for order in crash.orders:
        if order.out_trade_no not in crash.in_flight:
            assert simulator.close_requests_for(order.out_trade_no) == 1
    # The crash's rows stay unfinished for ever: the audit does not pretend to know their answers.
    assert set(CloseAttempt.objects.unfinished().values_list("out_trade_no", flat=True)) == set(
        crash.in_flight | crash.written_ahead)
    assert len(simulator.requests) == ORDERS + len(crash.in_flight)
    assert CloseAttempt.objects.count() == len(simulator.requests) + ROWS_AHEAD
    assert not Order.objects.filter(claim_token__isnull=False).exists()
    reliability_figures(
        orders=ORDERS, killed_with_requests_in_flight=len(crash.in_flight), claims_held_by_dead_process=len(crash.claimed),
        rows_written_ahead=len(crash.written_ahead), unfinished_audit_rows=CloseAttempt.objects.unfinished().count(),
        orders_lost=Order.objects.exclude(state=OrderState.CLOSED).count(),
        orders_double_closed=sum(1 for r in simulator.requests if r.closed) - ORDERS,
    )
