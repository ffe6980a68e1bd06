"""The README's first quick-start command runs `manage.py wxpay_demo`; it must keep showing closed, audited orders."""

from __future__ import annotations

from io import StringIO

from django.core.management import call_command
from django.test import override_settings

from django_wxpay_close.models import CloseAttempt, Order, OrderState


def test_the_demo_closes_expired_orders_and_audits_every_request(transactional_db, settings):
    out = StringIO()
    with override_settings(WXPAY_CLOSE={**settings.WXPAY_CLOSE, "READ_TIMEOUT": 2.0, "CONNECT_TIMEOUT": 1.0}):
        call_command("wxpay_demo", "--latency", "0", stdout=out, stderr=StringIO())

    states = {state: Order.objects.filter(state=state).count() for state in OrderState}
    assert states == {OrderState.CLOSED: 10, OrderState.PAID: 2, OrderState.OPEN: 5, OrderState.UNKNOWN_TO_WECHAT: 0}
    assert CloseAttempt.objects.unfinished().count() == 0
    assert f"the audit trail holds {CloseAttempt.objects.count()} rows" in out.getvalue()
