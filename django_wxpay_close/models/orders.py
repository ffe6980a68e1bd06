"""Orders: their WeChat state, the allowed transitions, the outcome labels every table shows, and the database
that decides who closes them. No HTTP here: the services are the only writers of state."""

from __future__ import annotations

from typing import Any

from django.core.validators import RegexValidator
from django.db import models, router
from django.db.models import Q
from django.utils import timezone
from django.utils.translation import gettext_lazy as _

from ..wechat import OUT_TRADE_NO_PATTERN, Outcome, QueryVerdict

out_trade_no_validator = RegexValidator(
    OUT_TRADE_NO_PATTERN, _("1-32 characters: letters, digits and _ - | * @ only.")
)


class OrderState(models.TextChoices):
    """Where the order stands at WeChat, as far as we know.

    OPEN: created at WeChat and not (yet) paid or closed; the sweep closes it after its deadline.
    CLOSED: WeChat closed it (by us or someone before us); it can never be paid.
    PAID: WeChat says the payer paid; never marked closed; the shop must fulfil or refund.
    UNKNOWN_TO_WECHAT: WeChat said ORDERNOTEXIST until the retries ran out; it cannot be paid.
    """

    OPEN = "open", _("Open (awaiting payment)")
    CLOSED = "closed", _("Closed")
    PAID = "paid", _("Paid")
    UNKNOWN_TO_WECHAT = "unknown_to_wechat", _("Never known to WeChat")


# The only state changes there are; each is applied as an UPDATE … WHERE state = <from>.
ALLOWED_TRANSITIONS: dict[str, frozenset[str]] = {
    OrderState.OPEN: frozenset({OrderState.CLOSED, OrderState.PAID, OrderState.UNKNOWN_TO_WECHAT}),
    # Money that arrives for an order WeChat had denied knowing must still be recorded.
    OrderState.UNKNOWN_TO_WECHAT: frozenset({OrderState.PAID}),
    OrderState.CLOSED: frozenset(),
    OrderState.PAID: frozenset(),
}


class Trigger(models.TextChoices):
    ADMIN = "admin", _("Admin action")
    COMMAND = "command", "close_expired_orders"  # the command's name, the same in every language
    CODE = "code", _("Application code")


# Outcome labels for people (wechat/ stays free of Django, so they are defined and translated here);
# the msgids are the English labels, so an untranslated page reads exactly as before.
OUTCOME_LABELS: dict[Outcome, Any] = {
    Outcome.CLOSED: _("closed"),
    Outcome.ALREADY_CLOSED: _("already closed"),
    Outcome.PAID: _("paid"),
    Outcome.NOT_FOUND: _("not found"),
    Outcome.RETRYABLE_ERROR: _("retryable error"),
    Outcome.NETWORK_ERROR: _("network error"),
    Outcome.INVALID_RESPONSE: _("invalid response"),
    Outcome.CONFIGURATION_ERROR: _("configuration error"),
    Outcome.CLIENT_BUG: _("client bug"),
    Outcome.UNTRUSTED_RESPONSE: _("untrusted response"),
    Outcome.UNEXPECTED_ERROR: _("unexpected error"),
}
# What an orderquery answer with a trade_state says (wechat.QueryVerdict); its failures are the outcomes above.
QUERY_OUTCOME_LABELS: dict[QueryVerdict, Any] = {
    QueryVerdict.PAYABLE: _("still payable"),
    QueryVerdict.PAYING: _("payer paying now"),
}
OUTCOME_CHOICES = [(outcome.value, OUTCOME_LABELS[outcome]) for outcome in Outcome] + [
    (verdict.value, label) for verdict, label in QUERY_OUTCOME_LABELS.items()]
# Every value an audit row's or an order's outcome column can hold, with its label.
STORED_OUTCOME_LABELS: dict[str, Any] = dict(OUTCOME_CHOICES)


class Order(models.Model):
    merchant = models.CharField(_("merchant"), max_length=64,
                                help_text=_("Key of the merchant in WXPAY_CLOSE['MERCHANTS']."))
    appid = models.CharField(_("appid"), max_length=32, help_text=_("Snapshot at creation."))
    mch_id = models.CharField(_("mch_id"), max_length=32, help_text=_("Snapshot at creation."))
    sub_mch_id = models.CharField(_("sub_mch_id"), max_length=32, help_text=_("Snapshot at creation."))
    sub_appid = models.CharField(_("sub_appid"), max_length=32, blank=True,
                                 help_text=_("Snapshot at creation (institutional mode)."))
    out_trade_no = models.CharField(_("out_trade_no"), max_length=32, validators=[out_trade_no_validator])
    amount = models.PositiveBigIntegerField(_("amount"), null=True, blank=True,
                                            help_text=_("In the currency's minor unit, if known."))
    currency = models.CharField(_("currency"), max_length=3, blank=True)
    created_at = models.DateTimeField(_("created at"), default=timezone.now,
                                      help_text=_("When the order was created at WeChat."))
    payment_deadline = models.DateTimeField(_("payment deadline"),
                                            help_text=_("After this the order is closed if unpaid."))

    state = models.CharField(_("state"), max_length=20, choices=OrderState.choices, default=OrderState.OPEN)
    state_changed_at = models.DateTimeField(_("state changed at"), null=True, blank=True)
    closed_at = models.DateTimeField(_("closed at"), null=True, blank=True)
    paid_at = models.DateTimeField(_("paid at"), null=True, blank=True)

    attempt_count = models.PositiveIntegerField(_("attempt count"), default=0,
                                                help_text=_("closeorder and orderquery exchanges completed."))
    retry_count = models.PositiveIntegerField(_("retry count"), default=0,
                                              help_text=_("Consecutive retryable failures (MAX_ATTEMPTS)."))
    last_attempt_at = models.DateTimeField(_("last attempt at"), null=True, blank=True)
    last_outcome = models.CharField(_("last outcome"), max_length=32, blank=True, choices=OUTCOME_CHOICES)
    last_error = models.TextField(_("last error"), blank=True)
    on_hold = models.BooleanField(
        _("on hold"), default=False,
        help_text=_("The sweep leaves it alone until a person acts (untrusted answer, bug, retries spent)."),
    )

    # When a close cannot tell where the order stands, the sweep asks WeChat (orderquery) before a person must.
    needs_query = models.BooleanField(
        _("ask WeChat next"), default=False,
        help_text=_("The sweep's next request for this order is an orderquery, not a close."))
    query_count = models.PositiveIntegerField(
        _("query count"), default=0,
        help_text=_("orderquery answers with a trade state since a person last closed the order or lifted its hold."))

    # The order as a queue row: when anybody should next look at it while it is open. Its payment deadline (not
    # before MIN_ORDER_AGE), then its retry time after a failure, or its lease's expiry while a close is in
    # flight (`in_flight`). The sweep claims the open orders whose time has come.
    due_at = models.DateTimeField(_("due at"), help_text=_(
        "When the sweep next looks at the order: its deadline, its retry time, or the end of a close in flight."))
    in_flight = models.BooleanField(_("in flight"), default=False, editable=False,
                                    help_text=_("A close holds the order's lease until its due time."))
    # The run that claimed the order last; kept after its answer, so that one run never sends for an order twice.
    claim_token = models.UUIDField(_("claim token"), null=True, blank=True, editable=False)

    class Meta:
        ordering = ["-created_at"]
        verbose_name = _("order")
        verbose_name_plural = _("orders")
        constraints = [
            models.UniqueConstraint(fields=["mch_id", "sub_mch_id", "out_trade_no"],
                                    name="wxpay_close_unique_out_trade_no"),
            models.CheckConstraint(
                condition=~(Q(closed_at__isnull=False) & Q(paid_at__isnull=False)),
                name="wxpay_close_not_closed_and_paid",
            ),
        ]
        indexes = [
            # The sweep's claim: open, not on hold, whose time has come, the earliest first. Only due rows are read.
            models.Index(fields=["due_at", "id"], condition=Q(state="open", on_hold=False),
                         name="wxpay_close_queue_idx"),
            # The sweep's "N orders wait for a retry" summary: only the open orders that were tried and wait.
            models.Index(fields=["due_at"], name="wxpay_close_retry_idx",
                         condition=Q(state="open", on_hold=False, in_flight=False, attempt_count__gt=0)),
            models.Index(fields=["state", "merchant"], name="wxpay_close_state_idx"),
            # The admin's order list, newest first (`-created_at`, then `-id` that the changelist adds), and its
            # created_at date-range filter.
            models.Index(fields=["created_at", "id"], name="wxpay_order_created_idx"),
            # The admin's exact search by out_trade_no alone (the unique constraint leads with mch_id, so it
            # cannot serve it).
            models.Index(fields=["out_trade_no"], name="wxpay_order_out_trade_no_idx"),
            # The admin's last-outcome filter, newest first, and its bounded count: without it a rare outcome
            # (a client bug, an untrusted answer) would be found by reading every order.
            models.Index(fields=["last_outcome", "created_at"], name="wxpay_order_outcome_idx"),
            # The admin's "needs attention" filter (selectors.orders_needing_attention), newest first; only the
            # few orders on hold, or open and refused for configuration, are in it.
            models.Index(fields=["created_at", "id"], name="wxpay_order_attention_idx",
                         condition=Q(on_hold=True) | Q(state="open", last_outcome="configuration_error")),
        ]

    def __str__(self) -> str:
        return f"{self.out_trade_no} ({self.get_state_display()})"

    def save(self, *args: Any, **kwargs: Any) -> None:
        if self.due_at is None:  # a new order is due at its deadline (the claim also enforces MIN_ORDER_AGE)
            self.due_at = self.payment_deadline
        super().save(*args, **kwargs)

    @property
    def is_overdue(self) -> bool:
        return self.state == OrderState.OPEN and self.payment_deadline <= timezone.now()


def write_database() -> str:
    """The database the router picks for writes to orders: claims, state changes and the reads that decide them
    all go there, so a read replica's lag never decides who closes an order."""
    return router.db_for_write(Order)
