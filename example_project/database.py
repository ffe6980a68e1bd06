"""DATABASE_URL → Django DATABASES entry, with SQLite configured the way we recommend.

Small on purpose (sqlite:///, postgres:// and mysql:// only); a project that needs more uses dj-database-url.
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

# MySQL/MariaDB: utf8mb4 stores any text (WeChat answers included); strict mode refuses over-long or
# invalid values instead of silently truncating them. READ COMMITTED (Django's recommendation) rather
# than InnoDB's default REPEATABLE READ: there the batch claim's SELECT ... FOR UPDATE SKIP LOCKED would
# keep next-key locks on every row it scans (also those its WHERE rejects) and the gaps between them, so
# new orders and other callers' claims on those rows would wait; READ COMMITTED keeps locks on the
# returned rows only, as PostgreSQL does.
MYSQL_OPTIONS: dict[str, Any] = {
    "charset": "utf8mb4",
    "init_command": "SET sql_mode='STRICT_TRANS_TABLES'",
    "isolation_level": "read committed",
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
    if parts.scheme in ("mysql", "mariadb"):
        return {
            "ENGINE": "django.db.backends.mysql",  # driver: mysqlclient (the `mysql` extra)
            "NAME": unquote(parts.path.lstrip("/")),
            "USER": unquote(parts.username or ""),
            "PASSWORD": unquote(parts.password or ""),
            "HOST": parts.hostname or "",
            "PORT": str(parts.port or ""),
            "CONN_MAX_AGE": 0,
            "OPTIONS": dict(MYSQL_OPTIONS),
            "TEST": {"CHARSET": "utf8mb4", "COLLATION": "utf8mb4_unicode_ci"},
        }
    raise ValueError(f"DATABASE_URL scheme {parts.scheme!r} is not supported (use sqlite:///, postgres:// or mysql://)")
