"""Signals for the host shop. All are sent after the state change is committed, with
`send_robust`: a failing receiver is logged and never undoes or stops a close.

Every signal has `sender=Order` and the keyword arguments `order` (the refreshed Order) and
`attempt` (the CloseAttempt that produced it, or None).

- order_closed: WeChat closed the order (`already_closed=True` when someone had closed it before).
- order_found_paid: WeChat answered ORDERPAID; the order is PAID. Fulfil or refund it.
- close_failed: the close did not succeed this time; `outcome` (wechat.Outcome) and `reason` say why.
- close_attempts_exhausted: retries ran out; the order is UNKNOWN_TO_WECHAT or on hold. `outcome`, `reason`.
- order_paid_recorded: `record_payment()` marked the order PAID (notification or order query).
- order_settled_by_query: WeChat's answer to an orderquery changed the order's state: `state` is the new one
  (paid, closed or unknown_to_wechat), `trade_state` what WeChat said (SUCCESS, REFUND, CLOSED, REVOKED, or ""
  for ORDERNOTEXIST). A shop that fulfils paid orders listens to this one as well as order_found_paid and
  order_paid_recorded: each payment is announced by exactly one of the three.
- closed_after_payment: WeChat answered a close with "closed" for an order a payment was recorded for
  meanwhile (`outcome`, `reason`). The order stays PAID and goes on hold: a person must check the payment at
  WeChat and refund or fulfil it.

The payment notification view sends these two with `attempt=None` and `notification` (the PaymentNotification):

- payment_for_closed_order: WeChat reports a payment for an order we had closed. The money was taken: a
  person must refund it (or fulfil the order). The order stays CLOSED.
- payment_mismatch: a signed notification's (or an orderquery answer's, then with `notification=None` and the
  query's `attempt`) total_fee or fee_type differs from the order's amount or currency, or its
  appid (or a sub_appid it names) from the order's.
  The order is not marked paid: a person must check the payment.
"""

from __future__ import annotations

import logging
from typing import Any

from django.db import models, transaction
from django.dispatch import Signal

logger = logging.getLogger("django_wxpay_close")

order_closed = Signal()
order_found_paid = Signal()
close_failed = Signal()
close_attempts_exhausted = Signal()
order_paid_recorded = Signal()
order_settled_by_query = Signal()
closed_after_payment = Signal()
payment_for_closed_order = Signal()
payment_mismatch = Signal()


def send_after_commit(signal: Signal, order: models.Model, *, using: str, **kwargs: Any) -> None:
    """Send `signal` (sender: the order's model) with the order as it is after the change, once the change is
    committed; a receiver that raises is logged, never raised, so it cannot undo or stop a close."""
    sender = type(order)
    if not signal.has_listeners(sender):
        return
    order.refresh_from_db(using=using)

    def send() -> None:
        for receiver, response in signal.send_robust(sender=sender, order=order, **kwargs):
            if isinstance(response, Exception):
                logger.error("A receiver of a django_wxpay_close signal failed: %r", receiver, exc_info=response,
                             extra={"order_id": order.pk, "out_trade_no": getattr(order, "out_trade_no", "")})

    transaction.on_commit(send, using=using)
