"""The admin: orders with their whole audit trail, a read-only audit list, and "Close selected orders".

Thin on purpose: it shows models and calls services; it never changes an order's state itself.
What it shows is built in admin_display.py; what keeps its lists fast on large tables, in changelists.py.
"""

from __future__ import annotations

from typing import Any

from django.contrib import admin, messages
from django.core.exceptions import ImproperlyConfigured
from django.db import transaction
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse
from django.utils import timezone
from django.utils.html import format_html, format_html_join
from django.utils.safestring import SafeString, mark_safe
from django.utils.translation import gettext, ngettext, pgettext
from django.utils.translation import gettext_lazy as _

from .admin_actions import CHECK, CLOSE, send_to_selection
from .admin_display import (
    answer_text,
    attempt_title,
    exact_pre,
    exchange_xml,
    format_when,
    moment_column,
    order_story,
    outcome_badge,
    outcome_label,
    outcome_with_code,
    pretty_pre,
    stored_reason_text,
    who_sent,
)
from .admin_text import translated_detail
from .changelists import ErrCodeFilter, LargeTableAdmin, MerchantFilter, NeedsAttentionFilter, OverdueFilter
from .conf import CloseSettings, load_settings
from .models import CloseAttempt, Order, OrderState, PaymentNotification
from .services import lift_hold

_STATE_COLOURS = {
    OrderState.OPEN: "#205493",
    OrderState.CLOSED: "#4a4a4a",
    OrderState.PAID: "#2e7d32",
    OrderState.UNKNOWN_TO_WECHAT: "#8d6e63",
}
_OVERDUE_COLOUR = "#965a00"  # amber dark enough for white badge text (WCAG AA, 5.6:1)
# Short enough for a list column; the filter and the order page use the states' full labels.
_BADGE_TEXTS = {
    OrderState.OPEN: _("awaiting payment"),
    OrderState.CLOSED: _("closed"),
    OrderState.PAID: _("paid"),
    OrderState.UNKNOWN_TO_WECHAT: _("unknown to WeChat"),
}

class ReadOnly:
    """An audit record's admin: nobody adds, edits or deletes a row (the models refuse it too)."""

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


class AppAdmin(LargeTableAdmin):
    """The app's look: its stylesheet, and "—" for an empty value (Django's "-" beside the "—" of the app's own
    columns would be two signs for one thing). Searches are exact (`__exact`, not Django's `=` that compares
    UPPER() of both sides on PostgreSQL), so the column's index serves them; there is no prefix search,
    which no index serves on every database."""

    empty_value_display = "—"

    class Media:
        css = {"all": ["django_wxpay_close/admin.css"]}


class AuditInline(ReadOnly, admin.TabularInline):
    """An audit record on its order's page: newest first, one line each, no blank rows to fill in."""

    extra = 0
    max_num = 0
    can_delete = False
    show_change_link = False
    empty_value_display = "—"


class CloseAttemptInline(AuditInline):
    model = CloseAttempt
    verbose_name = _("WeChat exchange")
    verbose_name_plural = _("Audit trail (newest first)")
    readonly_fields = ("started", "api", "trigger", "actor", "outcome_badge", "answer", "http_status",
                       "signature_verified", "duration_ms", "xml")  # the URL, failover, raw fields: on its own page
    fields = readonly_fields
    ordering = ["-started_at", "-id"]
    started = moment_column("started_at", _("started"), link=True)

    @admin.display(description=_("outcome"))
    def outcome_badge(self, attempt: CloseAttempt) -> str:
        return outcome_with_code(attempt)  # with a query's trade_state under it

    @admin.display(description=_("answer"))
    def answer(self, attempt: CloseAttempt) -> str:
        return stored_reason_text(attempt.reason) or answer_text(attempt) or "—"

    @admin.display(description=_("request / response"))
    def xml(self, attempt: CloseAttempt) -> str:
        # The XML is read full width, pretty-printed, in the section under the trail: a link to its entry.
        return format_html('<a href="#xml-{}" class="wxpay-xml-link">XML ↓</a>', attempt.pk)


class PaymentNotificationInline(AuditInline):
    """The order's payment notifications, read-only; the raw body is on each notification's own page."""

    model = PaymentNotification
    verbose_name = _("payment notification")
    verbose_name_plural = _("Payment notifications (newest first)")
    readonly_fields = ("received", "verdict", "signature_verified", "transaction_id", "total_fee", "fee_type",
                       "detail_text")
    fields = readonly_fields
    ordering = ["-received_at", "-id"]
    received = moment_column("received_at", _("received"), link=True)

    @admin.display(description=_("detail"))
    def detail_text(self, notification: PaymentNotification) -> str:
        return translated_detail(notification.detail) or "—"


def _settings_or_none() -> CloseSettings | None:
    try:
        return load_settings()
    except ImproperlyConfigured:
        return None


@admin.register(Order)
class OrderAdmin(AppAdmin):
    # Fits the 790 px that a 1440 px screen leaves between Django's navigation and filter sidebars, even with
    # 32-character order numbers: the merchant is under the order number, state and "overdue" are one badge, the
    # last outcome and error one column that wraps, dates may break between day and time, and the counts and
    # creation time are on the order page (the creation date filter still selects by it).
    list_display = ["order_number", "state_badge", "last_answer", "deadline", "next_attempt"]
    # "Needs attention" lists the open orders on hold; no on_hold filter, which no index would serve.
    list_filter = ["state", MerchantFilter, OverdueFilter, NeedsAttentionFilter, "last_outcome", "created_at"]
    search_fields = ["out_trade_no__exact"]
    search_help_text = _("The whole out_trade_no (no partial match).")
    actions = ["close_selected_orders", "check_status_at_wechat", "lift_hold"]
    inlines = [CloseAttemptInline, PaymentNotificationInline]
    fieldsets = [
        (_("Why it is in this state"), {"fields": ["story"]}),
        (_("Order"), {"fields": [("out_trade_no", "merchant"), ("appid", "mch_id", "sub_mch_id", "sub_appid"),
                                 ("amount", "currency"), ("created_at_when", "payment_deadline_when")]}),
        (_("State at WeChat"), {"fields": [("state_badge", "state_changed_at_when"),
                                           ("closed_at_when", "paid_at_when"), "hold"]}),
        (_("Closing"), {"fields": [("attempt_count", "retry_count"),
                                   ("last_attempt_at_when", "due_at_when"),
                                   ("last_outcome", "last_error")]}),
    ]

    # The list's date columns, short headings; the page's, the fields' own names. All in `format_when`'s format.
    next_attempt = moment_column("due_at", _("next attempt"), only_when_open=True)
    deadline = moment_column("payment_deadline", _("deadline"))
    created_at_when = moment_column("created_at", _("created at"))
    payment_deadline_when = moment_column("payment_deadline", _("payment deadline"))
    state_changed_at_when = moment_column("state_changed_at", _("state changed at"))
    closed_at_when = moment_column("closed_at", _("closed at"))
    paid_at_when = moment_column("paid_at", _("paid at"))
    last_attempt_at_when = moment_column("last_attempt_at", _("last attempt at"))
    due_at_when = moment_column("due_at", _("due at"), only_when_open=True)

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> list[str]:
        # Only services change an order; the admin shows it and offers the close action.
        return [name for _title, options in self.fieldsets for line in options["fields"]
                for name in ((line,) if isinstance(line, str) else line)]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        # The order page is view-only (no Save buttons): the only change an operator makes is the close action,
        # which needs the model-level change permission.
        return obj is None and super().has_change_permission(request)

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    @admin.display(description=_("what happened and what happens next"))
    def story(self, order: Order) -> str:
        last_attempt = order.close_attempts.order_by("-started_at", "-id").first()
        sentences = order_story(order, last_attempt=last_attempt, settings=_settings_or_none(), now=timezone.now())
        return format_html('<div class="wxpay-story">{}</div>',
                           format_html_join("", "<p>{}</p>", ((sentence,) for sentence in sentences)))

    @admin.display(description=_("on hold"))
    def hold(self, order: Order) -> str:
        # Words: Django's boolean icons show "not on hold", the good case, as a red cross.
        return gettext("yes") if order.on_hold else gettext("no")

    @admin.display(description=_("out_trade_no"), ordering="out_trade_no")
    def order_number(self, order: Order) -> str:
        return format_html('<span class="wxpay-nowrap">{}</span><br><span class="wxpay-merchant">{}</span>',
                           order.out_trade_no, order.merchant)

    @admin.display(description=_("state"), ordering="state")
    def state_badge(self, order: Order) -> str:
        """One badge for state, overdue and hold: words, not a tick or a cross whose meaning has to be guessed."""
        if order.is_overdue:
            text, colour = gettext("overdue"), _OVERDUE_COLOUR
        else:
            text, colour = str(_BADGE_TEXTS[OrderState(order.state)]), _STATE_COLOURS[OrderState(order.state)]
        if order.on_hold:
            # Translators: appended to the state badge, e.g. "overdue · on hold".
            text = pgettext("badge", "%(state)s · on hold") % {"state": text}
        return format_html('<span class="wxpay-badge" style="background:{}">{}</span>', colour, text)

    @admin.display(description=_("last answer"), ordering="last_outcome")
    def last_answer(self, order: Order) -> str:
        """Outcome and error in one cell, cut short; the whole text is its tooltip and on the order page."""
        if not order.last_outcome:
            return "—"
        text = pgettext("outcome: error", "%(outcome)s: %(error)s") % {
            "outcome": outcome_label(order.last_outcome), "error": order.last_error} if order.last_error \
            else outcome_label(order.last_outcome)
        short = text if len(text) <= 40 else text[:39] + "…"
        return format_html('<span title="{}">{}</span>', text, short)

    def change_view(self, request: HttpRequest, object_id: str, form_url: str = "",
                    extra_context: dict[str, Any] | None = None) -> HttpResponse:
        order = self.get_object(request, object_id)
        exchanges = [exchange_xml(attempt) for attempt in order.close_attempts.order_by("-started_at", "-id")] \
            if order else []
        return super().change_view(request, object_id, form_url, {**(extra_context or {}), "exchanges": exchanges})

    @transaction.non_atomic_requests
    def changelist_view(self, request: HttpRequest, extra_context: dict[str, Any] | None = None) -> HttpResponse:
        # The close action sends requests; with ATOMIC_REQUESTS a rollback would erase their audit rows.
        return super().changelist_view(request, extra_context)

    @admin.action(description=CLOSE.description, permissions=["change"])
    def close_selected_orders(self, request: HttpRequest, queryset: QuerySet[Order]) -> HttpResponse | None:
        return send_to_selection(self, request, queryset, CLOSE)

    # The same permission as closing: a check may settle an order (paid or closed at WeChat).
    @admin.action(description=CHECK.description, permissions=["change"])
    def check_status_at_wechat(self, request: HttpRequest, queryset: QuerySet[Order]) -> HttpResponse | None:
        return send_to_selection(self, request, queryset, CHECK)

    @admin.action(description=_("Lift the hold of selected orders (the sweep retries them)"), permissions=["change"])
    def lift_hold(self, request: HttpRequest, queryset: QuerySet[Order]) -> None:
        """Give orders on hold back to the sweep, with a fresh retry budget; nothing is sent now."""
        lifted = lift_hold(queryset)
        if lifted:
            self.message_user(request, ngettext("%(count)d order is off hold: the next sweep closes it.",
                                                "%(count)d orders are off hold: the next sweep closes them.", lifted)
                              % {"count": lifted}, messages.SUCCESS)
        else:
            self.message_user(request, gettext("None of the selected orders was on hold."), messages.WARNING)


@admin.register(CloseAttempt)
class CloseAttemptAdmin(ReadOnly, AppAdmin):
    """The audit list: searchable and filterable; nobody can add, edit or delete a row."""

    # Fits beside Django's sidebars at 1440 px in every language: the merchant under the order number, who sent it
    # under the API, the outcome with WeChat's err_code or trade_state; whether the answer's signature verified is
    # in the outcome ("untrusted response"), the rest on the attempt's page.
    list_display = ["started", "order_number", "api_and_trigger", "outcome_and_code", "http_status", "duration_ms"]
    # No signature_verified filter (no index would serve its rare False): the outcome "untrusted response" is
    # exactly the answers whose signature did not verify.
    # The API filter's orderquery choice is served by the partial index wxpay_attempt_api_idx; closeorder is nearly
    # every row, read newest first by the started_at index.
    list_filter = ["api", "outcome", ErrCodeFilter, MerchantFilter, "trigger", "started_at"]
    search_fields = ["out_trade_no__exact"]
    search_help_text = _("The whole out_trade_no (no partial match).")
    actions = None  # not even "delete selected": the audit trail is append-only
    readonly_fields = ("order", "out_trade_no", "merchant", "mch_id", "sub_mch_id", "api", "trigger", "actor", "url",
                       "failed_over_from", "sign_type", "started", "completed", "duration_ms", "outcome_badge",
                       "stored_reason", "http_status", "return_code", "return_msg", "result_code", "err_code",
                       "err_code_des", "trade_state", "signature_verified", "request", "request_pretty", "response",
                       "response_pretty")
    fields = readonly_fields

    started = moment_column("started_at", _("started at"))
    completed = moment_column("completed_at", _("completed at"))

    @admin.display(description=_("out_trade_no"), ordering="out_trade_no")
    def order_number(self, attempt: CloseAttempt) -> str:
        return format_html('<span class="wxpay-nowrap">{}</span><br><span class="wxpay-merchant">{}</span>',
                           attempt.out_trade_no, attempt.merchant)

    @admin.display(description=_("API"), ordering="api")
    def api_and_trigger(self, attempt: CloseAttempt) -> str:
        # close_expired_orders may break after its underscores: as one word it would widen the list past the screen.
        who = format_html_join(mark_safe("_<wbr>"), "{}", ((part,) for part in who_sent(attempt).split("_")))
        return format_html('{}<br><span class="wxpay-merchant">{}</span>', attempt.api, who)

    @admin.display(description=_("outcome"), ordering="outcome")
    def outcome_and_code(self, attempt: CloseAttempt) -> str:
        return outcome_with_code(attempt)

    def change_view(self, request: HttpRequest, object_id: str, form_url: str = "",
                    extra_context: dict[str, Any] | None = None) -> HttpResponse:
        attempt = self.get_object(request, object_id)
        return super().change_view(request, object_id, form_url, {
            **(extra_context or {}), "subtitle": attempt_title(attempt) if attempt else None})

    @admin.display(description=_("outcome"), ordering="outcome")
    def outcome_badge(self, attempt: CloseAttempt) -> str:
        return outcome_badge(attempt)

    @admin.display(description=_("reason"))
    def stored_reason(self, attempt: CloseAttempt) -> str:
        return stored_reason_text(attempt.reason) or "—"

    @admin.display(description=_("request XML (exact bytes sent; the key is never part of it)"))
    def request(self, attempt: CloseAttempt) -> str:
        return exact_pre(attempt.request_xml)

    @admin.display(description=_("request XML, pretty-printed for reading (not the bytes sent)"))
    def request_pretty(self, attempt: CloseAttempt) -> SafeString | str:
        return pretty_pre(attempt.request_xml)

    @admin.display(description=_("response body (as received)"))
    def response(self, attempt: CloseAttempt) -> str:
        return exact_pre(attempt.response_body) if attempt.response_body else "—"

    @admin.display(description=_("response body, pretty-printed for reading"))
    def response_pretty(self, attempt: CloseAttempt) -> SafeString | str:
        return pretty_pre(attempt.response_body)


@admin.register(PaymentNotification)
class PaymentNotificationAdmin(ReadOnly, AppAdmin):
    """Every payment notification received, believed or not; nobody can add, edit or delete a row."""

    # Fits beside Django's sidebars at 1440 px in every language: mch_id under the order number, amount and
    # currency one column; whether the signature verified is in the verdict, sub_mch_id on the page.
    list_display = ["received", "order_number", "verdict", "fee", "transaction"]
    # No signature_verified filter (no index would serve it): the verdict "missing or wrong signature" is the
    # notifications whose signature did not verify.
    list_filter = ["verdict", "received_at"]
    search_fields = ["out_trade_no__exact", "transaction_id__exact"]
    search_help_text = _("The whole out_trade_no or transaction_id (no partial match).")
    actions = None  # not even "delete selected": the audit trail is append-only
    readonly_fields = ("received", "verdict", "detail_text", "order", "signature_verified", "mch_id", "sub_mch_id",
                       "out_trade_no", "transaction_id", "total_fee", "fee_type", "result_code", "body", "body_pretty")
    fields = readonly_fields

    received = moment_column("received_at", _("received at"))

    @admin.display(description=_("detail"))
    def detail_text(self, notification: PaymentNotification) -> str:
        return translated_detail(notification.detail) or "—"

    @admin.display(description=_("out_trade_no"), ordering="out_trade_no")
    def order_number(self, notification: PaymentNotification) -> str:
        return format_html('<span class="wxpay-nowrap">{}</span><br><span class="wxpay-merchant">{}</span>',
                           notification.out_trade_no or "—", notification.mch_id)

    @admin.display(description=_("total_fee"))
    def fee(self, notification: PaymentNotification) -> str:
        return " ".join(filter(None, (notification.total_fee, notification.fee_type))) or "—"

    @admin.display(description=_("transaction_id"))
    def transaction(self, notification: PaymentNotification) -> str:
        return format_html('<span class="wxpay-code">{}</span>', notification.transaction_id or "—")

    def change_view(self, request: HttpRequest, object_id: str, form_url: str = "",
                    extra_context: dict[str, Any] | None = None) -> HttpResponse:
        notification = self.get_object(request, object_id)
        subtitle = gettext("notification %(out_trade_no)s at %(received)s: %(verdict)s") % {
            "out_trade_no": notification.out_trade_no or "?", "received": format_when(notification.received_at),
            "verdict": notification.get_verdict_display()} if notification else None
        return super().change_view(request, object_id, form_url, {**(extra_context or {}), "subtitle": subtitle})

    @admin.display(description=_("body as received (it never holds the API key)"))
    def body(self, notification: PaymentNotification) -> str:
        return exact_pre(notification.raw_body) if notification.raw_body else "—"

    @admin.display(description=_("body, pretty-printed for reading"))
    def body_pretty(self, notification: PaymentNotification) -> SafeString | str:
        return pretty_pre(notification.raw_body)
