"""Client CPU per close, sequential, zero latency: ours, wechatpy and the http.client floor, alternated."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from ..stats import alternate
from .senders import SENDERS, Close, order_numbers

WARM_UP = 50


def _cpu_per_call(close: Close, next_number: Callable[[], str], calls: int) -> float:
    """Microseconds of this process's CPU (all threads, user + system) per call."""
    started = time.process_time()
    for _ in range(calls):
        close(next_number())
    return (time.process_time() - started) / calls * 1e6


def run(*, base_url: str, calls: int, repeats: int, **_unused: Any) -> dict[str, Any]:
    """µs of CPU per close for each sender, `repeats` alternated repeats of `calls` sequential closes."""
    next_number = order_numbers()
    senders = {name: factory(base_url) for name, factory in SENDERS.items()}
    for close in senders.values():
        for _ in range(WARM_UP):
            close(next_number())
    sides = {name: (lambda close=close: _cpu_per_call(close, next_number, calls)) for name, close in senders.items()}
    return {"cpu_us_per_close": alternate(sides, repeats), "calls": calls, "repeats": repeats}
