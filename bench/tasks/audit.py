"""Throughput read back from the audit rows of every sweeper that shared the database (see tasks/sweep.py)."""

from __future__ import annotations

from typing import Any

from .. import django_env


def run(**_unused: Any) -> dict[str, Any]:
    django_env.setup()
    from .sweep import from_audit_rows

    return from_audit_rows()
