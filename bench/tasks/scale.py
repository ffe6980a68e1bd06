"""The admin at scale: seed years of history (bench/scale.py), then time every admin page cold and warm through
Django's test client as a superuser, count its queries, EXPLAIN the slowest queries of any page over budget, and
measure what the admin's indexes cost the writes of a close."""

from __future__ import annotations

import os
import re
import statistics
import time
from collections.abc import Callable
from typing import Any

from .. import django_env
from ..scale import FULL_SIZE, QUICK_SIZE, Size, seed_history

WARM_BUDGET_S = 0.300
COLD_BUDGET_S = 1.0
WARM_REPEATS = 3
SCRATCH_ROWS = 200_000  # rows copied into each write-cost table, so its indexes have a realistic depth (full size)


def run(*, quick: bool, **_unused: Any) -> dict[str, Any]:
    os.environ["DJANGO_SETTINGS_MODULE"] = "bench.scale_settings"
    django_env.setup()
    django_env.migrate()
    from django.db import connection

    size = QUICK_SIZE if quick else FULL_SIZE
    began = time.perf_counter()
    seed_steps = seed_history(connection, size)
    result: dict[str, Any] = {"size": size.__dict__, "seed_seconds": time.perf_counter() - began,
                              "seed_steps": seed_steps, "table_mb": _table_sizes(connection)}
    began = time.perf_counter()
    result["pages"] = _time_pages(size)
    result["pages_seconds"] = time.perf_counter() - began
    result["sweep_queries"] = _sweep_queries()
    began = time.perf_counter()
    result["write_cost"] = _write_cost(connection, rows=200 if quick else 20_000, repeats=1 if quick else 3,
                                       scratch_rows=5_000 if quick else SCRATCH_ROWS)
    result["write_cost_seconds"] = time.perf_counter() - began
    return result


def _table_sizes(connection: Any) -> dict[str, float]:
    from django_wxpay_close.models import CloseAttempt, Order, PaymentNotification

    sizes = {}
    with connection.cursor() as cursor:
        for model in (Order, CloseAttempt, PaymentNotification):
            cursor.execute("SELECT pg_table_size(%s), pg_indexes_size(%s)", [model._meta.db_table] * 2)
            table, indexes = cursor.fetchone()
            sizes[model._meta.model_name] = {"table": table / 2**20, "indexes": indexes / 2**20}
    return sizes


def _pages(size: Size) -> list[tuple[str, str]]:
    """Every admin page of the app, with the filters and searches an operator uses."""
    orders, attempts, notifications = ("/admin/django_wxpay_close/order/", "/admin/django_wxpay_close/closeattempt/",
                                       "/admin/django_wxpay_close/paymentnotification/")
    number = f"W{size.terminal_orders // 2 + 3:012d}"
    transaction = f"42{size.notifications // 2:026d}"
    return [
        ("app index", "/admin/django_wxpay_close/"),
        ("orders", orders),
        ("orders, page 2", f"{orders}?p=2"),
        ("orders, state open", f"{orders}?state__exact=open"),
        ("orders, state unknown to WeChat", f"{orders}?state__exact=unknown_to_wechat"),
        ("orders, overdue", f"{orders}?overdue=yes"),
        ("orders, needs attention", f"{orders}?attention=yes"),
        ("orders, merchant other", f"{orders}?merchant=other"),
        ("orders, last outcome not found", f"{orders}?last_outcome__exact=not_found"),
        ("orders, last outcome untrusted response (rare)", f"{orders}?last_outcome__exact=untrusted_response"),
        ("orders, created in the past 7 days", f"{orders}?created_at__gte={_days_ago(7)}"),
        ("orders, search out_trade_no", f"{orders}?q={number}"),
        ("one order", f"{orders}{size.terminal_orders // 2 + 3}/change/"),
        ("close attempts", attempts),
        ("close attempts, outcome retryable error", f"{attempts}?outcome__exact=retryable_error"),
        ("close attempts, outcome client bug (none)", f"{attempts}?outcome__exact=client_bug"),
        ("close attempts, err_code SYSTEMERROR", f"{attempts}?err_code=SYSTEMERROR"),
        ("close attempts, err_code SIGNERROR (none)", f"{attempts}?err_code=SIGNERROR"),
        ("close attempts, trigger admin", f"{attempts}?trigger__exact=admin"),
        ("close attempts, API orderquery", f"{attempts}?api__exact=orderquery"),
        ("close attempts, merchant other", f"{attempts}?merchant=other"),
        ("close attempts, started in the past 7 days", f"{attempts}?started_at__gte={_days_ago(7)}"),
        ("close attempts, search out_trade_no", f"{attempts}?q={number}"),
        ("one close attempt", f"{attempts}{size.attempts // 2 + 5}/change/"),
        ("payment notifications", notifications),
        ("payment notifications, verdict bad signature", f"{notifications}?verdict__exact=bad_signature"),
        ("payment notifications, search transaction_id", f"{notifications}?q={transaction}"),
        ("one payment notification", f"{notifications}{size.notifications // 2 + 5}/change/"),
    ]


def _days_ago(days: int) -> str:
    from datetime import timedelta
    from urllib.parse import quote

    from django.utils import timezone

    return quote((timezone.now() - timedelta(days=days)).replace(microsecond=0).isoformat())


class _Recorder:
    """Each SQL statement of a request, with its duration."""

    def __init__(self) -> None:
        self.queries: list[tuple[str, Any, float]] = []

    def __call__(self, execute: Callable[..., Any], sql: str, params: Any, many: bool, context: Any) -> Any:
        began = time.perf_counter()
        try:
            return execute(sql, params, many, context)
        finally:
            self.queries.append((sql, params, time.perf_counter() - began))


def _time_pages(size: Size) -> list[dict[str, Any]]:
    from django.contrib.auth.models import User
    from django.db import connection, connections
    from django.test import Client

    user = User.objects.create_superuser("bench", "bench@example.com", "bench")
    results = []
    for name, url in _pages(size):
        client = Client()
        client.force_login(user)
        connections.close_all()  # cold: a new connection, nothing of this page's queries prepared or cached
        timings, counts, recorder = [], [], _Recorder()
        for _ in range(1 + WARM_REPEATS):
            recorder = _Recorder()
            with connection.execute_wrapper(recorder):
                began = time.perf_counter()
                response = client.get(url)
                timings.append(time.perf_counter() - began)
            if response.status_code != 200:
                raise RuntimeError(f"{url} answered {response.status_code}")
            counts.append(len(recorder.queries))
        warm = statistics.median(timings[1:])
        page: dict[str, Any] = {"page": name, "url": url, "cold_s": timings[0], "warm_s": warm,
                                "warm_all_s": timings[1:], "queries": counts[-1], "queries_cold": counts[0],
                                "slowest_query_s": max(seconds for _sql, _params, seconds in recorder.queries)}
        if warm > WARM_BUDGET_S or timings[0] > COLD_BUDGET_S:
            page["explain"] = _explain_slowest(connection, recorder.queries)
        results.append(page)
    return results


def _explain_slowest(connection: Any, queries: list[tuple[str, Any, float]], count: int = 2) -> list[str]:
    plans = []
    with connection.cursor() as cursor:
        for sql, params, seconds in sorted(queries, key=lambda query: -query[2])[:count]:
            cursor.execute(f"EXPLAIN (ANALYZE, BUFFERS) {sql}", params)
            plans.append(f"-- {seconds * 1000:.0f} ms: {sql[:300]}\n" + "\n".join(row[0] for row in cursor.fetchall()))
    return plans


# -- what the admin's indexes cost a close ------------------------------------------------------------------------

ADMIN_INDEXES = {
    "django_wxpay_close_order": ("wxpay_order_created_idx", "wxpay_order_out_trade_no_idx",
                                 "wxpay_order_outcome_idx", "wxpay_order_attention_idx"),
    "django_wxpay_close_closeattempt": ("wxpay_attempt_started_idx", "wxpay_attempt_out_trade_no_idx",
                                        "wxpay_attempt_err_code_idx", "wxpay_attempt_trigger_idx",
                                        "wxpay_attempt_api_idx"),
}


def _shape(definition: str) -> str:
    """An index definition without its own name and table's, to find the copy of an index on another table."""
    return re.sub(r"^CREATE (UNIQUE )?INDEX \S+ ON \S+ ", r"CREATE \1INDEX ON ", definition)


def _scratch(cursor: Any, table: str, *, with_admin_indexes: bool, rows: int) -> str:
    """A copy of `table` (columns, defaults, constraints, indexes) holding its newest `rows` rows, with or without
    the admin's indexes."""
    scratch = f"bench_scratch_{table}"
    cursor.execute(f"DROP TABLE IF EXISTS {scratch}")
    cursor.execute(f"CREATE TABLE {scratch} (LIKE {table} INCLUDING ALL)")
    cursor.execute(f"INSERT INTO {scratch} SELECT * FROM {table} ORDER BY id DESC LIMIT {rows}")
    cursor.execute("SELECT indexdef FROM pg_indexes WHERE tablename = %s AND indexname = ANY(%s)",
                   [table, list(ADMIN_INDEXES[table])])
    admin_shapes = {_shape(row[0]) for row in cursor.fetchall()}
    if not with_admin_indexes:
        cursor.execute("SELECT indexname, indexdef FROM pg_indexes WHERE tablename = %s", [scratch])
        for name, definition in cursor.fetchall():
            if _shape(definition) in admin_shapes:
                cursor.execute(f"DROP INDEX {name}")
    cursor.execute(f"SELECT setval(pg_get_serial_sequence('{scratch}', 'id'), (SELECT MAX(id) FROM {scratch}))")
    cursor.execute(f"VACUUM ANALYZE {scratch}")
    return scratch


def _attempt_writes(cursor: Any, rows: int, *, with_admin_indexes: bool, scratch_rows: int) -> float:
    """Seconds for `rows` closes' audit writes: INSERT the attempt row, then complete it (UPDATE its outcome),
    one statement at a time, in a server-side loop (no client round trips in the figure)."""
    table = "django_wxpay_close_closeattempt"
    scratch = _scratch(cursor, table, with_admin_indexes=with_admin_indexes, rows=scratch_rows)
    cursor.execute("SELECT column_name FROM information_schema.columns WHERE table_name = %s AND column_name <> 'id' "
                   "ORDER BY ordinal_position", [table])
    columns = [row[0] for row in cursor.fetchall()]
    fresh = {"started_at": "clock_timestamp()", "completed_at": "NULL", "outcome": "''", "err_code": "''",
             "result_code": "''", "return_code": "''", "http_status": "NULL", "response_body": "''"}
    selects = ", ".join(fresh.get(column, column) for column in columns)
    began = time.perf_counter()
    cursor.execute(f"""DO $$ DECLARE new_id bigint; BEGIN
        FOR i IN 1..{rows} LOOP
            INSERT INTO {scratch} ({", ".join(columns)}) SELECT {selects} FROM {table} WHERE id = i
                RETURNING id INTO new_id;
            UPDATE {scratch} SET completed_at = clock_timestamp(), outcome = 'closed', result_code = 'SUCCESS',
                return_code = 'SUCCESS', http_status = 200, response_body = '<xml/>' WHERE id = new_id;
        END LOOP; END $$""")
    seconds = time.perf_counter() - began
    cursor.execute(f"DROP TABLE {scratch}")
    return seconds


def _order_writes(cursor: Any, rows: int, *, with_admin_indexes: bool, scratch_rows: int) -> float:
    """Seconds for `rows` closes' order writes: the state change UPDATE of an open order, one at a time."""
    table = "django_wxpay_close_order"
    scratch = _scratch(cursor, table, with_admin_indexes=with_admin_indexes, rows=scratch_rows)
    began = time.perf_counter()
    cursor.execute(f"""DO $$ DECLARE open_id bigint; BEGIN
        FOR open_id IN SELECT id FROM {scratch} WHERE state = 'open' ORDER BY id LIMIT {rows} LOOP
            UPDATE {scratch} SET state = 'closed', state_changed_at = clock_timestamp(),
                closed_at = clock_timestamp(), last_attempt_at = clock_timestamp(), last_outcome = 'closed',
                attempt_count = attempt_count + 1 WHERE id = open_id;
        END LOOP; END $$""")
    seconds = time.perf_counter() - began
    cursor.execute(f"DROP TABLE {scratch}")
    return seconds


def _write_cost(connection: Any, *, rows: int, repeats: int, scratch_rows: int) -> dict[str, Any]:
    """Rows/s of a close's writes with and without the admin's indexes, alternated `repeats` times."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM django_wxpay_close_order WHERE state = 'open'")
        order_rows = min(rows, cursor.fetchone()[0])
        measured: dict[str, dict[str, list[float]]] = {"attempt insert and completion": {"without": [], "with": []},
                                                       "order state change": {"without": [], "with": []}}
        for _ in range(repeats):
            for side, with_indexes in (("without", False), ("with", True)):
                measured["attempt insert and completion"][side].append(
                    rows / _attempt_writes(cursor, rows, with_admin_indexes=with_indexes, scratch_rows=scratch_rows))
                measured["order state change"][side].append(
                    order_rows / _order_writes(cursor, order_rows, with_admin_indexes=with_indexes,
                                              scratch_rows=scratch_rows))
    out: dict[str, Any] = {"rows": rows, "order_rows": order_rows, "scratch_rows": scratch_rows}
    for write, sides in measured.items():
        without, with_ = statistics.median(sides["without"]), statistics.median(sides["with"])
        out[write] = {"rows_per_s_without": without, "rows_per_s_with": with_,
                      "all_without": sides["without"], "all_with": sides["with"],
                      "extra_us_per_row": (1 / with_ - 1 / without) * 1e6}
    return out


def _sweep_queries() -> list[dict[str, Any]]:
    """The sweep's own queries at this size, EXPLAIN ANALYZEd: the claim of a batch (as 32 workers take it), a
    dry run's first chunk, the two reads of the end-of-run "N orders wait for a retry" summary, and the claim of
    `--check-held` (the orders on hold, oldest first)."""
    import re

    from django.db import transaction

    from django_wxpay_close.conf import load_settings
    from django_wxpay_close.selectors import (
        WAITING_COUNT_LIMIT,
        orders_due_for_closing,
        orders_on_hold,
        orders_waiting,
    )

    due = orders_due_for_closing(min_order_age=load_settings().min_order_age)
    queries = {
        "claim (64 orders, FOR UPDATE SKIP LOCKED)": due.select_for_update(skip_locked=True)[:64],
        "dry run, first chunk of 100": due[:100],
        "orders waiting for a retry, counted up to the bound": orders_waiting().order_by()[:WAITING_COUNT_LIMIT + 1],
        "the next retry's time": orders_waiting().order_by("due_at")[:1],
        "--check-held claim (64 orders on hold)": orders_on_hold().select_for_update(skip_locked=True)[:64],
    }
    plans = []
    for name, queryset in queries.items():
        with transaction.atomic():  # the claim's FOR UPDATE needs one; the others do not mind
            plan = queryset.explain(analyze=True, buffers=True)
        executed = re.search(r"Execution Time: ([0-9.]+) ms", plan)
        buffers = re.search(r"Buffers: shared hit=(\d+)(?: read=(\d+))?", plan)
        plans.append({"query": name, "ms": float(executed.group(1)) if executed else None,
                      "buffers": sum(int(n) for n in buffers.groups() if n) if buffers else None,
                      "rows_removed_by_filter": sum(int(n) for n in re.findall(r"Rows Removed by Filter: (\d+)", plan)),
                      "plan": plan})
    return plans
