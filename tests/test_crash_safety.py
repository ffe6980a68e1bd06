"""A sweeper killed with SIGKILL mid-request: at most WORKERS unfinished rows, claims that lapse, and a next run
that finishes its orders and settles those rows as abandoned.

PostgreSQL and MariaDB: a real `manage.py close_expired_orders` process shares the test database.

What is provable after a SIGKILL: the audit row is written before the request leaves, so every request the
simulator received has a row; a row is completed only with an answer the process received, so a request
whose answer had not been sent when the process died stays unfinished. A worker writes its next row only
after the answer of its last one, so a killed sweeper leaves at most one unfinished row per worker. Killing
while every worker waits on the simulator's latency (before the first answer could leave) makes the
unfinished rows exactly the requests in flight.
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
from django_wxpay_close.services import ABANDONED
from django_wxpay_close.services.engine import MAX_UNFINISHED
from django_wxpay_close.testing import MCH_ID, SUB_MCH_ID, WeChatPaySimulator
from django_wxpay_close.testing import OrderState as RemoteState
from django_wxpay_close.wechat import Outcome

from .conftest import wait_for

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

ORDERS = 80
WORKERS = 32
# Seconds every answer waits; the simulator applies the close when the request arrives. Long enough that on a
# loaded machine all the workers' requests arrive, and the kill follows, before the first answer could leave.
LATENCY = 3.0
CLAIM_TIMEOUT = timedelta(seconds=6)  # must exceed CONNECT_TIMEOUT + READ_TIMEOUT (conf.py E010)


@dataclass(frozen=True)
class Crash:
    killed_at: float  # time.time()
    in_flight: frozenset[str]  # out_trade_nos the simulator received and had not answered at the kill
    written_ahead: frozenset[str]  # claimed, audit row written, request not yet sent at the kill
    claimed: frozenset[str]  # orders the dead process still held a claim on
    orders: tuple[Order, ...]




def sweep() -> None:
    """The next cron run, in this process."""
    call_command("close_expired_orders", "--json", stdout=io.StringIO())


@pytest.fixture
def crash(wxpay_settings: dict[str, Any], simulator: WeChatPaySimulator, make_order: Callable[..., Order],
          start_sweeper: Callable[..., Any]) -> Crash:
    """A sweeper killed with SIGKILL while all its workers wait for answers."""
    wxpay_settings.update(CONNECT_TIMEOUT=0.5, READ_TIMEOUT=LATENCY + 1, CLAIM_TIMEOUT=CLAIM_TIMEOUT)
    orders = tuple(make_order() for _ in range(ORDERS))
    simulator.latency = LATENCY
    sweeper = start_sweeper("--workers", str(WORKERS))
    wait_for(lambda: len(simulator.requests) >= WORKERS, timeout=20)
    time.sleep(0.2)  # a worker sends nothing more until its answer comes: the kill finds them all waiting
    os.kill(sweeper.pid, signal.SIGKILL)
    killed_at = time.time()
    sweeper.wait()
    simulator.latency = 0.0
    received = simulator.requests
    assert all(r.received_at + LATENCY > killed_at for r in received), "an answer left before the kill"
    claimed = Order.objects.filter(in_flight=True, due_at__gt=timezone.now()).values_list("out_trade_no", flat=True)
    in_flight = frozenset(r.out_trade_no for r in received)
    unfinished = frozenset(CloseAttempt.objects.unfinished().values_list("out_trade_no", flat=True))
    return Crash(killed_at, in_flight, unfinished - in_flight, frozenset(claimed), orders)


def test_a_killed_sweeper_leaves_at_most_three_unfinished_rows_per_worker_one_in_flight_and_two_written_ahead(
    crash: Crash, simulator: WeChatPaySimulator,
):
    unfinished = CloseAttempt.objects.unfinished()
    assert unfinished.count() <= MAX_UNFINISHED * WORKERS
    assert len(crash.in_flight) == WORKERS
    # Not lost: every request WeChat received has its row. The others were claimed and waited for a worker.
    assert set(unfinished.values_list("out_trade_no", flat=True)) == crash.in_flight | crash.written_ahead
    assert CloseAttempt.objects.count() == unfinished.count() == len(simulator.requests) + len(crash.written_ahead)
    assert len(crash.written_ahead) <= (MAX_UNFINISHED - 1) * WORKERS
    assert all(a.outcome == "" and a.http_status is None for a in unfinished)
    assert crash.written_ahead <= crash.claimed
    # WeChat did close them (the answers never arrived); locally they are still open, and still claimed.
    for number in crash.in_flight:
        assert simulator.order_state(number, mch_id=MCH_ID, sub_mch_id=SUB_MCH_ID) is RemoteState.CLOSED
    assert crash.in_flight <= crash.claimed
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
    wait_for(lambda: not Order.objects.filter(in_flight=True, due_at__gt=timezone.now()).exists(),
             timeout=CLAIM_TIMEOUT.total_seconds() + 2)

    sweep()

    assert set(Order.objects.values_list("state", flat=True)) == {OrderState.CLOSED}
    for number in crash.in_flight:
        # The second close learns what the first one did: ORDERCLOSED, so CLOSED (idempotent), not an error;
        # the dead process's row is settled as abandoned: no answer is invented for it.
        dead, finished = CloseAttempt.objects.filter(out_trade_no=number).order_by("started_at", "pk")
        assert dead.is_finished and dead.reason == ABANDONED and dead.outcome == "" and dead.http_status is None
        assert finished.outcome == Outcome.ALREADY_CLOSED
        assert simulator.close_requests_for(number) == 2
    for number in crash.written_ahead:  # never sent before the kill: its row settled, then closed once
        dead, finished = CloseAttempt.objects.filter(out_trade_no=number).order_by("started_at", "pk")
        assert dead.reason == ABANDONED and finished.outcome == Outcome.CLOSED
    for order in crash.orders:
        if order.out_trade_no not in crash.in_flight:
            assert simulator.close_requests_for(order.out_trade_no) == 1
    assert not CloseAttempt.objects.unfinished().exists()
    assert len(simulator.requests) == ORDERS + len(crash.in_flight)
    assert CloseAttempt.objects.count() == ORDERS + len(crash.in_flight) + len(crash.written_ahead)
    assert not Order.objects.filter(in_flight=True).exists()
    reliability_figures(
        orders=ORDERS, workers=WORKERS, killed_with_requests_in_flight=len(crash.in_flight),
        rows_written_ahead=len(crash.written_ahead),
        claims_held_by_dead_process=len(crash.claimed),
        rows_settled_as_abandoned=CloseAttempt.objects.filter(reason=ABANDONED).count(),
        unfinished_audit_rows=CloseAttempt.objects.unfinished().count(),
        orders_lost=Order.objects.exclude(state=OrderState.CLOSED).count(),
        orders_double_closed=sum(1 for r in simulator.requests if r.closed) - ORDERS,
    )
