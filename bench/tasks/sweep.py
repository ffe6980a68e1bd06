"""`manage.py close_expired_orders` over the seeded backlog: closes/s, per-close latency, CPU cores, memory."""

from __future__ import annotations

import io
import json
import resource
import time
from typing import Any

from .. import django_env
from ..machine import cpu_seconds
from ..stats import percentile, windows

WINDOWS = 5  # throughput samples per run: the closes split into this many consecutive equal parts


def run(*, workers: int, dry_run: bool = False, analyse: bool = True, **_unused: Any) -> dict[str, Any]:
    """One sweep in this process. `analyse`: read latencies back from the audit rows (one sweeper only)."""
    django_env.setup()
    from django.core.management import call_command

    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    output = io.StringIO()
    cpu, wall, started = cpu_seconds(), time.perf_counter(), time.time()
    call_command("close_expired_orders", workers=workers, json=True, dry_run=dry_run, stdout=output)
    wall, cpu, ended = time.perf_counter() - wall, cpu_seconds() - cpu, time.time()
    summary = json.loads(output.getvalue())
    result = {
        "workers": workers,
        "dry_run": dry_run,
        "handled": summary["total"],
        "by_action": summary["by_action"],
        "wall_s": wall,
        "cpu_s": cpu,
        "cores": cpu / wall,
        "closes_per_s": summary["total"] / wall,
        "rss_before_sweep_kib": rss_before,
        "started_epoch": started,
        "ended_epoch": ended,
    }
    if analyse and not dry_run:
        result.update(from_audit_rows())
    return result


def from_audit_rows() -> dict[str, Any]:
    """Per-close latency, throughput per window of completions, and how long rows wait for a request slot.

    The latency is the exchange the audit row records (`duration_ms`: request out → answer read), as wechatpy's
    is timed around its call. The sweep writes a few rows ahead of a free slot, so `started_at` →
    `completed_at` is longer by that wait, reported on its own.
    """
    from django_wxpay_close.models import CloseAttempt

    rows = list(CloseAttempt.objects.order_by().values_list("started_at", "completed_at", "duration_ms"))
    latencies = sorted(float(duration) for _, _, duration in rows)
    waits = sorted((done - started).total_seconds() * 1000 - duration for started, done, duration in rows)
    first_start = min(started for started, _, _ in rows).timestamp()
    return {
        "latency_ms_p50": percentile(latencies, 0.50),
        "latency_ms_p99": percentile(latencies, 0.99),
        "wait_for_slot_ms_p50": percentile(waits, 0.50),
        "wait_for_slot_ms_p99": percentile(waits, 0.99),
        "window_closes_per_s": windows([done.timestamp() for _, done, _ in rows], first_start, WINDOWS),
    }
