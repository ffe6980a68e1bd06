"""The admin in headless Chromium (Playwright), against Django's live server and the simulator: the action end to
end, and the layout at 1440 px (nothing wider than the window, the navigation at the top) in English and Chinese.

Needs `pip install playwright` and Debian's `chromium` (no `playwright install`: the system browser is used), and
for the Chinese pages a CJK font (Debian's fonts-noto-cjk). Skipped with the reason when Playwright or Chromium is
missing, except under CI=true, where that is a failure. It takes screenshots of the order list, the confirmation
and order pages; with WXPAY_UPDATE_SCREENSHOTS=1 it writes them over the ones in docs/img/ that the README embeds
(`WXPAY_UPDATE_SCREENSHOTS=1 scripts/test -m browser`).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from django.db import connections
from django.utils import timezone

from django_wxpay_close.models import NotificationVerdict, Order, OrderState, PaymentNotification, Trigger
from django_wxpay_close.services import check_orders, close_order
from django_wxpay_close.testing import Fault
from django_wxpay_close.testing import OrderState as RemoteState

from .conftest import closed_at_the_second_try

pytestmark = pytest.mark.browser

CHROMIUM = os.environ.get("WXPAY_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
README_SCREENSHOTS = Path(__file__).resolve().parent.parent / "docs" / "img"
CHANGELIST = "/admin/django_wxpay_close/order/"


def _missing() -> str | None:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "Playwright is not installed (pip install playwright)"
    if not os.access(CHROMIUM, os.X_OK):
        return f"no Chromium at {CHROMIUM} (apt-get install chromium, or set WXPAY_CHROMIUM)"
    return None


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """One Chromium for the module's tests (each gets a context of its own: cookies, headers, storage)."""
    reason = _missing()
    if reason:
        if os.environ.get("CI") == "true":
            pytest.fail(f"the browser test must run under CI=true: {reason}")
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    # Playwright's sync API keeps an event loop in this thread while it runs; the tests' own ORM calls (and their
    # database fixtures' cleanup) are still synchronous.
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
        with sync_playwright() as playwright:
            chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                yield chromium
            finally:
                chromium.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1440, "height": 900})
    try:
        context.set_default_timeout(15_000)
        yield context.new_page()
    finally:
        context.close()
        # ORM calls made while Playwright runs get their own context-local connection; close it here,
        # or it outlives the test and blocks dropping the PostgreSQL test database.
        connections.close_all()


def _has_cjk_font() -> bool:
    fc_list = shutil.which("fc-list")
    return bool(fc_list and subprocess.run([fc_list, ":lang=zh"], capture_output=True, text=True).stdout.strip())


@pytest.fixture
def screenshots(tmp_path: Path) -> Path:
    if os.environ.get("WXPAY_UPDATE_SCREENSHOTS") != "1":
        return tmp_path
    if not _has_cjk_font():  # Chromium would draw the Chinese pages' text as boxes, over the good screenshots
        pytest.fail("WXPAY_UPDATE_SCREENSHOTS=1 needs a CJK font for the Chinese pages: apt-get install fonts-noto-cjk")
    return README_SCREENSHOTS


def log_in(page: Any, base_url: str) -> None:
    page.goto(f"{base_url}/admin/login/?next={CHANGELIST}")
    page.fill("#id_username", "admin")
    page.fill("#id_password", "password")
    page.click("input[type=submit]")
    page.wait_for_url(f"{base_url}{CHANGELIST}")


def run_close_action(page: Any, base_url: str, out_trade_nos: list[str]) -> Any:
    """Tick the orders on the change list, choose the action and return at the confirmation page."""
    page.goto(f"{base_url}{CHANGELIST}")
    for number in out_trade_nos:
        page.locator("#result_list tr", has_text=number).locator("input.action-select").check()
    page.select_option("select[name=action]", "close_selected_orders")
    page.click("button[name=index]")
    page.wait_for_selector("#to-send")
    return page


def message(page: Any) -> str:
    return page.locator("ul.messagelist li").inner_text().strip()


def test_an_operator_closes_expired_orders_through_the_confirmation_page(page, live_server, admin_user, make_order,
                                                                         simulator, screenshots):
    for number in ("EXPIRED-1", "EXPIRED-2", "EXPIRED-3"):
        make_order(number)
    make_order("JUST-CREATED", age=timedelta(minutes=1), expired_for=timedelta(minutes=-29))
    simulator.inject(Fault.SYSTEMERROR, out_trade_no="EXPIRED-1")
    log_in(page, live_server.url)

    run_close_action(page, live_server.url, ["EXPIRED-1", "EXPIRED-2", "EXPIRED-3", "JUST-CREATED"])
    assert page.locator("#to-send tbody tr").count() == 3
    assert "younger than MIN_ORDER_AGE" in page.locator("#skipped", has_text="JUST-CREATED").inner_text()
    page.screenshot(path=str(screenshots / "confirmation-page.png"), full_page=True)
    page.click("input[type=submit][value='Yes, close 3 orders']")
    page.wait_for_url(f"{live_server.url}{CHANGELIST}")

    assert message(page) == ("2 closed, 1 will be retried (SYSTEMERROR). 1 not sent: younger than MIN_ORDER_AGE "
                             "(WeChat mishandles closing a just-created order) (1).")
    assert dict(Order.objects.values_list("out_trade_no", "state")) == {
        "EXPIRED-1": OrderState.OPEN, "EXPIRED-2": OrderState.CLOSED, "EXPIRED-3": OrderState.CLOSED,
        "JUST-CREATED": OrderState.OPEN}

    run_close_action(page, live_server.url, ["EXPIRED-1"])
    page.click("input[type=submit][value='Yes, close 1 order']")
    page.wait_for_url(f"{live_server.url}{CHANGELIST}")
    assert message(page) == "1 closed."
    assert Order.objects.get(out_trade_no="EXPIRED-1").state == OrderState.CLOSED

    page.click("#result_list a:has-text('EXPIRED-1')")
    page.wait_for_selector(".wxpay-story")
    trail = page.locator(".inline-group", has_text="Audit trail (newest first)")
    assert trail.locator("tbody tr", has=page.locator("a[href*='/closeattempt/']")).count() == 2
    assert "Closed at " in page.locator(".wxpay-story").inner_text()
    page.locator("#exchanges details.wxpay-xml summary").first.click()  # the newest exchange's XML, in the screenshot
    page.evaluate("() => window.scrollTo(0, 0)")  # the sticky navigation sidebar at the top, where it belongs
    page.screenshot(path=str(screenshots / "order-page.png"), full_page=True)
    assert (screenshots / "order-page.png").stat().st_size > 10_000


# -- the layout at 1440 px ------------------------------------------------------------------------------------

WIDTH = 1440

# The page's own width against the window's, and where Django's header, navigation sidebar and content start.
LAYOUT_JS = """() => {
    const top = (selector) => {
        const element = document.querySelector(selector);
        return element ? element.getBoundingClientRect().top + window.scrollY : null;
    };
    return {scrollWidth: document.documentElement.scrollWidth, innerWidth: window.innerWidth,
            header: top("#header"), nav: top("#nav-sidebar"), content: top("#content")};
}"""


def assert_fits(page: Any, where: str) -> None:
    # From the top: Django's navigation sidebar is sticky, so after a scroll it is rightly further down the page.
    page.evaluate("() => window.scrollTo(0, 0)")
    layout = page.evaluate(LAYOUT_JS)
    assert layout["innerWidth"] == WIDTH, layout
    assert layout["scrollWidth"] <= layout["innerWidth"], f"{where} is wider than the window: {layout}"
    assert layout["header"] == 0, f"{where}: the header is not at the top: {layout}"
    # The sidebar and the content start together, right under the header and the breadcrumbs.
    assert layout["nav"] is not None and layout["nav"] < 150, f"{where}: the navigation is not at the top: {layout}"
    assert layout["content"] < 200, f"{where}: the content is pushed down: {layout}"


def a_busy_order_list(make_order: Any, simulator: Any) -> Order:
    """Orders in every state, with the longest texts each column shows; returns one closed at the second try."""
    now = timezone.now()
    for index in range(3):
        make_order(f"EXPIRED-20260501-{index:04d}")
    make_order("WAITING-20260501-0001", expired_for=timedelta(minutes=-20))
    make_order("RETRYING-20260501-0001", attempt_count=1, retry_count=1, last_outcome="retryable_error",
               last_error="SYSTEMERROR: system error", due_at=now + timedelta(minutes=4))
    make_order("ON-HOLD-20260501-0001", on_hold=True, retry_count=3, attempt_count=3, last_outcome="untrusted_response",
               last_error="SUCCESS body whose signature does not verify with the configured key and sign type")
    make_order("PAID-20260501-0001", state=OrderState.PAID, paid_at=now, attempt_count=1, last_outcome="paid",
               last_error="ORDERPAID: order paid", due_at=now + timedelta(minutes=5))
    make_order("CLOSED-20260501-0001", state=OrderState.CLOSED, closed_at=now, attempt_count=1, last_outcome="closed")
    make_order("2026050112345678901234567890ABCD", state=OrderState.UNKNOWN_TO_WECHAT, attempt_count=3,
               last_outcome="not_found", last_error="ORDERNOTEXIST: order does not exist",
               due_at=now + timedelta(minutes=5))
    return closed_at_the_second_try(make_order("TWO-EXCHANGES-0001", remote=RemoteState.NOTPAY), simulator)


def open_order_page_with_xml(page: Any, base_url: str, order: Order) -> None:
    page.goto(f"{base_url}{CHANGELIST}{order.pk}/change/")
    page.wait_for_selector(".wxpay-story")
    page.locator(".inline-group a.wxpay-xml-link").first.click()  # the trail's link to the newest exchange's XML
    page.locator("#exchanges details.wxpay-xml summary").first.click()
    page.wait_for_selector("#exchanges details.wxpay-xml[open] pre.wxpay-exact")


# Each list's page, and texts as long as its columns get: 32-character order numbers, WeChat's longest err_code,
# 32-digit transaction ids.
LISTS = {"orders": CHANGELIST, "WeChat exchanges": "/admin/django_wxpay_close/closeattempt/",
         "payment notifications": "/admin/django_wxpay_close/paymentnotification/"}


def long_audit_rows(make_order: Any, simulator: Any) -> None:
    for index, fault in enumerate((Fault.SYSTEMERROR, Fault.REQUIRE_POST_METHOD, Fault.XML_FORMAT_ERROR)):
        number = f"2026050112345678901234567890AB{index:02d}"
        order = make_order(number)
        simulator.inject(fault, out_trade_no=number)
        close_order(order)
    # The longest API and trigger: an orderquery sent by the sweep's trigger, answered with the longest outcome and
    # trade_state.
    check_orders([make_order("2026050112345678901234567890AB99", remote=RemoteState.USERPAYING)],
                 trigger=Trigger.COMMAND)
    for index, verdict in enumerate(NotificationVerdict):
        PaymentNotification.objects.create(
            out_trade_no=f"2026050112345678901234567890AB{index:02d}", transaction_id=f"{4200000000 + index:032d}",
            mch_id="1900000109", sub_mch_id="1900000111", total_fee="123456789", fee_type="CNY", verdict=verdict,
            signature_verified=verdict is not NotificationVerdict.BAD_SIGNATURE)


@pytest.mark.parametrize("language", ["en", "zh-hans", "zh-hant"])
def test_the_order_list_and_an_order_page_fit_a_1440_px_screen(page, live_server, admin_user, make_order, simulator,
                                                                screenshots, language):
    order = a_busy_order_list(make_order, simulator)
    page.context.set_extra_http_headers({"Accept-Language": language})
    log_in(page, live_server.url)

    page.goto(f"{live_server.url}{CHANGELIST}")
    page.wait_for_selector("#result_list")
    assert_fits(page, f"the order list ({language})")
    headings = page.locator("#result_list thead th").all_inner_texts()
    expected = {"en": "STATE", "zh-hans": "状态", "zh-hant": "狀態"}[language]
    assert expected in [heading.strip().upper() for heading in headings], headings
    # Every column is on screen: the table needs no horizontal scrolling inside its own box either.
    results = page.evaluate("() => { const box = document.querySelector('#changelist .results'); "
                            "return [box.scrollWidth, box.clientWidth]; }")
    assert results[0] <= results[1], f"the order list scrolls sideways in its box: {results}"
    if language == "en":
        page.screenshot(path=str(screenshots / "order-list.png"), full_page=True)

    open_order_page_with_xml(page, live_server.url, order)
    assert_fits(page, f"the order page with its XML open ({language})")
    exact = page.locator("#exchanges details.wxpay-xml[open] pre.wxpay-exact").first.inner_text()
    assert exact == order.close_attempts.order_by("-started_at", "-id").first().request_xml  # byte for byte
    assert page.locator("a.closelink").count() == 1
    assert page.locator("a.closelink").inner_text().strip() != "Close"
    # Readable: the pretty-printed request keeps its lines, in a box wider than a column of the trail.
    pretty = page.locator("#exchanges details.wxpay-xml[open] pre.wxpay-pretty").first
    assert pretty.inner_text().count("\n") >= 5
    assert pretty.evaluate("element => element.parentElement.clientWidth") >= 450
    if language == "zh-hans":
        page.screenshot(path=str(screenshots / "order-page-zh-hans.png"), full_page=True)


@pytest.mark.parametrize("language", ["en", "zh-hans", "zh-hant"])
def test_every_list_fits_a_1440_px_screen(page, live_server, admin_user, make_order, simulator, language):
    a_busy_order_list(make_order, simulator)
    long_audit_rows(make_order, simulator)
    page.context.set_extra_http_headers({"Accept-Language": language})
    log_in(page, live_server.url)

    for name, url in LISTS.items():
        page.goto(f"{live_server.url}{url}")
        page.wait_for_selector("#result_list")
        assert_fits(page, f"the {name} list ({language})")
        box = page.evaluate("() => { const box = document.querySelector('#changelist .results'); "
                            "return [box.scrollWidth, box.clientWidth]; }")
        assert box[0] <= box[1], f"the {name} list hides columns off its box's right edge ({language}): {box}"
