"""Reusable pytest fixtures, loaded for every project that installs django-wxpay-close (a `pytest11` entry point;
no `pytest_plugins` line needed, and an old one is harmless).

`wxpay_simulator`: a started loopback WeChat Pay simulator. `wxpay_close_settings` (with pytest-django): the
project's WXPAY_CLOSE pointed at that simulator, in a test that may call the services. The services refuse to
run inside a transaction (they raise TransactionManagementError: a rollback would erase the audit rows of
requests that really went out), so such a test needs a transactional database: pytest-django's
`transactional_db` / `@pytest.mark.django_db(transaction=True)`, or Django's `TransactionTestCase`. A plain
`db` fixture, `@pytest.mark.django_db` or Django's `TestCase` wraps the test in a transaction.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator, Mapping
from typing import Any

import pytest

from .simulator import API_KEY, APPID, MCH_ID, SUB_MCH_ID, WeChatPaySimulator

DEMO_MERCHANT: dict[str, str] = {
    "APPID": APPID, "MCH_ID": MCH_ID, "SUB_MCH_ID": SUB_MCH_ID, "API_KEY": API_KEY, "SIGN_TYPE": "HMAC-SHA256",
}


@pytest.fixture
def wxpay_simulator() -> Iterator[WeChatPaySimulator]:
    """A started simulator that knows the demo merchant (APPID, MCH_ID, SUB_MCH_ID, API_KEY); stopped afterwards.

    It answers ORDERNOTEXIST for an order it was not told about: `add_order(out_trade_no, mch_id=...,
    sub_mch_id=...)` first (state=OrderState.PAID for one the payer paid); `inject(Fault.SYSTEMERROR, ...)`
    to misbehave; `requests` is what it received.
    """
    with WeChatPaySimulator() as simulator:
        yield simulator


def simulated_close_settings(configured: Mapping[str, Any] | None, simulator: WeChatPaySimulator) -> dict[str, Any]:
    """`configured` (a WXPAY_CLOSE) with every request going to `simulator`, which learns its merchants' keys.

    BASE_URL becomes the simulator and FAILOVER_BASE_URL is dropped, so nothing can reach WeChat. Without
    merchants, the demo merchant is "default".
    """
    close_settings = dict(configured or {})
    merchants = close_settings.get("MERCHANTS") or {"default": DEMO_MERCHANT}
    # A merchant's closes are signed with its own key: the simulator must accept that key to verify them.
    # An incomplete entry is left for the app's checks to report.
    keys = {merchant["MCH_ID"]: merchant["API_KEY"] for merchant in merchants.values()
            if isinstance(merchant, Mapping) and merchant.get("MCH_ID") and merchant.get("API_KEY")}
    simulator.merchants = {**simulator.merchants, **keys}
    return {**close_settings, "MERCHANTS": merchants, "BASE_URL": simulator.base_url, "FAILOVER_BASE_URL": None}


# Only with pytest-django: the fixture needs its `settings` (restored after the test) and `transactional_db`.
if importlib.util.find_spec("pytest_django") is not None:

    @pytest.fixture
    def wxpay_close_settings(settings: Any, wxpay_simulator: WeChatPaySimulator, transactional_db: None
                             ) -> dict[str, Any]:
        """WXPAY_CLOSE pointed at `wxpay_simulator` for this test, in a database the services can run in.

        Keeps the project's merchants (the simulator learns their MCH_ID and API_KEY; the demo merchant as
        "default" when WXPAY_CLOSE has none) and other keys; restored afterwards. It asks for pytest-django's
        `transactional_db`, so the test is transactional even under a plain `@pytest.mark.django_db`: inside
        the `db` fixture's transaction every close would raise TransactionManagementError. Tell the simulator
        about each order the test closes (`wxpay_simulator.add_order(...)`), or it answers ORDERNOTEXIST.
        """
        settings.WXPAY_CLOSE = simulated_close_settings(getattr(settings, "WXPAY_CLOSE", None), wxpay_simulator)
        close_settings: dict[str, Any] = settings.WXPAY_CLOSE
        return close_settings
