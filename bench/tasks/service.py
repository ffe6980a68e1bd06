"""`close_order()` one order at a time with its database work: CPU, wall and SQL statements per order."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from .. import django_env


def run(*, orders: int, repeats: int, **_unused: Any) -> dict[str, Any]:
    """Closes `orders` seeded orders per repeat (the seed holds orders × repeats); samples per repeat."""
    django_env.setup()
    from django.db import connection

    from django_wxpay_close.models import Order
    from django_wxpay_close.services import CloseAction, close_order

    statements = 0

    def count(execute: Callable[..., Any], sql: str, params: Any, many: bool, context: Any) -> Any:
        nonlocal statements
        statements += 1
        return execute(sql, params, many, context)

    backlog = list(Order.objects.order_by("pk"))
    cpu_us: list[float] = []
    wall_us: list[float] = []
    per_order: Counter[int] = Counter()
    actions: Counter[str] = Counter()
    with connection.execute_wrapper(count):
        for repeat in range(repeats):
            batch = backlog[repeat * orders:(repeat + 1) * orders]
            cpu, wall = time.process_time(), time.perf_counter()
            for order in batch:
                before = statements
                actions[close_order(order).action.value] += 1
                per_order[statements - before] += 1
            cpu_us.append((time.process_time() - cpu) / len(batch) * 1e6)
            wall_us.append((time.perf_counter() - wall) / len(batch) * 1e6)
    if set(actions) != {CloseAction.CLOSED.value}:
        raise RuntimeError(f"expected every order closed, got {dict(actions)}")
    return {
        "vendor": connection.vendor,
        "cpu_us_per_order": cpu_us,
        "wall_us_per_order": wall_us,
        "sql_per_order": {str(k): v for k, v in sorted(per_order.items())},
    }
