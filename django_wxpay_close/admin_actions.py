"""The order list's two actions that send a request per chosen order: "Close selected orders" (closeorder) and
"Check status at WeChat" (orderquery).

Both work the same way, written once here: a preview of what will be sent, what will not and why; then, on
confirmation, the service sends and the result is one message of counts per action in the reader's language.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from django.contrib import admin, messages
from django.contrib.admin.helpers import ACTION_CHECKBOX_NAME
from django.core.exceptions import ImproperlyConfigured
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse
from django.template.response import TemplateResponse
from django.utils import timezone
from django.utils.translation import gettext, ngettext, ngettext_lazy, pgettext
from django.utils.translation import gettext_lazy as _

from .admin_display import stored_reason_text
from .conf import load_settings
from .models import Api, Order, Trigger
from .reports import CloseAction, CloseReport
from .selectors import why_not_closable
from .services import check_orders, close_orders


@dataclass(frozen=True)
class SendingAction:
    """What tells the two actions apart: the API sent, what keeps an order back, and what counts as success."""

    name: str  # the admin action's name
    api: str
    description: Any  # the action's label, also the confirmation page's breadcrumb
    title: Any
    too_many: Any  # the refusal of a selection over ADMIN_MAX_SELECTION: ngettext_lazy on "count"
    waits_for_min_order_age: bool  # closing a just-created order is what WeChat mishandles; asking about it is not
    settled: frozenset[CloseAction]  # results that need nobody's attention
    send: Callable[..., CloseReport]


CLOSE = SendingAction(
    name="close_selected_orders", api=Api.CLOSEORDER, description=_("Close selected orders"),
    title=_("Close these orders at WeChat Pay?"),
    too_many=ngettext_lazy(
        "%(count)d order selected; at most %(maximum)d can be closed at once (WXPAY_CLOSE['ADMIN_MAX_SELECTION']). "
        "Nothing was sent. Narrow the selection, or let close_expired_orders sweep them.",
        "%(count)d orders selected; at most %(maximum)d can be closed at once (WXPAY_CLOSE['ADMIN_MAX_SELECTION']). "
        "Nothing was sent. Narrow the selection, or let close_expired_orders sweep them.", "count"),
    waits_for_min_order_age=True, settled=frozenset({CloseAction.CLOSED, CloseAction.ALREADY_CLOSED}),
    send=close_orders,
)
CHECK = SendingAction(
    name="check_status_at_wechat", api=Api.ORDERQUERY, description=_("Check status at WeChat"),
    title=_("Ask WeChat Pay where these orders stand?"),
    too_many=ngettext_lazy(
        "%(count)d order selected; at most %(maximum)d can be checked at once (WXPAY_CLOSE['ADMIN_MAX_SELECTION']). "
        "Nothing was sent. Narrow the selection, or let close_expired_orders --check-held ask about those on hold.",
        "%(count)d orders selected; at most %(maximum)d can be checked at once (WXPAY_CLOSE['ADMIN_MAX_SELECTION']). "
        "Nothing was sent. Narrow the selection, or let close_expired_orders --check-held ask about those on hold.",
        "count"),
    waits_for_min_order_age=False, settled=frozenset({CloseAction.CHECKED, CloseAction.ALREADY_CLOSED}),
    send=check_orders,
)


def not_sent_summary(skipped: list[tuple[Order, str]]) -> str:
    """'2 not sent: it is paid (1); younger than MIN_ORDER_AGE … (1)'."""
    counts = Counter(reason for _order, reason in skipped)
    # Translators: one reason and how many orders it kept back, e.g. "it is paid (1)".
    reasons = pgettext("reasons separator", "; ").join(
        pgettext("reason (count)", "%(reason)s (%(count)d)") % {"reason": reason, "count": count}
        for reason, count in sorted(counts.items()))
    return ngettext("%(count)d not sent: %(reasons)s", "%(count)d not sent: %(reasons)s", len(skipped)) % {
        "count": len(skipped), "reasons": reasons}


def as_sentence(text: str) -> str:
    """A summary phrase as a sentence: capitalised (where the script has capitals) and with its full stop."""
    # Translators: a sentence with its full stop; Chinese uses "。".
    return pgettext("sentence", "%(sentence)s.") % {"sentence": text[:1].upper() + text[1:]}


def send_to_selection(model_admin: admin.ModelAdmin[Order], request: HttpRequest, queryset: QuerySet[Order],
                      kind: SendingAction) -> HttpResponse | None:
    """Preview (what is sent, what is skipped and why), then send through the service on confirmation."""
    try:
        settings = load_settings()
    except ImproperlyConfigured as exc:
        model_admin.message_user(request, str(exc), messages.ERROR)
        return None
    selected = queryset.count()
    if selected > settings.admin_max_selection:
        model_admin.message_user(request, kind.too_many % {"count": selected,
                                                           "maximum": settings.admin_max_selection}, messages.ERROR)
        return None
    now = timezone.now()
    orders = list(queryset.order_by("payment_deadline", "pk"))
    # A query keeps back what a close does, except a young order: the service's claim applies the same rules.
    min_order_age = settings.min_order_age if kind.waits_for_min_order_age else timedelta(0)
    plan = [(order, why_not_closable(order, now=now, min_order_age=min_order_age)) for order in orders]
    to_send = [order for order, blocker in plan if blocker is None]
    skipped = [(order, stored_reason_text(blocker)) for order, blocker in plan if blocker]
    if request.POST.get("confirm") != "yes":
        return TemplateResponse(request, "admin/django_wxpay_close/order/close_selected_confirmation.html", {
            **model_admin.admin_site.each_context(request),
            "title": str(kind.title),
            "description": kind.description,
            "opts": model_admin.model._meta,
            "media": model_admin.media,
            "to_send": to_send,
            "skipped": skipped,
            "closing": kind is CLOSE,
            "not_yet_expired": [order for order in to_send if order.payment_deadline > now] if kind is CLOSE else [],
            "selected_ids": [order.pk for order in orders],
            "action_checkbox_name": ACTION_CHECKBOX_NAME,
            "action": kind.name,
        })
    report = kind.send(to_send, trigger=Trigger.ADMIN, user=request.user)
    summary = as_sentence(report.sentence() if to_send else gettext("nothing was sent"))
    if skipped:
        # Translators: two sentences of a message; Chinese sentences follow each other without a space.
        summary = pgettext("two sentences", "%(first)s %(second)s") % {
            "first": summary, "second": as_sentence(not_sent_summary(skipped))}
    level = messages.ERROR if report.has_alarms else (
        messages.WARNING if skipped or set(report.by_action) - kind.settled else messages.SUCCESS)
    model_admin.message_user(request, summary, level)
    return None
