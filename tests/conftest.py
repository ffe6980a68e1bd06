"""Shared fixtures: the loopback simulator wired into WXPAY_CLOSE, and an order factory."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from django.db import connection
from django.utils import timezone

from django_wxpay_close.models import Order
from django_wxpay_close.services import close_order
from django_wxpay_close.testing import API_KEY, APPID, MCH_ID, SUB_MCH_ID, Fault, OrderState, WeChatPaySimulator

# The fixtures of django_wxpay_close.testing.pytest_plugin (wxpay_simulator, wxpay_close_settings) come from its
# pytest11 entry point, as in any project that installs the package (scripts/test runs `pip install -e`).

OTHER_MCH_ID = "10000200"
OTHER_API_KEY = "OTHERKEY0OTHERKEY1OTHERKEY2OTHER"


DATABASE_FIXTURES = frozenset({"db", "transactional_db", "django_db_setup"})


def same_on_every_backend(item: pytest.Item) -> bool:
    """Uses no database, or is a browser test (the admin's layout)."""
    uses_database = bool(DATABASE_FIXTURES & set(getattr(item, "fixturenames", ()))) or bool(
        item.get_closest_marker("django_db"))
    return not uses_database or "browser" in item.keywords


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """`postgres`-marked tests need a server database with row locks and SKIP LOCKED that several processes
    share: PostgreSQL, or MariaDB 10.6+ / MySQL 8 (vendor "mysql"; they pass there too). Elsewhere (SQLite) they
    skip with their reason; scripts/test runs them on PostgreSQL (and fails under CI=true when PostgreSQL cannot be
    reached). The vendor decides, not connection.features: collection may not touch the database.

    With WXPAY_TESTS_BACKEND_ONLY=1 (scripts/test's passes after the first) only what can differ between backends
    runs: not the tests that use no database (the wire client, the simulator, the settings checks), nor the
    browser's layout tests.
    """
    if os.environ.get("WXPAY_TESTS_BACKEND_ONLY") == "1":
        config.hook.pytest_deselected(items=[item for item in items if same_on_every_backend(item)])
        items[:] = [item for item in items if not same_on_every_backend(item)]
    if connection.vendor in ("postgresql", "mysql"):
        return
    skip = pytest.mark.skip(reason=f"needs PostgreSQL or MariaDB (row locks, SKIP LOCKED), this run uses {connection.vendor} "
                                   "(scripts/test runs a PostgreSQL pass)")
    for item in items:
        if "postgres" in item.keywords:
            item.add_marker(skip)


def merchant_config(mch_id: str = MCH_ID, api_key: str = API_KEY, **overrides: Any) -> dict[str, Any]:
    return {"APPID": APPID, "MCH_ID": mch_id, "SUB_MCH_ID": SUB_MCH_ID, "API_KEY": api_key,
            "SIGN_TYPE": "HMAC-SHA256", **overrides}


@pytest.fixture
def simulator() -> Iterator[WeChatPaySimulator]:
    with WeChatPaySimulator({MCH_ID: API_KEY, OTHER_MCH_ID: OTHER_API_KEY}) as sim:
        yield sim


@pytest.fixture
def wxpay_settings(settings: Any, simulator: WeChatPaySimulator) -> dict[str, Any]:
    """WXPAY_CLOSE pointing at the simulator, the example project's timeouts, no backoff wait worth mentioning.

    The timeouts are generous on purpose: on a loaded machine (CI runs two passes at once on two CPUs) a loopback
    answer can take a second, and a timeout would turn an answer a test is about into a network error. A test
    about a timeout sets its own short one beside the delay it injects.
    """
    settings.WXPAY_CLOSE = {
        "MERCHANTS": {"default": merchant_config(), "other": merchant_config(OTHER_MCH_ID, OTHER_API_KEY)},
        "BASE_URL": simulator.base_url,
        "CONNECT_TIMEOUT": 2.0,
        "READ_TIMEOUT": 5.0,
        "CLAIM_TIMEOUT": timedelta(seconds=30),
        "MAX_ATTEMPTS": 3,
        "WORKERS": 4,
    }
    return settings.WXPAY_CLOSE


@pytest.fixture
def make_order(wxpay_settings: dict[str, Any], simulator: WeChatPaySimulator, transactional_db: None
               ) -> Callable[..., Order]:
    """An order that expired 10 minutes ago (created an hour ago), known to the simulator as `remote`."""
    counter = iter(range(1, 1_000_000))

    def make(
        out_trade_no: str | None = None, *, merchant: str = "default", remote: OrderState | None = OrderState.NOTPAY,
        age: timedelta = timedelta(hours=1), expired_for: timedelta = timedelta(minutes=10), **fields: Any,
    ) -> Order:
        now = timezone.now()
        number = out_trade_no or f"T{next(counter):05d}"
        mch_id = wxpay_settings["MERCHANTS"][merchant]["MCH_ID"]
        order = Order.objects.create(
            merchant=merchant, appid=APPID, mch_id=mch_id, sub_mch_id=SUB_MCH_ID, out_trade_no=number,
            created_at=now - age, payment_deadline=now - expired_for, **fields,
        )
        if remote is not None:
            simulator.add_order(number, mch_id=mch_id, sub_mch_id=SUB_MCH_ID, state=remote)
        return order

    return make


@pytest.fixture
def on_postgres() -> bool:
    return connection.vendor == "postgresql"


# -- helpers for the reliability tests (tests/test_concurrency.py, test_crash_safety.py, ...) ------------------

ROOT = Path(__file__).resolve().parent.parent


def close_settings_as_json(wxpay: Mapping[str, Any]) -> str:
    """WXPAY_CLOSE for tests/subprocess_settings.py: durations become seconds (conf.py accepts numbers)."""
    return json.dumps({key: value.total_seconds() if isinstance(value, timedelta) else value
                       for key, value in wxpay.items()})


@pytest.fixture
def start_sweeper(wxpay_settings: dict[str, Any], transactional_db: None) -> Iterator[Callable[..., subprocess.Popen[str]]]:
    """Starts real `manage.py close_expired_orders [--json]` processes on this test's database and simulator.

    They read WXPAY_CLOSE as it is when started; any still running when the test ends are killed.
    """
    processes: list[subprocess.Popen[str]] = []

    def start(*args: str, as_json: bool = True, log_level: str = "WARNING",
              clock_offset: str | None = None) -> subprocess.Popen[str]:
        """`clock_offset` ("+150s"): the process runs with its host clock shifted (libfaketime)."""
        env = {
            **os.environ,
            "DJANGO_SETTINGS_MODULE": "tests.subprocess_settings",
            "WXPAY_TEST_DB_NAME": str(connection.settings_dict["NAME"]),
            "WXPAY_TEST_CLOSE": close_settings_as_json(wxpay_settings),
            "WXPAY_TEST_LOG_LEVEL": log_level,
        }
        shifted = ["faketime", "-f", clock_offset] if clock_offset else []
        process = subprocess.Popen(
            [*shifted, sys.executable, str(ROOT / "manage.py"), "close_expired_orders",
             *(["--json"] if as_json else []), *args],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        processes.append(process)
        return process

    yield start
    for process in processes:
        if process.poll() is None:
            process.kill()
        process.communicate()


def closed_at_the_second_try(order: Order, simulator: WeChatPaySimulator) -> Order:
    """`order` closed by its second exchange, the first answered SYSTEMERROR: two rows in its audit trail."""
    simulator.inject(Fault.SYSTEMERROR, out_trade_no=order.out_trade_no)
    close_order(order)  # refreshes `order`
    close_order(order)
    return order


def wait_for(condition: Callable[[], bool], timeout: float) -> None:
    """Poll `condition` until it holds; fail after `timeout` seconds (a test's bound, never a figure)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {condition}")
        time.sleep(0.02)


def require_faketime() -> None:
    """Skip (fail under CI=true) where libfaketime's `faketime` is missing: it shifts a process's clock."""
    if shutil.which("faketime"):
        return
    message = "needs faketime to shift a sweeper's clock: apt-get install faketime"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture
def reliability_figures(request: pytest.FixtureRequest) -> Callable[..., None]:
    """Prints one `RELIABILITY-FIGURES {json}` line (see with -s) and appends it to $WXPAY_RELIABILITY_FIGURES."""

    def record(**figures: Any) -> None:
        line = json.dumps({"test": request.node.name, "database": connection.vendor, **figures}, sort_keys=True)
        print(f"\nRELIABILITY-FIGURES {line}")
        path = os.environ.get("WXPAY_RELIABILITY_FIGURES")
        if path:
            with open(path, "a", encoding="utf-8") as stream:
                stream.write(line + "\n")

    return record


# -- faults injected where they happen: in the database ---------------------------------------------------------


@pytest.fixture
def database_fault(transactional_db: None) -> Iterator[Callable[..., None]]:
    """Makes the database itself fail (or stall) a write: a trigger on one of the app's tables.

    `database_fault("closeattempt", "UPDATE", out_trade_no=...)` fails the writes of an answer (an UPDATE that
    sets an outcome) for that order; "INSERT" fails the audit row's insert; `delay=1.5` stalls the write instead
    (PostgreSQL only): each transaction that writes such a row waits that long once, however many rows it writes.
    The error is one the service cannot mistake for a lost connection. Dropped afterwards.
    """
    created: list[tuple[str, str]] = []

    def inject(model: str, operation: str, *, out_trade_no: str | None = None, delay: float | None = None) -> None:
        table = f"django_wxpay_close_{model}"
        name = f"wxpay_test_fault_{len(created)}"
        conditions = ["TRUE"]
        if out_trade_no is not None:
            conditions.append(f"NEW.out_trade_no = '{out_trade_no}'")
        if model == "closeattempt" and operation == "UPDATE":
            conditions.append("NEW.outcome <> ''")
        with connection.cursor() as cursor:
            if connection.vendor == "postgresql":
                # A stall: once per transaction (a transaction-local setting remembers it), not once per row.
                stalled = f"current_setting('wxpay_test.{name}', true) IS DISTINCT FROM 'stalled'"
                action = (f"IF {stalled} THEN PERFORM pg_sleep({delay}); "
                          f"PERFORM set_config('wxpay_test.{name}', 'stalled', true); END IF"
                          if delay else "RAISE EXCEPTION 'injected fault'")
                cursor.execute(f"CREATE FUNCTION {name}() RETURNS trigger AS $$ BEGIN IF {' AND '.join(conditions)} "
                               f"THEN {action}; END IF; RETURN NEW; END $$ LANGUAGE plpgsql")
                cursor.execute(f"CREATE TRIGGER {name} BEFORE {operation} ON {table} FOR EACH ROW EXECUTE FUNCTION {name}()")
            elif delay:
                pytest.skip("a stalled write is injected on PostgreSQL (pg_sleep in a trigger)")
            elif connection.vendor == "sqlite":
                when = " AND ".join(c.replace("TRUE", "1") for c in conditions)
                cursor.execute(f"CREATE TRIGGER {name} BEFORE {operation} ON {table} FOR EACH ROW WHEN {when} "
                               "BEGIN SELECT RAISE(ABORT, 'injected fault'); END")
            else:  # MySQL/MariaDB: a NOT NULL column set to NULL fails as an IntegrityError
                cursor.execute(f"CREATE TRIGGER {name} BEFORE {operation} ON {table} FOR EACH ROW BEGIN "
                               f"IF {' AND '.join(conditions)} THEN SET NEW.out_trade_no = NULL; END IF; END")
        created.append((name, table))

    yield inject
    with connection.cursor() as cursor:
        for name, table in created:
            cursor.execute(f"DROP TRIGGER {name}" + (f" ON {table}" if connection.vendor == "postgresql" else ""))
            if connection.vendor == "postgresql":
                cursor.execute(f"DROP FUNCTION {name}()")
