"""`manage.py wxpay_demo`: the quick start's main job, end to end, on the loopback simulator.

Creates a realistic mix of orders (expired and open, already paid at WeChat, already closed,
too young, hitting SYSTEMERROR first, unknown to WeChat, still in their payment window), runs
`close_expired_orders` twice (the second time after "fast-forwarding" the retry schedule), and
prints where every order ended and what the audit trail holds.
"""

from __future__ import annotations

import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.test.utils import override_settings
from django.utils import timezone

from django_wxpay_close.models import CloseAttempt, Order, OrderState
from django_wxpay_close.services import create_order
from django_wxpay_close.testing import Fault, WeChatPaySimulator
from django_wxpay_close.testing import OrderState as RemoteState

# (scenario, how many, state at WeChat (None: WeChat never heard of it), minutes since created, minutes to deadline)
SCENARIOS: list[tuple[str, int, RemoteState | None, int, int]] = [
    ("expired, unpaid", 6, RemoteState.NOTPAY, 60, -30),
    ("paid at WeChat", 2, RemoteState.PAID, 60, -30),
    ("closed at WeChat already", 2, RemoteState.CLOSED, 60, -30),
    ("SYSTEMERROR first", 2, RemoteState.NOTPAY, 60, -30),
    ("unknown to WeChat", 1, None, 60, -30),
    ("too young to close", 2, RemoteState.NOTPAY, 2, -1),
    ("still in payment window", 2, RemoteState.NOTPAY, 10, 20),
]


class Command(BaseCommand):
    help = "Run the sweep on a realistic mix of demo orders against the loopback WeChat Pay simulator."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--latency", type=float, default=0.05, help="Simulated WeChat latency in seconds.")

    def handle(self, *args: Any, **options: Any) -> None:
        merchant = settings.WXPAY_CLOSE["MERCHANTS"]["default"]
        with WeChatPaySimulator({merchant["MCH_ID"]: merchant["API_KEY"]}, latency=options["latency"]) as simulator:
            config = {**settings.WXPAY_CLOSE, "BASE_URL": simulator.base_url}
            with override_settings(WXPAY_CLOSE=config):
                orders = self._create_orders(simulator)
                self.stdout.write(self.style.MIGRATE_HEADING(
                    f"Simulator at {simulator.base_url}; {len(orders)} demo orders created. First sweep:"))
                self._sweep()
                retried = Order.objects.filter(pk__in=[o.pk for o, _ in orders], state=OrderState.OPEN,
                                               next_attempt_at__isnull=False)
                self.stdout.write(self.style.MIGRATE_HEADING(
                    f"Fast-forwarding to the retry time of {retried.count()} orders. Second sweep:"))
                retried.update(next_attempt_at=timezone.now())
                self._sweep()
                self._show(orders, requests_seen=len(simulator.requests))

    def _create_orders(self, simulator: WeChatPaySimulator) -> list[tuple[Order, str]]:
        prefix = timezone.now().strftime("D%m%d%H%M%S")
        now = timezone.now()
        created: list[tuple[Order, str]] = []
        for scenario_number, (scenario, count, remote, age, deadline) in enumerate(SCENARIOS):
            for n in range(count):
                order = create_order(
                    out_trade_no=f"{prefix}-{scenario_number}{n}", amount=100 * (n + 1), currency="HKD",
                    created_at=now - timedelta(minutes=age), payment_deadline=now + timedelta(minutes=deadline),
                )
                if remote is not None:
                    simulator.add_order(order.out_trade_no, mch_id=order.mch_id, sub_mch_id=order.sub_mch_id,
                                        state=remote)
                if scenario == "SYSTEMERROR first":
                    simulator.inject(Fault.SYSTEMERROR, out_trade_no=order.out_trade_no)
                created.append((order, scenario))
        return created

    def _sweep(self) -> None:
        try:
            call_command("close_expired_orders", progress="none", stdout=self.stdout, stderr=self.stderr)
        except CommandError as exc:
            self.stderr.write(self.style.ERROR(str(exc)))

    def _show(self, orders: list[tuple[Order, str]], *, requests_seen: int) -> None:
        self.stdout.write(self.style.MIGRATE_HEADING("Where every order ended:"))
        self.stdout.write(f"{'out_trade_no':<18} {'scenario':<26} {'state':<24} {'attempts':>8}  last outcome")
        for order, scenario in orders:
            order.refresh_from_db()
            self.stdout.write(
                f"{order.out_trade_no:<18} {scenario:<26} {order.get_state_display():<24} "
                f"{order.attempt_count:>8}  {order.last_outcome or '-'}"
            )
        attempts = CloseAttempt.objects.filter(order__in=[o for o, _ in orders])
        self.stdout.write(
            f"\nThe simulator received {requests_seen} closeorder requests; the audit trail holds "
            f"{attempts.count()} rows ({attempts.unfinished().count()} unfinished)."
        )
        python = Path(sys.executable).relative_to(Path.cwd()) if Path(sys.executable).is_relative_to(Path.cwd()) else "python"
        self.stdout.write(
            f"Browse them in the admin (see the README): {python} -m django_wxpay_close.testing --port 8765 & "
            f"{python} manage.py createsuperuser; {python} manage.py runserver; open http://127.0.0.1:8000/admin/"
        )
