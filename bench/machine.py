"""What the numbers were measured on, and how busy the whole machine was meanwhile (Linux /proc)."""

from __future__ import annotations

import os
import platform
import resource
from importlib.metadata import PackageNotFoundError, version
from typing import Any


def describe() -> dict[str, Any]:
    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    memory_kib = next(int(line.split()[1]) for line in open("/proc/meminfo") if line.startswith("MemTotal"))
    packages: dict[str, str | None] = {}
    for name in ("django", "requests", "urllib3", "aiohttp", "defusedxml", "psycopg", "wechatpy", "xmltodict"):
        try:
            packages[name] = version(name)
        except PackageNotFoundError:
            packages[name] = None
    return {
        "cpu": model, "cores": os.cpu_count(), "memory_gib": round(memory_kib / 2**20, 1),
        "kernel": platform.release(), "python": platform.python_version(), "packages": packages,
        "load_average_at_start": os.getloadavg(),
    }


def cpu_seconds() -> float:
    """User + system CPU of this process so far, every thread included."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class BusyCores:
    """Cores busy machine-wide (every process, ours or not) between construction and `stop()`."""

    def __init__(self) -> None:
        self._start = self._ticks()

    @staticmethod
    def _ticks() -> tuple[int, int]:
        with open("/proc/stat") as stat:
            values = [int(v) for v in stat.readline().split()[1:]]
        idle = values[3] + values[4]
        return sum(values[:8]) - idle, sum(values[:8])

    def stop(self) -> float:
        busy, total = self._ticks()
        return (busy - self._start[0]) / max(total - self._start[1], 1) * (os.cpu_count() or 1)
