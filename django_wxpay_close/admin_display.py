"""What the admin shows, built from the stored rows: dates in one format, XML for people, outcomes and titles in
the reader's language, and an order's story (why it is in its state, what happens next).

Every date is formatted by `format_when` (ISO order, the current time zone), in lists and on pages alike.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any
from xml.parsers.expat import ExpatError

from defusedxml import minidom as safe_minidom
from defusedxml.common import DefusedXmlException
from django.contrib import admin
from django.db.models import Model
from django.urls import reverse
from django.utils import timezone
from django.utils.html import format_html
from django.utils.safestring import SafeString
from django.utils.translation import gettext, ngettext, pgettext

from .conf import CloseSettings
from .models import QUERY_OUTCOME_LABELS, STORED_OUTCOME_LABELS, Api, CloseAttempt, Order, OrderState, Trigger
from .wechat import Outcome


def pretty_xml(text: str) -> str:
    """Indented XML for people; the stored text unchanged when it is not XML."""
    if not text.strip().startswith("<"):
        return text
    try:
        # A stored response may be hostile (it is kept as received): defusedxml, no DTDs.
        document = safe_minidom.parseString(text, forbid_dtd=True)
    except (ExpatError, DefusedXmlException, ValueError):
        return text
    root = document.documentElement
    return root.toprettyxml(indent="  ").strip() if root is not None else text


def exact_pre(text: str) -> SafeString:
    """Stored text exactly as it is (only HTML-escaped); CSS wraps long lines instead of widening the page."""
    return format_html('<pre class="wxpay-exact">{}</pre>', text)


def pretty_pre(text: str) -> SafeString | str:
    """The indented view, or "—" when indenting changes nothing (not XML): then the exact view says it all."""
    pretty = pretty_xml(text) if text else ""
    return format_html('<pre class="wxpay-pretty">{}</pre>', pretty) if pretty and pretty != text else "—"


def local_time(moment: datetime) -> datetime:
    # With USE_TZ=False the database holds naive local times, which localtime() refuses (ValueError).
    return timezone.localtime(moment) if timezone.is_aware(moment) else moment


def format_when(moment: datetime | None) -> str:
    return local_time(moment).strftime("%Y-%m-%d %H:%M:%S %Z").rstrip() if moment else "—"


def format_when_html(moment: datetime | None) -> SafeString | str:
    """`format_when` for narrow columns: it may break between the date and the time, never inside either."""
    if moment is None:
        return "—"
    day, _space, time = format_when(moment).partition(" ")
    return format_html('<span class="wxpay-nowrap">{}</span> <span class="wxpay-nowrap">{}</span>', day, time)


def moment_column(field: str, description: Any, *, only_when_open: bool = False,
                  link: bool = False) -> Callable[..., Any]:
    """A display method for a datetime field in `format_when`'s format (Django's own would be a second format).

    `only_when_open` shows "—" once the order is no longer open: a terminal order keeps its last
    due_at, which means nothing any more. `link` makes it a link to the row's own page (in an inline).
    """

    def show(self: admin.ModelAdmin[Any], obj: Model) -> SafeString | str:
        if only_when_open and getattr(obj, "state", OrderState.OPEN) != OrderState.OPEN:
            return "—"
        if link:
            page = reverse(f"admin:{obj._meta.app_label}_{obj._meta.model_name}_change", args=[obj.pk])
            return format_html('<a href="{}">{}</a>', page, format_when_html(getattr(obj, field)))
        return format_when_html(getattr(obj, field))

    show.__name__ = field
    return admin.display(description=description, ordering=field)(show)


def who_sent(attempt: CloseAttempt) -> str:
    trigger = Trigger(attempt.trigger).label
    return f"{trigger} ({attempt.actor})" if attempt.actor else str(trigger)


def outcome_label(outcome: str) -> str:
    return str(STORED_OUTCOME_LABELS.get(outcome, outcome))


def answer_text(attempt: CloseAttempt) -> str:
    return attempt.err_code or attempt.trade_state or attempt.result_code or (
        outcome_label(attempt.outcome) if attempt.outcome else "")


def is_query(attempt: CloseAttempt | None) -> bool:
    return attempt is not None and attempt.api == Api.ORDERQUERY


def query_answer(attempt: CloseAttempt) -> str:
    """What WeChat answered an orderquery, with what that means; or that there was no answer to go by."""
    values = {"when": format_when(attempt.started_at), "who": who_sent(attempt),
              "meaning": outcome_label(attempt.outcome) if attempt.outcome else gettext("no answer")}
    if attempt.trade_state or attempt.err_code:  # WeChat itself said it (ORDERNOTEXIST has no trade_state)
        return gettext("WeChat answered orderquery with %(answer)s (%(meaning)s) at %(when)s (sent by %(who)s).") % {
            **values, "answer": attempt.trade_state or attempt.err_code}
    return gettext("The orderquery sent at %(when)s by %(who)s brought no answer to go by (%(meaning)s).") % values


def stored_reason_text(reason: str) -> str:
    """A reason the engine stored in English, in the reader's language when the catalogue has it (the engine's
    fixed reasons are in it); anything else (WeChat's own words, exception texts) as stored."""
    return gettext(reason) if reason else ""


def order_story(order: Order, *, last_attempt: CloseAttempt | None, settings: CloseSettings | None,
                now: datetime) -> list[str]:
    """Why the order is in its state and what happens next, in sentences an operator can act on.

    Built only from the order's fields and its newest audit row, so it can never disagree with them.
    """
    if order.state == OrderState.CLOSED:
        if last_attempt is not None and is_query(last_attempt):
            told = query_answer(last_attempt)
        elif last_attempt is not None and last_attempt.outcome == Outcome.ALREADY_CLOSED:
            told = gettext("WeChat answered ORDERCLOSED (someone had closed it before) to the close sent at "
                           "%(when)s by %(who)s.") % {"when": format_when(last_attempt.started_at),
                                                      "who": who_sent(last_attempt)}
        elif last_attempt is not None:
            told = gettext("WeChat answered %(answer)s to the close sent at %(when)s by %(who)s.") % {
                "answer": answer_text(last_attempt), "when": format_when(last_attempt.started_at),
                "who": who_sent(last_attempt)}
        else:
            told = gettext("No close exchange is recorded for it.")
        return [gettext("Closed at %(when)s.") % {"when": format_when(order.closed_at)}, told,
                gettext("It can never be paid; nothing more will be sent.")]
    if order.state == OrderState.PAID:
        if last_attempt is not None and is_query(last_attempt) and last_attempt.outcome == Outcome.PAID:
            how = query_answer(last_attempt)
        elif last_attempt is not None and last_attempt.outcome == Outcome.PAID:
            how = gettext("WeChat answered ORDERPAID to the close sent at %(when)s: the payer paid.") % {
                "when": format_when(last_attempt.started_at)}
        else:
            how = gettext("The shop recorded the payment (payment notification or order query).")
        paid = [gettext("Paid at %(when)s.") % {"when": format_when(order.paid_at)}, how,
                gettext("closeorder is never sent for it; the shop must fulfil or refund it.")]
        if order.on_hold:  # WeChat answered a close with "closed" after the payment was recorded
            paid.append(gettext("Needs attention: %(error)s. \"Lift the hold\" once it is settled.")
                        % {"error": order.last_error})
        return paid
    if order.state == OrderState.UNKNOWN_TO_WECHAT:
        never = gettext("It was never created at WeChat, so it can never be paid; nothing more will be sent.")
        if last_attempt is not None and is_query(last_attempt):  # the query confirmed what the closes could not
            return [query_answer(last_attempt), never]
        return [ngettext("WeChat answered ORDERNOTEXIST to every close until the retries ran out "
                         "(%(count)d attempt, the last at %(when)s).",
                         "WeChat answered ORDERNOTEXIST to every close until the retries ran out "
                         "(%(count)d attempts, the last at %(when)s).", order.attempt_count)
                % {"count": order.attempt_count, "when": format_when(order.last_attempt_at)}, never]

    story: list[str] = []
    # Translators: the last outcome and WeChat's (untranslated) error text, e.g. "retryable error: SYSTEMERROR".
    last = pgettext("outcome: error", "%(outcome)s: %(error)s") % {
        "outcome": outcome_label(order.last_outcome), "error": order.last_error} if order.last_outcome else ""
    if order.in_flight and order.due_at >= now:
        story.append(gettext("A close is in flight right now (claimed until %(when)s).")
                     % {"when": format_when(order.due_at)})
    queried = is_query(last_attempt)
    if last_attempt is not None and queried:
        story.append(query_answer(last_attempt))
    due = {"when": format_when(order.due_at)}
    if order.on_hold:
        story += [gettext("On hold after the last answer (%(last)s).") % {"last": last or gettext("none recorded")},
                  gettext("The sweep leaves it alone until a person acts: \"Close selected orders\" retries it and "
                          "lifts the hold.")]
    elif order.needs_query and queried:  # the payer was paying, or the query brought no answer to go by
        story.append(gettext("The sweep asks WeChat (orderquery) again at %(when)s.") % due)
    elif order.needs_query:
        story.append(gettext("The last close could not tell where the order stands (%(last)s); the next sweep asks "
                             "WeChat (orderquery) at %(when)s.") % {**due, "last": last})
    elif order.last_outcome == Outcome.CONFIGURATION_ERROR:
        story += [gettext("The last close hit a configuration error (%(error)s).") % {"error": order.last_error},
                  gettext("Fix WXPAY_CLOSE (API key, sign type or merchant IDs); every order of this merchant fails "
                          "the same way. The sweep tries again from %(when)s.")
                  % {"when": format_when(order.due_at)}]
    elif order.payment_deadline > now:
        story.append(gettext("Awaiting payment: the payment window ends at %(when)s; after that the sweep closes it.")
                     % {"when": format_when(order.payment_deadline)})
    elif queried and order.due_at > now:  # a check of an order waiting for its retry left the retry as it was
        story.append(gettext("Overdue since %(deadline)s: the sweep sends closeorder at %(when)s.")
                     % {**due, "deadline": format_when(order.payment_deadline)})
    elif queried:
        story.append(gettext("Overdue since %(when)s: the next sweep sends closeorder.")
                     % {"when": format_when(order.payment_deadline)})
    elif order.attempt_count and order.due_at > now:
        values = {"attempt": order.retry_count, "last": last, "when": format_when(order.due_at)}
        if settings:
            story.append(gettext("Overdue. Close attempt %(attempt)d of %(budget)d failed (%(last)s); the sweep "
                                 "retries at %(when)s.") % {**values, "budget": settings.max_attempts})
        else:
            story.append(gettext("Overdue. Close attempt %(attempt)d failed (%(last)s); the sweep retries at "
                                 "%(when)s.") % values)
    elif last:
        story.append(gettext("Overdue since %(when)s: the next sweep sends closeorder (last answer: %(last)s).")
                     % {"when": format_when(order.payment_deadline), "last": last})
    else:
        story.append(gettext("Overdue since %(when)s: the next sweep sends closeorder.")
                     % {"when": format_when(order.payment_deadline)})
    if order.on_hold or order.needs_query:
        story.append(gettext("\"Check status at WeChat\" asks WeChat (orderquery) where it stands now: a paid or "
                             "closed answer settles it, any other is only recorded."))
    if settings is not None and order.created_at > now - settings.min_order_age:
        story.append(gettext("It cannot be closed before %(when)s (WeChat mishandles closing a just-created order).")
                     % {"when": format_when(order.created_at + settings.min_order_age)})
    return story


def exchange_xml(attempt: CloseAttempt) -> dict[str, Any]:
    """One exchange's XML for the order page's full-width section: the exact bodies, and their pretty-printed
    views where indenting changes something."""
    def pretty(text: str) -> str:
        indented = pretty_xml(text) if text else ""
        return indented if indented != text else ""

    return {"pk": attempt.pk, "summary": attempt_title(attempt), "request": attempt.request_xml,
            "request_pretty": pretty(attempt.request_xml), "response": attempt.response_body,
            "response_pretty": pretty(attempt.response_body)}


def outcome_badge(attempt: CloseAttempt) -> str:
    if attempt.has_no_answer:  # abandoned by a process that stopped, or never sent: `reason` says which
        return format_html('<strong style="color:{}">{}</strong>', "#616161", gettext("no answer"))
    if not attempt.outcome:
        return format_html('<strong style="color:{}">{}</strong> {}', "#b26a00", gettext("unfinished"),
                           gettext("(no answer recorded)"))
    settled = {Outcome.CLOSED.value, Outcome.ALREADY_CLOSED.value, Outcome.PAID.value}
    waits = {outcome.value for outcome in Outcome if outcome.is_retryable} | {
        verdict.value for verdict in QUERY_OUTCOME_LABELS}
    colour = "#2e7d32" if attempt.outcome in settled else ("#b26a00" if attempt.outcome in waits else "#c62828")
    return format_html('<strong style="color:{}">{}</strong>', colour, outcome_label(attempt.outcome))


def outcome_with_code(attempt: CloseAttempt) -> str:
    """The outcome's badge with WeChat's own word under it: a query's trade_state, else the err_code."""
    code = attempt.trade_state or attempt.err_code
    if not code:
        return outcome_badge(attempt)
    return format_html('{}<br><span class="wxpay-code">{}</span>', outcome_badge(attempt), code)


def attempt_title(attempt: CloseAttempt) -> str:
    """The attempt's page title: its status in words of the reader's language, not the stored code."""
    if attempt.outcome:
        status = outcome_label(attempt.outcome)
    else:
        status = gettext("no answer") if attempt.has_no_answer else gettext("unfinished")
    return gettext("%(api)s %(out_trade_no)s at %(started)s: %(status)s") % {
        "api": attempt.api, "out_trade_no": attempt.out_trade_no, "started": format_when(attempt.started_at),
        "status": status}
