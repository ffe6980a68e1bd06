"""DATABASE_URL → Django DATABASES entry, with SQLite configured the way we recommend.

Small on purpose (sqlite:/// and postgres:// only); a project that needs more uses dj-database-url.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

# WAL lets readers run beside the one writer; IMMEDIATE transactions and a busy timeout make
# concurrent writers wait their turn instead of failing with "database is locked".
SQLITE_OPTIONS: dict[str, Any] = {
    "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
    "transaction_mode": "IMMEDIATE",
    "timeout": 20,
}


def database_from_url(url: str | None, *, sqlite_path: Path) -> dict[str, Any]:
    if not url:
        return {"ENGINE": "django.db.backends.sqlite3", "NAME": str(sqlite_path), "OPTIONS": dict(SQLITE_OPTIONS)}
    parts = urlsplit(url)
    if parts.scheme == "sqlite":
        return {"ENGINE": "django.db.backends.sqlite3", "NAME": unquote(parts.path[1:]) or str(sqlite_path),
                "OPTIONS": dict(SQLITE_OPTIONS)}
    if parts.scheme in ("postgres", "postgresql"):
        return {
            "ENGINE": "django.db.backends.postgresql",
            "NAME": unquote(parts.path.lstrip("/")) or "postgres",
            "USER": unquote(parts.username or ""),
            "PASSWORD": unquote(parts.password or ""),
            "HOST": parts.hostname or "",
            "PORT": str(parts.port or ""),
            "CONN_MAX_AGE": 0,
        }
    raise ValueError(f"DATABASE_URL scheme {parts.scheme!r} is not supported (use sqlite:/// or postgres://)")
