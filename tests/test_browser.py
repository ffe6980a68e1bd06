"""The admin action end to end in headless Chromium (Playwright), against Django's live server and the simulator.

Needs `pip install playwright` and Debian's `chromium` (no `playwright install`: the system browser is used).
Skipped with the reason when either is missing, except under CI=true, where that is a failure. It takes
screenshots of the confirmation and order pages; with WXPAY_UPDATE_SCREENSHOTS=1 it writes them over the
ones in docs/img/ that the README embeds (`WXPAY_UPDATE_SCREENSHOTS=1 scripts/test -m browser`).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from django.db import connections

from django_wxpay_close.models import Order, OrderState
from django_wxpay_close.testing import Fault

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


@pytest.fixture
def page(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    reason = _missing()
    if reason:
        if os.environ.get("CI") == "true":
            pytest.fail(f"the browser test must run under CI=true: {reason}")
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    # Playwright's sync API keeps an event loop in this thread; the test's own ORM calls are still synchronous.
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(viewport={"width": 1440, "height": 900})
            context.set_default_timeout(15_000)
            yield context.new_page()
        finally:
            browser.close()
            # ORM calls made while Playwright runs get their own context-local connection; close it here,
            # or it outlives the test and blocks dropping the PostgreSQL test database.
            connections.close_all()


@pytest.fixture
def screenshots(tmp_path: Path) -> Path:
    return README_SCREENSHOTS if os.environ.get("WXPAY_UPDATE_SCREENSHOTS") == "1" else tmp_path


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

    page.click("#result_list a:text-is('EXPIRED-1')")
    page.wait_for_selector(".wxpay-story")
    trail = page.locator(".inline-group", has_text="Audit trail (newest first)")
    assert trail.locator("tbody tr", has=page.locator("a[href*='/closeattempt/']")).count() == 2
    assert "Closed at " in page.locator(".wxpay-story").inner_text()
    trail.locator("details summary").first.click()  # show the newest exchange's XML in the screenshot
    page.screenshot(path=str(screenshots / "order-page.png"), full_page=True)
    assert (screenshots / "order-page.png").stat().st_size > 10_000
