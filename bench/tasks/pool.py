"""A thread pool of bare clients (no database): what `wechatpy plus a cron script` reaches, and our client's ceiling."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ..machine import cpu_seconds
from ..stats import percentile, windows
from .senders import SENDERS, order_numbers
from .sweep import WINDOWS


def run(*, sender: str, base_url: str, workers: int, calls: int, **_unused: Any) -> dict[str, Any]:
    """`calls` closes through `workers` threads sharing one client, as a cron script would run them."""
    close = SENDERS[sender](base_url, pool_size=workers)
    next_number = order_numbers()
    finished: list[float] = []
    latencies: list[float] = []

    def timed(out_trade_no: str) -> None:
        began = time.perf_counter()
        close(out_trade_no)
        done = time.perf_counter()
        latencies.append((done - began) * 1000)
        finished.append(done)

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(close, [next_number() for _ in range(workers)]))  # connections open before timing
        cpu, started = cpu_seconds(), time.perf_counter()
        list(pool.map(timed, [next_number() for _ in range(calls)]))
        wall, cpu = time.perf_counter() - started, cpu_seconds() - cpu
    return summary(sender, workers, started, wall, cpu, finished, latencies)


def summary(sender: str, workers: int, started: float, wall: float, cpu: float, finished: list[float],
            latencies: list[float]) -> dict[str, Any]:
    """One run of bare closes: throughput overall and per window (as the sweep's), latency, CPU."""
    latencies = sorted(latencies)
    calls = len(finished)
    return {
        "sender": sender, "workers": workers, "handled": calls, "wall_s": wall, "cpu_s": cpu, "cores": cpu / wall,
        "closes_per_s": calls / wall, "window_closes_per_s": windows(finished, started, WINDOWS),
        "latency_ms_p50": percentile(latencies, 0.50), "latency_ms_p99": percentile(latencies, 0.99),
    }
