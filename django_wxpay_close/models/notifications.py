"""The payment notifications received, and the per-minute count of unauthenticated ones."""

from __future__ import annotations

from typing import Any

from django.db import models
from django.utils import timezone
from django.utils.translation import gettext
from django.utils.translation import gettext_lazy as _

from .audit import AppendOnly, AppendOnlyQuerySet
from .orders import Order


class NotificationVerdict(models.TextChoices):
    """What one payment notification led to; notifications.py decides it and the reply WeChat gets."""

    RECORDED_PAID = "recorded_paid", _("Payment recorded")
    ALREADY_PAID = "already_paid", _("Already paid (a repeat)")
    PAID_AFTER_CLOSE = "paid_after_close", _("Paid after we closed it: refund it")
    AMOUNT_MISMATCH = "amount_mismatch", _("Amount or currency differs from the order")
    APP_MISMATCH = "app_mismatch", _("Paid to another app (appid or sub_appid differs from the order)")
    UNKNOWN_ORDER = "unknown_order", _("Unknown order")
    UNKNOWN_MERCHANT = "unknown_merchant", _("Unknown merchant")
    BAD_SIGNATURE = "bad_signature", _("Missing or wrong signature")
    UNREADABLE = "unreadable", _("Unreadable body")
    NOT_SUCCESS = "not_success", _("Payment not successful")


# What a body whose sender is not known to be WeChat can be: a bounded trace is kept of it, never the whole body.
UNAUTHENTICATED_VERDICTS = frozenset({
    NotificationVerdict.UNREADABLE, NotificationVerdict.UNKNOWN_MERCHANT, NotificationVerdict.BAD_SIGNATURE,
})


class PaymentNotificationQuerySet(AppendOnlyQuerySet["PaymentNotification"]):
    def unauthenticated(self) -> PaymentNotificationQuerySet:
        """Traces of bodies nobody is known to have signed: never verified, no order, an unauthenticated verdict."""
        return self.filter(verdict__in=UNAUTHENTICATED_VERDICTS, order__isnull=True).exclude(signature_verified=True)

    def prune_unauthenticated(self, *, received_before: Any, batch_size: int = 10_000) -> int:
        """Delete the unauthenticated traces received before `received_before`; the only delete there is.

        Verified notifications are WeChat's word about money and stay append-only whatever their age. Deletes in
        batches, so a flood's millions of traces never make one long transaction. Returns how many went.
        """
        doomed = self.unauthenticated().filter(received_at__lt=received_before)
        deleted = 0
        while True:
            batch = list(doomed.order_by("pk").values_list("pk", flat=True)[:batch_size])
            if not batch:
                return deleted
            count, _ = models.QuerySet.delete(doomed.filter(pk__in=batch))
            deleted += count


class PaymentNotification(AppendOnly):
    """One payment result notification as it arrived, and its verdict: written once, never edited.

    Every POST to the notify view is counted; only `signature_verified` rows are WeChat's word and keep the whole
    body. A body nobody is known to have signed (unreadable, unknown merchant, bad signature) keeps a trace: its
    size, hash, first bytes and client address, and past WXPAY_CLOSE['NOTIFICATION_TRACES_PER_MINUTE'] only a count
    (`UnauthenticatedNotificationCount`). Those traces alone can be deleted, by `prune_notification_traces`.
    Identifiers are stored as received (cut to their column's length), so a forged body shows as sent.
    """

    received_at = models.DateTimeField(_("received at"), default=timezone.now)
    raw_body = models.TextField(
        _("raw body"), blank=True,
        help_text=_("As received, capped; undecodable bytes escaped. A notification never carries the API key."),
    )
    body_size = models.PositiveIntegerField(
        _("body size (bytes)"), null=True, blank=True,
        help_text=_("As read: the view reads at most one byte past the size cap."),
    )
    body_sha256 = models.CharField(_("body SHA-256"), max_length=64, blank=True)
    client_address = models.CharField(
        _("client address"), max_length=64, blank=True,
        help_text=_("REMOTE_ADDR as Django saw it (a proxy's address when one forwards the request)."),
    )
    mch_id = models.CharField(_("mch_id"), max_length=32, blank=True)
    sub_mch_id = models.CharField(_("sub_mch_id"), max_length=32, blank=True)
    out_trade_no = models.CharField(_("out_trade_no"), max_length=32, blank=True)
    transaction_id = models.CharField(_("transaction_id"), max_length=32, blank=True)
    total_fee = models.CharField(_("total_fee"), max_length=32, blank=True, help_text=_("As received."))
    fee_type = models.CharField(_("fee_type"), max_length=16, blank=True)
    result_code = models.CharField(_("result_code"), max_length=16, blank=True)
    signature_verified = models.BooleanField(
        _("signature verified"), null=True, blank=True,
        help_text=_("Empty: not checked (unreadable body or unknown merchant)."),
    )
    verdict = models.CharField(_("verdict"), max_length=20, choices=NotificationVerdict.choices)
    detail = models.TextField(_("detail"), blank=True)
    order = models.ForeignKey(
        Order, on_delete=models.PROTECT, null=True, blank=True, related_name="payment_notifications",
        verbose_name=_("order"),
    )

    objects = PaymentNotificationQuerySet.as_manager()

    class Meta:
        ordering = ["-received_at", "-id"]
        verbose_name = _("payment notification")
        verbose_name_plural = _("payment notifications")
        indexes = [
            models.Index(fields=["verdict", "received_at"], name="wxpay_notif_verdict_idx"),
            # The admin's notification list, newest first (Meta.ordering), and its received_at date-range filter.
            models.Index(fields=["received_at", "id"], name="wxpay_notif_received_idx"),
            # The admin's exact search, by out_trade_no or by transaction_id.
            models.Index(fields=["out_trade_no"], name="wxpay_notif_out_trade_no_idx"),
            models.Index(fields=["transaction_id"], name="wxpay_notif_transaction_idx"),
        ]

    def __str__(self) -> str:
        return gettext("notification %(out_trade_no)s at %(received)s: %(verdict)s") % {
            "out_trade_no": self.out_trade_no or "?", "received": f"{self.received_at:%Y-%m-%d %H:%M:%S}",
            "verdict": self.verdict}


class UnauthenticatedNotificationCount(models.Model):
    """How many unauthenticated bodies reached the notify view in one minute (host clock), by verdict.

    One row per minute, whatever the flood: each request adds one with an UPDATE … SET n = n + 1, so every web
    worker shares the bound. `traced` of them left a `PaymentNotification` trace; the rest were only counted.
    Not an audit trail: `prune_notification_traces` deletes old rows with the traces.
    """

    interval_start = models.DateTimeField(_("minute"), unique=True)
    traced = models.PositiveBigIntegerField(_("traced"), default=0)
    unreadable = models.PositiveBigIntegerField(_("unreadable"), default=0)
    unknown_merchant = models.PositiveBigIntegerField(_("unknown merchant"), default=0)
    bad_signature = models.PositiveBigIntegerField(_("bad signature"), default=0)

    class Meta:
        ordering = ["-interval_start"]
        verbose_name = _("unauthenticated notifications per minute")
        verbose_name_plural = _("unauthenticated notifications per minute")

    def __str__(self) -> str:
        return f"{self.interval_start:%Y-%m-%d %H:%M}: {self.received} ({self.untraced} untraced)"

    @property
    def received(self) -> int:
        return self.unreadable + self.unknown_merchant + self.bad_signature

    @property
    def untraced(self) -> int:
        return self.received - self.traced
