"""The admin: orders with their whole audit trail, a read-only audit list, and "Close selected orders".

Thin on purpose: it shows models and calls services; it never changes an order's state itself.
"""

from __future__ import annotations

from collections import Counter
from datetime import datetime
from typing import Any
from xml.parsers.expat import ExpatError

from defusedxml import minidom as safe_minidom
from defusedxml.common import DefusedXmlException

from django.contrib import admin, messages
from django.core.exceptions import ImproperlyConfigured
from django.db import transaction
from django.db.models import Q, QuerySet
from django.http import HttpRequest, HttpResponse
from django.template.response import TemplateResponse
from django.urls import reverse
from django.utils import timezone
from django.utils.html import format_html, format_html_join
from django.utils.safestring import SafeString
from django.utils.translation import gettext_lazy as _

from .conf import CloseSettings, load_settings
from .models import CloseAttempt, Order, OrderState, PaymentNotification, Trigger
from .selectors import orders_needing_attention, why_not_closable
from .services import CloseAction, close_orders, lift_hold
from .wechat import Outcome

_STATE_COLOURS = {
    OrderState.OPEN: "#205493",
    OrderState.CLOSED: "#4a4a4a",
    OrderState.PAID: "#2e7d32",
    OrderState.UNKNOWN_TO_WECHAT: "#8d6e63",
}


def pretty_xml(text: str) -> str:
    """Indented XML for people; the stored text unchanged when it is not XML (it is shown as sent)."""
    if not text.strip().startswith("<"):
        return text
    try:
        # A stored response may be hostile (it is kept as received): defusedxml, no DTDs.
        document = safe_minidom.parseString(text.encode("utf-8"), forbid_dtd=True)
    except (ExpatError, DefusedXmlException, ValueError):
        return text
    return document.documentElement.toprettyxml(indent="  ").strip()


def _when(moment: datetime | None) -> str:
    return timezone.localtime(moment).strftime("%Y-%m-%d %H:%M:%S %Z") if moment else "—"


def _who(attempt: CloseAttempt) -> str:
    return f"{Trigger(attempt.trigger).label} ({attempt.actor})" if attempt.actor else Trigger(attempt.trigger).label


def _answer(attempt: CloseAttempt) -> str:
    return attempt.err_code or attempt.result_code or (Outcome(attempt.outcome).label if attempt.outcome else "")


def order_story(order: Order, *, last_attempt: CloseAttempt | None, settings: CloseSettings | None,
                now: datetime) -> list[str]:
    """Why the order is in its state and what happens next, in sentences an operator can act on.

    Built only from the order's fields and its newest audit row, so it can never disagree with them.
    """
    if order.state == OrderState.CLOSED:
        if last_attempt is not None and last_attempt.outcome == Outcome.ALREADY_CLOSED:
            told = ("WeChat answered ORDERCLOSED (someone had closed it before) to the close sent at "
                    f"{_when(last_attempt.started_at)} by {_who(last_attempt)}.")
        elif last_attempt is not None:
            told = (f"WeChat answered {_answer(last_attempt)} to the close sent at {_when(last_attempt.started_at)} "
                    f"by {_who(last_attempt)}.")
        else:
            told = "No close exchange is recorded for it."
        return [f"Closed at {_when(order.closed_at)}.", told, "It can never be paid; nothing more will be sent."]
    if order.state == OrderState.PAID:
        if last_attempt is not None and last_attempt.outcome == Outcome.PAID:
            how = f"WeChat answered ORDERPAID to the close sent at {_when(last_attempt.started_at)}: the payer paid."
        else:
            how = "The shop recorded the payment (payment notification or order query)."
        return [f"Paid at {_when(order.paid_at)}.", how,
                "closeorder is never sent for it; the shop must fulfil or refund it."]
    if order.state == OrderState.UNKNOWN_TO_WECHAT:
        return [f"WeChat answered ORDERNOTEXIST to every close until the retries ran out "
                f"({order.attempt_count} attempts, the last at {_when(order.last_attempt_at)}).",
                "It was never created at WeChat, so it can never be paid; nothing more will be sent."]

    story: list[str] = []
    last = f"{Outcome(order.last_outcome).label}: {order.last_error}" if order.last_outcome else ""
    if order.claim_expires_at is not None and order.claim_expires_at >= now:
        story.append(f"A close is in flight right now (claimed until {_when(order.claim_expires_at)}).")
    if order.on_hold:
        story += [f"On hold after the last answer ({last or 'none recorded'}).",
                  "The sweep leaves it alone until a person acts: \"Close selected orders\" retries it and "
                  "lifts the hold."]
    elif order.last_outcome == Outcome.CONFIGURATION_ERROR:
        story += [f"The last close hit a configuration error ({order.last_error}).",
                  "Fix WXPAY_CLOSE (API key, sign type or merchant IDs); every order of this merchant fails the "
                  f"same way. The sweep tries again from {_when(order.next_attempt_at)}."]
    elif order.payment_deadline > now:
        story.append(f"Awaiting payment: the payment window ends at {_when(order.payment_deadline)}; "
                     "after that the sweep closes it.")
    elif order.next_attempt_at is not None and order.next_attempt_at > now:
        budget = f" of {settings.max_attempts}" if settings else ""
        story.append(f"Overdue. Close attempt {order.retry_count}{budget} failed ({last}); "
                     f"the sweep retries at {_when(order.next_attempt_at)}.")
    else:
        story.append(f"Overdue since {_when(order.payment_deadline)}: the next sweep sends closeorder"
                     + (f" (last answer: {last})." if last else "."))
    if settings is not None and order.created_at > now - settings.min_order_age:
        story.append(f"It cannot be closed before {_when(order.created_at + settings.min_order_age)} "
                     "(WeChat mishandles closing a just-created order).")
    return story


class OverdueFilter(admin.SimpleListFilter):
    title = "overdue"
    parameter_name = "overdue"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [("yes", "Open past its deadline"), ("no", "Not overdue")]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Order]) -> QuerySet[Order]:
        overdue = Q(state=OrderState.OPEN, payment_deadline__lte=timezone.now())
        if self.value() == "yes":
            return queryset.filter(overdue)
        if self.value() == "no":
            return queryset.exclude(overdue)
        return queryset


class NeedsAttentionFilter(admin.SimpleListFilter):
    title = "needs attention"
    parameter_name = "attention"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [("yes", "Needs attention")]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Order]) -> QuerySet[Order]:
        if self.value() == "yes":
            return queryset.filter(pk__in=orders_needing_attention().values("pk"))
        return queryset


def _xml_details(attempt: CloseAttempt) -> SafeString:
    """Both bodies behind a disclosure, so the trail stays one line per exchange until someone looks."""
    response = pretty_xml(attempt.response_body) if attempt.response_body else "(no response body)"
    return format_html(
        "<details><summary>XML</summary><p>Request (exact bytes sent; the key is never part of it):</p>"
        '<pre style="margin:0;font-size:11px">{}</pre><p>Response:</p>'
        '<pre style="margin:0;font-size:11px">{}</pre></details>',
        pretty_xml(attempt.request_xml), response,
    )


class CloseAttemptInline(admin.TabularInline):
    model = CloseAttempt
    verbose_name = "closeorder exchange"
    verbose_name_plural = "Audit trail (newest first)"
    fields = ["started", "trigger", "actor", "outcome_badge", "answer", "http_status", "signature_verified",
              "duration_ms", "xml"]  # the URL, failover and raw fields are on the attempt's own page
    readonly_fields = fields
    ordering = ["-started_at", "-id"]
    extra = 0
    max_num = 0
    can_delete = False
    show_change_link = False

    @admin.display(description="started")
    def started(self, attempt: CloseAttempt) -> str:
        link = reverse("admin:django_wxpay_close_closeattempt_change", args=[attempt.pk])
        started = timezone.localtime(attempt.started_at).strftime("%Y-%m-%d %H:%M:%S")
        return format_html('<a href="{}">{}</a>', link, started)

    @admin.display(description="outcome")
    def outcome_badge(self, attempt: CloseAttempt) -> str:
        return outcome_badge(attempt)

    @admin.display(description="answer")
    def answer(self, attempt: CloseAttempt) -> str:
        return attempt.reason or _answer(attempt) or "—"

    @admin.display(description="request / response")
    def xml(self, attempt: CloseAttempt) -> str:
        return _xml_details(attempt)

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


class PaymentNotificationInline(admin.TabularInline):
    """The order's payment notifications, read-only; the raw body is on each notification's own page."""

    model = PaymentNotification
    verbose_name = _("payment notification")
    verbose_name_plural = _("Payment notifications (newest first)")
    readonly_fields = ("received", "verdict", "signature_verified", "transaction_id", "total_fee", "fee_type", "detail")
    fields = readonly_fields
    ordering = ["-received_at", "-id"]
    extra = 0
    max_num = 0
    can_delete = False
    show_change_link = False

    @admin.display(description=_("received"))
    def received(self, notification: PaymentNotification) -> str:
        link = reverse("admin:django_wxpay_close_paymentnotification_change", args=[notification.pk])
        return format_html('<a href="{}">{}</a>', link, _when(notification.received_at))

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


def outcome_badge(attempt: CloseAttempt) -> str:
    if attempt.has_no_answer:  # abandoned by a process that stopped, or never sent: `reason` says which
        return format_html('<strong style="color:{}">{}</strong>', "#616161", "no answer")
    if not attempt.outcome:
        return format_html('<strong style="color:{}">{}</strong> (no answer recorded)', "#b26a00", "unfinished")
    outcome = Outcome(attempt.outcome)
    colour = "#2e7d32" if outcome.order_is_closed or outcome is Outcome.PAID else (
        "#b26a00" if outcome.is_retryable else "#c62828")
    return format_html('<strong style="color:{}">{}</strong>', colour, outcome.label)


def _settings_or_none() -> CloseSettings | None:
    try:
        return load_settings()
    except ImproperlyConfigured:
        return None


def _not_sent_summary(skipped: list[tuple[Order, str]]) -> str:
    """'2 not sent: it is paid (1); younger than MIN_ORDER_AGE … (1)'."""
    counts = Counter(reason for _, reason in skipped)
    return f"{len(skipped)} not sent: " + "; ".join(f"{reason} ({count})" for reason, count in sorted(counts.items()))


@admin.register(Order)
class OrderAdmin(admin.ModelAdmin):
    list_display = ["out_trade_no", "merchant", "state_badge", "overdue", "attempt_count", "last_outcome",
                    "short_last_error", "next_attempt_at", "payment_deadline", "created_at"]
    list_filter = ["state", "merchant", OverdueFilter, NeedsAttentionFilter, "last_outcome", "on_hold"]
    search_fields = ["=out_trade_no"]
    date_hierarchy = "created_at"
    actions = ["close_selected_orders", "lift_hold"]
    inlines = [CloseAttemptInline, PaymentNotificationInline]
    fieldsets = [
        ("Why it is in this state", {"fields": ["story"]}),
        ("Order", {"fields": [("out_trade_no", "merchant"), ("appid", "mch_id", "sub_mch_id", "sub_appid"),
                              ("amount", "currency"), ("created_at", "payment_deadline")]}),
        ("State at WeChat", {"fields": [("state_badge", "state_changed_at"), ("closed_at", "paid_at"), "on_hold"]}),
        ("Closing", {"fields": [("attempt_count", "retry_count"), ("last_attempt_at", "next_attempt_at"),
                                ("last_outcome", "last_error"), "claim_expires_at"]}),
    ]

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> list[str]:
        # Only services change an order; the admin shows it and offers the close action.
        return [name for _, options in self.fieldsets for line in options["fields"]
                for name in ((line,) if isinstance(line, str) else line)]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        # The order page is view-only (no Save buttons): the only change an operator makes is the close action,
        # which needs the model-level change permission.
        return obj is None and super().has_change_permission(request)

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    @admin.display(description="what happened and what happens next")
    def story(self, order: Order) -> str:
        last_attempt = order.close_attempts.order_by("-started_at", "-id").first()
        sentences = order_story(order, last_attempt=last_attempt, settings=_settings_or_none(), now=timezone.now())
        return format_html('<div class="wxpay-story">{}</div>',
                           format_html_join("", "<p>{}</p>", ((sentence,) for sentence in sentences)))

    @admin.display(description="state", ordering="state")
    def state_badge(self, order: Order) -> str:
        hold = " · on hold" if order.on_hold else ""
        return format_html(
            '<span style="background:{};color:#fff;padding:1px 7px;border-radius:9px;white-space:nowrap">{}{}</span>',
            _STATE_COLOURS[OrderState(order.state)], order.get_state_display(), hold,
        )

    @admin.display(description="overdue", boolean=True)
    def overdue(self, order: Order) -> bool:
        return order.is_overdue

    @admin.display(description="last error")
    def short_last_error(self, order: Order) -> str:
        return order.last_error if len(order.last_error) <= 60 else order.last_error[:59] + "…"

    @transaction.non_atomic_requests
    def changelist_view(self, request: HttpRequest, extra_context: dict[str, Any] | None = None) -> HttpResponse:
        # The close action sends requests; with ATOMIC_REQUESTS a rollback would erase their audit rows.
        return super().changelist_view(request, extra_context)

    @admin.action(description="Close selected orders", permissions=["change"])
    def close_selected_orders(self, request: HttpRequest, queryset: QuerySet[Order]) -> HttpResponse | None:
        """Preview (what is sent, what is skipped and why), then close through the service on confirmation."""
        try:
            settings = load_settings()
        except ImproperlyConfigured as exc:
            self.message_user(request, str(exc), messages.ERROR)
            return None
        selected = queryset.count()
        if selected > settings.admin_max_selection:
            self.message_user(
                request,
                f"{selected} orders selected; at most {settings.admin_max_selection} can be closed at once "
                "(WXPAY_CLOSE['ADMIN_MAX_SELECTION']). Nothing was sent. Narrow the selection, or let "
                "close_expired_orders sweep them.",
                messages.ERROR,
            )
            return None
        now = timezone.now()
        orders = list(queryset.order_by("payment_deadline", "pk"))
        plan = [(order, why_not_closable(order, now=now, min_order_age=settings.min_order_age)) for order in orders]
        to_send = [order for order, blocker in plan if blocker is None]
        skipped = [(order, blocker) for order, blocker in plan if blocker]
        if request.POST.get("confirm") != "yes":
            return TemplateResponse(request, "admin/django_wxpay_close/order/close_selected_confirmation.html", {
                **self.admin_site.each_context(request),
                "title": "Close these orders at WeChat Pay?",
                "opts": self.model._meta,
                "to_send": to_send,
                "skipped": skipped,
                "not_yet_expired": [order for order in to_send if order.payment_deadline > now],
                "selected_ids": [order.pk for order in orders],
                "action_checkbox_name": admin.helpers.ACTION_CHECKBOX_NAME,
                "action": "close_selected_orders",
            })
        report = close_orders(to_send, trigger=Trigger.ADMIN, user=request.user)
        summary = report.sentence() if to_send else "nothing was sent"
        summary = summary[0].upper() + summary[1:] + "."
        if skipped:
            summary += f" {_not_sent_summary(skipped)}."
        level = messages.ERROR if report.has_alarms else (
            messages.WARNING if skipped or set(report.by_action) - {CloseAction.CLOSED, CloseAction.ALREADY_CLOSED}
            else messages.SUCCESS)
        self.message_user(request, summary, level)
        return None


    @admin.action(description="Lift the hold of selected orders (the sweep retries them)", permissions=["change"])
    def lift_hold(self, request: HttpRequest, queryset: QuerySet[Order]) -> None:
        """Give orders on hold back to the sweep, with a fresh retry budget; nothing is sent now."""
        lifted = lift_hold(queryset)
        if lifted:
            self.message_user(request, f"{lifted} orders are off hold: the next sweep closes them.", messages.SUCCESS)
        else:
            self.message_user(request, "None of the selected orders was on hold.", messages.WARNING)


@admin.register(CloseAttempt)
class CloseAttemptAdmin(admin.ModelAdmin):
    """The audit list: searchable and filterable; nobody can add, edit or delete a row."""

    list_display = ["started_at", "out_trade_no", "merchant", "trigger", "actor", "outcome_badge", "err_code",
                    "http_status", "signature_verified", "duration_ms"]
    list_filter = ["outcome", "err_code", "merchant", "trigger", "signature_verified", "started_at"]
    search_fields = ["=out_trade_no"]
    date_hierarchy = "started_at"
    actions = None  # not even "delete selected": the audit trail is append-only
    fields = ["order", "out_trade_no", "merchant", "mch_id", "sub_mch_id", "trigger", "actor", "url",
              "failed_over_from", "sign_type", "started_at", "completed_at", "duration_ms", "outcome_badge", "reason",
              "http_status", "return_code", "return_msg", "result_code", "err_code", "err_code_des",
              "signature_verified", "request", "response"]
    readonly_fields = fields

    @admin.display(description="outcome", ordering="outcome")
    def outcome_badge(self, attempt: CloseAttempt) -> str:
        return outcome_badge(attempt)

    @admin.display(description="request XML (exact bytes sent; the key is never part of it)")
    def request(self, attempt: CloseAttempt) -> str:
        return format_html("<pre>{}</pre>", pretty_xml(attempt.request_xml))

    @admin.display(description="response body")
    def response(self, attempt: CloseAttempt) -> str:
        return format_html("<pre>{}</pre>", pretty_xml(attempt.response_body)) if attempt.response_body else "—"

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(PaymentNotification)
class PaymentNotificationAdmin(admin.ModelAdmin):
    """Every payment notification received, believed or not; nobody can add, edit or delete a row."""

    list_display = ["received_at", "out_trade_no", "verdict", "signature_verified", "mch_id", "sub_mch_id",
                    "total_fee", "fee_type", "transaction_id"]
    list_filter = ["verdict", "signature_verified", "received_at"]
    search_fields = ["=out_trade_no", "=transaction_id"]
    date_hierarchy = "received_at"
    actions = None  # not even "delete selected": the audit trail is append-only
    readonly_fields = ("received_at", "verdict", "detail", "order", "signature_verified", "mch_id", "sub_mch_id",
                       "out_trade_no", "transaction_id", "total_fee", "fee_type", "result_code", "body")
    fields = readonly_fields

    @admin.display(description=_("body as received (it never holds the API key)"))
    def body(self, notification: PaymentNotification) -> str:
        return format_html("<pre>{}</pre>", pretty_xml(notification.raw_body)) if notification.raw_body else "—"

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False
