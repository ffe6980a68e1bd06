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
    """Remove every order and audit row (the audit trail refuses ORM deletes, so this is raw SQL)."""
    from django.db import connection

    from django_wxpay_close.models import CloseAttempt, Order

    tables = [connection.ops.quote_name(model._meta.db_table) for model in (CloseAttempt, Order)]
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            cursor.execute(f"TRUNCATE {', '.join(tables)} RESTART IDENTITY")
        else:
            for table in tables:
                cursor.execute(f"DELETE FROM {table}")


def seed(count: int) -> None:
    """`count` open orders of the default merchant whose payment window closed an hour ago."""
    from django.utils import timezone

    from django_wxpay_close.models import Order
    from django_wxpay_close.testing import APPID, MCH_ID, SUB_MCH_ID

    now = timezone.now()
    prefix = "S" + secrets.token_hex(5)
    orders: Iterator[Order] = (
        Order(merchant="default", appid=APPID, mch_id=MCH_ID, sub_mch_id=SUB_MCH_ID, out_trade_no=f"{prefix}{n:09d}",
              created_at=now - timedelta(hours=2), payment_deadline=now - timedelta(hours=1, seconds=n % 3600))
        for n in range(count)
    )
    while chunk := list(islice(orders, SEED_CHUNK)):  # never the whole backlog in memory
        Order.objects.bulk_create(chunk)
