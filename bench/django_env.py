"""Django inside a benchmark process: set up, empty the tables, bulk-create expired orders."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from datetime import timedelta
from itertools import islice

import django

SEED_CHUNK = 5_000


def setup() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "bench.settings")
    django.setup()


def migrate() -> None:
    from django.core.management import call_command

    call_command("migrate", verbosity=0, interactive=False)


def reset() -> None:
    """Remove every row of the app's tables (its audit trails refuse ORM deletes, so this is raw SQL)."""
    from django.apps import apps
    from django.db import connection

    models = list(apps.get_app_config("django_wxpay_close").get_models())
    tables = [connection.ops.quote_name(model._meta.db_table) for model in models]
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            cursor.execute(f"TRUNCATE {', '.join(tables)} RESTART IDENTITY")
        else:
            for table in reversed(tables):  # the app defines referrers after what they refer to
                cursor.execute(f"DELETE FROM {table}")


def seed(count: int, waiting: int = 0) -> str:
    """`count` open orders of the default merchant whose payment window closed an hour ago, numbered
    PREFIX000000000 on; returns PREFIX (fresh each time, so every close is a first one at the simulator).

    `waiting` more orders, whose deadlines passed before all of those, wait for a retry an hour from now (what
    an outage leaves behind): ahead of the due ones in deadline order, not due.
    """
    from django.db import connection
    from django.db.models.functions import Now

    from django_wxpay_close.models import Order

    prefix = "S" + secrets.token_hex(5)
    if connection.vendor == "postgresql":
        _seed_postgresql(prefix, count + waiting)
    else:
        _seed_orm(prefix, count + waiting)
    if waiting:
        ahead = Order.objects.filter(out_trade_no__startswith=prefix).order_by("payment_deadline", "id")
        Order.objects.filter(pk__in=list(ahead.values_list("pk", flat=True)[:waiting])).update(
            due_at=Now() + timedelta(hours=1), attempt_count=1, retry_count=1, last_outcome="network_error")
        if connection.vendor == "postgresql":  # as autovacuum would: the UPDATE's dead rows gone, statistics fresh
            with connection.cursor() as cursor:
                cursor.execute(f"VACUUM ANALYZE {connection.ops.quote_name(Order._meta.db_table)}")
    return prefix


def _template() -> object:
    from django.utils import timezone

    from django_wxpay_close.models import Order
    from django_wxpay_close.testing import APPID, MCH_ID, SUB_MCH_ID

    now = timezone.now()
    return Order(merchant="default", appid=APPID, mch_id=MCH_ID, sub_mch_id=SUB_MCH_ID, out_trade_no="",
                 created_at=now - timedelta(hours=2), payment_deadline=now - timedelta(hours=1),
                 due_at=now - timedelta(hours=1))


def _seed_orm(prefix: str, count: int) -> None:
    from django_wxpay_close.models import Order

    template = _template()
    deadline = template.payment_deadline  # type: ignore[attr-defined]
    fields = {f.attname: getattr(template, f.attname) for f in Order._meta.concrete_fields if not f.primary_key}
    orders: Iterator[Order] = (
        Order(**{**fields, "out_trade_no": f"{prefix}{n:09d}",
                 "payment_deadline": deadline - timedelta(seconds=n % 3600),
                 "due_at": deadline - timedelta(seconds=n % 3600)})
        for n in range(count)
    )
    while chunk := list(islice(orders, SEED_CHUNK)):  # never the whole backlog in memory
        Order.objects.bulk_create(chunk)


def _seed_postgresql(prefix: str, count: int) -> None:
    """One INSERT … SELECT FROM generate_series: a million orders in seconds. Every column's value is the
    model's own (converted by its field), but out_trade_no and the deadline, which vary per order."""
    from django.db import connection

    from django_wxpay_close.models import Order

    template = _template()
    fields = [f for f in Order._meta.concrete_fields if not f.primary_key]
    quote = connection.ops.quote_name
    columns, values, params = [], [], []
    for field in fields:
        columns.append(quote(str(field.column)))
        if field.attname == "out_trade_no":
            values.append("%s || lpad(n::text, 9, '0')")
            params.append(prefix)
        elif field.attname in ("payment_deadline", "due_at"):
            values.append("%s - (n %% 3600) * interval '1 second'")
            params.append(field.get_db_prep_save(getattr(template, field.attname), connection))
        else:
            cast = field.db_type(connection)
            values.append(f"%s::{cast}" if cast else "%s")
            params.append(field.get_db_prep_save(getattr(template, field.attname), connection))
    table = quote(Order._meta.db_table)
    with connection.cursor() as cursor:
        cursor.execute(f"INSERT INTO {table} ({', '.join(columns)}) SELECT {', '.join(values)} "
                       f"FROM generate_series(0, %s) AS n", [*params, count - 1])
        cursor.execute(f"ANALYZE {table}")
