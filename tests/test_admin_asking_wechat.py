"""The admin's side of asking WeChat (orderquery): the "Check status at WeChat" action, the audit list's API
column and filter, and the order page's story of what a query answered and what happens next."""

from __future__ import annotations

import json
import re
from datetime import timedelta
from typing import Any

import pytest
from django.db import connection
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from django_wxpay_close.admin_display import format_when
from django_wxpay_close.models import CloseAttempt, Order, OrderState, Trigger
from django_wxpay_close.services import check_orders, close_order, sweep_expired_orders
from django_wxpay_close.testing import Fault
from django_wxpay_close.testing import OrderState as RemoteState

from .test_admin import CHANGELIST, messages_of, order_page, post_action, viewer  # noqa: F401 - viewer is a fixture
from .test_asking_wechat import closed_unclearly, held_by_a_client_bug, set_remote
from .test_fault_matrix import make_due, refreshed

ATTEMPTS = "admin:django_wxpay_close_closeattempt_changelist"


def post_check(client: Client, orders: list[Order], *, confirm: bool = False) -> Any:
    return post_action(client, orders, confirm=confirm, action="check_status_at_wechat")


@pytest.fixture
def to_check(make_order: Any) -> dict[str, Order]:
    """Three open orders to ask about (one paid at WeChat, one just created) and two that are not open."""
    now = timezone.now()
    return {
        "payable": make_order("PAYABLE"),
        "paid_at_wechat": make_order("PAID-AT-WECHAT", amount=1, currency="CNY", remote=RemoteState.PAID),
        "young": make_order("JUST-CREATED", age=timedelta(minutes=1), expired_for=timedelta(minutes=-29)),
        "paid": make_order("PAID-HERE", state=OrderState.PAID, paid_at=now),
        "closed": make_order("CLOSED-HERE", state=OrderState.CLOSED, closed_at=now),
    }


# -- "Check status at WeChat" --------------------------------------------------------------------------------


def test_the_check_action_is_offered_beside_the_close_action(admin_client, make_order):
    make_order()

    choices = [value for value, _label in admin_client.get(reverse(CHANGELIST)).context["action_form"]
               .fields["action"].choices]

    assert choices[1:3] == ["close_selected_orders", "check_status_at_wechat"]


def test_the_check_confirmation_page_lists_what_will_be_asked_about_and_what_is_skipped_and_why(
        admin_client, to_check, simulator):
    response = post_check(admin_client, list(to_check.values()))

    assert response.templates[0].name == "admin/django_wxpay_close/order/close_selected_confirmation.html"
    # A query is never too early: MIN_ORDER_AGE only keeps young orders from being closed.
    assert sorted(order.out_trade_no for order in response.context["to_send"]) == [
        "JUST-CREATED", "PAID-AT-WECHAT", "PAYABLE"]
    skipped = {order.out_trade_no: reason for order, reason in response.context["skipped"]}
    assert skipped == {"PAID-HERE": "it is paid", "CLOSED-HERE": "it is closed"}
    page = response.content.decode()
    assert "orderquery will be sent to WeChat Pay for" in page and "Will not be sent (2)" in page
    assert "Yes, ask about 3 orders" in page and "Yes, close" not in page and "payment window" not in page
    assert simulator.requests == [] and not CloseAttempt.objects.exists()


def test_confirming_a_check_asks_wechat_about_the_chosen_orders_and_reports_each_outcome(
        admin_client, to_check, simulator):
    response = post_check(admin_client, list(to_check.values()), confirm=True)

    [message] = response.context["messages"]
    assert str(message) == ("1 was already paid (trade_state SUCCESS), 2 were checked at WeChat and left as they were "
                            "(trade_state NOTPAY). 2 not sent: it is closed (1); it is paid (1).")
    assert message.level_tag == "warning"
    states = dict(Order.objects.filter(state__in=[OrderState.OPEN, OrderState.PAID])
                  .values_list("out_trade_no", "state"))
    assert states["PAID-AT-WECHAT"] == OrderState.PAID and states["PAYABLE"] == OrderState.OPEN
    audited = set(CloseAttempt.objects.values_list("out_trade_no", "api", "trigger", "actor"))
    assert audited == {(number, "orderquery", Trigger.ADMIN, "admin")
                       for number in ("PAYABLE", "PAID-AT-WECHAT", "JUST-CREATED")}
    assert sum(simulator.close_requests_for(number) for number in ("PAYABLE", "JUST-CREATED")) == 0


def test_a_check_that_only_records_answers_reports_success(admin_client, make_order):
    response = post_check(admin_client, [make_order(), make_order()], confirm=True)

    [message] = response.context["messages"]
    assert (str(message), message.level_tag) == (
        "2 were checked at WeChat and left as they were (trade_state NOTPAY).", "success")


def test_a_check_over_admin_max_selection_is_refused_and_nothing_is_sent(admin_client, make_order, wxpay_settings,
                                                                          simulator):
    wxpay_settings["ADMIN_MAX_SELECTION"] = 1

    response = post_check(admin_client, [make_order(), make_order()], confirm=True)

    assert messages_of(response) == [
        "2 orders selected; at most 1 can be checked at once (WXPAY_CLOSE['ADMIN_MAX_SELECTION']). Nothing was sent. "
        "Narrow the selection, or let close_expired_orders --check-held ask about those on hold."]
    assert simulator.requests == []


def test_a_user_without_change_permission_cannot_check_by_posting_it(viewer, make_order, simulator):  # noqa: F811
    order = make_order()

    post_check(viewer, [order], confirm=True)

    assert simulator.requests == [] and not order.close_attempts.exists()


# -- the audit list: which API -------------------------------------------------------------------------------


@pytest.fixture
def one_of_each(make_order: Any) -> None:
    """A close (CLOSE-1) and a query (CHECKED-1) whose answer was USERPAYING."""
    close_order(make_order("CLOSE-1"))
    checked = make_order("CHECKED-1", remote=RemoteState.USERPAYING)
    check_orders([checked])


def test_the_audit_list_filters_by_api(admin_client, one_of_each):
    def listed(query: str) -> list[str]:
        return sorted(row.out_trade_no for row in admin_client.get(f"{reverse(ATTEMPTS)}?{query}").context["cl"]
                      .result_list)

    assert listed("api__exact=orderquery") == ["CHECKED-1"]
    assert listed("api__exact=closeorder") == ["CLOSE-1"]


def test_the_audit_list_shows_each_exchanges_api_and_a_querys_trade_state(admin_client, one_of_each):
    page = admin_client.get(reverse(ATTEMPTS)).content.decode()

    assert '<td class="field-api_and_trigger">orderquery<br><span class="wxpay-merchant">Application code</span>' \
        in page
    assert '<td class="field-api_and_trigger">closeorder<br>' in page
    assert ">payer paying now</strong><br><span class=\"wxpay-code\">USERPAYING</span>" in page


def test_the_api_filter_is_served_by_its_partial_index(admin_client, one_of_each):
    if connection.vendor != "postgresql":
        pytest.skip("partial indexes are PostgreSQL's here (MariaDB has none; SQLite's planner is not asked)")
    queryset = admin_client.get(f"{reverse(ATTEMPTS)}?api__exact=orderquery").context["cl"].queryset
    with connection.cursor() as cursor:
        cursor.execute("SET enable_seqscan = off")  # a table of two rows is read whole otherwise
        plan = json.dumps(json.loads(queryset.explain(format="json")))
        cursor.execute("RESET enable_seqscan")

    assert "wxpay_attempt_api_idx" in plan


def test_a_querys_page_shows_its_api_and_trade_state(admin_client, one_of_each):
    query = CloseAttempt.objects.get(api="orderquery")

    page = admin_client.get(reverse("admin:django_wxpay_close_closeattempt_change", args=[query.pk])).content.decode()

    assert '<div class="readonly">orderquery</div>' in page and '<div class="readonly">USERPAYING</div>' in page
    assert f"orderquery CHECKED-1 at {format_when(query.started_at)}: payer paying now" in page


def test_the_order_pages_trail_shows_each_exchanges_api_and_a_querys_trade_state(admin_client, make_order,
                                                                                 simulator):
    order = make_order()
    closed_unclearly(order, simulator)
    sweep_expired_orders()  # the query: NOTPAY

    trail = re.sub(r">\s+<", "><", order_page(admin_client, order).split("Audit trail (newest first)", 1)[1])

    assert trail.index('<td class="field-api"><p>orderquery</p></td>') < trail.index(
        '<td class="field-api"><p>closeorder</p></td>')
    assert '<span class="wxpay-code">NOTPAY</span>' in trail


# -- the order's story -----------------------------------------------------------------------------------------


def test_the_story_of_an_order_waiting_for_a_query_says_when_the_sweep_asks_wechat(admin_client, make_order,
                                                                                  simulator):
    order = make_order()
    closed_unclearly(order, simulator)

    page = order_page(admin_client, refreshed(order))

    assert "The last close could not tell where the order stands (untrusted response:" in page
    assert f"the next sweep asks WeChat (orderquery) at {format_when(order.due_at)}." in page
    assert "&quot;Check status at WeChat&quot; asks WeChat (orderquery) where it stands now" in page


def test_the_story_says_what_a_query_answered_and_that_a_payment_in_progress_is_asked_about_again(
        admin_client, make_order, simulator):
    order = make_order()
    closed_unclearly(order, simulator)
    set_remote(simulator, order, RemoteState.USERPAYING)
    sweep_expired_orders()
    order = refreshed(order)
    query = order.close_attempts.get(api="orderquery")

    page = order_page(admin_client, order)

    assert (f"WeChat answered orderquery with USERPAYING (payer paying now) at {format_when(query.started_at)} "
            "(sent by close_expired_orders).") in page
    assert f"The sweep asks WeChat (orderquery) again at {format_when(order.due_at)}." in page


def test_the_story_of_a_still_payable_order_says_the_next_sweep_closes_it(admin_client, make_order, simulator):
    order = make_order()
    closed_unclearly(order, simulator)
    sweep_expired_orders()  # NOTPAY: close it again

    page = order_page(admin_client, refreshed(order))

    assert "WeChat answered orderquery with NOTPAY (still payable) at " in page
    assert "the next sweep sends closeorder." in page


@pytest.mark.parametrize(("remote", "state", "answer"), [
    (RemoteState.CLOSED, OrderState.CLOSED, "CLOSED (closed)"),
    (RemoteState.PAID, OrderState.PAID, "SUCCESS (paid)"),
])
def test_the_story_of_an_order_settled_by_a_query_says_what_wechat_answered(admin_client, make_order, simulator,
                                                                            remote, state, answer):
    order = make_order(amount=1, currency="CNY")
    closed_unclearly(order, simulator)
    set_remote(simulator, order, remote)
    sweep_expired_orders()
    assert refreshed(order).state == state

    page = order_page(admin_client, order)

    assert f"WeChat answered orderquery with {answer} at " in page and "(sent by close_expired_orders)." in page


def test_the_story_of_an_order_unknown_to_wechat_says_a_query_confirmed_it(admin_client, make_order, simulator):
    order = make_order(remote=None)  # WeChat never heard of it: every close and the query say ORDERNOTEXIST
    for _ in range(3):
        sweep_expired_orders()
        make_due(order)
    sweep_expired_orders()
    assert refreshed(order).state == OrderState.UNKNOWN_TO_WECHAT

    page = order_page(admin_client, order)

    assert "WeChat answered orderquery with ORDERNOTEXIST (not found) at " in page
    assert "It was never created at WeChat, so it can never be paid" in page
    assert "to every close until the retries ran out" not in page


def test_the_story_of_a_query_without_an_answer_says_so(admin_client, make_order, simulator):
    order = make_order()
    simulator.inject(Fault.DROP_CONNECTION, out_trade_no=order.out_trade_no, api="orderquery")
    check_orders([order])

    page = order_page(admin_client, refreshed(order))

    assert "The orderquery sent at " in page and "brought no answer to go by (network error)." in page


def test_the_story_of_an_order_a_query_left_on_hold_gives_the_querys_answer_as_the_reason(admin_client, make_order,
                                                                                         simulator):
    order = held_by_a_client_bug(make_order, simulator)
    simulator.inject(Fault.SYSTEMERROR, out_trade_no=order.out_trade_no, api="orderquery")
    sweep_expired_orders(check_held=True)

    page = order_page(admin_client, refreshed(order))

    assert "WeChat answered orderquery with SYSTEMERROR (retryable error) at " in page
    assert "On hold after the last answer (retryable error: orderquery: SYSTEMERROR: System error)." in page
    assert "&quot;Check status at WeChat&quot; asks WeChat (orderquery) where it stands now" in page
