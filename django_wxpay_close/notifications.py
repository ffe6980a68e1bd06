"""Payment result notifications: who sent one, whether it is true, what it means for the order, and the reply.

`handle_payment_notification` is all the notify view calls. Nothing in a body can make it raise; only a
database failure does (the view then answers 500, and WeChat notifies again later). Checks, in order, each with
its verdict:

1. the body is a flat signed-XML document within the size cap (`unreadable`);
2. its mch_id is a configured merchant's (`unknown_merchant`);
3. its sign verifies with that merchant's key and *configured* sign type (`bad_signature`);
4. result_code is SUCCESS (`not_success`: acknowledged, nothing recorded);
5. out_trade_no is an Order of that mch_id and sub_mch_id (`unknown_order`);
6. appid (and a sub_appid it names) are the order's (`app_mismatch`);
7. total_fee and fee_type match the order's amount and currency, where it has them (`amount_mismatch`);
8. then the payment is recorded (`recorded_paid`, `already_paid`, or `paid_after_close` for a closed order).

The endpoint is public, so what anyone can make it store is bounded: a verified notification keeps its whole
body, always; a body that fails checks 1-3 keeps a trace (size, hash, first bytes, client address), and past
NOTIFICATION_TRACES_PER_MINUTE such bodies a minute only a per-minute count (`UnauthenticatedNotificationCount`).
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from django.core.exceptions import ImproperlyConfigured
from django.db import IntegrityError, models, router, transaction
from django.db.models import F
from django.utils import timezone

from . import services, signals
from .conf import DEFAULTS, CloseSettings, MerchantSettings, load_settings
from .models import (
    NotificationVerdict,
    Order,
    OrderState,
    PaymentNotification,
    UnauthenticatedNotificationCount,
    stored_text,
    write_database,
)
from .wechat import DEFAULT_MAX_BODY_BYTES, InvalidXMLBody, Notification, notification_reply, read_notification

__all__ = [
    "ACKNOWLEDGED_VERDICTS", "MAX_NOTIFICATION_BYTES", "TRACE_BODY_BYTES", "NotificationResult",
    "handle_payment_notification",
]

logger = logging.getLogger("django_wxpay_close")

# A notification is a kilobyte or two; the view reads at most one byte more than this.
MAX_NOTIFICATION_BYTES = DEFAULT_MAX_BODY_BYTES
# What an unauthenticated body keeps of itself: enough to recognise a misconfigured sender, never a flood's bulk.
TRACE_BODY_BYTES = 256

# Verdicts answered SUCCESS, which stops WeChat's repeats (15 s … 6 h apart, for about a day). A verified
# amount mismatch and a payment for a closed order are among them: both need a person, whom the row and the
# signal reach, and a day of repeats would only add rows. Everything else is answered FAIL: a body we cannot
# believe must not be acknowledged, and an unknown order may be one whose row is not committed yet.
ACKNOWLEDGED_VERDICTS = frozenset({
    NotificationVerdict.RECORDED_PAID,
    NotificationVerdict.ALREADY_PAID,
    NotificationVerdict.PAID_AFTER_CLOSE,
    NotificationVerdict.AMOUNT_MISMATCH,
    NotificationVerdict.APP_MISMATCH,
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
    notification: PaymentNotification | None  # the row written for it; None when a flood was only counted
    reply: bytes  # the XML body to answer with

    @property
    def acknowledged(self) -> bool:
        """True when WeChat is told SUCCESS (and so stops notifying)."""
        return self.verdict in ACKNOWLEDGED_VERDICTS


def handle_payment_notification(body: bytes, *, client_address: str = "") -> NotificationResult:
    """Check one notification body, record the payment it reports if it is true, and return the reply.

    `client_address` is the peer as Django sees it (REMOTE_ADDR), kept on the row; it decides nothing.
    """
    row: dict[str, Any] = {
        "body_size": len(body), "body_sha256": hashlib.sha256(body).hexdigest(), "client_address": client_address[:64],
    }
    settings_error = ""
    try:
        settings: CloseSettings | None = load_settings()
    except ImproperlyConfigured as exc:  # FAIL: WeChat repeats it, and it lands once the settings are fixed
        settings, settings_error = None, str(exc)
    traces_per_minute = (settings.notification_traces_per_minute if settings is not None
                         else DEFAULTS["NOTIFICATION_TRACES_PER_MINUTE"])

    def refuse(verdict: NotificationVerdict, detail: str) -> NotificationResult:
        if not _take_trace_slot(verdict, traces_per_minute):
            return NotificationResult(verdict=verdict, notification=None, reply=_reply(verdict))
        return _finish(verdict, {**row, "raw_body": stored_text(body[:TRACE_BODY_BYTES])}, detail)

    try:
        notification = read_notification(body, max_bytes=MAX_NOTIFICATION_BYTES)
    except InvalidXMLBody as exc:
        return refuse(NotificationVerdict.UNREADABLE, str(exc))
    row.update({name: _cut(notification.get(name), name) for name in _COLUMNS})

    if settings is None:
        return refuse(NotificationVerdict.UNKNOWN_MERCHANT, settings_error)
    merchants = settings.merchants
    candidates = _merchants_for(merchants, notification)
    if not candidates:
        return refuse(NotificationVerdict.UNKNOWN_MERCHANT,
                      f"no merchant in WXPAY_CLOSE['MERCHANTS'] has mch_id {notification.mch_id[:40]!r}")
    merchant = next((m for m in candidates if notification.verify(m.merchant.api_key, m.merchant.sign_type)), None)
    if merchant is None:
        row["signature_verified"] = False
        return refuse(NotificationVerdict.BAD_SIGNATURE, _why_unverified(notification, candidates[0]))
    # WeChat's word: kept whole, and never subject to the trace bound.
    row.update(signature_verified=True, raw_body=stored_text(body[:MAX_NOTIFICATION_BYTES]))

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
    for verdict, mismatch in ((NotificationVerdict.APP_MISMATCH, _other_app(order, notification)),
                              (NotificationVerdict.AMOUNT_MISMATCH, _mismatch(order, notification))):
        if mismatch:
            result = _finish(verdict, row, f"{mismatch}; not recorded as paid", order=order)
            signals.send_after_commit(signals.payment_mismatch, order, using=write_database(),
                                      notification=result.notification, attempt=None)
            return result
    return _record_payment(order, notification, row)


def _record_payment(order: Order, notification: Notification, row: dict[str, Any]) -> NotificationResult:
    # One transaction: the order's new state and the row that explains it are committed together. The order's
    # row lock makes concurrent copies of one notification take turns, so exactly one reads "not paid yet" and
    # says recorded_paid; the others wait for its commit and say already_paid.
    with transaction.atomic(using=write_database()):
        order = Order.objects.using(write_database()).select_for_update().get(pk=order.pk)
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
        verdict = NotificationVerdict.ALREADY_PAID if was_paid else NotificationVerdict.RECORDED_PAID
        return _finish(verdict, row, "" if verdict is NotificationVerdict.RECORDED_PAID else "already recorded",
                       order=order)


def _finish(verdict: NotificationVerdict, row: dict[str, Any], detail: str, *, order: Order | None = None
            ) -> NotificationResult:
    saved = PaymentNotification.objects.create(verdict=verdict, detail=detail, order=order, **row)
    acknowledged = verdict in ACKNOWLEDGED_VERDICTS
    level = logging.ERROR if verdict in _INCIDENTS else logging.INFO if acknowledged else logging.WARNING
    logger.log(level, "Payment notification for %r: %s%s", saved.out_trade_no, verdict.value,
               f" ({detail})" if detail else "",
               extra={"notification_id": saved.pk, "out_trade_no": saved.out_trade_no, "verdict": verdict.value,
                      "order_id": order.pk if order else None, "client_address": saved.client_address})
    return NotificationResult(verdict=verdict, notification=saved, reply=_reply(verdict))


def _reply(verdict: NotificationVerdict) -> bytes:
    return notification_reply(success=verdict in ACKNOWLEDGED_VERDICTS, message=_FAIL_MESSAGES.get(verdict, ""))


_INCIDENTS = frozenset({
    NotificationVerdict.PAID_AFTER_CLOSE, NotificationVerdict.AMOUNT_MISMATCH, NotificationVerdict.APP_MISMATCH,
})


def _take_trace_slot(verdict: NotificationVerdict, traces_per_minute: int) -> bool:
    """Count one unauthenticated body in this minute's row; True while the minute still has a trace to give.

    The row is shared by every worker of every web server: one UPDATE … SET n = n + 1 each, conditional on
    `traced` being under the bound for the request that gets a trace, so no more than `traces_per_minute` traces
    are written a minute however many workers race. The minute is the host's (it decides no order's state).
    """
    using = router.db_for_write(UnauthenticatedNotificationCount)
    minute = timezone.now().replace(second=0, microsecond=0)
    counts = UnauthenticatedNotificationCount.objects.using(using).filter(interval_start=minute)
    count_it = {verdict.value: F(verdict.value) + 1}
    for _ in range(2):  # a second round only after losing the race to create the minute's row
        if counts.filter(traced__lt=traces_per_minute).update(traced=F("traced") + 1, **count_it):
            return True
        if counts.update(**count_it):
            _log_flood_once(minute, traces_per_minute)
            return False
        try:
            with transaction.atomic(using=using):
                UnauthenticatedNotificationCount.objects.using(using).create(
                    interval_start=minute, traced=1, **{verdict.value: 1})
            return True
        except IntegrityError:
            continue
    return False


_flood_logged: dict[str, datetime] = {}  # "minute": the last minute this process logged a flood for
_flood_lock = threading.Lock()


def _log_flood_once(minute: datetime, traces_per_minute: int) -> None:
    """One WARNING per process and minute when the bound is reached, never one per request: logs are storage too."""
    with _flood_lock:
        if _flood_logged.get("minute") == minute:
            return
        _flood_logged["minute"] = minute
    logger.warning("More than %d unauthenticated payment notifications this minute (%s): the rest are answered "
                   "FAIL and only counted (UnauthenticatedNotificationCount), without a trace",
                   traces_per_minute, f"{minute:%Y-%m-%d %H:%M}", extra={"interval_start": minute})


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


def _other_app(order: Order, notification: Notification) -> str:
    """Why the payment was made to another app than the order's ("" when it was not).

    A sub_appid is compared only when the notification names one: WeChat leaves it out when the payer paid
    through the institution's appid, which an order with a sub_appid still allows.
    """
    problems = []
    if notification.appid != order.appid:
        problems.append(f"appid {notification.appid[:32]!r} but the order's is {order.appid!r}")
    if order.sub_appid and notification.sub_appid and notification.sub_appid != order.sub_appid:
        problems.append(f"sub_appid {notification.sub_appid[:32]!r} but the order's is {order.sub_appid!r}")
    return "; ".join(problems)


def _mismatch(order: Order, notification: Notification) -> str:
    return services.paid_amount_mismatch(order, total_fee=notification.total_fee,
                                         total_fee_amount=notification.total_fee_amount,
                                         fee_type=notification.fee_type)


def _cut(value: str, column: str) -> str:
    """A received value cut to its column (a hostile body may send anything, PostgreSQL refuses overlong text)."""
    field = PaymentNotification._meta.get_field(column)
    return value[: field.max_length] if isinstance(field, models.CharField) else value
