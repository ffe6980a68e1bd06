"""Orders the shop creates and pays: recording them, and letting the sweep take one off hold again. Nothing
here sends a request."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime

from django.db.models.functions import Now
from django.utils import timezone

from .. import signals
from ..conf import load_settings
from ..models import ALLOWED_TRANSITIONS, Order, OrderState, write_database
from ..wechat import validate_out_trade_no


class InvalidTransition(Exception):
    """A state change the transition table does not allow (e.g. a payment for a closed order)."""


def lift_hold(orders: Iterable[Order]) -> int:
    """Let the sweep take these orders again: clear the hold, restart their retry budget, due now. A paid order
    on hold (closed at WeChat after its payment was recorded) only leaves the needs-attention list. Returns how
    many."""
    ids = [order.pk for order in orders]
    using = write_database()
    lifted = Order.objects.using(using).filter(pk__in=ids, state=OrderState.OPEN, on_hold=True).update(
        on_hold=False, retry_count=0, query_count=0, needs_query=False, due_at=Now())
    return lifted + Order.objects.using(using).filter(pk__in=ids, on_hold=True).exclude(
        state=OrderState.OPEN).update(on_hold=False)


def paid_amount_mismatch(order: Order, *, total_fee: str, total_fee_amount: int | None, fee_type: str) -> str:
    """Why a payment WeChat reports (a notification, an order query) is not for the order's amount and currency:
    "" when it is, or the order has no amount or currency to compare."""
    problems = []
    if order.amount is not None and total_fee_amount != order.amount:
        problems.append(f"total_fee {total_fee[:20]!r} but the order's amount is {order.amount}")
    if order.currency and fee_type.upper() != order.currency.upper():
        problems.append(f"fee_type {fee_type[:16]!r} but the order's currency is {order.currency!r}")
    return "; ".join(problems)


def create_order(
    *,
    out_trade_no: str,
    merchant: str = "default",
    amount: int | None = None,
    currency: str = "",
    created_at: datetime | None = None,
    payment_deadline: datetime | None = None,
    sub_mch_id: str | None = None,
    sub_appid: str | None = None,
) -> Order:
    """Record an order the shop just created at WeChat (unified order), snapshotting the merchant IDs."""
    settings = load_settings()
    if merchant not in settings.merchants:
        raise ValueError(f"merchant {merchant!r} is not in WXPAY_CLOSE['MERCHANTS']")
    validate_out_trade_no(out_trade_no)
    configured = settings.merchants[merchant].merchant
    created_at = created_at or timezone.now()
    payment_deadline = payment_deadline or created_at + settings.payment_window
    return Order.objects.create(
        merchant=merchant, appid=configured.appid, mch_id=configured.mch_id,
        sub_mch_id=sub_mch_id or configured.sub_mch_id, sub_appid=sub_appid or configured.sub_appid or "",
        out_trade_no=out_trade_no, amount=amount, currency=currency, created_at=created_at,
        payment_deadline=payment_deadline, due_at=max(payment_deadline, created_at + settings.min_order_age),
    )


def record_payment(*, order: Order, paid_at: datetime | None = None) -> Order:
    """Mark an order PAID because WeChat's payment notification (or an order query) said so.

    Idempotent for an order already PAID; refuses a CLOSED order (WeChat cannot have taken that
    payment: investigate). Afterwards the sweep never sends closeorder for it.
    """
    using = write_database()
    for _ in range(3):  # the state may move under us once (a close landing); re-read and decide again
        order.refresh_from_db(using=using, fields=["state"])
        if order.state == OrderState.PAID:
            return order
        if OrderState.PAID not in ALLOWED_TRANSITIONS[order.state]:
            raise InvalidTransition(f"order {order.out_trade_no} is {order.state}; a payment cannot be recorded")
        if Order.objects.using(using).filter(pk=order.pk, state=order.state).update(
            state=OrderState.PAID, state_changed_at=Now(), paid_at=paid_at or Now()
        ):
            order.refresh_from_db(using=using)
            signals.send_after_commit(signals.order_paid_recorded, order, using=using, attempt=None)
            return order
    raise InvalidTransition(f"order {order.out_trade_no} kept changing state; payment not recorded")
