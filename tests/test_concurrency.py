"""Several real sweeper processes and the admin action close one backlog at once: nothing lost, nothing sent twice.

PostgreSQL only (row locks, SKIP LOCKED, several processes on one database). Run it alone, with its figures:
    DATABASE_URL=postgres://postgres@127.0.0.1:5432/wxpay_close python -m pytest tests/test_concurrency.py -s
"""

from __future__ import annotations

import io
import json
import random
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import pytest
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.db import connection
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from django_wxpay_close.models import ALLOWED_TRANSITIONS, CloseAttempt, Order, OrderState, Trigger
from django_wxpay_close.testing import APPID, MCH_ID, SUB_MCH_ID, Fault, OrderKey, RecordedRequest, WeChatPaySimulator
from django_wxpay_close.testing import OrderState as RemoteState

from .conftest import wait_for

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

ORDERS = 3000
PROCESSES = 4
WORKERS_PER_PROCESS = 6
ADMIN_BATCHES = 6
ADMIN_BATCH_SIZE = 100

# What the simulator's final state means locally (docs/protocol.md#outcomes): a closed order is CLOSED, a paid one PAID.
LOCAL_STATE_FOR = {RemoteState.CLOSED: OrderState.CLOSED, RemoteState.PAID: OrderState.PAID}


@dataclass
class Backlog:
    orders: list[Order]
    initially: dict[str, RemoteState]  # out_trade_no → state at WeChat before the sweep
    faults: dict[str, int] = field(default_factory=dict)  # out_trade_no → SYSTEMERRORs injected


def make_backlog(simulator: WeChatPaySimulator, size: int) -> Backlog:
    """`size` expired orders: 10% already PAID at WeChat, 10% already CLOSED, 10% answer SYSTEMERROR once first."""
    now = timezone.now()
    initially: dict[str, RemoteState] = {}
    faults: dict[str, int] = {}
    orders = []
    for n in range(size):
        number = f"C{n:06d}"
        deadline = now - timedelta(minutes=60) + timedelta(seconds=n)
        orders.append(Order(
            merchant="default", appid=APPID, mch_id=MCH_ID, sub_mch_id=SUB_MCH_ID, out_trade_no=number,
            created_at=now - timedelta(hours=2), payment_deadline=deadline, due_at=deadline,
        ))
        initially[number] = {0: RemoteState.PAID, 1: RemoteState.CLOSED}.get(n % 10, RemoteState.NOTPAY)
        if n % 10 == 2:
            faults[number] = 1
    Order.objects.bulk_create(orders, batch_size=1000)
    for state in RemoteState:
        simulator.add_orders([no for no, s in initially.items() if s is state], mch_id=MCH_ID, sub_mch_id=SUB_MCH_ID,
                             state=state)
    for number, times in faults.items():
        simulator.inject(Fault.SYSTEMERROR, out_trade_no=number, times=times)
    return Backlog(list(Order.objects.order_by("payment_deadline", "pk")), initially, faults)


class StateWatcher:
    """Snapshots every order's state while the sweep runs and records any change the transition table forbids."""

    def __init__(self, interval: float = 0.1) -> None:
        self.interval = interval
        self.snapshots = 0
        self.backwards: list[tuple[int, str, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="state-watcher", daemon=True)

    def __enter__(self) -> StateWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        previous: dict[int, str] = {}
        try:
            while True:
                current: dict[int, str] = dict(Order.objects.values_list("pk", "state"))
                self.snapshots += 1
                for pk, state in current.items():
                    before = previous.get(pk, state)
                    if state != before and state not in ALLOWED_TRANSITIONS[before]:
                        self.backwards.append((pk, before, state))
                previous = current
                if self._stop.wait(self.interval):
                    break
        finally:
            connection.close()


def admin_close(client: Client, order_ids: list[int]) -> int:
    """The admin action "Close selected orders", confirmed, as a logged-in superuser posts it."""
    response = client.post(reverse("admin:django_wxpay_close_order_changelist"), {
        "action": "close_selected_orders", "_selected_action": [str(pk) for pk in order_ids], "confirm": "yes",
    })
    return response.status_code




def answer_of(attempt: CloseAttempt) -> str:
    """The simulator's name for the answer an audit row recorded ("SUCCESS" or the err_code)."""
    return "SUCCESS" if attempt.result_code == "SUCCESS" and not attempt.err_code else attempt.err_code


def requests_by_order(simulator: WeChatPaySimulator) -> dict[str, list[RecordedRequest]]:
    grouped: dict[str, list[RecordedRequest]] = defaultdict(list)
    for request in simulator.requests:
        grouped[request.out_trade_no].append(request)
    return grouped


def attempts_by_order() -> dict[str, list[CloseAttempt]]:
    grouped: dict[str, list[CloseAttempt]] = defaultdict(list)
    for attempt in CloseAttempt.objects.order_by("started_at", "pk"):
        grouped[attempt.out_trade_no].append(attempt)
    return grouped


@pytest.fixture
def admin_client_logged_in(transactional_db: None) -> Client:
    user = get_user_model().objects.create_superuser("ops", "ops@example.com", "not-a-secret")
    client = Client()
    client.force_login(user)
    return client


@pytest.fixture
def sweep_settings(wxpay_settings: dict[str, Any]) -> dict[str, Any]:
    # Generous read timeout: two CPUs run four sweepers, the admin and the simulator; a timeout here would be a
    # legitimate retry but would blur the one-request-per-order count this test is about.
    wxpay_settings.update(READ_TIMEOUT=10.0, CLAIM_TIMEOUT=timedelta(seconds=30), RETRY_BACKOFF=timedelta(seconds=1),
                          MAX_ATTEMPTS=3, WORKERS=8)
    return wxpay_settings


@pytest.fixture
def backlog(simulator: WeChatPaySimulator, sweep_settings: dict[str, Any], transactional_db: None) -> Iterator[Backlog]:
    yield make_backlog(simulator, ORDERS)


def test_sweeper_processes_and_the_admin_action_close_a_shared_backlog_once_each(
    backlog: Backlog, simulator: WeChatPaySimulator, start_sweeper: Callable[..., Any],
    admin_client_logged_in: Client, reliability_figures: Callable[..., None],
) -> None:
    started = time.monotonic()
    # The admin picks orders among the oldest half, where the sweepers start: they race for the same rows.
    picked = random.Random(4).sample(backlog.orders[: ORDERS // 2], ADMIN_BATCHES * ADMIN_BATCH_SIZE)
    with StateWatcher() as watcher:
        sweepers = [start_sweeper("--workers", str(WORKERS_PER_PROCESS), "--batch-size", "25")
                    for _ in range(PROCESSES)]
        wait_for(lambda: len(simulator.requests) > 0, timeout=20)
        admin_statuses = [admin_close(admin_client_logged_in, [o.pk for o in picked[i:i + ADMIN_BATCH_SIZE]])
                          for i in range(0, len(picked), ADMIN_BATCH_SIZE)]
        outputs = [sweeper.communicate(timeout=60) for sweeper in sweepers]
        swept_concurrently = time.monotonic() - started
        # SYSTEMERROR orders are due again after RETRY_BACKOFF; sweep until nothing is left (a later cron run).
        for _ in range(3):
            if not Order.objects.filter(state=OrderState.OPEN).exists():
                break
            time.sleep(1.1)
            call_command("close_expired_orders", "--json", stdout=io.StringIO())

    assert [sweeper.returncode for sweeper in sweepers] == [0] * PROCESSES, [err for _, err in outputs]
    summaries = [json.loads(out) for out, _ in outputs]
    assert all(summary["ok"] for summary in summaries)
    assert admin_statuses == [302] * ADMIN_BATCHES

    requests = requests_by_order(simulator)
    attempts = attempts_by_order()
    final = {o.out_trade_no: o for o in Order.objects.all()}

    # Every order ends in the state WeChat (the simulator) says is true; none is left open.
    truth = {number: simulator.order_state(number, mch_id=MCH_ID, sub_mch_id=SUB_MCH_ID) for number in final}
    assert RemoteState.NOTPAY not in set(truth.values())
    assert {n: o.state for n, o in final.items()} == {n: LOCAL_STATE_FOR.get(s) for n, s in truth.items()}
    assert {n for n, s in truth.items() if s is RemoteState.PAID} == {
        n for n, s in backlog.initially.items() if s is RemoteState.PAID}

    # At most one closeorder per order per attempt window, counted server-side: each order got one request,
    # plus one per SYSTEMERROR it was given, and each request arrived inside its own, non-overlapping audit window.
    counts = simulator.close_request_counts()
    expected_counts = {OrderKey(MCH_ID, SUB_MCH_ID, n): 1 + backlog.faults.get(n, 0) for n in final}
    assert counts == expected_counts
    for number, received in requests.items():
        windows = attempts[number]
        assert len(windows) == len(received)
        for window, request in zip(windows, received):
            assert window.started_at.timestamp() <= request.received_at <= window.completed_at.timestamp()
        for earlier, later in zip(windows, windows[1:]):
            assert earlier.completed_at <= later.started_at, f"two closes in flight for {number}"

    # Every exchange the simulator saw has exactly one completed audit row with its answer, and no row lacks one.
    assert not CloseAttempt.objects.unfinished().exists()
    assert CloseAttempt.objects.count() == len(simulator.requests)
    assert {n: [answer_of(a) for a in rows] for n, rows in attempts.items()} == {
        n: [r.answer for r in received] for n, received in requests.items()}

    # No order is both PAID and CLOSED; none went backwards; nothing was sent once an order was final.
    assert not Order.objects.filter(closed_at__isnull=False, paid_at__isnull=False).exists()
    assert not Order.objects.filter(state=OrderState.CLOSED, closed_at__isnull=True).exists()
    assert not Order.objects.filter(state=OrderState.PAID, paid_at__isnull=True).exists()
    assert watcher.backwards == [] and watcher.snapshots > 1
    for number, order in final.items():
        assert all(a.started_at <= order.state_changed_at for a in attempts[number]), number
    closes_applied = sum(1 for r in simulator.requests if r.closed)
    assert closes_applied == sum(1 for s in backlog.initially.values() if s is RemoteState.NOTPAY)

    by_admin = CloseAttempt.objects.filter(trigger=Trigger.ADMIN).count()
    assert by_admin > 0, "the admin action never won a race; the test did not test what it claims"
    reliability_figures(
        orders=ORDERS, sweeper_processes=PROCESSES, workers_per_process=WORKERS_PER_PROCESS,
        admin_requests=ADMIN_BATCHES, admin_orders_selected=len(picked), closes_sent_by_admin=by_admin,
        closes_sent_by_sweepers=CloseAttempt.objects.filter(trigger=Trigger.COMMAND).count(),
        requests_seen_by_simulator=len(simulator.requests), systemerrors_injected=sum(backlog.faults.values()),
        remote_paid=sum(1 for s in backlog.initially.values() if s is RemoteState.PAID),
        remote_closed=sum(1 for s in backlog.initially.values() if s is RemoteState.CLOSED),
        state_snapshots=watcher.snapshots, seconds_concurrent_phase=round(swept_concurrently, 1),
        orders_lost=sum(1 for o in final.values() if o.state == OrderState.OPEN),
        orders_double_closed=sum(1 for n in final if sum(r.closed for r in requests[n]) > 1),
        requests_beyond_one_per_window=sum(counts.values()) - sum(expected_counts.values()),
        states_gone_backwards=len(watcher.backwards),
    )
