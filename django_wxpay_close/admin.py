"""The admin: orders with their whole audit trail, a read-only audit list, and "Close selected orders".

Thin on purpose: it shows models and calls services; it never changes an order's state itself.
"""

from __future__ import annotations

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
from django.utils.html import format_html

from .conf import load_settings
from .models import CloseAttempt, Order, OrderState, Trigger
from .selectors import orders_needing_attention, why_not_closable
from .services import CloseAction, close_orders
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


class CloseAttemptInline(admin.TabularInline):
    model = CloseAttempt
    verbose_name = "closeorder exchange"
    verbose_name_plural = "Audit trail (newest first)"
    fields = ["started", "trigger", "actor", "outcome_badge", "err_code", "http_status", "signature_verified",
              "duration_ms", "url"]
    readonly_fields = fields
    ordering = ["-started_at", "-id"]
    extra = 0
    max_num = 0
    can_delete = False
    show_change_link = False

    @admin.display(description="started")
    def started(self, attempt: CloseAttempt) -> str:
        link = reverse("admin:django_wxpay_close_closeattempt_change", args=[attempt.pk])
        return format_html('<a href="{}">{}</a>', link, attempt.started_at.strftime("%Y-%m-%d %H:%M:%S"))

    @admin.display(description="outcome")
    def outcome_badge(self, attempt: CloseAttempt) -> str:
        return outcome_badge(attempt)

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


def outcome_badge(attempt: CloseAttempt) -> str:
    if not attempt.outcome:
        return format_html('<strong style="color:#b26a00">unfinished</strong> (no answer recorded)')
    outcome = Outcome(attempt.outcome)
    colour = "#2e7d32" if outcome.order_is_closed or outcome is Outcome.PAID else (
        "#b26a00" if outcome.is_retryable else "#c62828")
    return format_html('<strong style="color:{}">{}</strong>', colour, outcome.label)


@admin.register(Order)
class OrderAdmin(admin.ModelAdmin):
    list_display = ["out_trade_no", "merchant", "state_badge", "overdue", "attempt_count", "last_outcome",
                    "short_last_error", "payment_deadline", "created_at"]
    list_filter = ["state", "merchant", OverdueFilter, NeedsAttentionFilter, "last_outcome"]
    search_fields = ["=out_trade_no"]
    date_hierarchy = "created_at"
    actions = ["close_selected_orders"]
    inlines = [CloseAttemptInline]
    fieldsets = [
        ("Order", {"fields": ["out_trade_no", "merchant", "appid", "mch_id", "sub_mch_id", "sub_appid", "amount",
                              "currency", "created_at", "payment_deadline"]}),
        ("State at WeChat", {"fields": ["state_badge", "state_changed_at", "closed_at", "paid_at", "on_hold"]}),
        ("Closing", {"fields": ["attempt_count", "retry_count", "last_attempt_at", "next_attempt_at",
                                "last_outcome", "last_error", "claim_expires_at"]}),
    ]

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> list[str]:
        # Only services change an order; the admin shows it and offers the close action.
        return [name for fieldset in self.fieldsets for name in fieldset[1]["fields"]]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

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
                "(WXPAY_CLOSE['ADMIN_MAX_SELECTION']). Narrow the selection, or let close_expired_orders sweep them.",
                messages.ERROR,
            )
            return None
        now = timezone.now()
        orders = list(queryset.order_by("payment_deadline", "pk"))
        plan = [(order, why_not_closable(order, now=now, min_order_age=settings.min_order_age)) for order in orders]
        to_send = [order for order, blocker in plan if blocker is None]
        if request.POST.get("confirm") != "yes":
            return TemplateResponse(request, "admin/django_wxpay_close/order/close_selected_confirmation.html", {
                **self.admin_site.each_context(request),
                "title": "Close these orders at WeChat Pay?",
                "opts": self.model._meta,
                "to_send": to_send,
                "skipped": [(order, blocker) for order, blocker in plan if blocker],
                "not_yet_expired": [order for order in to_send if order.payment_deadline > now],
                "selected_ids": [order.pk for order in orders],
                "action_checkbox_name": admin.helpers.ACTION_CHECKBOX_NAME,
                "action": "close_selected_orders",
            })
        report = close_orders(to_send, trigger=Trigger.ADMIN, user=request.user)
        skipped = len(plan) - len(to_send)
        summary = report.sentence() if to_send else "nothing was sent"
        if skipped:
            summary += f"; {skipped} not sent ({'; '.join(sorted({b for _, b in plan if b}))})"
        level = messages.ERROR if report.has_alarms else (
            messages.WARNING if skipped or set(report.by_action) - {CloseAction.CLOSED, CloseAction.ALREADY_CLOSED}
            else messages.SUCCESS)
        self.message_user(request, summary[0].upper() + summary[1:] + ".", level)
        return None


@admin.register(CloseAttempt)
class CloseAttemptAdmin(admin.ModelAdmin):
    """The audit list: searchable and filterable; nobody can add, edit or delete a row."""

    list_display = ["started_at", "out_trade_no", "merchant", "trigger", "actor", "outcome_badge", "err_code",
                    "http_status", "signature_verified", "duration_ms"]
    list_filter = ["outcome", "err_code", "merchant", "trigger", "signature_verified"]
    search_fields = ["=out_trade_no"]
    date_hierarchy = "started_at"
    list_select_related = ["order"]
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
