"""The hooks the host shop uses, as docs/operations.md documents them: signal arguments, sending after commit,
and create_order / record_payment called from the shop's own (transactional) code."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from django.db import transaction

from django_wxpay_close import signals
from django_wxpay_close.models import CloseAttempt, Order, OrderState
from django_wxpay_close.services import close_order, create_order, record_payment, sweep_expired_orders
from django_wxpay_close.testing import Fault
from django_wxpay_close.testing import OrderState as RemoteState
from django_wxpay_close.wechat import Outcome

SIGNALS = ["order_closed", "order_found_paid", "close_failed", "close_attempts_exhausted", "order_paid_recorded",
           "order_settled_by_query", "payment_mismatch"]


@pytest.fixture
def sent() -> Iterator[list[tuple[str, dict[str, Any]]]]:
    """(signal name, keyword arguments) of every signal, in the order they were sent."""
    log: list[tuple[str, dict[str, Any]]] = []
    receivers = []
    for name in SIGNALS:
        def receiver(sender: Any, signal: Any, _name: str = name, **kwargs: Any) -> None:
            assert sender is Order
            log.append((_name, kwargs))
        getattr(signals, name).connect(receiver, sender=Order, weak=False)
        receivers.append((name, receiver))
    yield log
    for name, receiver in receivers:
        getattr(signals, name).disconnect(receiver, sender=Order)


def test_order_closed_carries_the_order_the_attempt_and_already_closed(make_order, sent):
    order = make_order(remote=RemoteState.CLOSED)
    close_order(order)

    [(name, kwargs)] = sent
    assert (name, set(kwargs)) == ("order_closed", {"order", "attempt", "already_closed"})
    assert kwargs["order"].state == OrderState.CLOSED and kwargs["already_closed"] is True
    assert isinstance(kwargs["attempt"], CloseAttempt) and kwargs["attempt"].outcome == Outcome.ALREADY_CLOSED


def test_close_failed_carries_the_outcome_and_reason(make_order, simulator, sent):
    simulator.inject(Fault.SYSTEMERROR)
    close_order(make_order())

    [(name, kwargs)] = sent
    assert (name, set(kwargs)) == ("close_failed", {"order", "attempt", "outcome", "reason"})
    assert kwargs["outcome"] is Outcome.RETRYABLE_ERROR and kwargs["reason"].startswith("SYSTEMERROR")


def test_close_attempts_exhausted_says_why_it_gave_up(make_order, wxpay_settings, simulator, sent):
    wxpay_settings["MAX_ATTEMPTS"] = 1
    for api in ("closeorder", "orderquery"):
        simulator.inject(Fault.SYSTEMERROR, times=None, api=api)
    close_order(make_order())
    sweep_expired_orders()  # the query the close left for the sweep

    assert [name for name, _ in sent] == ["close_failed", "close_attempts_exhausted"]
    kwargs = sent[-1][1]
    assert set(kwargs) == {"order", "attempt", "outcome", "reason"}
    assert kwargs["order"].on_hold and kwargs["outcome"] is Outcome.RETRYABLE_ERROR
    assert kwargs["reason"].startswith("orderquery gave up after 1 attempts")


def test_order_paid_recorded_has_no_attempt(make_order, sent):
    record_payment(order=make_order())

    assert sent == [("order_paid_recorded", {"order": sent[0][1]["order"], "attempt": None})]


def test_signals_of_a_payment_recorded_in_a_transaction_wait_for_its_commit(make_order, sent):
    order = make_order()

    with transaction.atomic():
        record_payment(order=order)
        assert sent == []

    assert [name for name, _ in sent] == ["order_paid_recorded"]


def test_no_signal_is_sent_for_a_payment_whose_transaction_rolls_back(make_order, sent):
    order = make_order()

    with pytest.raises(RuntimeError), transaction.atomic():
        record_payment(order=order)
        raise RuntimeError("the shop's fulfilment failed")

    order.refresh_from_db()
    assert sent == [] and order.state == OrderState.OPEN


def test_create_order_joins_the_shops_transaction(wxpay_settings, transactional_db):
    with pytest.raises(RuntimeError), transaction.atomic():
        create_order(out_trade_no="SHOP-1001", amount=2500, currency="HKD")
        raise RuntimeError("unified order failed after all")

    assert not Order.objects.exists()
