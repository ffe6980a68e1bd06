"""Migrate, empty the tables and bulk-create an expired backlog (its own process: seeding memory is not measured)."""

from __future__ import annotations

import time
from typing import Any

from .. import django_env


def run(*, orders: int, waiting: int = 0, **_unused: Any) -> dict[str, Any]:
    started = time.perf_counter()
    django_env.setup()
    django_env.migrate()
    django_env.reset()
    prefix = django_env.seed(orders, waiting)
    return {"orders": orders, "waiting": waiting, "prefix": prefix, "seconds": time.perf_counter() - started}
