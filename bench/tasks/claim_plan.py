"""EXPLAIN (ANALYZE, BUFFERS) of the sweep's claim on the seeded database (PostgreSQL): it must read only
due rows, whatever waits for a retry."""

from __future__ import annotations

import re
from typing import Any

from .. import django_env


def run(*, workers: int, **_unused: Any) -> dict[str, Any]:
    django_env.setup()
    from django.db import transaction

    from django_wxpay_close.conf import load_settings
    from django_wxpay_close.selectors import orders_due_for_closing

    due = orders_due_for_closing(min_order_age=load_settings().min_order_age)
    with transaction.atomic():  # as the claim runs it: FOR UPDATE SKIP LOCKED, in a transaction
        plan = due.select_for_update(skip_locked=True)[:2 * workers].explain(analyze=True, buffers=True)
    removed = sum(int(n) for n in re.findall(r"Rows Removed by Filter: (\d+)", plan))
    return {"plan": plan, "rows_removed_by_filter": removed, "uses_queue_index": "wxpay_close_queue_idx" in plan}
