"""What the numbers were measured on, and how busy the machine and the database were meanwhile (Linux /proc)."""

from __future__ import annotations

import os
import platform
import resource
import threading
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

_TICK = os.sysconf("SC_CLK_TCK")


def describe(postgres_url: str | None = None) -> dict[str, Any]:
    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                 "?")
    memory_kib = next(int(line.split()[1]) for line in open("/proc/meminfo") if line.startswith("MemTotal"))
    packages: dict[str, str | None] = {}
    for name in ("django", "requests", "urllib3", "defusedxml", "psycopg", "wechatpy", "xmltodict"):
        try:
            packages[name] = version(name)
        except PackageNotFoundError:
            packages[name] = None
    return {
        "cpu": model, "cores": os.cpu_count(), "memory_gib": round(memory_kib / 2**20, 1),
        "kernel": platform.release(), "python": platform.python_version(), "packages": packages,
        "postgresql": _postgres_settings(postgres_url) if postgres_url else None,
        "load_average_at_start": os.getloadavg(),
    }


def _postgres_settings(url: str) -> dict[str, str] | None:
    import psycopg

    names = ("server_version", "max_connections", "shared_buffers", "synchronous_commit", "fsync", "autovacuum")
    try:
        with psycopg.connect(url, autocommit=True, connect_timeout=3) as connection:
            return {name: connection.execute(f"SHOW {name}").fetchone()[0] for name in names}  # type: ignore[index]
    except psycopg.OperationalError:
        return None


def cpu_seconds(children: bool = False) -> float:
    """User + system CPU of this process so far, every thread included; with `children`, plus that of its
    child processes that have ended (the sweeper processes `close_expired_orders --processes N` starts)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    total = usage.ru_utime + usage.ru_stime
    if children:
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        total += usage.ru_utime + usage.ru_stime
    return total


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


def _stat(pid: int) -> tuple[int, float] | None:
    """(start time in ticks, user + system CPU seconds) of a process; None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return int(fields[19]), (int(fields[11]) + int(fields[12])) / _TICK


def _postmasters() -> list[int]:
    """PostgreSQL's postmaster processes on this machine: `postgres` processes whose parent is not one."""
    def comm(pid: str) -> str:
        try:
            return Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:
            return ""

    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and comm(entry) == "postgres":
            try:
                parent = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1]
            except OSError:
                continue
            if comm(parent) != "postgres":
                found.append(int(entry))
    return found


class DatabaseLoad:
    """The PostgreSQL backends serving one database while a measurement runs, watched from this process.

    A thread samples /proc every `interval` seconds: each backend (and autovacuum worker) whose title names
    the database is charged the CPU it used since it was first seen, or since it started. A backend that
    disconnects between two samples loses at most one interval of CPU, and every worker holds its connection
    for the whole run, so that is a few backends' last statements. The same thread counts the database's
    rows in pg_stat_activity every `activity_every` seconds (the most at once is `peak_connections`), and
    `stop()` reads pg_stat_database's committed transactions once every backend has gone. Needs to read
    the postgres processes' /proc entries (root, or the postgres user); `available` says whether it can.
    """

    def __init__(self, url: str, database: str, interval: float = 0.1, activity_every: float = 0.25) -> None:
        self.url, self.database, self.interval, self.activity_every = url, database, interval, activity_every
        self._postmasters = _postmasters()
        self.available = bool(self._postmasters)
        self._first: dict[tuple[int, int], float] = {}  # (pid, start) → CPU when first seen (0 if born meanwhile)
        self._last: dict[tuple[int, int], float] = {}
        self._titles: dict[tuple[int, int], bool] = {}  # (pid, start) of the backends known to be ours
        self._peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="bench-database-load", daemon=True)

    def start(self) -> DatabaseLoad:
        self._connection = self._connect()
        self._xacts = self._transactions()
        self._started_ticks = self._uptime_ticks()
        self._sample(initial=True)
        self._thread.start()
        return self

    def _connect(self) -> Any:
        import psycopg

        return psycopg.connect(urlunsplit(urlsplit(self.url)._replace(path="/postgres")), autocommit=True)

    def _transactions(self) -> int:
        row = self._connection.execute(
            "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = %s", [self.database]).fetchone()
        return int(row[0]) if row else 0

    def _connected(self) -> int:
        return int(self._connection.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = %s", [self.database]).fetchone()[0])

    @staticmethod
    def _uptime_ticks() -> int:
        return int(float(Path("/proc/uptime").read_text().split()[0]) * _TICK)

    def _ours(self, pid: int, start: int) -> bool:
        """Does the process's title name our database? Only a yes is remembered: a backend that has just
        forked still carries the postmaster's title until it knows its database."""
        key = (pid, start)
        if key not in self._titles:
            try:
                title = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                return False
            if self.database not in title.split():
                return False
            self._titles[key] = True
        return True

    def _sample(self, initial: bool = False) -> None:
        for postmaster in self._postmasters:
            try:
                children = Path(f"/proc/{postmaster}/task/{postmaster}/children").read_text().split()
            except OSError:
                continue
            for child in children:
                stat = _stat(int(child))
                if stat is None or not self._ours(int(child), stat[0]):
                    continue
                key = (int(child), stat[0])
                if key not in self._first:
                    # Seen at the start: count from now. Born since: count from its birth (CPU 0 then).
                    self._first[key] = stat[1] if initial or stat[0] < self._started_ticks else 0.0
                self._last[key] = stat[1]

    def _watch(self) -> None:
        next_activity = 0.0
        while not self._stop.wait(self.interval):
            self._sample()
            if time.monotonic() >= next_activity:
                next_activity = time.monotonic() + self.activity_every
                self._peak = max(self._peak, self._connected())

    def stop(self) -> dict[str, Any]:
        """CPU seconds of the database's backends, most connections at once, transactions committed."""
        self._stop.set()
        self._thread.join()
        self._sample()
        for _ in range(40):  # backends flush their statistics as they exit: wait for the last to go
            if not self._connected():
                break
            time.sleep(0.05)
        transactions = self._transactions() - self._xacts
        self._connection.close()
        cpu = sum(self._last[key] - self._first[key] for key in self._last)
        return {"cpu_s": cpu, "backends": len(self._last), "peak_connections": self._peak,
                "transactions": transactions}
