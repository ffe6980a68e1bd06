"""EXPLAIN (ANALYZE, BUFFERS) of the sweep's queries on the seeded database (PostgreSQL): the claim must read
only due rows, and the waiting-for-retry summary a bounded number, whatever waits for a retry."""

from __future__ import annotations

import re
from typing import Any

from .. import django_env


def run(*, workers: int, **_unused: Any) -> dict[str, Any]:
    django_env.setup()
    from django.db import transaction

    from django_wxpay_close.conf import load_settings
    from django_wxpay_close.selectors import WAITING_COUNT_LIMIT, orders_due_for_closing, orders_waiting

    due = orders_due_for_closing(min_order_age=load_settings().min_order_age)
    with transaction.atomic():  # as the claim runs it: FOR UPDATE SKIP LOCKED, in a transaction
        plan = due.select_for_update(skip_locked=True)[:2 * workers].explain(analyze=True, buffers=True)
    removed = sum(int(n) for n in re.findall(r"Rows Removed by Filter: (\d+)", plan))
    waiting = orders_waiting()
    return {"plan": plan, "rows_removed_by_filter": removed, "uses_queue_index": "wxpay_close_queue_idx" in plan,
            "waiting_count_plan": waiting.order_by()[:WAITING_COUNT_LIMIT + 1].explain(analyze=True, buffers=True),
            "waiting_next_plan": waiting.order_by("due_at")[:1].explain(analyze=True, buffers=True)}
