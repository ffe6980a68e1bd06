"""Start `python -m bench.worker` processes against a database and a simulator, and read their JSON answers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_POSTGRES = "postgres://postgres@127.0.0.1:5432/wxpay_bench"  # `--quick` and bench.ab append a suffix


@dataclass(frozen=True)
class Backend:
    name: str  # "postgresql" or "sqlite"
    url: str  # DATABASE_URL


def postgres_backend(url: str) -> Backend | None:
    """The PostgreSQL database at `url`, created if missing; None when no server answers there."""
    import psycopg

    parts = urlsplit(url)
    name = parts.path.lstrip("/") or "postgres"
    try:
        maintenance = urlunsplit(parts._replace(path="/postgres"))
        with psycopg.connect(maintenance, autocommit=True, connect_timeout=3) as admin:
            if not admin.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name]).fetchone():
                admin.execute(f'CREATE DATABASE "{name}"')
    except psycopg.OperationalError:
        return None
    return Backend("postgresql", url)


def sqlite_backend(path: Path) -> Backend:
    """A fresh SQLite file (WAL mode, as bench/settings.py configures it)."""
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    return Backend("sqlite", f"sqlite:///{path}")


def _command(task: str, kwargs: dict[str, Any]) -> list[str]:
    return [sys.executable, "-m", "bench.worker", task, json.dumps(kwargs)]


def _env(backend: Backend | None, base_url: str | None, root: Path = ROOT) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    if backend is not None:
        env["DATABASE_URL"] = backend.url
    if base_url is not None:
        env["WXPAY_BASE_URL"] = base_url
    return env


def start(task: str, *, backend: Backend | None = None, base_url: str | None = None, root: Path = ROOT,
          **kwargs: Any) -> subprocess.Popen[str]:
    """Start one measurement process (call `finish` on it); `root`: the checkout whose code it runs."""
    return subprocess.Popen(_command(task, {"base_url": base_url, **kwargs}), cwd=root,
                            env=_env(backend, base_url, root), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def finish(process: subprocess.Popen[str]) -> dict[str, Any]:
    stdout, stderr = process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"{process.args!r} failed ({process.returncode}):\n{stderr[-4000:]}")
    answer: dict[str, Any] = json.loads(stdout.strip().splitlines()[-1])
    return answer


def run(task: str, *, backend: Backend | None = None, base_url: str | None = None, root: Path = ROOT,
        **kwargs: Any) -> dict[str, Any]:
    """Run one measurement process to completion and return its JSON answer."""
    return finish(start(task, backend=backend, base_url=base_url, root=root, **kwargs))
