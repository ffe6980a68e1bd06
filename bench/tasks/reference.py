"""The reference sweep: what a user writes by hand with wechatpy 1.8 instead of this app.

The due orders are read in one query; a `ThreadPoolExecutor` of `workers` threads calls wechatpy's
`WeChatPay(...).order.close(out_trade_no)` for each, then, in one `transaction.atomic()`, marks the order closed
with an ORM `filter(...).update(...)` and inserts its audit row with `CloseAttempt.objects.create(...)`. No claim
(two of these scripts at once would send orders twice), no row before the request leaves (a crash mid-request
leaves no trace), no check of the answer's signature. One `WeChatPay` is shared by the threads and its
requests pool widened to `workers` connections, so wechatpy's default of 10 does not slow it down.
"""

from __future__ import annotations

import json
import resource
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import Any

from .. import django_env
from ..machine import cpu_seconds
from .sweep import count_statements, from_audit_rows


def run(*, base_url: str, workers: int, **_unused: Any) -> dict[str, Any]:
    django_env.setup()
    from django.db import transaction
    from django.db.models import F
    from django.utils import timezone
    from requests.adapters import HTTPAdapter
    from wechatpy.pay import WeChatPay

    from django_wxpay_close.models import CloseAttempt, Order, OrderState, Trigger
    from django_wxpay_close.testing import API_KEY, APPID, MCH_ID, SUB_MCH_ID

    pay = WeChatPay(APPID, API_KEY, MCH_ID, sub_mch_id=SUB_MCH_ID, sandbox=False)
    pay.API_BASE_URL = base_url.rstrip("/") + "/"  # wechatpy builds {API_BASE_URL}pay/closeorder
    pay._http.mount("http://", HTTPAdapter(pool_maxsize=workers))
    url = pay.API_BASE_URL + "pay/closeorder"

    def close(order: Order) -> str:
        began = timezone.now()
        answer = pay.order.close(order.out_trade_no)  # raises WeChatPayException on a FAIL
        took = timezone.now() - began
        with transaction.atomic():
            Order.objects.filter(pk=order.pk).update(
                state=OrderState.CLOSED, closed_at=timezone.now(), state_changed_at=timezone.now(),
                attempt_count=F("attempt_count") + 1, last_attempt_at=began, last_outcome="closed")
            CloseAttempt.objects.create(
                order=order, merchant=order.merchant, mch_id=order.mch_id, sub_mch_id=order.sub_mch_id,
                out_trade_no=order.out_trade_no, trigger=Trigger.CODE, url=url, sign_type="MD5",
                started_at=began, completed_at=timezone.now(), duration_ms=round(took / timedelta(milliseconds=1)),
                http_status=200, response_body=json.dumps(answer), return_code=answer.get("return_code", ""),
                result_code=answer.get("result_code", ""), outcome="closed")
        return str(answer["result_code"])

    statements = count_statements()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    cpu, wall, started = cpu_seconds(), time.perf_counter(), time.time()
    due = list(Order.objects.filter(state=OrderState.OPEN, payment_deadline__lte=timezone.now())
               .order_by("payment_deadline"))
    with ThreadPoolExecutor(workers) as pool:
        answers = list(pool.map(close, due))
    wall, cpu, ended = time.perf_counter() - wall, cpu_seconds() - cpu, time.time()
    if any(answer != "SUCCESS" for answer in answers):
        raise RuntimeError("the reference sweep: a close did not succeed")
    result = {
        "workers": workers, "handled": len(answers), "by_action": {"closed": len(answers)},
        "wall_s": wall, "cpu_s": cpu, "cores": cpu / wall, "closes_per_s": len(answers) / wall,
        "rss_before_sweep_kib": rss_before, "started_epoch": started, "ended_epoch": ended,
        "sql_statements": statements(),
    }
    result.update(from_audit_rows())
    return result
