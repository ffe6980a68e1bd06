"""close_before_reorder: close the old order before the shop creates a new one for the same purchase."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import Enum
from typing import Any

from django.utils import timezone

from ..conf import load_settings
from ..models import Order, OrderState, write_database
from ..reports import CloseAction, OrderCloseResult
from ..selectors import TOO_YOUNG
from ..wechat import QueryVerdict
from .closing import check_order, close_order


class ReorderVerdict(str, Enum):
    """May the shop create a new WeChat order for the purchase whose old order this was?"""

    CREATE_NEW = "create_new"  # the old order is closed (or never existed at WeChat): it can never be paid
    ALREADY_PAID = "already_paid"  # the payer paid the old order: do not create a new one; fulfil it
    TOO_YOUNG = "too_young"  # younger than MIN_ORDER_AGE: it cannot be closed before `retry_at`
    UNKNOWN = "unknown"  # WeChat itself could not say (network, SYSTEMERROR, a payment in progress, in flight): retry


@dataclass(frozen=True)
class ReorderAnswer:
    verdict: ReorderVerdict
    order: Order  # refreshed
    reason: str = ""
    retry_at: datetime | None = None  # when asking again can help (TOO_YOUNG, UNKNOWN)
    result: OrderCloseResult | None = None  # the last request sent (a close, or the query after it), if one was

    @property
    def may_create_new_order(self) -> bool:
        return self.verdict is ReorderVerdict.CREATE_NEW


def close_before_reorder(order: Order, *, user: Any = None) -> ReorderAnswer:
    """Close `order` before the shop creates a new one for the same purchase, and say whether it may.

    WeChat's guidance: a merchant closes the old order first, so the payer cannot pay both. The answer is
    CREATE_NEW only when the old order can never be paid. When the close cannot tell, WeChat is asked once
    (orderquery): paid or closed settles the verdict, and a still-payable order is closed once more.
    """
    settings = load_settings()
    order.refresh_from_db(using=write_database())
    if order.state == OrderState.OPEN and order.created_at > timezone.now() - settings.min_order_age:
        return ReorderAnswer(ReorderVerdict.TOO_YOUNG, order, TOO_YOUNG, order.created_at + settings.min_order_age)
    result = close_order(order, user=user) if order.state == OrderState.OPEN else None
    if order.state == OrderState.OPEN and result is not None and result.action is not CloseAction.SKIPPED:
        result = check_order(order, user=user)  # the close could not tell: ask where the order stands
        if result.action is CloseAction.CHECKED and order.last_outcome == QueryVerdict.PAYABLE:
            result = close_order(order, user=user)
    if order.state == OrderState.PAID:
        return ReorderAnswer(ReorderVerdict.ALREADY_PAID, order, "the payer paid it", result=result)
    if order.state in (OrderState.CLOSED, OrderState.UNKNOWN_TO_WECHAT):
        return ReorderAnswer(ReorderVerdict.CREATE_NEW, order, f"it is {order.state}", result=result)
    retry_at = order.due_at if order.due_at > timezone.now() else timezone.now() + settings.retry_backoff
    return ReorderAnswer(ReorderVerdict.UNKNOWN, order, result.reason if result else "", retry_at, result)
