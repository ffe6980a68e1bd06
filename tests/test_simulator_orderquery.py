"""The simulator's orderquery, through the real client over real sockets: it answers every order state as WeChat
would, consistently with what closes and notifications did to the order, and its faults bend queries on demand."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
import requests

from django_wxpay_close.testing import (
    API_KEY,
    APPID,
    MCH_ID,
    SUB_MCH_ID,
    Fault,
    OrderKey,
    OrderState,
    WeChatPaySimulator,
)
from django_wxpay_close.wechat import (
    ORDERQUERY_PATH,
    CloseOrderClient,
    Merchant,
    Outcome,
    QueryVerdict,
    SignType,
    TradeState,
    compute_signature,
    decode_xml,
    encode_xml,
    new_nonce,
)

OTHER_KEY = "OTHERKEY" * 4


@pytest.fixture
def sim(wxpay_simulator: WeChatPaySimulator) -> WeChatPaySimulator:
    return wxpay_simulator


def make_client(base_urls: list[str], *, api_key: str = API_KEY,
                sign_type: SignType = SignType.HMAC_SHA256) -> CloseOrderClient:
    merchant = Merchant(APPID, MCH_ID, SUB_MCH_ID, api_key, sign_type=sign_type)
    return CloseOrderClient(merchant, base_urls=base_urls, connect_timeout=0.5, read_timeout=0.5)


@pytest.fixture(params=[SignType.MD5, SignType.HMAC_SHA256], ids=lambda sign_type: sign_type.value)
def client(sim: WeChatPaySimulator, request: pytest.FixtureRequest) -> Iterator[CloseOrderClient]:
    with make_client([sim.base_url], sign_type=request.param) as query_client:
        yield query_client


def refused_base() -> str:
    """A loopback base URL where nothing listens: connecting to it is refused."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def add(sim: WeChatPaySimulator, out_trade_no: str, state: OrderState = OrderState.NOTPAY, **amount: str | int) -> None:
    sim.add_order(out_trade_no, mch_id=MCH_ID, sub_mch_id=SUB_MCH_ID, state=state, **amount)  # type: ignore[arg-type]


def state_of(sim: WeChatPaySimulator, out_trade_no: str) -> OrderState | None:
    return sim.order_state(out_trade_no, mch_id=MCH_ID, sub_mch_id=SUB_MCH_ID)


# -- each state answers its trade_state ------------------------------------------------------------------


@pytest.mark.parametrize(("state", "trade_state", "verdict"), [
    (OrderState.NOTPAY, TradeState.NOTPAY, QueryVerdict.PAYABLE),
    (OrderState.PAID, TradeState.SUCCESS, QueryVerdict.PAID),
    (OrderState.CLOSED, TradeState.CLOSED, QueryVerdict.CLOSED),
    (OrderState.USERPAYING, TradeState.USERPAYING, QueryVerdict.PAYING),
    (OrderState.REFUND, TradeState.REFUND, QueryVerdict.PAID),
    (OrderState.REVOKED, TradeState.REVOKED, QueryVerdict.CLOSED),
    (OrderState.PAYERROR, TradeState.PAYERROR, QueryVerdict.PAYABLE),
], ids=lambda value: getattr(value, "name", ""))
def test_each_order_state_answers_its_trade_state_and_stays(
    sim: WeChatPaySimulator, client: CloseOrderClient, state: OrderState, trade_state: TradeState,
    verdict: QueryVerdict,
) -> None:
    add(sim, "Q1", state)

    result = client.query_order("Q1")

    assert (result.trade_state, result.verdict, result.failure, result.signature_verified) == (
        trade_state, verdict, None, True)
    assert state_of(sim, "Q1") is state


def test_every_order_state_is_covered_by_the_table_above() -> None:
    assert len(OrderState) == 7


@pytest.mark.parametrize("state", [OrderState.PAID, OrderState.REFUND])
def test_a_paid_order_answers_with_its_amount(sim: WeChatPaySimulator, client: CloseOrderClient,
                                              state: OrderState) -> None:
    add(sim, "Q1", state, total_fee=1999, fee_type="HKD")

    result = client.query_order("Q1")

    assert (result.total_fee, result.fee_type, result.cash_fee) == (1999, "HKD", 1999)
    assert result.transaction_id.startswith("4200") and len(result.time_end) == 14


def test_a_paid_order_answers_the_same_payment_every_time(sim: WeChatPaySimulator, client: CloseOrderClient) -> None:
    add(sim, "Q1", OrderState.PAID)

    first, second = client.query_order("Q1"), client.query_order("Q1")

    assert (first.transaction_id, first.time_end) == (second.transaction_id, second.time_end)
    assert sim.payment("Q1", mch_id=MCH_ID, sub_mch_id=SUB_MCH_ID) is not None


def test_an_unpaid_order_has_no_payment(sim: WeChatPaySimulator) -> None:
    add(sim, "Q1")

    assert sim.payment("Q1", mch_id=MCH_ID, sub_mch_id=SUB_MCH_ID) is None


def test_an_order_the_simulator_closed_answers_closed(sim: WeChatPaySimulator, client: CloseOrderClient) -> None:
    add(sim, "Q1")

    assert client.close_order("Q1").outcome is Outcome.CLOSED
    assert client.query_order("Q1").trade_state is TradeState.CLOSED


def test_an_order_paid_by_a_notification_answers_that_payment(
    sim: WeChatPaySimulator, client: CloseOrderClient
) -> None:
    add(sim, "Q1", total_fee=500, fee_type="CNY")
    with pytest.raises(OSError, match="refused"):  # nobody listens: the notification fails, the payment stands
        sim.notify(f"{refused_base()}/notify", "Q1", total_fee=1000, fee_type="HKD", timeout=0.5)
    notified = decode_xml(sim.last_notification or b"")

    result = client.query_order("Q1")

    assert (result.verdict, result.total_fee, result.fee_type) == (QueryVerdict.PAID, 1000, "HKD")
    assert (result.transaction_id, result.time_end) == (notified["transaction_id"], notified["time_end"])


def test_a_paid_order_can_be_queried_by_its_transaction_id(
    sim: WeChatPaySimulator, client: CloseOrderClient
) -> None:
    add(sim, "Q1", OrderState.PAID, total_fee=1999, fee_type="HKD")
    transaction_id = client.query_order("Q1").transaction_id

    result = client.query_order(transaction_id=transaction_id)

    assert (result.verdict, result.out_trade_no, result.total_fee) == (QueryVerdict.PAID, "Q1", 1999)


def test_an_unknown_transaction_id_answers_ordernotexist(sim: WeChatPaySimulator, client: CloseOrderClient) -> None:
    assert client.query_order(transaction_id="4200000000000000000000000000").verdict is QueryVerdict.NOT_FOUND


def test_an_unknown_order_answers_ordernotexist(sim: WeChatPaySimulator, client: CloseOrderClient) -> None:
    result = client.query_order("NOPE")

    assert (result.verdict, result.failure) == (QueryVerdict.NOT_FOUND, Outcome.NOT_FOUND)


def test_open_mode_answers_an_unknown_order_notpay_without_creating_it() -> None:
    with WeChatPaySimulator(unknown_orders="open") as open_sim, make_client([open_sim.base_url]) as query_client:
        assert query_client.query_order("ANY1").trade_state is TradeState.NOTPAY
        assert open_sim.order_state("ANY1", mch_id=MCH_ID, sub_mch_id=SUB_MCH_ID) is None


# -- closing the new states ------------------------------------------------------------------------------


@pytest.mark.parametrize(("state", "outcome", "after"), [
    (OrderState.USERPAYING, Outcome.RETRYABLE_ERROR, OrderState.USERPAYING),
    (OrderState.REFUND, Outcome.PAID, OrderState.REFUND),
    (OrderState.REVOKED, Outcome.ALREADY_CLOSED, OrderState.REVOKED),
    (OrderState.PAYERROR, Outcome.CLOSED, OrderState.CLOSED),
], ids=lambda value: getattr(value, "name", ""))
def test_closing_an_order_in_a_new_state(sim: WeChatPaySimulator, client: CloseOrderClient, state: OrderState,
                                         outcome: Outcome, after: OrderState) -> None:
    add(sim, "Q1", state)

    assert client.close_order("Q1").outcome is outcome
    assert state_of(sim, "Q1") is after


# -- faults on queries -----------------------------------------------------------------------------------


def test_a_fault_for_queries_leaves_closes_alone_and_the_reverse(
    sim: WeChatPaySimulator, client: CloseOrderClient
) -> None:
    add(sim, "Q1")
    sim.inject(Fault.SYSTEMERROR, api="orderquery")
    sim.inject(Fault.DROP_CONNECTION, api="closeorder")

    query = client.query_order("Q1")
    close = client.close_order("Q1")

    assert (query.verdict, query.failure) == (QueryVerdict.UNKNOWN, Outcome.RETRYABLE_ERROR)
    assert close.outcome is Outcome.NETWORK_ERROR
    assert client.query_order("Q1").trade_state is TradeState.NOTPAY


@pytest.mark.parametrize(("fault", "trade_state"), [
    (Fault.USERPAYING, TradeState.USERPAYING), (Fault.REFUND, TradeState.REFUND), (Fault.REVOKED, TradeState.REVOKED),
])
def test_a_pretending_fault_answers_a_query_with_its_trade_state_and_changes_nothing(
    sim: WeChatPaySimulator, client: CloseOrderClient, fault: Fault, trade_state: TradeState
) -> None:
    add(sim, "Q1")
    sim.inject(fault, out_trade_no="Q1", api="orderquery")

    assert client.query_order("Q1").trade_state is trade_state
    assert client.query_order("Q1").trade_state is TradeState.NOTPAY
    assert state_of(sim, "Q1") is OrderState.NOTPAY


@pytest.mark.parametrize(("fault", "outcome"), [
    (Fault.USERPAYING, Outcome.RETRYABLE_ERROR), (Fault.REFUND, Outcome.PAID), (Fault.REVOKED, Outcome.ALREADY_CLOSED),
])
def test_a_pretending_fault_answers_a_close_as_that_state_would_and_closes_nothing(
    sim: WeChatPaySimulator, client: CloseOrderClient, fault: Fault, outcome: Outcome
) -> None:
    add(sim, "Q1")
    sim.inject(fault, out_trade_no="Q1")

    assert client.close_order("Q1").outcome is outcome
    assert state_of(sim, "Q1") is OrderState.NOTPAY


@pytest.mark.parametrize(("fault", "failure"), [
    (Fault.BAD_SIGNATURE, Outcome.UNTRUSTED_RESPONSE),
    (Fault.UNSIGNED, Outcome.UNTRUSTED_RESPONSE),
    (Fault.MALFORMED_BODY, Outcome.INVALID_RESPONSE),
    (Fault.HTTP_502, Outcome.INVALID_RESPONSE),
    (Fault.RETURN_FAIL, Outcome.CONFIGURATION_ERROR),
    (Fault.DROP_CONNECTION, Outcome.NETWORK_ERROR),
    (Fault.RESET_CONNECTION, Outcome.NETWORK_ERROR),
], ids=lambda value: getattr(value, "name", ""))
def test_a_hostile_query_answer_settles_nothing(
    sim: WeChatPaySimulator, client: CloseOrderClient, fault: Fault, failure: Outcome
) -> None:
    add(sim, "Q1", OrderState.PAID)
    sim.inject(fault, api="orderquery")

    result = client.query_order("Q1")

    assert (result.verdict, result.failure, result.total_fee) == (QueryVerdict.UNKNOWN, failure, None)


def test_inject_refuses_an_unknown_api(sim: WeChatPaySimulator) -> None:
    with pytest.raises(ValueError, match="api must be"):
        sim.inject(Fault.SYSTEMERROR, api="refund")  # type: ignore[arg-type]


# -- refusals --------------------------------------------------------------------------------------------


def test_a_query_signed_with_the_wrong_key_is_refused_unsigned(sim: WeChatPaySimulator) -> None:
    add(sim, "Q1")
    with make_client([sim.base_url], api_key=OTHER_KEY) as wrong_key:
        result = wrong_key.query_order("Q1")

    assert (result.verdict, result.failure, result.reason) == (
        QueryVerdict.UNKNOWN, Outcome.CONFIGURATION_ERROR, "return_code FAIL: Signature Failure")


def test_a_query_naming_no_order_is_refused(sim: WeChatPaySimulator) -> None:
    fields = {"appid": APPID, "mch_id": MCH_ID, "sub_mch_id": SUB_MCH_ID, "nonce_str": new_nonce()}
    fields["sign"] = compute_signature(fields, API_KEY, SignType.MD5)

    answer = requests.post(sim.base_url + ORDERQUERY_PATH, data=encode_xml(fields), timeout=2)

    assert decode_xml(answer.content) == {
        "return_code": "FAIL",
        "return_msg": "Parameter format checking error: missing out_trade_no or transaction_id",
    }


# -- accounting and failover -----------------------------------------------------------------------------


def test_queries_are_logged_and_counted_apart_from_closes(sim: WeChatPaySimulator, client: CloseOrderClient) -> None:
    add(sim, "Q1", OrderState.PAID)
    client.query_order("Q1")
    client.query_order("Q1")
    client.close_order("Q1")

    log = [(r.api, r.path, r.out_trade_no, r.answer, r.closed) for r in sim.requests]
    assert log == [
        ("orderquery", ORDERQUERY_PATH, "Q1", "SUCCESS", False),
        ("orderquery", ORDERQUERY_PATH, "Q1", "SUCCESS", False),
        ("closeorder", "/pay/closeorder", "Q1", "ORDERPAID", False),
    ]
    assert (sim.query_requests_for("Q1"), sim.close_requests_for("Q1")) == (2, 1)
    assert sim.query_request_counts() == {OrderKey(MCH_ID, SUB_MCH_ID, "Q1"): 2}
    sim.reset_log()
    assert (sim.requests, sim.query_request_counts(), sim.query_requests_for("Q1")) == ([], {}, 0)


def test_a_query_fails_over_from_a_refusing_region_to_the_simulator(sim: WeChatPaySimulator) -> None:
    refusing_base = refused_base()
    add(sim, "Q1", OrderState.CLOSED)

    with make_client([refusing_base, sim.base_url]) as two_regions:
        result = two_regions.query_order("Q1")

    assert (result.verdict, result.failed_over_from) == (QueryVerdict.CLOSED, refusing_base + ORDERQUERY_PATH)
