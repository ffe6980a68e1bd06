"""Order state, the close audit trail and the payment notifications received. No HTTP here: services.py is the
only writer of state."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.validators import RegexValidator
from django.db import models
from django.db.models import Q
from django.utils import timezone
from django.utils.translation import gettext_lazy as _

from .wechat import Outcome

out_trade_no_validator = RegexValidator(
    r"^[A-Za-z0-9_\-|*@]{1,32}\Z", "1-32 characters: letters, digits and _ - | * @ only."
)


class OrderState(models.TextChoices):
    """Where the order stands at WeChat, as far as we know.

    OPEN: created at WeChat and not (yet) paid or closed; the sweep closes it after its deadline.
    CLOSED: WeChat closed it (by us or someone before us); it can never be paid.
    PAID: WeChat says the payer paid; never marked closed; the shop must fulfil or refund.
    UNKNOWN_TO_WECHAT: WeChat said ORDERNOTEXIST until the retries ran out; it cannot be paid.
    """

    OPEN = "open", "Open (awaiting payment)"
    CLOSED = "closed", "Closed"
    PAID = "paid", "Paid"
    UNKNOWN_TO_WECHAT = "unknown_to_wechat", "Never known to WeChat"


# The only state changes there are; each is applied as an UPDATE … WHERE state = <from>.
ALLOWED_TRANSITIONS: dict[str, frozenset[str]] = {
    OrderState.OPEN: frozenset({OrderState.CLOSED, OrderState.PAID, OrderState.UNKNOWN_TO_WECHAT}),
    # Money that arrives for an order WeChat had denied knowing must still be recorded.
    OrderState.UNKNOWN_TO_WECHAT: frozenset({OrderState.PAID}),
    OrderState.CLOSED: frozenset(),
    OrderState.PAID: frozenset(),
}


class Trigger(models.TextChoices):
    ADMIN = "admin", "Admin action"
    COMMAND = "command", "close_expired_orders"
    CODE = "code", "Application code"


class Order(models.Model):
    merchant = models.CharField(max_length=64, help_text="Key of the merchant in WXPAY_CLOSE['MERCHANTS'].")
    appid = models.CharField(max_length=32, help_text="Snapshot at creation.")
    mch_id = models.CharField(max_length=32, help_text="Snapshot at creation.")
    sub_mch_id = models.CharField(max_length=32, help_text="Snapshot at creation.")
    sub_appid = models.CharField(max_length=32, blank=True, help_text="Snapshot at creation (institutional mode).")
    out_trade_no = models.CharField(max_length=32, validators=[out_trade_no_validator])
    amount = models.PositiveBigIntegerField(null=True, blank=True, help_text="In the currency's minor unit, if known.")
    currency = models.CharField(max_length=3, blank=True)
    created_at = models.DateTimeField(default=timezone.now, help_text="When the order was created at WeChat.")
    payment_deadline = models.DateTimeField(help_text="After this the order is closed if unpaid.")

    state = models.CharField(max_length=20, choices=OrderState.choices, default=OrderState.OPEN)
    state_changed_at = models.DateTimeField(null=True, blank=True)
    closed_at = models.DateTimeField(null=True, blank=True)
    paid_at = models.DateTimeField(null=True, blank=True)

    attempt_count = models.PositiveIntegerField(default=0, help_text="closeorder exchanges completed.")
    retry_count = models.PositiveIntegerField(default=0, help_text="Consecutive retryable failures (MAX_ATTEMPTS).")
    last_attempt_at = models.DateTimeField(null=True, blank=True)
    next_attempt_at = models.DateTimeField(null=True, blank=True, help_text="Empty: due as soon as expired.")
    last_outcome = models.CharField(max_length=32, blank=True, choices=[(o.value, o.label) for o in Outcome])
    last_error = models.TextField(blank=True)
    on_hold = models.BooleanField(
        default=False, help_text="The sweep leaves it alone until a person acts (untrusted answer, bug, retries spent)."
    )

    claim_token = models.UUIDField(null=True, blank=True, editable=False)
    claim_expires_at = models.DateTimeField(null=True, blank=True, editable=False)

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            models.UniqueConstraint(fields=["mch_id", "sub_mch_id", "out_trade_no"], name="wxpay_close_unique_out_trade_no"),
            models.CheckConstraint(
                condition=~(Q(closed_at__isnull=False) & Q(paid_at__isnull=False)), name="wxpay_close_not_closed_and_paid"
            ),
        ]
        indexes = [
            # The sweep's query: open, not on hold, past the deadline, oldest deadline first.
            models.Index(
                fields=["payment_deadline", "id"], condition=Q(state="open", on_hold=False), name="wxpay_close_due_idx"
            ),
            models.Index(fields=["state", "merchant"], name="wxpay_close_state_idx"),
        ]

    def __str__(self) -> str:
        return f"{self.out_trade_no} ({self.get_state_display()})"

    @property
    def is_overdue(self) -> bool:
        return self.state == OrderState.OPEN and self.payment_deadline <= timezone.now()


class AuditTrailError(Exception):
    """The close audit trail is append-only: a row is written once, completed once, never edited or deleted."""


class CloseAttemptQuerySet(models.QuerySet["CloseAttempt"]):
    def delete(self) -> Any:
        raise AuditTrailError("Close attempts are an audit trail and are never deleted.")

    def update(self, **kwargs: Any) -> int:
        raise AuditTrailError("Close attempts are append-only; an unfinished one is completed once with complete().")

    def unfinished(self) -> CloseAttemptQuerySet:
        return self.filter(completed_at__isnull=True)

    def complete(self, **fields: Any) -> int:
        """Complete the unfinished rows among these, once; a completed row is never touched again."""
        fields.setdefault("completed_at", timezone.now())
        return models.QuerySet.update(self.unfinished(), **fields)


class CloseAttempt(models.Model):
    """One closeorder HTTP exchange: created before the request leaves, completed once after its answer.

    A row with no `completed_at` belongs to a request whose answer is not written yet: still in flight, or its
    process stopped or lost its database. The next close of the same order completes such a row as abandoned.
    A completed row with no outcome has no answer (`has_no_answer`; `reason` says why: abandoned, or not sent).
    """

    order = models.ForeignKey(Order, on_delete=models.PROTECT, related_name="close_attempts")
    merchant = models.CharField(max_length=64)
    mch_id = models.CharField(max_length=32)
    sub_mch_id = models.CharField(max_length=32)
    out_trade_no = models.CharField(max_length=32)
    trigger = models.CharField(max_length=10, choices=Trigger.choices)
    user = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    actor = models.CharField(max_length=150, blank=True, help_text="Username at the time; survives the user.")
    url = models.CharField(max_length=300, help_text="The URL that answered, or the last one tried.")
    failed_over_from = models.CharField(max_length=300, blank=True)
    sign_type = models.CharField(max_length=16)
    request_xml = models.TextField(help_text="The exact body sent (holds the signature, never the key).")

    started_at = models.DateTimeField(default=timezone.now)
    completed_at = models.DateTimeField(null=True, blank=True)
    duration_ms = models.PositiveIntegerField(null=True, blank=True)
    http_status = models.PositiveSmallIntegerField(null=True, blank=True)
    response_body = models.TextField(blank=True, help_text="Raw body, capped; undecodable bytes escaped.")
    return_code = models.CharField(max_length=16, blank=True)
    return_msg = models.CharField(max_length=128, blank=True)
    result_code = models.CharField(max_length=16, blank=True)
    err_code = models.CharField(max_length=32, blank=True)
    err_code_des = models.CharField(max_length=128, blank=True)
    signature_verified = models.BooleanField(null=True, blank=True)
    outcome = models.CharField(max_length=32, blank=True, choices=[(o.value, o.label) for o in Outcome])
    reason = models.TextField(blank=True)

    objects = CloseAttemptQuerySet.as_manager()

    class Meta:
        ordering = ["-started_at", "-id"]
        indexes = [models.Index(fields=["outcome", "started_at"], name="wxpay_attempt_outcome_idx")]

    def __str__(self) -> str:
        status = self.outcome or ("no answer" if self.has_no_answer else "unfinished")
        return f"closeorder {self.out_trade_no} at {self.started_at:%Y-%m-%d %H:%M:%S}: {status}"

    @property
    def is_finished(self) -> bool:
        return self.completed_at is not None

    @property
    def has_no_answer(self) -> bool:
        """Completed without an answer: every answer, even a timeout, is recorded with an outcome."""
        return self.completed_at is not None and not self.outcome

    def save(self, *args: Any, **kwargs: Any) -> None:
        if not self._state.adding:
            raise AuditTrailError("Close attempts are append-only; complete an unfinished one with complete().")
        super().save(*args, **kwargs)

    def delete(self, *args: Any, **kwargs: Any) -> Any:
        raise AuditTrailError("Close attempts are an audit trail and are never deleted.")

    def complete(self, **fields: Any) -> bool:
        """Record the answer once. False if the row was already completed (it is then left untouched)."""
        fields.setdefault("completed_at", timezone.now())
        completed = CloseAttempt.objects.using(self._state.db).filter(pk=self.pk).complete(**fields)
        if completed:
            for name, value in fields.items():
                setattr(self, name, value)
        return bool(completed)


class NotificationVerdict(models.TextChoices):
    """What one payment notification led to; notifications.py decides it and the reply WeChat gets."""

    RECORDED_PAID = "recorded_paid", _("Payment recorded")
    ALREADY_PAID = "already_paid", _("Already paid (a repeat)")
    PAID_AFTER_CLOSE = "paid_after_close", _("Paid after we closed it: refund it")
    AMOUNT_MISMATCH = "amount_mismatch", _("Amount or currency differs from the order")
    UNKNOWN_ORDER = "unknown_order", _("Unknown order")
    UNKNOWN_MERCHANT = "unknown_merchant", _("Unknown merchant")
    BAD_SIGNATURE = "bad_signature", _("Missing or wrong signature")
    UNREADABLE = "unreadable", _("Unreadable body")
    NOT_SUCCESS = "not_success", _("Payment not successful")


class PaymentNotificationQuerySet(models.QuerySet["PaymentNotification"]):
    def delete(self) -> Any:
        raise AuditTrailError("Payment notifications are an audit trail and are never deleted.")

    def update(self, **kwargs: Any) -> int:
        raise AuditTrailError("Payment notifications are append-only; a row is never edited.")


class PaymentNotification(models.Model):
    """One payment result notification as it arrived, and its verdict: written once, never edited or deleted.

    Every POST to the notify view leaves a row, believed or not; only `signature_verified` rows are WeChat's
    word. Identifiers are stored as received (cut to their column's length), so a forged body shows as sent.
    """

    received_at = models.DateTimeField(_("received at"), default=timezone.now)
    raw_body = models.TextField(
        _("raw body"), blank=True,
        help_text=_("As received, capped; undecodable bytes escaped. A notification never carries the API key."),
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
        indexes = [models.Index(fields=["verdict", "received_at"], name="wxpay_notif_verdict_idx")]

    def __str__(self) -> str:
        return f"notification {self.out_trade_no or '?'} at {self.received_at:%Y-%m-%d %H:%M:%S}: {self.verdict}"

    def save(self, *args: Any, **kwargs: Any) -> None:
        if not self._state.adding:
            raise AuditTrailError("Payment notifications are append-only; a row is never edited.")
        super().save(*args, **kwargs)

    def delete(self, *args: Any, **kwargs: Any) -> Any:
        raise AuditTrailError("Payment notifications are an audit trail and are never deleted.")
