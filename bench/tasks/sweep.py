"""`manage.py close_expired_orders` over the seeded backlog: closes/s, per-close latency, CPU, SQL, memory."""

from __future__ import annotations

import io
import json
import resource
import time
from collections.abc import Callable
from typing import Any

from .. import django_env
from ..machine import cpu_seconds
from ..stats import percentile, windows

WINDOWS = 5  # throughput samples per run: the closes split into this many consecutive equal parts


def count_statements() -> Callable[[], int]:
    """Count the SQL statements of every database connection this process opens from now on (each worker
    thread opens its own); returns a function giving the total so far. Transaction control (BEGIN, COMMIT)
    is not a statement here: Django issues it through the driver, not a cursor."""
    from django.db.backends.signals import connection_created

    counters: list[list[int]] = []

    def install(sender: Any, connection: Any, **_: Any) -> None:
        counter = [0]
        counters.append(counter)

        def counted(execute: Callable[..., Any], sql: str, params: Any, many: bool, context: Any) -> Any:
            counter[0] += 1
            return execute(sql, params, many, context)

        connection.execute_wrappers.append(counted)

    connection_created.connect(install, weak=False)
    return lambda: sum(counter[0] for counter in counters)


def run(*, workers: int, processes: int = 1, dry_run: bool = False, analyse: bool = True,
        **_unused: Any) -> dict[str, Any]:
    """One `close_expired_orders --workers W --processes P` in this process (P > 1: it starts P sweepers)."""
    django_env.setup()
    from django.core.management import call_command

    statements = count_statements()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    output = io.StringIO()
    cpu, wall, started = cpu_seconds(children=True), time.perf_counter(), time.time()
    call_command("close_expired_orders", workers=workers, processes=processes, json=True, dry_run=dry_run,
                 stdout=output)
    wall, cpu, ended = time.perf_counter() - wall, cpu_seconds(children=True) - cpu, time.time()
    summary = json.loads(output.getvalue())
    result = {
        "workers": workers,
        "processes": processes,
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
    if processes == 1:  # the statements of other processes are not seen here
        result["sql_statements"] = statements()
    else:  # the largest peak RSS among the sweeper processes the command started
        result["sweeper_peak_rss_kib"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if analyse and not dry_run:
        result.update(from_audit_rows())
    return result


def from_audit_rows() -> dict[str, Any]:
    """Per-close latency and throughput per window of completions, read back from the audit trail.

    The latency is the exchange the audit row records (`duration_ms`: request out → answer read), as
    wechatpy's is timed around its call. Every sweeper that shared the database is counted.
    """
    from django_wxpay_close.models import CloseAttempt

    answered = CloseAttempt.objects.filter(completed_at__isnull=False, duration_ms__isnull=False).order_by()
    rows = [(started, done, duration) for started, done, duration
            in answered.values_list("started_at", "completed_at", "duration_ms")
            if done is not None and duration is not None]
    latencies = sorted(float(duration) for _, _, duration in rows)
    first_start = min(started for started, _, _ in rows).timestamp()
    return {
        "latency_ms_p50": percentile(latencies, 0.50),
        "latency_ms_p99": percentile(latencies, 0.99),
        "window_closes_per_s": windows([done.timestamp() for _, done, _ in rows], first_start, WINDOWS),
    }
