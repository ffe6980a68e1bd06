"""Payment result notifications: who sent one, whether it is true, what it means for the order, and the reply.

`handle_payment_notification` is all the notify view calls. Every body leaves a `PaymentNotification` row, and
nothing in a body can make it raise; only a database failure does (the view then answers 500, and WeChat
notifies again later). Checks, in order, each with its verdict:

1. the body is a flat signed-XML document within the size cap (`unreadable`);
2. its mch_id is a configured merchant's (`unknown_merchant`);
3. its sign verifies with that merchant's key and *configured* sign type (`bad_signature`);
4. result_code is SUCCESS (`not_success`: acknowledged, nothing recorded);
5. out_trade_no is an Order of that mch_id and sub_mch_id (`unknown_order`);
6. total_fee and fee_type match the order's amount and currency, where it has them (`amount_mismatch`);
7. then the payment is recorded (`recorded_paid`, `already_paid`, or `paid_after_close` for a closed order).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from django.core.exceptions import ImproperlyConfigured
from django.db import models, transaction
from django.utils import timezone

from . import services, signals
from .conf import MerchantSettings, load_settings
from .models import NotificationVerdict, Order, OrderState, PaymentNotification, stored_text, write_database
from .wechat import DEFAULT_MAX_BODY_BYTES, InvalidXMLBody, Notification, notification_reply, read_notification

__all__ = ["ACKNOWLEDGED_VERDICTS", "MAX_NOTIFICATION_BYTES", "NotificationResult", "handle_payment_notification"]

logger = logging.getLogger("django_wxpay_close")

# A notification is a kilobyte or two; the view reads at most one byte more than this.
MAX_NOTIFICATION_BYTES = DEFAULT_MAX_BODY_BYTES

# Verdicts answered SUCCESS, which stops WeChat's repeats (15 s … 6 h apart, for about a day). A verified
# amount mismatch and a payment for a closed order are among them: both need a person, whom the row and the
# signal reach, and a day of repeats would only add rows. Everything else is answered FAIL: a body we cannot
# believe must not be acknowledged, and an unknown order may be one whose row is not committed yet.
ACKNOWLEDGED_VERDICTS = frozenset({
    NotificationVerdict.RECORDED_PAID,
    NotificationVerdict.ALREADY_PAID,
    NotificationVerdict.PAID_AFTER_CLOSE,
    NotificationVerdict.AMOUNT_MISMATCH,
    NotificationVerdict.NOT_SUCCESS,
})

# What a refused sender is told: fixed words, never our details (the row has those).
_FAIL_MESSAGES = {
    NotificationVerdict.UNREADABLE: "invalid XML",
    NotificationVerdict.UNKNOWN_MERCHANT: "unknown merchant",
    NotificationVerdict.BAD_SIGNATURE: "signature failure",
    NotificationVerdict.UNKNOWN_ORDER: "order not found",
}

_COLUMNS = ("mch_id", "sub_mch_id", "out_trade_no", "transaction_id", "total_fee", "fee_type", "result_code")


@dataclass(frozen=True)
class NotificationResult:
    verdict: NotificationVerdict
    notification: PaymentNotification  # the row written for it
    reply: bytes  # the XML body to answer with

    @property
    def acknowledged(self) -> bool:
        """True when WeChat is told SUCCESS (and so stops notifying)."""
        return self.verdict in ACKNOWLEDGED_VERDICTS


def handle_payment_notification(body: bytes) -> NotificationResult:
    """Check one notification body, record the payment it reports if it is true, and return the reply."""
    row: dict[str, Any] = {"raw_body": stored_text(body[:MAX_NOTIFICATION_BYTES])}
    try:
        notification = read_notification(body, max_bytes=MAX_NOTIFICATION_BYTES)
    except InvalidXMLBody as exc:
        return _finish(NotificationVerdict.UNREADABLE, row, str(exc))
    row.update({name: _cut(notification.get(name), name) for name in _COLUMNS})

    try:
        merchants = load_settings().merchants
    except ImproperlyConfigured as exc:  # FAIL: WeChat repeats it, and it lands once the settings are fixed
        return _finish(NotificationVerdict.UNKNOWN_MERCHANT, row, str(exc))
    candidates = _merchants_for(merchants, notification)
    if not candidates:
        return _finish(NotificationVerdict.UNKNOWN_MERCHANT, row,
                       f"no merchant in WXPAY_CLOSE['MERCHANTS'] has mch_id {notification.mch_id[:40]!r}")
    merchant = next((m for m in candidates if notification.verify(m.merchant.api_key, m.merchant.sign_type)), None)
    row["signature_verified"] = merchant is not None
    if merchant is None:
        return _finish(NotificationVerdict.BAD_SIGNATURE, row, _why_unverified(notification, candidates[0]))

    order = Order.objects.using(write_database()).filter(
        mch_id=notification.mch_id, sub_mch_id=notification.sub_mch_id, out_trade_no=notification.out_trade_no
    ).first()
    if notification.return_code != "SUCCESS" or notification.result_code != "SUCCESS":
        codes = " ".join(filter(None, (notification.return_code, notification.result_code,
                                       notification.get("err_code"), notification.get("err_code_des"))))
        return _finish(NotificationVerdict.NOT_SUCCESS, row, f"the payment did not succeed ({codes})", order=order)
    if order is None:
        return _finish(NotificationVerdict.UNKNOWN_ORDER, row,
                       f"no order {notification.out_trade_no[:40]!r} of merchant {merchant.name!r} "
                       f"(sub_mch_id {notification.sub_mch_id[:40]!r}); WeChat will notify again")
    mismatch = _mismatch(order, notification)
    if mismatch:
        result = _finish(NotificationVerdict.AMOUNT_MISMATCH, row, f"{mismatch}; not recorded as paid", order=order)
        signals.send_after_commit(signals.payment_mismatch, order, using=write_database(),
                                  notification=result.notification, attempt=None)
        return result
    return _record_payment(order, notification, row)


def _record_payment(order: Order, notification: Notification, row: dict[str, Any]) -> NotificationResult:
    # One transaction: the order's new state and the row that explains it are committed together.
    with transaction.atomic(using=write_database()):
        was_paid = order.state == OrderState.PAID
        try:
            services.record_payment(order=order, paid_at=notification.paid_at or timezone.now())
        except services.InvalidTransition:
            order.refresh_from_db(using=write_database())
            if order.state != OrderState.CLOSED:
                raise  # not a state a payment is refused in: a bug, answered 500 so WeChat tries again
            result = _finish(
                NotificationVerdict.PAID_AFTER_CLOSE, row,
                f"WeChat took a payment (transaction_id {notification.transaction_id[:40]!r}) for an order we had "
                "closed; it stays closed: refund the payer or fulfil the order", order=order,
            )
            signals.send_after_commit(signals.payment_for_closed_order, order, using=write_database(),
                                      notification=result.notification, attempt=None)
            return result
        # A repeat of a notification already recorded; two copies racing both read "not paid" and are both
        # recorded_paid, which is harmless: record_payment itself is idempotent.
        verdict = NotificationVerdict.ALREADY_PAID if was_paid else NotificationVerdict.RECORDED_PAID
        return _finish(verdict, row, "" if verdict is NotificationVerdict.RECORDED_PAID else "already recorded",
                       order=order)


def _finish(verdict: NotificationVerdict, row: dict[str, Any], detail: str, *, order: Order | None = None
            ) -> NotificationResult:
    saved = PaymentNotification.objects.create(verdict=verdict, detail=detail, order=order, **row)
    acknowledged = verdict in ACKNOWLEDGED_VERDICTS
    level = logging.ERROR if verdict in (NotificationVerdict.PAID_AFTER_CLOSE, NotificationVerdict.AMOUNT_MISMATCH) \
        else logging.INFO if acknowledged else logging.WARNING
    logger.log(level, "Payment notification for %r: %s%s", saved.out_trade_no, verdict.value,
               f" ({detail})" if detail else "",
               extra={"notification_id": saved.pk, "out_trade_no": saved.out_trade_no, "verdict": verdict.value,
                      "order_id": order.pk if order else None})
    reply = notification_reply(success=acknowledged, message=_FAIL_MESSAGES.get(verdict, ""))
    return NotificationResult(verdict=verdict, notification=saved, reply=reply)


def _merchants_for(merchants: Mapping[str, MerchantSettings], notification: Notification) -> list[MerchantSettings]:
    """The configured merchants with this mch_id, the one configured for its sub_mch_id (and sub_appid) first.

    The others are tried too: in institutional mode an order can carry a sub_mch_id of its own, which no
    merchant entry names, and the institution's key signs for all of its sub-merchants.
    """
    candidates = [m for m in merchants.values() if m.merchant.mch_id == notification.mch_id]
    return sorted(candidates, key=lambda m: (m.merchant.sub_mch_id != notification.sub_mch_id,
                                             (m.merchant.sub_appid or "") != notification.sub_appid))


def _why_unverified(notification: Notification, merchant: MerchantSettings) -> str:
    configured = merchant.merchant.sign_type.value
    if not notification.get("sign"):
        return "the body carries no sign"
    detail = f"the sign does not verify with the key and sign type ({configured}) of merchant {merchant.name!r}"
    claimed = notification.claimed_sign_type
    if claimed and claimed != configured:
        detail += f"; the body names sign_type {claimed[:20]!r}, which is never used to verify"
    return detail


def _mismatch(order: Order, notification: Notification) -> str:
    """Why the paid amount is not the order's ("" when it is, or the order has no amount or currency)."""
    problems = []
    if order.amount is not None and notification.total_fee_amount != order.amount:
        problems.append(f"total_fee {notification.total_fee[:20]!r} but the order's amount is {order.amount}")
    if order.currency and notification.fee_type.upper() != order.currency.upper():
        problems.append(f"fee_type {notification.fee_type[:16]!r} but the order's currency is {order.currency!r}")
    return "; ".join(problems)


def _cut(value: str, column: str) -> str:
    """A received value cut to its column (a hostile body may send anything, PostgreSQL refuses overlong text)."""
    field = PaymentNotification._meta.get_field(column)
    return value[: field.max_length] if isinstance(field, models.CharField) else value
