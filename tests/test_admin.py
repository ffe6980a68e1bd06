"""The admin through Django's test client, logged in, against the loopback simulator."""

from __future__ import annotations

from datetime import date, datetime, time, timedelta
from typing import Any
from urllib.parse import urlencode

import uuid

import pytest
from django.contrib.admin.helpers import ACTION_CHECKBOX_NAME
from django.contrib.auth.models import Permission, User
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import dateformat, timezone

from django_wxpay_close.admin_display import pretty_xml
from django_wxpay_close.changelists import CLOSEORDER_ERR_CODES, ErrCodeFilter, EstimatedCountPaginator, MerchantFilter
from django_wxpay_close.models import (
    CloseAttempt,
    NotificationVerdict,
    Order,
    OrderState,
    PaymentNotification,
    Trigger,
)
from django_wxpay_close.services import CloseAction, close_order, sweep_expired_orders
from django_wxpay_close.testing import API_KEY, Fault
from django_wxpay_close.testing import OrderState as RemoteState
from django_wxpay_close.wechat import Outcome

CHANGELIST = "admin:django_wxpay_close_order_changelist"


def post_action(client: Client, orders: list[Order], *, confirm: bool = False,
                action: str = "close_selected_orders") -> Any:
    data: dict[str, Any] = {"action": action, ACTION_CHECKBOX_NAME: [order.pk for order in orders]}
    if confirm:
        data["confirm"] = "yes"
    return client.post(reverse(CHANGELIST), data, follow=confirm)


def between(field: str, first_day: date, end_day: date) -> str:
    """The date-range filter's query: from midnight of `first_day` to midnight of `end_day`, local time."""
    def midnight(day: date) -> datetime:
        return timezone.make_aware(datetime.combine(day, time()))

    return urlencode({f"{field}__gte": midnight(first_day).isoformat(), f"{field}__lt": midnight(end_day).isoformat()})


def messages_of(response: Any) -> list[str]:
    return [str(message) for message in response.context["messages"]]


def order_page(client: Client, order: Order) -> str:
    response = client.get(reverse("admin:django_wxpay_close_order_change", args=[order.pk]))
    assert response.status_code == 200
    return response.content.decode()


@pytest.fixture
def selection(make_order: Any, simulator: Any) -> dict[str, Order]:
    """Five orders the action sends (one answered ORDERPAID, one SYSTEMERROR) and three it must skip."""
    now = timezone.now()
    orders = {
        "closable": [make_order("OPEN-1"), make_order("OPEN-2"), make_order("OPEN-3")],
        "paid_at_wechat": make_order("PAID-AT-WECHAT", remote=RemoteState.PAID),
        "flaky": make_order("FLAKY"),
        "too_young": make_order("TOO-YOUNG", age=timedelta(minutes=1), expired_for=timedelta(minutes=-29)),
        "paid": make_order("PAID-HERE", state=OrderState.PAID, paid_at=now),
        "closed": make_order("CLOSED-HERE", state=OrderState.CLOSED, closed_at=now),
    }
    simulator.inject(Fault.SYSTEMERROR, out_trade_no="FLAKY")
    return orders


def everything(selection: dict[str, Any]) -> list[Order]:
    return [*selection["closable"], *(order for key, order in selection.items() if key != "closable")]


# -- the "Close selected orders" action -------------------------------------------------------------


def test_the_confirmation_page_lists_what_will_be_sent_and_what_is_skipped_and_why(admin_client, selection, simulator):
    response = post_action(admin_client, everything(selection))

    assert response.status_code == 200
    assert response.templates[0].name == "admin/django_wxpay_close/order/close_selected_confirmation.html"
    assert [order.out_trade_no for order in response.context["to_send"]] == [
        "OPEN-1", "OPEN-2", "OPEN-3", "PAID-AT-WECHAT", "FLAKY"]
    skipped = {order.out_trade_no: reason for order, reason in response.context["skipped"]}
    assert skipped == {
        "TOO-YOUNG": "younger than MIN_ORDER_AGE (WeChat mishandles closing a just-created order)",
        "PAID-HERE": "it is paid",
        "CLOSED-HERE": "it is closed",
    }
    page = response.content.decode()
    assert "Will not be sent (3)" in page and "Yes, close 5 orders" in page
    assert simulator.requests == [] and not CloseAttempt.objects.exists()


def test_confirming_closes_through_the_simulator_and_reports_each_outcome(admin_client, admin_user, selection,
                                                                           simulator):
    response = post_action(admin_client, everything(selection), confirm=True)

    assert messages_of(response) == [
        "3 closed, 1 was already paid (ORDERPAID), 1 will be retried (SYSTEMERROR). 3 not sent: it is closed (1); "
        "it is paid (1); younger than MIN_ORDER_AGE (WeChat mishandles closing a just-created order) (1)."
    ]
    states = dict(Order.objects.values_list("out_trade_no", "state"))
    assert states == {
        "OPEN-1": OrderState.CLOSED, "OPEN-2": OrderState.CLOSED, "OPEN-3": OrderState.CLOSED,
        "PAID-AT-WECHAT": OrderState.PAID, "FLAKY": OrderState.OPEN, "TOO-YOUNG": OrderState.OPEN,
        "PAID-HERE": OrderState.PAID, "CLOSED-HERE": OrderState.CLOSED,
    }
    audited = sorted(CloseAttempt.objects.values_list("out_trade_no", "outcome", "trigger", "actor"))
    assert audited == sorted([
        ("OPEN-1", Outcome.CLOSED, Trigger.ADMIN, "admin"), ("OPEN-2", Outcome.CLOSED, Trigger.ADMIN, "admin"),
        ("OPEN-3", Outcome.CLOSED, Trigger.ADMIN, "admin"), ("PAID-AT-WECHAT", Outcome.PAID, Trigger.ADMIN, "admin"),
        ("FLAKY", Outcome.RETRYABLE_ERROR, Trigger.ADMIN, "admin"),
    ])
    assert len(simulator.requests) == 5


def test_an_all_closed_selection_reports_success(admin_client, make_order):
    response = post_action(admin_client, [make_order(), make_order()], confirm=True)

    [message] = response.context["messages"]
    assert (str(message), message.level_tag) == ("2 closed.", "success")


def test_a_selection_with_nothing_closable_offers_no_confirm_button(admin_client, make_order):
    response = post_action(admin_client, [make_order(state=OrderState.CLOSED, closed_at=timezone.now())])

    page = response.content.decode()
    assert "nothing will be sent" in page and "Yes, close" not in page


def test_a_selection_over_admin_max_selection_is_refused_and_nothing_is_sent(admin_client, make_order,
                                                                             wxpay_settings, simulator):
    wxpay_settings["ADMIN_MAX_SELECTION"] = 2
    orders = [make_order() for _ in range(3)]

    for confirm in (False, True):
        response = post_action(admin_client, orders, confirm=confirm)
        response = response if confirm else admin_client.get(reverse(CHANGELIST))
        assert messages_of(response) == [
            "3 orders selected; at most 2 can be closed at once (WXPAY_CLOSE['ADMIN_MAX_SELECTION']). Nothing was "
            "sent. Narrow the selection, or let close_expired_orders sweep them."
        ]
    assert simulator.requests == []
    assert set(Order.objects.values_list("state", flat=True)) == {OrderState.OPEN}


def test_the_action_keeps_its_audit_rows_under_atomic_requests(admin_client, make_order, monkeypatch):
    monkeypatch.setitem(connection.settings_dict, "ATOMIC_REQUESTS", True)
    order = make_order()

    response = post_action(admin_client, [order], confirm=True)

    assert messages_of(response) == ["1 closed."]
    assert order.close_attempts.get().outcome == Outcome.CLOSED


@pytest.fixture
def viewer(transactional_db: None) -> Client:
    """A staff member who may look at orders and the audit trail but change nothing."""
    user = User.objects.create_user("viewer", password="pw", is_staff=True)
    user.user_permissions.set(Permission.objects.filter(codename__in=["view_order", "view_closeattempt"]))
    client = Client()
    client.force_login(user)
    return client


def test_a_user_without_change_permission_is_not_offered_the_action(viewer, make_order):
    make_order()
    response = viewer.get(reverse(CHANGELIST))

    assert response.status_code == 200
    assert response.context["action_form"] is None  # no action at all is offered
    assert "Close selected orders" not in response.content.decode()


def test_a_user_without_change_permission_cannot_run_the_action_by_posting_it(viewer, make_order, simulator):
    order = make_order()

    post_action(viewer, [order], confirm=True)

    order.refresh_from_db()
    assert order.state == OrderState.OPEN and simulator.requests == []


# -- the audit trail is read-only -----------------------------------------------------------------


@pytest.fixture
def attempt(make_order: Any) -> CloseAttempt:
    order = make_order()
    close_order(order)
    return order.close_attempts.get()


def test_nobody_can_add_a_close_attempt(admin_client, attempt):
    assert admin_client.get(reverse("admin:django_wxpay_close_closeattempt_add")).status_code == 403
    assert admin_client.post(reverse("admin:django_wxpay_close_closeattempt_add"), {}).status_code == 403


def test_nobody_can_edit_a_close_attempt(admin_client, attempt):
    url = reverse("admin:django_wxpay_close_closeattempt_change", args=[attempt.pk])
    page = admin_client.get(url).content.decode()

    assert admin_client.post(url, {"reason": "edited"}).status_code == 403
    assert 'name="_save"' not in page and "deletelink" not in page
    attempt.refresh_from_db()
    assert attempt.reason != "edited"


def test_nobody_can_delete_a_close_attempt(admin_client, attempt):
    url = reverse("admin:django_wxpay_close_closeattempt_delete", args=[attempt.pk])
    changelist = admin_client.get(reverse("admin:django_wxpay_close_closeattempt_changelist"))

    assert admin_client.post(url, {"post": "yes"}).status_code == 403
    assert changelist.context["action_form"] is None
    assert CloseAttempt.objects.filter(pk=attempt.pk).exists()


def test_the_audit_list_filters_by_outcome_err_code_merchant_and_date(admin_client, make_order, simulator):
    simulator.inject(Fault.SYSTEMERROR, out_trade_no="FLAKY")
    for order in (make_order("FLAKY"), make_order("OK"), make_order("OTHER", merchant="other")):
        close_order(order)
    url = reverse("admin:django_wxpay_close_closeattempt_changelist")
    today = timezone.localdate()

    def listed(query: str) -> list[str]:
        return sorted(a.out_trade_no for a in admin_client.get(f"{url}?{query}").context["cl"].result_list)

    assert listed("err_code=SYSTEMERROR") == ["FLAKY"]
    assert listed(f"outcome={Outcome.CLOSED.value}") == ["OK", "OTHER"]
    assert listed("merchant=other") == ["OTHER"]
    assert listed(between("started_at", today, today + timedelta(days=1))) == ["FLAKY", "OK", "OTHER"]
    assert listed(between("started_at", today - timedelta(days=400), today - timedelta(days=399))) == []


# -- the order list and page ----------------------------------------------------------------------


def test_the_order_list_filters_overdue_and_needs_attention(admin_client, make_order):
    make_order("OVERDUE")
    make_order("WAITING", expired_for=timedelta(minutes=-20))
    make_order("HELD", on_hold=True, last_outcome=Outcome.UNTRUSTED_RESPONSE)
    url = reverse(CHANGELIST)

    def listed(query: str) -> list[str]:
        return sorted(o.out_trade_no for o in admin_client.get(f"{url}?{query}").context["cl"].result_list)

    assert listed("overdue=yes") == ["HELD", "OVERDUE"]
    assert listed("overdue=no") == ["WAITING"]
    assert listed("attention=yes") == ["HELD"]
    assert listed("q=WAITING") == ["WAITING"]


def test_the_order_page_shows_the_audit_trail_newest_first_and_never_the_api_key(admin_client, make_order,
                                                                                  simulator):
    order = make_order("TWICE")
    simulator.inject(Fault.SYSTEMERROR, out_trade_no="TWICE")
    close_order(order)
    order.refresh_from_db()
    close_order(order)
    first, second = order.close_attempts.order_by("started_at", "id")

    page = order_page(admin_client, order)

    assert "Audit trail (newest first)" in page
    newest, oldest = (page.index(f"/closeattempt/{attempt.pk}/change/") for attempt in (second, first))
    assert newest < oldest
    assert "&lt;out_trade_no&gt;TWICE&lt;/out_trade_no&gt;" in page  # the request XML, escaped
    assert API_KEY not in page


def test_a_row_settled_as_abandoned_shows_that_no_answer_was_recorded(admin_client, make_order, simulator):
    order = make_order()
    dead = CloseAttempt.objects.create(order=order, merchant=order.merchant, mch_id=order.mch_id,
                                       sub_mch_id=order.sub_mch_id, out_trade_no=order.out_trade_no,
                                       trigger=Trigger.COMMAND, url=simulator.base_url, sign_type="HMAC-SHA256",
                                       request_xml="<xml></xml>")
    Order.objects.filter(pk=order.pk).update(in_flight=True, claim_token=uuid.uuid4(), due_at=timezone.now() - timedelta(seconds=1))  # lapsed
    sweep_expired_orders()
    dead = CloseAttempt.objects.get(pk=dead.pk)

    listing = admin_client.get(reverse("admin:django_wxpay_close_closeattempt_changelist")).content.decode()
    page = admin_client.get(reverse("admin:django_wxpay_close_closeattempt_change", args=[dead.pk])).content.decode()

    assert listing.count(">no answer</strong>") == 1 and ">closed</strong>" in listing
    assert ">no answer</strong>" in page and "no answer was recorded: the process stopped or lost its database" in page
    assert str(dead).endswith(": no answer")


def test_the_order_page_is_view_only(admin_client, make_order):
    order = make_order()
    url = reverse("admin:django_wxpay_close_order_change", args=[order.pk])

    assert 'name="_save"' not in order_page(admin_client, order)
    assert admin_client.post(url, {"state": OrderState.CLOSED}).status_code == 403
    order.refresh_from_db()
    assert order.state == OrderState.OPEN


def test_the_order_page_says_who_closed_it_and_when(admin_client, admin_user, make_order):
    order = make_order()
    close_order(order, trigger=Trigger.ADMIN, user=admin_user)

    page = order_page(admin_client, order)

    assert "Closed at " in page and "WeChat answered SUCCESS to the close sent at" in page
    assert "by Admin action (admin)" in page and "It can never be paid" in page


def test_the_order_page_says_when_a_failed_close_is_retried(admin_client, make_order, simulator):
    order = make_order()
    simulator.inject(Fault.SYSTEMERROR)
    close_order(order)
    order.refresh_from_db()

    page = order_page(admin_client, order)

    assert "Overdue. Close attempt 1 of 3 failed (retryable error: SYSTEMERROR" in page
    assert "the sweep retries at " + timezone.localtime(order.due_at).strftime("%Y-%m-%d %H:%M:%S") in page


def test_the_order_page_gives_the_hold_reason(admin_client, make_order, simulator):
    order = make_order()
    simulator.inject(Fault.BAD_SIGNATURE)
    simulator.inject(Fault.BAD_SIGNATURE, api="orderquery")  # the query that follows cannot tell either
    close_order(order)
    sweep_expired_orders()

    page = order_page(admin_client, order)

    assert "On hold after the last answer (untrusted response:" in page
    assert "The sweep leaves it alone until a person acts" in page


def test_the_order_page_says_a_paid_order_must_be_fulfilled(admin_client, make_order):
    order = make_order(remote=RemoteState.PAID)
    close_order(order)

    page = order_page(admin_client, order)

    assert "WeChat answered ORDERPAID to the close sent at" in page and "fulfil or refund" in page


def test_the_order_page_says_when_a_young_order_can_first_be_closed(admin_client, make_order):
    order = make_order(age=timedelta(minutes=1), expired_for=timedelta(minutes=-29))

    page = order_page(admin_client, order)

    assert "Awaiting payment: the payment window ends at" in page and "It cannot be closed before" in page


def test_lifting_the_hold_of_selected_orders_lets_the_next_sweep_close_them(admin_client, make_order, simulator):
    held = [make_order(on_hold=True, retry_count=3) for _ in range(2)]
    untouched = make_order(on_hold=True)
    response = admin_client.post(reverse("admin:django_wxpay_close_order_changelist"), {
        "action": "lift_hold", ACTION_CHECKBOX_NAME: [str(order.pk) for order in held]}, follow=True)

    assert "2 orders are off hold" in response.content.decode() and simulator.requests == []
    assert sweep_expired_orders().by_action == {CloseAction.CLOSED: 2}
    assert set(Order.objects.filter(pk__in=[o.pk for o in held]).values_list("state", "retry_count")) == {
        (OrderState.CLOSED, 0)}
    assert Order.objects.get(pk=untouched.pk).on_hold


# -- what the pages show, and how -----------------------------------------------------------------------------


def changelist_row(client: Client, order: Order) -> str:
    page = client.get(reverse(CHANGELIST)).content.decode()
    start = page.index(f"/order/{order.pk}/change/")
    return page[start:page.index("</tr>", start)]


def test_the_list_says_overdue_in_words_in_the_state_badge(admin_client, make_order):
    overdue = make_order("LATE")
    waiting = make_order("WAITING", expired_for=timedelta(minutes=-20))
    held = make_order("HELD", on_hold=True)

    assert ">overdue</span>" in changelist_row(admin_client, overdue)
    assert ">awaiting payment</span>" in changelist_row(admin_client, waiting)
    assert ">overdue · on hold</span>" in changelist_row(admin_client, held)
    page = admin_client.get(reverse(CHANGELIST)).content.decode()
    assert "icon-yes.svg" not in page and "icon-no.svg" not in page  # no tick or cross to decode


def test_a_terminal_order_shows_no_next_attempt(admin_client, make_order):
    stale = timezone.now() + timedelta(minutes=5)
    order = make_order(state=OrderState.CLOSED, closed_at=timezone.now(), due_at=stale)
    stamp = timezone.localtime(stale).strftime("%Y-%m-%d")

    row = changelist_row(admin_client, order)
    assert row.rstrip().endswith('<td class="field-next_attempt">—</td>'), row
    assert stamp + '</span> <span class="wxpay-nowrap">' + timezone.localtime(stale).strftime("%H:%M:%S") not in row
    page = order_page(admin_client, order)
    next_attempt = page[page.index("field-due_at_when"):]
    assert '<div class="readonly">—</div>' in next_attempt[:600]


def test_the_list_and_the_order_page_format_every_date_one_way(admin_client, make_order):
    order = make_order()
    deadline = timezone.localtime(order.payment_deadline)

    row = changelist_row(admin_client, order)
    assert (f'<span class="wxpay-nowrap">{deadline:%Y-%m-%d}</span> '
            f'<span class="wxpay-nowrap">{deadline:%H:%M:%S %Z}</span>') in row
    page = order_page(admin_client, order)
    assert f"{deadline:%Y-%m-%d}</span> <span" in page and f"{deadline:%H:%M:%S %Z}" in page
    # Django's own format ("Dec. 1, 2026, 8:13 p.m.") appears nowhere
    assert dateformat.format(deadline, "N j, Y") not in page


def test_the_view_only_pages_offer_a_way_back_not_a_close_button(admin_client, make_order, attempt):
    order = make_order()
    attempt_page = reverse("admin:django_wxpay_close_closeattempt_change", args=[attempt.pk])
    pages = [order_page(admin_client, order), admin_client.get(attempt_page).content.decode()]

    for page in pages:
        assert 'class="closelink">Back to the list of ' in page
        assert ">Close</a>" not in page


def test_the_exact_bytes_are_shown_as_stored_and_the_pretty_print_apart(admin_client, attempt):
    page = admin_client.get(reverse("admin:django_wxpay_close_closeattempt_change", args=[attempt.pk])).content.decode()
    escaped = attempt.request_xml.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")

    assert f'<pre class="wxpay-exact">{escaped}</pre>' in page
    pretty = pretty_xml(attempt.request_xml).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    assert pretty != escaped and f'<pre class="wxpay-pretty">{pretty}</pre>' in page
    assert "pretty-printed for reading (not the bytes sent)" in page
    order_page_html = order_page(admin_client, attempt.order)
    assert f'<pre class="wxpay-exact">{escaped}</pre>' in order_page_html  # the trail shows the bytes too
    assert "django_wxpay_close/admin.css" in order_page_html  # the stylesheet that wraps them


def test_the_pages_work_with_use_tz_false(admin_client, make_order, settings):
    settings.USE_TZ = False
    order = make_order(on_hold=True)
    order.refresh_from_db()
    assert timezone.is_naive(order.payment_deadline)

    page = order_page(admin_client, order)
    # Naive datetimes are shown as they are (the database holds local time), without a time zone name.
    deadline = order.payment_deadline
    assert f'{deadline:%Y-%m-%d}</span> <span class="wxpay-nowrap">{deadline:%H:%M:%S}</span>' in page
    assert admin_client.get(reverse(CHANGELIST)).status_code == 200


# -- lists that stay fast on millions of rows ----------------------------------------------------------------

LISTS = ["admin:django_wxpay_close_order_changelist", "admin:django_wxpay_close_closeattempt_changelist",
         "admin:django_wxpay_close_paymentnotification_changelist"]


def listed_numbers(client: Client, url_name: str, query: str) -> list[str]:
    response = client.get(f"{reverse(url_name)}?{query}")
    assert response.status_code == 200
    return sorted(row.out_trade_no for row in response.context["cl"].result_list)


def notification(out_trade_no: str, transaction_id: str) -> PaymentNotification:
    return PaymentNotification.objects.create(out_trade_no=out_trade_no, transaction_id=transaction_id,
                                              verdict=NotificationVerdict.UNKNOWN_ORDER)


def test_the_order_search_matches_the_exact_out_trade_no(admin_client, make_order):
    make_order("Abc-1")
    make_order("Abc-10")

    assert listed_numbers(admin_client, CHANGELIST, "q=Abc-1") == ["Abc-1"]
    assert listed_numbers(admin_client, CHANGELIST, "q=Abc") == []  # no prefix search: no index serves one


def test_the_audit_list_search_matches_the_exact_out_trade_no(admin_client, make_order):
    for number in ("Abc-1", "Abc-10"):
        close_order(make_order(number))
    url_name = "admin:django_wxpay_close_closeattempt_changelist"

    assert listed_numbers(admin_client, url_name, "q=Abc-1") == ["Abc-1"]
    assert listed_numbers(admin_client, url_name, "q=Abc") == []


def test_a_notification_is_found_by_its_exact_out_trade_no_or_transaction_id(admin_client, db):
    notification("ORDER-1", "4200000001")
    notification("ORDER-2", "4200000002")
    url_name = "admin:django_wxpay_close_paymentnotification_changelist"

    assert listed_numbers(admin_client, url_name, "q=ORDER-2") == ["ORDER-2"]
    assert listed_numbers(admin_client, url_name, "q=4200000001") == ["ORDER-1"]
    assert listed_numbers(admin_client, url_name, "q=420000000") == []


def test_the_search_tells_letter_case_apart(admin_client, make_order):
    if connection.vendor == "mysql":
        pytest.skip("MariaDB and MySQL compare by the column's collation; the default *_ci ones ignore letter case")
    close_order(make_order("Abc-1"))
    notification("Abc-1", "42ABC")

    for url_name in LISTS:
        assert listed_numbers(admin_client, url_name, "q=Abc-1") == ["Abc-1"]
        assert listed_numbers(admin_client, url_name, "q=ABC-1") == []
    assert listed_numbers(admin_client, LISTS[2], "q=42abc") == []


def test_the_merchant_filter_offers_the_configured_merchants_and_filters_by_them(admin_client, make_order):
    make_order("MINE")
    make_order("THEIRS", merchant="other")

    response = admin_client.get(reverse(CHANGELIST))
    merchant_filter = next(spec for spec in response.context["cl"].filter_specs if isinstance(spec, MerchantFilter))

    assert [value for value, _label in merchant_filter.lookup_choices] == ["default", "other"]
    assert listed_numbers(admin_client, CHANGELIST, "merchant=other") == ["THEIRS"]


def test_the_err_code_filter_offers_wechats_codes_and_filters_by_them(admin_client, make_order, simulator):
    simulator.inject(Fault.SYSTEMERROR, out_trade_no="FLAKY")
    for order in (make_order("FLAKY"), make_order("OK")):
        close_order(order)
    url_name = "admin:django_wxpay_close_closeattempt_changelist"

    response = admin_client.get(reverse(url_name))
    err_code_filter = next(spec for spec in response.context["cl"].filter_specs if isinstance(spec, ErrCodeFilter))

    assert [value for value, _label in err_code_filter.lookup_choices] == list(CLOSEORDER_ERR_CODES)
    assert listed_numbers(admin_client, url_name, "err_code=SYSTEMERROR") == ["FLAKY"]
    assert listed_numbers(admin_client, url_name, "err_code=ORDERPAID") == []


def test_the_order_list_filters_by_a_creation_date_range(admin_client, make_order):
    make_order("OLD", age=timedelta(days=40), expired_for=timedelta(days=39))
    new = make_order("NEW")  # created an hour ago: yesterday, in the first hour of a day
    day = timezone.localdate(new.created_at)

    assert listed_numbers(admin_client, CHANGELIST, between("created_at", day, day + timedelta(days=1))) == ["NEW"]
    assert listed_numbers(admin_client, CHANGELIST, between("created_at", day - timedelta(days=60),
                                                            day - timedelta(days=30))) == ["OLD"]


@pytest.mark.parametrize("url_name", LISTS)
def test_no_list_reads_distinct_values_or_counts_the_whole_table(admin_client, make_order, url_name):
    for number in ("A-1", "A-2", "A-3"):
        close_order(make_order(number))
        notification(number, f"42{number}")

    with CaptureQueriesContext(connection) as queries:
        assert admin_client.get(reverse(url_name)).status_code == 200

    statements = [query["sql"].upper() for query in queries.captured_queries]
    assert not [sql for sql in statements if "DISTINCT" in sql]
    table = {0: Order, 1: CloseAttempt, 2: PaymentNotification}[LISTS.index(url_name)]._meta.db_table.upper()
    # Every count of the listed table is bounded by a LIMIT (the paginator's count that stops at exact_up_to).
    counts = [sql for sql in statements if "COUNT(" in sql and table in sql]
    assert counts and all("LIMIT" in sql for sql in counts), counts


@pytest.mark.parametrize("url_name", LISTS)
def test_a_list_runs_as_many_queries_for_many_rows_as_for_a_few(admin_client, make_order, url_name):
    def queries_for_the_page() -> int:
        with CaptureQueriesContext(connection) as queries:
            assert admin_client.get(reverse(url_name)).status_code == 200
        return len(queries.captured_queries)

    close_order(make_order("FIRST"))
    notification("FIRST", "42FIRST")
    few = queries_for_the_page()
    for index in range(12):
        close_order(make_order(f"MORE-{index}"))
        notification(f"MORE-{index}", f"42MORE-{index}")

    assert queries_for_the_page() == few


def test_the_search_bar_counts_a_search_but_offers_no_show_all_on_the_whole_list(admin_client, make_order):
    make_order("ONE")
    make_order("TWO")

    whole = admin_client.get(reverse(CHANGELIST)).content.decode()
    searched = admin_client.get(f"{reverse(CHANGELIST)}?q=ONE").content.decode()

    assert "results (" not in whole and "result (" not in whole
    assert "1 result (" in searched


def test_the_count_is_exact_up_to_the_paginators_limit(admin_client, make_order, monkeypatch):
    monkeypatch.setattr(EstimatedCountPaginator, "exact_up_to", 5)
    for index in range(5):
        make_order(f"O-{index}")

    response = admin_client.get(reverse(CHANGELIST))

    assert response.context["cl"].result_count == 5
    assert not response.context["cl"].paginator.count_is_estimate
    assert "about" not in response.content.decode()


def test_beyond_the_limit_postgresql_shows_the_planners_estimate_as_about_n(admin_client, make_order, monkeypatch):
    if connection.vendor != "postgresql":
        pytest.skip("only PostgreSQL estimates (scripts/test runs a PostgreSQL pass); the test below covers the others")
    monkeypatch.setattr(EstimatedCountPaginator, "exact_up_to", 3)
    for index in range(8):
        make_order(f"O-{index}")
    with connection.cursor() as cursor:
        cursor.execute(f"ANALYZE {connection.ops.quote_name(Order._meta.db_table)}")  # what autovacuum does

    response = admin_client.get(reverse(CHANGELIST))

    assert response.context["cl"].paginator.count_is_estimate
    assert response.context["cl"].result_count == 8  # the statistics of a just-analysed table are exact
    assert "about 8 orders (an estimate)" in response.content.decode()


def test_beyond_the_limit_other_databases_count_exactly(make_order, monkeypatch, settings):
    if connection.vendor == "postgresql":
        pytest.skip("PostgreSQL estimates (the test above)")
    for index in range(4):
        make_order(f"O-{index}")

    paginator = EstimatedCountPaginator(Order.objects.order_by("-created_at", "-id"), 2)
    paginator.exact_up_to = 2

    assert paginator.count == 4
    assert not paginator.count_is_estimate
