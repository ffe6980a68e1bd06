"""Years of history in minutes: a PostgreSQL database seeded with millions of orders, close attempts and payment
notifications by `INSERT … SELECT FROM generate_series`, for `python -m bench --only scale` and for anyone who
wants to time a query at that size (`seed_history(connection, FULL_SIZE)` on a migrated database).

The rows are plausible, not random: order n was created n steps into a three-year window (ids follow time, as
in a real shop), most orders are closed or paid, the newest are open, a few are on hold; each order has two
close attempts on average (a retried SYSTEMERROR now and then), paid orders have their notifications.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit, urlunsplit

MERCHANTS = {"default": "1900000109", "other": "1900000110"}  # merchant → mch_id; one order in ten is "other"
SUB_MCH_ID = "1900000111"
APPID = "wx2421b1c4370ec43b"
HISTORY_DAYS = 3 * 365
OPEN_HOURS = 24  # the open orders were created in the last day


@dataclass(frozen=True)
class Size:
    terminal_orders: int  # closed, paid or unknown to WeChat
    open_orders: int
    attempts: int
    notifications: int

    @property
    def orders(self) -> int:
        return self.terminal_orders + self.open_orders


FULL_SIZE = Size(terminal_orders=5_000_000, open_orders=100_000, attempts=10_000_000, notifications=2_000_000)
QUICK_SIZE = Size(terminal_orders=10_000, open_orders=500, attempts=20_000, notifications=4_000)


@contextmanager
def own_database(server_url: str, name: str, *, keep: bool) -> Iterator[str]:
    """A fresh database `name` on the server of `server_url` (dropped first if a run left it); its URL. Dropped
    at the end unless `keep`."""
    import psycopg

    parts = urlsplit(server_url)
    maintenance = urlunsplit(parts._replace(path="/postgres"))

    def execute(sql: str) -> None:
        with psycopg.connect(maintenance, autocommit=True, connect_timeout=5) as admin:
            admin.execute(sql)

    execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    execute(f'CREATE DATABASE "{name}"')
    try:
        yield urlunsplit(parts._replace(path=f"/{name}"))
    finally:
        if not keep:
            execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _columns(model: Any, connection: Any, known: dict[str, str]) -> tuple[str, str, list[Any]]:
    """Column list, SELECT expressions and parameters for one INSERT … SELECT: the `known` expressions, and for
    every other column the model's default (so a column added later still gets a valid value)."""
    quote = connection.ops.quote_name
    columns, values, params = [], [], []
    for field in model._meta.concrete_fields:
        columns.append(quote(field.column))
        if field.column in known:
            values.append(known[field.column])
        elif field.null and not field.has_default():
            values.append("NULL")
        else:
            default = field.get_default()
            cast = field.db_type(connection)
            values.append(f"%s::{cast}")
            params.append(field.get_db_prep_save(default, connection))
    return ", ".join(columns), ", ".join(values), params


# Order n (1-based, = its id): created n steps into the history; its state by n % 100.
_CREATED = "(:start::timestamptz + (n - 1) * :step::interval)"
_MERCHANT = "(CASE WHEN n % 10 = 0 THEN 'other' ELSE 'default' END)"
_STATE = ("(CASE WHEN n > :terminal THEN 'open' WHEN n % 100 < 70 THEN 'closed' "
          "WHEN n % 100 < 98 THEN 'paid' ELSE 'unknown_to_wechat' END)")


def _order_expressions(size: Size) -> dict[str, str]:
    state = _STATE
    on_hold = "(n > :terminal AND n % 1000 = 7)"
    last_outcome = (f"(CASE WHEN {on_hold} THEN 'untrusted_response' WHEN n > :terminal AND n % 1000 = 8 "
                    "THEN 'configuration_error' WHEN n > :terminal AND n % 50 = 1 THEN 'retryable_error' "
                    "WHEN n > :terminal THEN '' WHEN n % 100 < 5 THEN 'already_closed' WHEN n % 100 < 70 "
                    "THEN 'closed' WHEN n % 100 < 98 THEN '' ELSE 'not_found' END)")
    return {
        "id": "n",
        "merchant": _MERCHANT,
        "appid": f"'{APPID}'",
        "mch_id": f"(CASE WHEN n % 10 = 0 THEN '{MERCHANTS['other']}' ELSE '{MERCHANTS['default']}' END)",
        "sub_mch_id": f"'{SUB_MCH_ID}'",
        "sub_appid": "''",
        "out_trade_no": "('W' || lpad(n::text, 12, '0'))",
        "amount": "(100 + n % 9900)",
        "currency": "'CNY'",
        "created_at": _CREATED,
        "payment_deadline": f"({_CREATED} + interval '30 minutes')",
        "due_at": f"({_CREATED} + interval '30 minutes')",  # an open order is due at its deadline
        "state": state,
        "state_changed_at": f"(CASE WHEN n > :terminal THEN NULL ELSE {_CREATED} + interval '31 minutes' END)",
        "closed_at": f"(CASE WHEN {state} = 'closed' THEN {_CREATED} + interval '31 minutes' END)",
        "paid_at": f"(CASE WHEN {state} = 'paid' THEN {_CREATED} + interval '5 minutes' END)",
        "attempt_count": "(CASE WHEN n > :terminal THEN 0 ELSE 2 END)",
        "retry_count": "0",
        "last_attempt_at": f"(CASE WHEN n > :terminal THEN NULL ELSE {_CREATED} + interval '31 minutes' END)",
        "last_outcome": last_outcome,
        "last_error": "''",
        "on_hold": on_hold,
    }


def _attempt_expressions() -> dict[str, str]:
    # Attempt a (1-based) belongs to order n = (a - 1) / 2 + 1: two each; the first of one order in ten
    # answered SYSTEMERROR.
    order = "((a - 1) / 2 + 1)"
    created = f"(:start::timestamptz + ({order} - 1) * :step::interval)"
    retried = f"((a - 1) % 2 = 0 AND {order} % 10 = 3)"
    number = f"('W' || lpad({order}::text, 12, '0'))"
    mch_id = f"(CASE WHEN {order} % 10 = 0 THEN '{MERCHANTS['other']}' ELSE '{MERCHANTS['default']}' END)"
    request = (f"('<xml><appid>{APPID}</appid><mch_id>' || {mch_id} || '</mch_id><nonce_str>'"
               f" || md5(a::text) || '</nonce_str><out_trade_no>' || {number} || '</out_trade_no><sign>'"
               f" || upper(md5(a::text || 's')) || md5(a::text) || '</sign><sign_type>HMAC-SHA256</sign_type>"
               f"<sub_mch_id>{SUB_MCH_ID}</sub_mch_id></xml>')")
    response = (f"('<xml><return_code><![CDATA[SUCCESS]]></return_code><return_msg><![CDATA[OK]]></return_msg>"
                f"<appid><![CDATA[{APPID}]]></appid><nonce_str><![CDATA[' || md5(a::text || 'r') || ']]></nonce_str>"
                f"<sign><![CDATA[' || upper(md5(a::text || 'q')) || ']]></sign><result_code><![CDATA[' || "
                f"(CASE WHEN {retried} THEN 'FAIL' ELSE 'SUCCESS' END) || ']]></result_code></xml>')")
    return {
        "id": "a",
        "order_id": order,
        "merchant": f"(CASE WHEN {order} % 10 = 0 THEN 'other' ELSE 'default' END)",
        "mch_id": mch_id,
        "sub_mch_id": f"'{SUB_MCH_ID}'",
        "out_trade_no": number,
        "trigger": f"(CASE WHEN {order} % 500 = 0 THEN 'admin' ELSE 'command' END)",
        "user_id": "NULL",
        "actor": f"(CASE WHEN {order} % 500 = 0 THEN 'operator' ELSE '' END)",
        "url": "'https://apihk.mch.weixin.qq.com/pay/closeorder'",
        "failed_over_from": "''",
        "sign_type": "'HMAC-SHA256'",
        "request_xml": request,
        "started_at": f"({created} + interval '30 minutes' + ((a - 1) % 2) * interval '1 minute')",
        "completed_at": f"({created} + interval '30 minutes' + ((a - 1) % 2) * interval '1 minute' "
                        "+ interval '80 milliseconds')",
        "duration_ms": "(40 + a % 80)",
        "http_status": "200",
        "response_body": response,
        "return_code": "'SUCCESS'",
        "return_msg": "'OK'",
        "result_code": f"(CASE WHEN {retried} THEN 'FAIL' ELSE 'SUCCESS' END)",
        "err_code": f"(CASE WHEN {retried} THEN 'SYSTEMERROR' WHEN (a - 1) % 2 = 1 AND {order} % 100 < 5 "
                    "THEN 'ORDERCLOSED' ELSE '' END)",
        "err_code_des": f"(CASE WHEN {retried} THEN 'system error' ELSE '' END)",
        "signature_verified": "true",
        "outcome": f"(CASE WHEN {retried} THEN 'retryable_error' WHEN (a - 1) % 2 = 1 AND {order} % 100 < 5 "
                   "THEN 'already_closed' ELSE 'closed' END)",
        "reason": "''",
        # One exchange in 250 is an orderquery, what the admin's API filter lists.
        "api": "(CASE WHEN a % 250 = 0 THEN 'orderquery' ELSE 'closeorder' END)",
        "trade_state": "(CASE WHEN a % 250 = 0 THEN 'NOTPAY' ELSE '' END)",
    }


def _notification_expressions(size: Size) -> dict[str, str]:
    # Notification m is about order n = (m - 1) * orders / notifications + 1; one in a thousand is forged.
    order = f"(((m - 1)::bigint * {size.terminal_orders}) / {size.notifications} + 1)"
    created = f"(:start::timestamptz + ({order} - 1) * :step::interval)"
    forged = "(m % 1000 = 5)"
    return {
        "id": "m",
        "received_at": f"({created} + interval '5 minutes')",
        "raw_body": ("('<xml><return_code><![CDATA[SUCCESS]]></return_code><out_trade_no>W' || "
                     f"lpad({order}::text, 12, '0') || '</out_trade_no><transaction_id>42' || lpad(m::text, 26, '0') "
                     "|| '</transaction_id><sign>' || upper(md5(m::text)) || '</sign></xml>')"),
        "mch_id": f"'{MERCHANTS['default']}'",
        "sub_mch_id": f"'{SUB_MCH_ID}'",
        "out_trade_no": f"('W' || lpad({order}::text, 12, '0'))",
        "transaction_id": "('42' || lpad(m::text, 26, '0'))",
        "total_fee": f"((100 + {order} % 9900)::text)",
        "fee_type": "'CNY'",
        "result_code": "'SUCCESS'",
        "signature_verified": f"(NOT {forged})",
        "verdict": f"(CASE WHEN {forged} THEN 'bad_signature' WHEN m % 7 = 0 THEN 'already_paid' "
                   "ELSE 'recorded_paid' END)",
        "detail": "''",
        "order_id": f"(CASE WHEN {forged} THEN NULL ELSE {order} END)",
    }


def _substituted(sql: str, values: dict[str, str]) -> str:
    """The expression with its :start, :step and :terminal, as SQL literals, and its % (modulo) doubled for the
    driver's parameter syntax."""
    for name, value in values.items():
        sql = sql.replace(f":{name}", f"'{value}'" if name != "terminal" else value)
    return sql.replace("%", "%%")


def _secondary_indexes(cursor: Any, table: str) -> list[tuple[str, str]]:
    """(name, CREATE INDEX statement) of the table's indexes that back no constraint."""
    cursor.execute("""SELECT i.indexname, i.indexdef FROM pg_indexes i
                      WHERE i.tablename = %s AND NOT EXISTS (
                          SELECT 1 FROM pg_constraint c WHERE c.conname = i.indexname)""", [table])
    return list(cursor.fetchall())


def seed_history(connection: Any, size: Size) -> dict[str, float]:
    """Fill the app's (empty, migrated) tables of this PostgreSQL connection with `size` rows, then VACUUM
    ANALYZE; returns the seconds each step took. The secondary indexes are dropped during the inserts and
    built again after (far faster than maintaining them row by row): their build times are in the result."""
    from django.utils import timezone

    from django_wxpay_close.models import CloseAttempt, Order, PaymentNotification

    if connection.vendor != "postgresql":
        raise ValueError("seed_history uses generate_series: PostgreSQL only")
    now = timezone.now()
    span = HISTORY_DAYS * 86400.0
    steps = {"start": (now - timedelta(days=HISTORY_DAYS)).isoformat(),
             "step": f"{span / max(size.terminal_orders, 1):.6f} seconds", "terminal": str(size.terminal_orders)}
    open_step = f"{OPEN_HOURS * 3600.0 / max(size.open_orders, 1):.6f} seconds"
    seconds: dict[str, float] = {}
    plans = [
        (Order, _order_expressions(size), "n", 1, size.terminal_orders, steps),
        # The open orders: the newest ids, created over the last day, so the step differs.
        (Order, _order_expressions(size), "n", size.terminal_orders + 1, size.orders,
         {**steps, "step": open_step, "start": (now - timedelta(hours=OPEN_HOURS) - size.terminal_orders
                                                 * timedelta(seconds=OPEN_HOURS * 3600 / max(size.open_orders, 1))
                                                 ).isoformat()}),
        (CloseAttempt, _attempt_expressions(), "a", 1, size.attempts, steps),
        (PaymentNotification, _notification_expressions(size), "m", 1, size.notifications, steps),
    ]
    with connection.cursor() as cursor:
        cursor.execute("SET session_replication_role = replica")  # no foreign-key checks while seeding
        cursor.execute("SET maintenance_work_mem = '512MB'")
        dropped: list[tuple[str, str]] = []
        for model in (Order, CloseAttempt, PaymentNotification):
            for name, definition in _secondary_indexes(cursor, model._meta.db_table):
                cursor.execute(f'DROP INDEX "{name}"')
                dropped.append((name, definition))
        for model, known, variable, first, last, values in plans:
            began = time.perf_counter()
            expressions = {column: _substituted(sql, values) for column, sql in known.items()}
            columns, selects, params = _columns(model, connection, expressions)
            cursor.execute(f"INSERT INTO {connection.ops.quote_name(model._meta.db_table)} ({columns}) "
                           f"SELECT {selects} FROM generate_series(%s::bigint, %s::bigint) AS {variable}",
                           [*params, first, last])
            seconds[f"insert {model._meta.model_name} {first}-{last}"] = time.perf_counter() - began
        for name, definition in dropped:
            began = time.perf_counter()
            cursor.execute(definition)
            seconds[f"create index {name}"] = time.perf_counter() - began
        for model in (Order, CloseAttempt, PaymentNotification):
            table = model._meta.db_table
            cursor.execute(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "
                           f"(SELECT COALESCE(MAX(id), 1) FROM {connection.ops.quote_name(table)}))")
        cursor.execute("SET session_replication_role = DEFAULT")
    began = time.perf_counter()
    with connection.cursor() as cursor:
        cursor.execute("VACUUM ANALYZE")  # outside a transaction: the worker runs in autocommit
    seconds["vacuum analyze"] = time.perf_counter() - began
    return seconds


def render(result: dict[str, Any]) -> str:
    """The section's tables: every page cold and warm with its queries, the EXPLAIN of any page over budget, and
    the write cost of the admin's indexes."""
    size = Size(**result["size"])
    out = [f"### Admin at scale: {size.terminal_orders:,} closed or paid orders + {size.open_orders:,} open, "
           f"{size.attempts:,} close attempts, {size.notifications:,} payment notifications "
           f"(seeded in {result['seed_seconds']:.0f} s)", "",
           "| page | warm ms (median of 3) | cold ms | queries | slowest query ms |", "| --- | --- | --- | --- | --- |"]
    for page in result["pages"]:
        out.append(f"| {page['page']} | {page['warm_s'] * 1000:.0f} | {page['cold_s'] * 1000:.0f} | {page['queries']} "
                   f"| {page['slowest_query_s'] * 1000:.1f} |")
    out += ["", "| write of a close | rows/s without the admin's indexes | rows/s with | µs more per row |",
            "| --- | --- | --- | --- |"]
    cost = result["write_cost"]
    for write in ("attempt insert and completion", "order state change"):
        figures = cost[write]
        out.append(f"| {write} | {figures['rows_per_s_without']:.0f} | {figures['rows_per_s_with']:.0f} "
                   f"| {figures['extra_us_per_row']:.1f} |")
    if result.get("sweep_queries"):
        out += ["", "| the sweep's query at this size | ms | buffers | rows removed by filter |",
                "| --- | --- | --- | --- |"]
        out += [f"| {q['query']} | {q['ms']} | {q['buffers']} | {q['rows_removed_by_filter']} |"
                for q in result["sweep_queries"]]
    builds = {step: seconds for step, seconds in result["seed_steps"].items() if step.startswith("create index")}
    out += ["", "index builds (s): " + ", ".join(f"{step[13:]} {seconds:.1f}" for step, seconds in builds.items())]
    out += ["table and index sizes (MiB): " + ", ".join(f"{name} {sizes['table']:.0f} + {sizes['indexes']:.0f}"
                                                      for name, sizes in result["table_mb"].items())]
    for page in result["pages"]:
        for plan in page.get("explain", []):
            out += ["", f"EXPLAIN for {page['page']} (over budget: warm {page['warm_s'] * 1000:.0f} ms, cold "
                        f"{page['cold_s'] * 1000:.0f} ms)", plan]
    if result.get("database"):
        out += ["", f"kept database: {result['database']}"]
    return "\n".join(out)
