"""Signals for the host shop. All are sent after the state change is committed, with
`send_robust`: a failing receiver is logged and never undoes or stops a close.

Every signal has `sender=Order` and the keyword arguments `order` (the refreshed Order) and
`attempt` (the CloseAttempt that produced it, or None).

- order_closed: WeChat closed the order (`already_closed=True` when someone had closed it before).
- order_found_paid: WeChat answered ORDERPAID; the order is PAID. Fulfil or refund it.
- close_failed: the close did not succeed this time; `outcome` (wechat.Outcome) and `reason` say why.
- close_attempts_exhausted: retries ran out; the order is UNKNOWN_TO_WECHAT or on hold. `outcome`, `reason`.
- order_paid_recorded: `record_payment()` marked the order PAID (notification or order query).

The payment notification view sends these two with `attempt=None` and `notification` (the PaymentNotification):

- payment_for_closed_order: WeChat reports a payment for an order we had closed. The money was taken: a
  person must refund it (or fulfil the order). The order stays CLOSED.
- payment_mismatch: a signed notification's total_fee or fee_type differs from the order's amount or currency.
  The order is not marked paid: a person must check the payment.
"""

from django.dispatch import Signal

order_closed = Signal()
order_found_paid = Signal()
close_failed = Signal()
close_attempts_exhausted = Signal()
order_paid_recorded = Signal()
payment_for_closed_order = Signal()
payment_mismatch = Signal()
