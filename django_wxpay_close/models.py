"""Order state, the close audit trail and the payment notifications received. No HTTP here: services.py is the
only writer of state."""

from __future__ import annotations

from typing import Any, TypeVar

from django.conf import settings
from django.core.validators import RegexValidator
from django.db import models, router
from django.db.models import Q
from django.utils import timezone
from django.utils.translation import gettext
from django.utils.translation import gettext_lazy as _

from .wechat import OUT_TRADE_NO_PATTERN, Outcome, QueryVerdict

out_trade_no_validator = RegexValidator(
    OUT_TRADE_NO_PATTERN, _("1-32 characters: letters, digits and _ - | * @ only.")
)


def stored_text(body: bytes) -> str:
    """A raw body as a text column keeps it: bytes that are not UTF-8 stay visible as escapes, and NUL is
    escaped too (PostgreSQL text refuses it)."""
    return body.decode("utf-8", "backslashreplace").replace("\x00", "\\x00")


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
_OUTCOME_CHOICES = [(outcome.value, OUTCOME_LABELS[outcome]) for outcome in Outcome] + [
    (verdict.value, label) for verdict, label in QUERY_OUTCOME_LABELS.items()]
# Every value an audit row's or an order's outcome column can hold, with its label.
STORED_OUTCOME_LABELS: dict[str, Any] = dict(_OUTCOME_CHOICES)


class Api(models.TextChoices):
    """The WeChat Pay API an audit row's exchange called."""

    CLOSEORDER = "closeorder", "closeorder"  # API names, the same in every language
    ORDERQUERY = "orderquery", "orderquery"


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
    last_outcome = models.CharField(_("last outcome"), max_length=32, blank=True, choices=_OUTCOME_CHOICES)
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


class AuditTrailError(Exception):
    """An audit trail is append-only: a row is written once (a close attempt is completed once), never edited
    or deleted."""


_Row = TypeVar("_Row", bound=models.Model)


class AppendOnlyQuerySet(models.QuerySet[_Row]):
    def delete(self) -> Any:
        raise AuditTrailError(f"{self.model.__name__} rows are an audit trail and are never deleted.")

    def update(self, **kwargs: Any) -> int:
        raise AuditTrailError(f"{self.model.__name__} rows are append-only and never edited.")


class AppendOnly(models.Model):
    """An audit record: saved once, never edited or deleted (its queryset refuses bulk edits and deletes too)."""

    class Meta:
        abstract = True

    def save(self, *args: Any, **kwargs: Any) -> None:
        if not self._state.adding:
            raise AuditTrailError(f"{type(self).__name__} rows are append-only and never edited.")
        super().save(*args, **kwargs)

    def delete(self, *args: Any, **kwargs: Any) -> Any:
        raise AuditTrailError(f"{type(self).__name__} rows are an audit trail and are never deleted.")


# What completing a close attempt may write: the answer, never the request it answers.
ANSWER_FIELDS = frozenset({
    "completed_at", "url", "failed_over_from", "duration_ms", "http_status", "response_body", "return_code",
    "return_msg", "result_code", "err_code", "err_code_des", "signature_verified", "outcome", "trade_state",
    "reason"})


class CloseAttemptQuerySet(AppendOnlyQuerySet["CloseAttempt"]):
    def unfinished(self) -> CloseAttemptQuerySet:
        return self.filter(completed_at__isnull=True)

    def complete(self, **fields: Any) -> int:
        """Complete the unfinished rows among these with their answer, once; a completed row is never touched
        again."""
        unknown = set(fields) - ANSWER_FIELDS
        if unknown:
            raise AuditTrailError(f"a close attempt is completed with its answer only, not {sorted(unknown)}")
        fields.setdefault("completed_at", timezone.now())
        return models.QuerySet.update(self.unfinished(), **fields)


class CloseAttempt(AppendOnly):
    """One HTTP exchange with WeChat about an order, closeorder or orderquery (`api`): created before the request
    leaves, completed once after its answer. An order's rows tell its whole story, closes and queries in turn.

    A row with no `completed_at` belongs to a request whose answer is not written yet: still in flight, or its
    process stopped or lost its database. The next close of the same order completes such a row as abandoned.
    A completed row with no outcome has no answer (`has_no_answer`; `reason` says why: abandoned, or not sent).
    An answer that comes after its row was settled as abandoned (another close took the order over meanwhile) is
    kept in a row of its own, `late_answer_to` that request's row, with no request of its own.
    """

    order = models.ForeignKey(Order, on_delete=models.PROTECT, related_name="close_attempts", verbose_name=_("order"))
    # No index: nothing looks rows up by it (an order's trail lists its rows by order), and the audit table is large.
    late_answer_to = models.ForeignKey(
        "self", on_delete=models.PROTECT, null=True, blank=True, related_name="late_answers", db_index=False,
        verbose_name=_("late answer to"), help_text=_("The request this answer belongs to, when it came after that "
                                                       "request's row was settled as abandoned."))
    merchant = models.CharField(_("merchant"), max_length=64)
    mch_id = models.CharField(_("mch_id"), max_length=32)
    sub_mch_id = models.CharField(_("sub_mch_id"), max_length=32)
    out_trade_no = models.CharField(_("out_trade_no"), max_length=32)
    trigger = models.CharField(_("trigger"), max_length=10, choices=Trigger.choices)
    user = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL,
                             related_name="+", verbose_name=_("user"))
    actor = models.CharField(_("actor"), max_length=150, blank=True,
                             help_text=_("Username at the time; survives the user."))
    url = models.CharField(_("URL"), max_length=300, help_text=_("The URL that answered, or the last one tried."))
    failed_over_from = models.CharField(_("failed over from"), max_length=300, blank=True)
    sign_type = models.CharField(_("sign_type"), max_length=16)
    api = models.CharField(_("API"), max_length=16, choices=Api.choices, default=Api.CLOSEORDER,
                           db_default=Api.CLOSEORDER)
    request_xml = models.TextField(_("request XML"),
                                   help_text=_("The exact body sent (holds the signature, never the key)."))

    started_at = models.DateTimeField(_("started at"), default=timezone.now)
    completed_at = models.DateTimeField(_("completed at"), null=True, blank=True)
    duration_ms = models.PositiveIntegerField(_("duration (ms)"), null=True, blank=True)
    http_status = models.PositiveSmallIntegerField(_("HTTP status"), null=True, blank=True)
    response_body = models.TextField(_("response body"), blank=True,
                                     help_text=_("Raw body, capped; undecodable bytes escaped."))
    return_code = models.CharField(_("return_code"), max_length=16, blank=True)
    return_msg = models.CharField(_("return_msg"), max_length=128, blank=True)
    result_code = models.CharField(_("result_code"), max_length=16, blank=True)
    err_code = models.CharField(_("err_code"), max_length=32, blank=True)
    err_code_des = models.CharField(_("err_code_des"), max_length=128, blank=True)
    signature_verified = models.BooleanField(_("signature verified"), null=True, blank=True)
    outcome = models.CharField(_("outcome"), max_length=32, blank=True, choices=_OUTCOME_CHOICES)
    trade_state = models.CharField(_("trade_state"), max_length=16, blank=True,
                                   help_text=_("What an orderquery answer said of the order (SUCCESS, NOTPAY, ...)."))
    reason = models.TextField(_("reason"), blank=True)

    objects = CloseAttemptQuerySet.as_manager()

    class Meta:
        ordering = ["-started_at", "-id"]
        # Closes and queries alike (`api`); the model keeps its first name, which its table and migrations use.
        verbose_name = _("WeChat exchange")
        verbose_name_plural = _("WeChat exchanges")
        indexes = [
            models.Index(fields=["outcome", "started_at"], name="wxpay_attempt_outcome_idx"),
            # The admin's audit list, newest first (Meta.ordering), and its started_at date-range filter.
            models.Index(fields=["started_at", "id"], name="wxpay_attempt_started_idx"),
            # The admin's exact search by out_trade_no.
            models.Index(fields=["out_trade_no"], name="wxpay_attempt_out_trade_no_idx"),
            # The admin's err_code filter, newest first. Partial: a successful close (no err_code) never enters
            # it, and the completion that writes an err_code adds the row's only entry.
            models.Index(fields=["err_code", "started_at"], name="wxpay_attempt_err_code_idx",
                         condition=~Q(err_code="")),
            # The admin's trigger filter for the rare manual closes (admin action, application code), newest
            # first; the sweep's own rows (trigger "command") never enter it.
            models.Index(fields=["trigger", "started_at"], name="wxpay_attempt_trigger_idx",
                         condition=~Q(trigger="command")),
            # The admin's API filter for the orderquery exchanges, newest first; the many closes never enter it.
            models.Index(fields=["api", "started_at"], name="wxpay_attempt_api_idx", condition=Q(api="orderquery")),
        ]

    def __str__(self) -> str:
        status = self.outcome or (gettext("no answer") if self.has_no_answer else gettext("unfinished"))
        return gettext("%(api)s %(out_trade_no)s at %(started)s: %(status)s") % {
            "api": self.api, "out_trade_no": self.out_trade_no, "started": f"{self.started_at:%Y-%m-%d %H:%M:%S}",
            "status": status}

    @property
    def is_finished(self) -> bool:
        return self.completed_at is not None

    @property
    def has_no_answer(self) -> bool:
        """Completed without an answer: every answer, even a timeout, is recorded with an outcome."""
        return self.completed_at is not None and not self.outcome

    def keep_late_answer(self, **answer: Any) -> CloseAttempt:
        """An answer to this request that came after the row was completed (settled as abandoned when another
        close took the order over): kept on a row of its own, tied to this one. The request is not repeated."""
        unknown = set(answer) - ANSWER_FIELDS
        if unknown:
            raise AuditTrailError(f"a late answer is kept with its answer only, not {sorted(unknown)}")
        return CloseAttempt.objects.using(self._state.db).create(
            order_id=self.order_id, late_answer_to=self, merchant=self.merchant, mch_id=self.mch_id,
            sub_mch_id=self.sub_mch_id, out_trade_no=self.out_trade_no, trigger=self.trigger, user_id=self.user_id,
            actor=self.actor, api=self.api, sign_type=self.sign_type, request_xml="", started_at=self.started_at,
            **{"completed_at": timezone.now(), **answer})

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
