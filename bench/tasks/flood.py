"""A flood of garbage at the notify URL of a real `runserver`, with genuine notifications sent meanwhile.

The server runs in its own process (`manage.py runserver`, threaded, as the problem was first seen); this process
floods it with 64 KiB bodies from `clients` keep-alive connections while one more sends WeChat's signed
notifications for open orders, one at a time, timing each answer. Before it, as many genuine notifications
without a flood, for comparison. Database growth is measured on the app's tables; the garbage's share is the
flood's growth less what the genuine notifications sent meanwhile take (measured on the ones sent before).
"""

from __future__ import annotations

import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from typing import Any

import requests

from .. import django_env
from ..runner import ROOT

GARBAGE = b"<xml>" + b"A" * (64 * 1024 - 12) + b"</xml>"  # within the 64 KiB cap: read, parsed, refused


def run(*, posts: int, genuine: int, clients: int, trace_count: int = 2000, **_unused: Any) -> dict[str, Any]:
    django_env.setup()
    django_env.migrate()
    django_env.reset()
    from django_wxpay_close.models import NotificationVerdict, PaymentNotification, UnauthenticatedNotificationCount
    from django_wxpay_close.testing import API_KEY, MCH_ID, WeChatPaySimulator

    _orders(2 * genuine)
    signer = WeChatPaySimulator({MCH_ID: API_KEY})  # never started: it only signs
    bodies = [signer.notification_body(f"G{n:06d}", total_fee=1000, fee_type="HKD") for n in range(2 * genuine)]
    with _server() as url:
        # First the genuine notifications alone: their answer times without a flood, and the space they take,
        # so that what the garbage adds can be told from what the genuine ones sent during the flood add.
        size_before = _app_tables_bytes()
        quiet = _genuine(url, bodies[genuine:], floods=[])
        genuine_growth = _app_tables_bytes() - size_before
        sent = [0] * clients

        def flood(index: int) -> None:
            with requests.Session() as session:
                while sum(sent) < posts:
                    session.post(url, data=GARBAGE, headers={"Content-Type": "text/xml"}, timeout=60)
                    sent[index] += 1

        floods = [threading.Thread(target=flood, args=(i,)) for i in range(clients)]
        size_before_flood = _app_tables_bytes()
        began = time.perf_counter()
        for thread in floods:
            thread.start()
        during = _genuine(url, bodies[:genuine], floods=floods)
        for thread in floods:
            thread.join()
        flood_seconds = time.perf_counter() - began
    garbage = sum(sent)
    flood_growth = _app_tables_bytes() - size_before_flood
    growth = flood_growth - genuine_growth * during["sent"] / max(quiet["sent"], 1)
    recorded = PaymentNotification.objects.filter(verdict=NotificationVerdict.RECORDED_PAID).count()
    counts = list(UnauthenticatedNotificationCount.objects.all())
    traces = PaymentNotification.objects.exclude(signature_verified=True).count()
    return {
        "garbage_posts": garbage, "flood_seconds": flood_seconds, "garbage_per_s": garbage / flood_seconds,
        "growth_bytes": growth, "growth_bytes_per_10000": growth * 10_000 / garbage,
        "growth_bytes_with_genuine": flood_growth, "genuine_growth_bytes": genuine_growth,
        "traces": traces, "bytes_per_trace": _bytes_per_trace(trace_count),
        "minutes_counted": len(counts), "counted": sum(row.received for row in counts),
        "genuine_during_flood": during, "genuine_without_flood": quiet,
        "genuine_recorded": recorded, "genuine_sent": during["sent"] + quiet["sent"],
    }


def _genuine(url: str, bodies: list[bytes], *, floods: list[threading.Thread]) -> dict[str, Any]:
    """Send signed notifications one at a time (while the flood lasts, if there is one); their answer times."""
    times, acknowledged = [], 0
    with requests.Session() as session:
        for body in bodies:
            if floods and not any(thread.is_alive() for thread in floods):
                break
            began = time.perf_counter()
            answer = session.post(url, data=body, headers={"Content-Type": "text/xml"}, timeout=60)
            times.append((time.perf_counter() - began) * 1000)
            acknowledged += b"SUCCESS" in answer.content
            time.sleep(0.01)
    ordered = sorted(times) or [0.0]
    return {"sent": len(times), "acknowledged": acknowledged, "median_ms": statistics.median(ordered),
            "p95_ms": ordered[int(0.95 * (len(ordered) - 1))], "max_ms": ordered[-1]}


def _bytes_per_trace(count: int = 2000) -> float:
    """What one trace takes with its indexes: `count` garbage bodies handled in this process, bound lifted."""
    from django.conf import settings
    from django.test import override_settings

    from django_wxpay_close.notifications import handle_payment_notification

    before = _app_tables_bytes()
    with override_settings(WXPAY_CLOSE={**settings.WXPAY_CLOSE, "NOTIFICATION_TRACES_PER_MINUTE": count}):
        for _ in range(count):
            handle_payment_notification(GARBAGE, client_address="203.0.113.9")
    return (_app_tables_bytes() - before) / count


def _orders(count: int) -> None:
    from datetime import timedelta

    from django.utils import timezone

    from django_wxpay_close.models import Order
    from django_wxpay_close.testing import APPID, MCH_ID, SUB_MCH_ID

    now = timezone.now()
    Order.objects.bulk_create(
        Order(merchant="default", appid=APPID, mch_id=MCH_ID, sub_mch_id=SUB_MCH_ID, out_trade_no=f"G{n:06d}",
              amount=1000, currency="HKD", created_at=now, payment_deadline=now + timedelta(hours=1),
              due_at=now + timedelta(hours=1))
        for n in range(count))


def _app_tables_bytes() -> int:
    """The space the app's tables and their indexes take (SQLite: its used pages, after a WAL checkpoint)."""
    from django.db import connection

    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            cursor.execute("SELECT coalesce(sum(pg_total_relation_size(oid)), 0) FROM pg_class "
                           "WHERE relkind = 'r' AND relname LIKE 'django_wxpay_close%%'")
            return int(cursor.fetchone()[0])
        cursor.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        pages = [int(cursor.execute(f"PRAGMA {name}").fetchone()[0])
                 for name in ("page_count", "freelist_count", "page_size")]
        return (pages[0] - pages[1]) * pages[2]


class _server:
    """`manage.py runserver` on a free port with the bench's settings and database; yields the notify URL."""

    def __enter__(self) -> str:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        env = {**os.environ, "DJANGO_SETTINGS_MODULE": "bench.flood_settings"}
        self.process = subprocess.Popen(
            [sys.executable, str(ROOT / "manage.py"), "runserver", "--noreload", f"127.0.0.1:{port}"],
            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{port}/wxpay/notify/"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                requests.get(url, timeout=1)
                return url
            except requests.ConnectionError:
                time.sleep(0.1)
        self.process.kill()
        raise RuntimeError("runserver did not start")

    def __exit__(self, *exc_info: object) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)
