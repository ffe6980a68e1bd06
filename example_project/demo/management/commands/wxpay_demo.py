"""`manage.py wxpay_demo`: the quick start's main job, end to end, on the loopback simulator.

Creates a realistic mix of orders (expired and open, already paid at WeChat, already closed, too young,
hitting SYSTEMERROR first, answered with an unsigned body that a query then settles, unknown to WeChat, still in
their payment window), runs `close_expired_orders` twice (the second time after "fast-forwarding" the retry schedule), and prints where every order ended
beside where its scenario says it should, and what the audit trail holds.

Each run stands alone. `--fresh-database` (scripts/demo passes it on SQLite) deletes the SQLite file and
migrates. Without it the demo refuses a database that holds orders already: the sweep would take an earlier
run's orders too (or a real shop's), and this run's figures would no longer add up.

Exit status: 0 when both sweeps exited 0 and every figure adds up (each order ended where its scenario says;
one audit row per request the simulator received, none unfinished). Otherwise the first non-zero exit
status of a sweep (see close_expired_orders), or 1.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import DEFAULT_DB_ALIAS, connections
from django.test.utils import override_settings
from django.utils import timezone

from django_wxpay_close.conf import load_settings
from django_wxpay_close.reports import (
    EXIT_ATTENTION,
    EXIT_CONFIGURATION,
    EXIT_DATABASE,
    EXIT_FAILED,
    EXIT_UNREACHABLE,
)
from django_wxpay_close.models import CloseAttempt, Order, OrderState
from django_wxpay_close.services import create_order
from django_wxpay_close.testing import Fault, WeChatPaySimulator
from django_wxpay_close.testing import OrderState as RemoteState

# What close_expired_orders' exit statuses mean (its module docstring), for the demo's own words.
SWEEP_EXIT_MEANINGS: dict[int, str] = {
    0: "no problem (orders whose close will be retried are not one)",
    EXIT_FAILED: "an unexpected failure, or an answer that came after another sweeper had taken its order over",
    2: "bad command-line arguments",
    EXIT_CONFIGURATION: "a configuration error",
    EXIT_ATTENTION: "orders were put on hold: a person must look",
    EXIT_DATABASE: "the database became unavailable mid-run",
    EXIT_UNREACHABLE: "WeChat looked unreachable, so the run stopped early",
}


@dataclass(frozen=True)
class Scenario:
    name: str
    count: int
    remote: RemoteState | None  # the order's state at WeChat; None: WeChat never heard of it
    age: timedelta  # since the order was created
    deadline: timedelta  # from now to the end of its payment window (negative: passed)
    ends: OrderState  # where the order must be after both sweeps
    fault: Fault | None = None  # what WeChat answers the first close instead


MINUTE = timedelta(minutes=1)
SCENARIOS: list[Scenario] = [
    Scenario("expired, unpaid", 6, RemoteState.NOTPAY, 60 * MINUTE, -30 * MINUTE, OrderState.CLOSED),
    Scenario("paid at WeChat", 2, RemoteState.PAID, 60 * MINUTE, -30 * MINUTE, OrderState.PAID),
    Scenario("closed at WeChat already", 2, RemoteState.CLOSED, 60 * MINUTE, -30 * MINUTE, OrderState.CLOSED),
    Scenario("SYSTEMERROR first", 2, RemoteState.NOTPAY, 60 * MINUTE, -30 * MINUTE, OrderState.CLOSED,
             fault=Fault.SYSTEMERROR),
    # An unsigned answer cannot be believed: instead of putting the order on hold, the second sweep asks WeChat
    # (orderquery), and its signed answer settles the order: closed (by someone before us), or paid.
    Scenario("unsigned answer, closed", 1, RemoteState.CLOSED, 60 * MINUTE, -30 * MINUTE, OrderState.CLOSED,
             fault=Fault.UNSIGNED),
    Scenario("unsigned answer, paid", 1, RemoteState.PAID, 60 * MINUTE, -30 * MINUTE, OrderState.PAID,
             fault=Fault.UNSIGNED),
    # Retried with backoff; it becomes "never known to WeChat" only after MAX_ATTEMPTS, beyond this demo.
    Scenario("unknown to WeChat", 1, None, 60 * MINUTE, -30 * MINUTE, OrderState.OPEN),
    Scenario("too young to close", 2, RemoteState.NOTPAY, 2 * MINUTE, -1 * MINUTE, OrderState.OPEN),
    Scenario("still in payment window", 2, RemoteState.NOTPAY, 10 * MINUTE, 20 * MINUTE, OrderState.OPEN),
]


class Command(BaseCommand):
    help = "Run the sweep on a realistic mix of demo orders against the loopback WeChat Pay simulator."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--latency", type=float, default=0.05, help="Simulated WeChat latency in seconds.")
        parser.add_argument(
            "--fresh-database", action="store_true",
            help="Start from an empty SQLite database: delete its file (earlier runs' orders and users with it) "
                 "and migrate. Without it, a database that holds orders already is refused.",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        if options["fresh_database"]:
            self._fresh_database()
        earlier = Order.objects.count()
        if earlier:
            raise CommandError(
                f"The database already holds {earlier} {'order' if earlier == 1 else 'orders'} (an earlier demo "
                "run's?): the sweep would take them too, and this run's figures would mix them in. scripts/demo "
                "starts from a fresh example.sqlite3; or run `manage.py wxpay_demo --fresh-database` (SQLite), or "
                "point DATABASE_URL at an empty database."
            )
        merchant = settings.WXPAY_CLOSE["MERCHANTS"]["default"]
        with WeChatPaySimulator({merchant["MCH_ID"]: merchant["API_KEY"]}, latency=options["latency"]) as simulator:
            config = {**settings.WXPAY_CLOSE, "BASE_URL": simulator.base_url, "FAILOVER_BASE_URL": None}
            with override_settings(WXPAY_CLOSE=config):
                orders = self._create_orders(simulator)
                self.stdout.write(self.style.MIGRATE_HEADING(
                    f"Simulator at {simulator.base_url}; {len(orders)} demo orders created. First sweep:"))
                statuses = [self._sweep()]
                retried = Order.objects.filter(pk__in=[o.pk for o, _ in orders], state=OrderState.OPEN,
                                               attempt_count__gt=0)
                self.stdout.write(self.style.MIGRATE_HEADING(
                    f"Fast-forwarding to the retry time of {retried.count()} orders. Second sweep:"))
                retried.update(due_at=timezone.now())
                statuses.append(self._sweep())
                problems = self._show(orders, requests_received=len(simulator.requests))
        self._show_walkthrough(orders)
        failed = [status for status in statuses if status]
        if failed:
            problems.insert(0, "close_expired_orders exited " + " and ".join(str(status) for status in statuses))
        if problems:
            raise CommandError("The demo did not go as its scenarios say: " + "; ".join(problems),
                               returncode=failed[0] if failed else 1)
        self.stdout.write(self.style.SUCCESS(
            "Demo passed: both sweeps exited 0, every order ended where its scenario says, and every request "
            "the simulator received has its audit row."))

    def _fresh_database(self) -> None:
        connection = connections[DEFAULT_DB_ALIAS]
        if connection.vendor != "sqlite":
            raise CommandError(
                f"--fresh-database deletes an SQLite file, and this database is {connection.vendor}: point "
                "DATABASE_URL at an empty database instead (the demo refuses one that holds orders).")
        name = str(connection.settings_dict["NAME"])
        connection.close()
        if name and name != ":memory:" and not name.startswith("file:"):
            path = Path(name)
            for stale in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
                stale.unlink(missing_ok=True)
        call_command("migrate", verbosity=0, interactive=False)
        self.stdout.write(f"Started from a fresh database ({name}); an earlier run's orders and users are gone.")

    def _create_orders(self, simulator: WeChatPaySimulator) -> list[tuple[Order, Scenario]]:
        prefix = timezone.now().strftime("D%m%d%H%M%S")
        now = timezone.now()
        created: list[tuple[Order, Scenario]] = []
        for scenario_number, scenario in enumerate(SCENARIOS):
            for n in range(scenario.count):
                order = create_order(
                    out_trade_no=f"{prefix}-{scenario_number}{n}", amount=100 * (n + 1), currency="HKD",
                    created_at=now - scenario.age, payment_deadline=now + scenario.deadline,
                )
                if scenario.remote is not None:  # what a query reports once it is paid: the order's amount
                    simulator.add_order(order.out_trade_no, mch_id=order.mch_id, sub_mch_id=order.sub_mch_id,
                                        state=scenario.remote, total_fee=order.amount or 0, fee_type=order.currency)
                if scenario.fault is not None:
                    simulator.inject(scenario.fault, out_trade_no=order.out_trade_no, times=1)
                created.append((order, scenario))
        return created

    def _sweep(self) -> int:
        """Runs the cron command as cron would; returns its exit status, said in words."""
        try:
            call_command("close_expired_orders", progress="none", stdout=self.stdout, stderr=self.stderr)
        except CommandError as exc:
            meaning = SWEEP_EXIT_MEANINGS.get(exc.returncode, "see close_expired_orders --help")
            self.stderr.write(self.style.ERROR(f"close_expired_orders exited {exc.returncode}: {meaning}. {exc}"))
            return exc.returncode
        self.stdout.write(f"close_expired_orders exited 0: {SWEEP_EXIT_MEANINGS[0]}.")
        return 0

    def _show(self, orders: list[tuple[Order, Scenario]], *, requests_received: int) -> list[str]:
        """Prints the table and the audit figures; returns what does not add up (nothing, normally)."""
        problems: list[str] = []
        self.stdout.write(self.style.MIGRATE_HEADING("Where every order ended:"))
        self.stdout.write(f"{'out_trade_no':<18} {'scenario':<26} {'state':<24} {'requests':>8}  last answer")
        for order, scenario in orders:
            order.refresh_from_db()
            last = order.close_attempts.order_by("-pk").first()
            answer = f"{last.api}: {order.last_outcome}" if last is not None and order.last_outcome else "-"
            self.stdout.write(
                f"{order.out_trade_no:<18} {scenario.name:<26} {order.get_state_display():<24} "
                f"{order.attempt_count:>8}  {answer}"
            )
            if order.state != scenario.ends:
                problems.append(f"{order.out_trade_no} ({scenario.name}) is {order.get_state_display()}, "
                                f"expected {scenario.ends.label}")
        if not problems:
            self.stdout.write(f"All {len(orders)} orders ended where their scenario says.")
        attempts = CloseAttempt.objects.filter(order__in=[o for o, _ in orders])
        rows, unfinished = attempts.count(), attempts.unfinished().count()
        queries = attempts.filter(api="orderquery").count()
        if rows == requests_received and not unfinished:
            self.stdout.write(
                f"The simulator received {requests_received} requests ({rows - queries} closeorder, {queries} "
                f"orderquery) and the audit trail holds {rows} rows for this run's orders: one per request, none "
                "unfinished.")
        else:
            problems.append(f"the simulator received {requests_received} requests, but the audit trail holds {rows} "
                            f"rows for this run's orders ({unfinished} unfinished)")
        return problems

    def _show_walkthrough(self, orders: list[tuple[Order, Scenario]]) -> None:
        executable = Path(sys.executable)
        python = executable.relative_to(Path.cwd()) if executable.is_relative_to(Path.cwd()) else "python"
        still_open = [order for order, _ in orders if order.state == OrderState.OPEN]
        min_order_age, now = load_settings().min_order_age, timezone.now()
        # The admin action skips an order younger than MIN_ORDER_AGE, with that reason; say when that ends.
        young = [order for order in still_open if order.created_at + min_order_age > now]
        when = ""
        if young:
            closable_from = max(order.created_at for order in young) + min_order_age
            when = (f"; it skips the {len(young)} younger than MIN_ORDER_AGE until "
                    f"{timezone.localtime(closable_from):%H:%M:%S %Z}")
        self.stdout.write(self.style.MIGRATE_HEADING(
            f"Click through them in the admin. {len(still_open)} are still open: select them, and "
            f"\"Close selected orders\" closes them{when}."))
        # The README's walkthrough, word for word.
        for command, comment in [
            ("-m django_wxpay_close.testing --port 8765 &", "the simulator the example settings point at"),
            ("manage.py createsuperuser", ""),
            ("manage.py runserver", "then open http://127.0.0.1:8000/admin/"),
        ]:
            line = f"  {python} {command}"
            self.stdout.write(f"{line:<64} # {comment}" if comment else line)
