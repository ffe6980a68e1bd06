"""The loopback WeChat Pay simulator, driven by the real CloseOrderClient (raw HTTP where the client cannot err)."""

from __future__ import annotations

import http.client
import select
import shlex
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

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
from django_wxpay_close.testing.__main__ import main as cli_main
from django_wxpay_close.wechat import (
    CLOSEORDER_PATH,
    CloseOrderClient,
    Merchant,
    Outcome,
    SignType,
    compute_signature,
    decode_xml,
    encode_xml,
    new_nonce,
    verify_signature,
)


OTHER_KEY = "OTHERKEY" * 4
BOTH_SIGN_TYPES = [SignType.MD5, SignType.HMAC_SHA256]


@pytest.fixture
def sim(wxpay_simulator: WeChatPaySimulator) -> WeChatPaySimulator:
    """The plugin's fixture under a short name: a started simulator knowing the demo merchant."""
    return wxpay_simulator


@pytest.fixture(params=BOTH_SIGN_TYPES, ids=lambda sign_type: sign_type.value)
def sign_type(request: pytest.FixtureRequest) -> SignType:
    chosen: SignType = request.param
    return chosen


@pytest.fixture
def client(sim: WeChatPaySimulator, sign_type: SignType) -> Iterator[CloseOrderClient]:
    with make_client(sim, sign_type=sign_type) as closer:
        yield closer


def make_client(
    sim: WeChatPaySimulator,
    *,
    sign_type: SignType = SignType.HMAC_SHA256,
    mch_id: str = MCH_ID,
    api_key: str = API_KEY,
    sub_appid: str | None = None,
    read_timeout: float = 0.5,
) -> CloseOrderClient:
    merchant = Merchant(APPID, mch_id, SUB_MCH_ID, api_key, sign_type=sign_type, sub_appid=sub_appid)
    return CloseOrderClient(merchant, base_urls=[sim.base_url], connect_timeout=0.5, read_timeout=read_timeout)


def add(sim: WeChatPaySimulator, out_trade_no: str, state: OrderState = OrderState.NOTPAY) -> None:
    sim.add_order(out_trade_no, mch_id=MCH_ID, sub_mch_id=SUB_MCH_ID, state=state)


def state_of(sim: WeChatPaySimulator, out_trade_no: str) -> OrderState | None:
    return sim.order_state(out_trade_no, mch_id=MCH_ID, sub_mch_id=SUB_MCH_ID)


def signed_fields(sign_type: SignType, /, *, without: str | None = None, **values: str) -> dict[str, str]:
    """A closeorder request built by hand, signed after `without` is left out (unless it is `sign`)."""
    fields = {"appid": APPID, "mch_id": MCH_ID, "sub_mch_id": SUB_MCH_ID, "out_trade_no": "RAW1"}
    fields["nonce_str"] = new_nonce()
    if sign_type is SignType.HMAC_SHA256:
        fields["sign_type"] = sign_type.value
    fields.update(values)
    fields.pop(without or "", None)
    if without != "sign":
        fields["sign"] = compute_signature(fields, API_KEY, sign_type)
    return fields


def wait_until(condition: Callable[[], bool], timeout: float = 2.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.005)


def post_raw(
    sim: WeChatPaySimulator, body: bytes, *, method: str = "POST", path: str = CLOSEORDER_PATH
) -> requests.Response:
    return requests.request(method, sim.base_url + path, data=body, timeout=2)


# -- answers to valid requests ---------------------------------------------------------------------------


def test_unpaid_order_is_closed_with_a_signed_success(
    sim: WeChatPaySimulator, client: CloseOrderClient, sign_type: SignType
) -> None:
    add(sim, "A1")
    result = client.close_order("A1")
    assert result.outcome is Outcome.CLOSED
    assert result.signature_verified is True
    fields = result.response_fields
    assert {name: fields[name] for name in ("return_code", "return_msg", "result_code", "result_msg")} == {
        "return_code": "SUCCESS", "return_msg": "OK", "result_code": "SUCCESS", "result_msg": "OK",
    }
    assert (fields["appid"], fields["mch_id"], fields["sub_mch_id"]) == (APPID, MCH_ID, SUB_MCH_ID)
    assert fields["nonce_str"] and fields["nonce_str"] not in result.request_body.decode()
    assert "err_code" not in fields and "sign_type" not in fields
    assert verify_signature(fields, API_KEY, sign_type)
    assert b"<return_code><![CDATA[SUCCESS]]></return_code>" in result.response_body
    assert state_of(sim, "A1") is OrderState.CLOSED


def test_closed_order_answers_orderclosed(sim: WeChatPaySimulator, client: CloseOrderClient) -> None:
    add(sim, "A1", OrderState.CLOSED)
    result = client.close_order("A1")
    assert (result.outcome, result.err_code, result.result_code) == (Outcome.ALREADY_CLOSED, "ORDERCLOSED", "FAIL")
    assert result.err_code_des == "Order is closed."
    assert state_of(sim, "A1") is OrderState.CLOSED


def test_paid_order_answers_orderpaid_and_stays_paid(sim: WeChatPaySimulator, client: CloseOrderClient) -> None:
    add(sim, "A1", OrderState.PAID)
    result = client.close_order("A1")
    assert (result.outcome, result.err_code, result.signature_verified) == (Outcome.PAID, "ORDERPAID", True)
    assert state_of(sim, "A1") is OrderState.PAID


def test_unknown_order_answers_ordernotexist(sim: WeChatPaySimulator, client: CloseOrderClient) -> None:
    result = client.close_order("NOPE")
    assert (result.outcome, result.err_code) == (Outcome.NOT_FOUND, "ORDERNOTEXIST")
    assert state_of(sim, "NOPE") is None


def test_open_mode_closes_an_unknown_order_on_its_first_close() -> None:
    with WeChatPaySimulator(unknown_orders="open") as open_sim, make_client(open_sim) as closer:
        assert closer.close_order("ANY1").outcome is Outcome.CLOSED
        assert closer.close_order("ANY1").outcome is Outcome.ALREADY_CLOSED
        assert state_of(open_sim, "ANY1") is OrderState.CLOSED


def test_unknown_orders_option_is_validated() -> None:
    with pytest.raises(ValueError, match="unknown_orders"):
        WeChatPaySimulator(unknown_orders="maybe")  # type: ignore[arg-type]


def test_sub_appid_is_echoed_in_the_signed_answer(sim: WeChatPaySimulator, sign_type: SignType) -> None:
    add(sim, "A1")
    with make_client(sim, sign_type=sign_type, sub_appid="wx8888888888888888") as closer:
        result = closer.close_order("A1")
    assert result.outcome is Outcome.CLOSED
    assert result.response_fields["sub_appid"] == "wx8888888888888888"


def test_sub_appid_is_absent_when_not_sent(sim: WeChatPaySimulator, client: CloseOrderClient) -> None:
    add(sim, "A1")
    assert "sub_appid" not in client.close_order("A1").response_fields


def test_orders_are_scoped_per_sub_merchant(sim: WeChatPaySimulator, client: CloseOrderClient) -> None:
    sim.add_order("A1", mch_id=MCH_ID, sub_mch_id="OTHER-SUB")
    assert client.close_order("A1").outcome is Outcome.NOT_FOUND
    assert sim.order_state("A1", mch_id=MCH_ID, sub_mch_id="OTHER-SUB") is OrderState.NOTPAY


def test_second_merchant_is_answered_with_its_own_key(sign_type: SignType) -> None:
    with WeChatPaySimulator({MCH_ID: API_KEY, "10000999": OTHER_KEY}) as two_merchants:
        two_merchants.add_order("B1", mch_id="10000999", sub_mch_id=SUB_MCH_ID)
        with make_client(two_merchants, sign_type=sign_type, mch_id="10000999", api_key=OTHER_KEY) as closer:
            result = closer.close_order("B1")
    assert (result.outcome, result.signature_verified) == (Outcome.CLOSED, True)


# -- refusals (unsigned return_code FAIL) -------------------------------------------------------------------


def test_wrong_key_is_an_unsigned_signature_failure(sim: WeChatPaySimulator, sign_type: SignType) -> None:
    add(sim, "A1")
    with make_client(sim, sign_type=sign_type, api_key=OTHER_KEY) as closer:
        result = closer.close_order("A1")
    assert (result.outcome, result.return_code, result.return_msg) == (
        Outcome.CONFIGURATION_ERROR, "FAIL", "Signature Failure",
    )
    assert "sign" not in result.response_fields
    assert state_of(sim, "A1") is OrderState.NOTPAY


def test_unknown_mch_id_is_an_unsigned_parameter_failure(sim: WeChatPaySimulator, sign_type: SignType) -> None:
    with make_client(sim, sign_type=sign_type, mch_id="99999999") as closer:
        result = closer.close_order("A1")
    assert (result.outcome, result.return_code) == (Outcome.CONFIGURATION_ERROR, "FAIL")
    assert result.return_msg.startswith("Parameter format checking error")
    assert "sign" not in result.response_fields


@pytest.mark.parametrize("missing", ["appid", "mch_id", "sub_mch_id", "out_trade_no", "nonce_str", "sign"])
def test_missing_required_field_is_an_unsigned_parameter_failure(
    sim: WeChatPaySimulator, sign_type: SignType, missing: str
) -> None:
    add(sim, "RAW1")
    answer = decode_xml(post_raw(sim, encode_xml(signed_fields(sign_type, without=missing))).content)
    assert answer["return_code"] == "FAIL" and "sign" not in answer
    assert answer["return_msg"].startswith("Parameter format checking error")
    assert state_of(sim, "RAW1") is OrderState.NOTPAY


def test_unknown_sign_type_is_an_unsigned_parameter_failure(sim: WeChatPaySimulator) -> None:
    fields = signed_fields(SignType.MD5, sign_type="SHA1")
    answer = decode_xml(post_raw(sim, encode_xml(fields)).content)
    assert answer == {"return_code": "FAIL", "return_msg": "Parameter format checking error: invalid sign_type"}


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE"])
def test_non_post_method_is_refused_as_requiring_post(sim: WeChatPaySimulator, method: str) -> None:
    response = post_raw(sim, b"", method=method)
    assert response.status_code == 200
    assert decode_xml(response.content) == {"return_code": "FAIL", "return_msg": "require POST method"}


def test_head_gets_headers_without_a_body(sim: WeChatPaySimulator) -> None:
    response = post_raw(sim, b"", method="HEAD")
    assert (response.status_code, response.content) == (200, b"")
    assert int(response.headers["Content-Length"]) > 0


@pytest.mark.parametrize(
    "body", [b"", b"not xml", b"<xml><appid>wx</appid>", b"<xml><a><b>nested</b></a></xml>", b"<html/>"],
    ids=["empty", "text", "truncated", "nested", "wrong-root"],
)
def test_unparseable_body_is_refused_as_xml_format_error(sim: WeChatPaySimulator, body: bytes) -> None:
    response = post_raw(sim, body)
    assert response.status_code == 200
    assert decode_xml(response.content) == {"return_code": "FAIL", "return_msg": "XML format error"}


def test_wrong_path_is_404(sim: WeChatPaySimulator) -> None:
    response = post_raw(sim, encode_xml(signed_fields(SignType.MD5)), path="/pay/refundquery")
    assert response.status_code == 404


def test_answers_keep_the_connection_alive(sim: WeChatPaySimulator) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", sim.port, timeout=2)
    try:
        sockets = []
        for _ in range(3):
            connection.request("POST", CLOSEORDER_PATH, body=encode_xml(signed_fields(SignType.MD5)))
            response = connection.getresponse()
            body = response.read()
            assert (response.version, response.status) == (11, 200)
            assert int(response.headers["Content-Length"]) == len(body)
            assert not response.will_close
            sockets.append(connection.sock)
        assert sockets[0] is sockets[1] is sockets[2]
    finally:
        connection.close()


# -- faults ------------------------------------------------------------------------------------------------


def test_systemerror_n_times_then_normal_behaviour(sim: WeChatPaySimulator, client: CloseOrderClient) -> None:
    add(sim, "A1")
    rule = sim.inject(Fault.SYSTEMERROR, out_trade_no="A1", times=2)
    outcomes = [client.close_order("A1").outcome for _ in range(3)]
    assert outcomes == [Outcome.RETRYABLE_ERROR, Outcome.RETRYABLE_ERROR, Outcome.CLOSED]
    assert (rule.hits, rule.remaining) == (2, 0)


@pytest.mark.parametrize(
    ("fault", "outcome"),
    [
        (Fault.ORDERPAID, Outcome.PAID),
        (Fault.ORDERCLOSED, Outcome.ALREADY_CLOSED),
        (Fault.ORDERNOTEXIST, Outcome.NOT_FOUND),
        (Fault.SYSTEMERROR, Outcome.RETRYABLE_ERROR),
        (Fault.SIGNERROR, Outcome.CONFIGURATION_ERROR),
        (Fault.REQUIRE_POST_METHOD, Outcome.CLIENT_BUG),
        (Fault.XML_FORMAT_ERROR, Outcome.CLIENT_BUG),
    ],
)
def test_forced_err_code_is_a_signed_business_failure_that_changes_nothing(
    sim: WeChatPaySimulator, client: CloseOrderClient, fault: Fault, outcome: Outcome
) -> None:
    add(sim, "A1")
    sim.inject(fault)
    result = client.close_order("A1")
    assert (result.outcome, result.err_code, result.result_code) == (outcome, fault.value, "FAIL")
    assert result.signature_verified is True
    assert state_of(sim, "A1") is OrderState.NOTPAY


def test_undocumented_err_code_is_unexpected_error(sim: WeChatPaySimulator, client: CloseOrderClient) -> None:
    add(sim, "A1")
    sim.inject(Fault.ERR_CODE, err_code="FREQUENCY_LIMITED")
    result = client.close_order("A1")
    assert (result.outcome, result.err_code) == (Outcome.UNEXPECTED_ERROR, "FREQUENCY_LIMITED")


def test_return_fail_fault_is_an_unsigned_configuration_error(
    sim: WeChatPaySimulator, client: CloseOrderClient
) -> None:
    add(sim, "A1")
    sim.inject(Fault.RETURN_FAIL)
    result = client.close_order("A1")
    assert (result.outcome, result.return_code, result.signature_verified) == (
        Outcome.CONFIGURATION_ERROR, "FAIL", None,
    )
    assert state_of(sim, "A1") is OrderState.NOTPAY


def test_dropped_connection_is_a_network_error_and_changes_nothing(
    sim: WeChatPaySimulator, client: CloseOrderClient
) -> None:
    add(sim, "A1")
    sim.inject(Fault.DROP_CONNECTION)
    result = client.close_order("A1")
    assert (result.outcome, result.http_status) == (Outcome.NETWORK_ERROR, None)
    assert state_of(sim, "A1") is OrderState.NOTPAY
    assert client.close_order("A1").outcome is Outcome.CLOSED


def test_reset_mid_response_is_a_network_error_and_changes_nothing(
    sim: WeChatPaySimulator, client: CloseOrderClient
) -> None:
    add(sim, "A1")
    sim.inject(Fault.RESET_CONNECTION)
    assert client.close_order("A1").outcome is Outcome.NETWORK_ERROR
    assert state_of(sim, "A1") is OrderState.NOTPAY


def test_reset_sends_headers_and_part_of_the_body_then_resets(sim: WeChatPaySimulator) -> None:
    sim.inject(Fault.RESET_CONNECTION)
    connection = http.client.HTTPConnection("127.0.0.1", sim.port, timeout=2)
    try:
        connection.request("POST", CLOSEORDER_PATH, body=encode_xml(signed_fields(SignType.MD5)))
        response = connection.getresponse()
        assert response.status == 200
        with pytest.raises(ConnectionResetError):
            response.read()
    finally:
        connection.close()


@pytest.mark.parametrize(("fault", "status"), [(Fault.HTTP_502, 502), (Fault.HTTP_503, 503)])
def test_gateway_error_page_is_an_invalid_response(
    sim: WeChatPaySimulator, client: CloseOrderClient, fault: Fault, status: int
) -> None:
    add(sim, "A1")
    sim.inject(fault)
    result = client.close_order("A1")
    assert (result.outcome, result.http_status) == (Outcome.INVALID_RESPONSE, status)
    assert result.response_body.startswith(b"<html>")
    assert state_of(sim, "A1") is OrderState.NOTPAY


def test_wrong_signature_is_an_untrusted_response(sim: WeChatPaySimulator, client: CloseOrderClient) -> None:
    add(sim, "A1")
    sim.inject(Fault.BAD_SIGNATURE)
    result = client.close_order("A1")
    assert (result.outcome, result.signature_verified, result.result_code) == (
        Outcome.UNTRUSTED_RESPONSE, False, "SUCCESS",
    )
    assert state_of(sim, "A1") is OrderState.NOTPAY


def test_missing_signature_is_an_untrusted_response(sim: WeChatPaySimulator, client: CloseOrderClient) -> None:
    add(sim, "A1")
    sim.inject(Fault.UNSIGNED)
    result = client.close_order("A1")
    assert (result.outcome, result.signature_verified) == (Outcome.UNTRUSTED_RESPONSE, False)
    assert "sign" not in result.response_fields
    assert state_of(sim, "A1") is OrderState.NOTPAY


def test_truncated_body_is_an_invalid_response(sim: WeChatPaySimulator, client: CloseOrderClient) -> None:
    add(sim, "A1")
    sim.inject(Fault.MALFORMED_BODY)
    result = client.close_order("A1")
    assert (result.outcome, result.http_status) == (Outcome.INVALID_RESPONSE, 200)
    assert result.response_body.startswith(b"<xml>") and not result.response_body.endswith(b"</xml>")
    assert state_of(sim, "A1") is OrderState.NOTPAY


def test_delay_answers_late_and_closes(sim: WeChatPaySimulator) -> None:
    add(sim, "A1")
    sim.inject(Fault.DELAY, delay=0.2)
    with make_client(sim) as closer:
        result = closer.close_order("A1")
    assert result.outcome is Outcome.CLOSED
    assert result.elapsed >= 0.2


def test_global_latency_delays_every_answer(sim: WeChatPaySimulator) -> None:
    sim.latency = 0.1
    with make_client(sim) as closer:
        elapsed = [closer.close_order("NOPE").elapsed for _ in range(2)]
    assert min(elapsed) >= 0.1


def test_read_timeout_after_the_close_was_applied_is_a_network_error_but_the_order_is_closed(
    sim: WeChatPaySimulator,
) -> None:
    add(sim, "A1")
    sim.inject(Fault.DELAY, delay=5, apply=True)
    with make_client(sim, read_timeout=0.2) as closer:
        result = closer.close_order("A1")
    assert result.outcome is Outcome.NETWORK_ERROR
    assert result.elapsed < 1
    assert state_of(sim, "A1") is OrderState.CLOSED


def test_read_timeout_without_apply_leaves_the_order_open(sim: WeChatPaySimulator) -> None:
    add(sim, "A1")
    sim.inject(Fault.DELAY, delay=5, apply=False)
    with make_client(sim, read_timeout=0.2) as closer:
        assert closer.close_order("A1").outcome is Outcome.NETWORK_ERROR
    assert state_of(sim, "A1") is OrderState.NOTPAY


def test_unapplied_delay_hangs_up_without_an_answer(sim: WeChatPaySimulator) -> None:
    add(sim, "A1")
    sim.inject(Fault.DELAY, delay=0.1, apply=False)
    with make_client(sim, read_timeout=2) as closer:
        result = closer.close_order("A1")
    assert (result.outcome, result.http_status) == (Outcome.NETWORK_ERROR, None)
    assert state_of(sim, "A1") is OrderState.NOTPAY


def test_a_delayed_answer_does_not_block_other_requests(sim: WeChatPaySimulator) -> None:
    add(sim, "SLOW")
    add(sim, "FAST")
    sim.inject(Fault.DELAY, out_trade_no="SLOW", delay=5)
    with make_client(sim, read_timeout=0.5) as slow_client, make_client(sim) as fast_client:
        slow = threading.Thread(target=slow_client.close_order, args=("SLOW",))
        slow.start()
        wait_until(lambda: sim.close_requests_for("SLOW") == 1)
        fast = fast_client.close_order("FAST")
        slow.join()
    assert fast.outcome is Outcome.CLOSED
    assert fast.elapsed < 0.3


def test_fault_for_one_order_leaves_others_alone(sim: WeChatPaySimulator, client: CloseOrderClient) -> None:
    add(sim, "A1")
    add(sim, "A2")
    sim.inject(Fault.HTTP_503, out_trade_no="A1", times=None)
    assert client.close_order("A2").outcome is Outcome.CLOSED
    assert client.close_order("A1").outcome is Outcome.INVALID_RESPONSE


def test_fault_without_times_limit_applies_always(sim: WeChatPaySimulator, client: CloseOrderClient) -> None:
    add(sim, "A1")
    rule = sim.inject(Fault.SYSTEMERROR, times=None)
    assert {client.close_order("A1").outcome for _ in range(4)} == {Outcome.RETRYABLE_ERROR}
    assert (rule.hits, rule.remaining) == (4, None)


def test_earliest_injected_matching_fault_wins(sim: WeChatPaySimulator, client: CloseOrderClient) -> None:
    add(sim, "A1")
    sim.inject(Fault.HTTP_502)
    sim.inject(Fault.SYSTEMERROR)
    outcomes = [client.close_order("A1").outcome for _ in range(3)]
    assert outcomes == [Outcome.INVALID_RESPONSE, Outcome.RETRYABLE_ERROR, Outcome.CLOSED]


def test_clear_faults_restores_normal_answers(sim: WeChatPaySimulator, client: CloseOrderClient) -> None:
    add(sim, "A1")
    sim.inject(Fault.DROP_CONNECTION, times=None)
    sim.clear_faults()
    assert client.close_order("A1").outcome is Outcome.CLOSED


def test_invalid_request_uses_up_no_fault(sim: WeChatPaySimulator) -> None:
    add(sim, "A1")
    rule = sim.inject(Fault.SYSTEMERROR)
    with make_client(sim, api_key=OTHER_KEY) as wrong_key, make_client(sim) as right_key:
        assert wrong_key.close_order("A1").return_msg == "Signature Failure"
        assert right_key.close_order("A1").outcome is Outcome.RETRYABLE_ERROR
    assert rule.hits == 1


@pytest.mark.parametrize(
    "options",
    [
        {"fault": Fault.SYSTEMERROR, "times": 0},
        {"fault": Fault.DELAY, "delay": -1},
        {"fault": Fault.HTTP_502, "apply": True},
        {"fault": Fault.ERR_CODE},
        {"fault": Fault.SYSTEMERROR, "err_code": "OTHER"},
    ],
    ids=["zero-times", "negative-delay", "apply-on-non-delay", "err-code-missing", "err-code-unexpected"],
)
def test_inject_rejects_meaningless_options(sim: WeChatPaySimulator, options: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        sim.inject(**options)


# -- lifecycle ---------------------------------------------------------------------------------------------


def test_stop_is_prompt_with_a_delayed_answer_pending() -> None:
    simulator = WeChatPaySimulator().start()
    add(simulator, "A1")
    simulator.inject(Fault.DELAY, delay=30)
    outcomes: list[Outcome] = []
    with make_client(simulator, read_timeout=10) as closer:
        waiting = threading.Thread(target=lambda: outcomes.append(closer.close_order("A1").outcome))
        waiting.start()
        wait_until(lambda: simulator.close_requests_for("A1") == 1)
        started = time.monotonic()
        simulator.stop()
        waiting.join(timeout=5)
    assert time.monotonic() - started < 1
    assert outcomes == [Outcome.NETWORK_ERROR]


def test_stop_closes_the_listening_socket() -> None:
    with WeChatPaySimulator() as simulator:
        port = simulator.port
    with pytest.raises(ConnectionRefusedError):
        http.client.HTTPConnection("127.0.0.1", port, timeout=1).connect()


def test_stop_cuts_idle_keep_alive_connections() -> None:
    with WeChatPaySimulator() as simulator:
        connection = http.client.HTTPConnection("127.0.0.1", simulator.port, timeout=2)
        connection.request("POST", CLOSEORDER_PATH, body=b"")
        connection.getresponse().read()
    try:
        assert connection.sock.recv(1) == b""
    finally:
        connection.close()


def test_a_simulator_starts_once() -> None:
    simulator = WeChatPaySimulator()
    with simulator, pytest.raises(RuntimeError):
        simulator.start()
    with pytest.raises(RuntimeError):
        simulator.start()


def test_base_url_needs_a_started_simulator() -> None:
    with pytest.raises(RuntimeError, match="not started"):
        _ = WeChatPaySimulator().base_url


# -- orders ------------------------------------------------------------------------------------------------


def test_add_orders_creates_many_in_the_given_state(sim: WeChatPaySimulator) -> None:
    sim.add_orders([f"N{index}" for index in range(100)], mch_id=MCH_ID, sub_mch_id=SUB_MCH_ID, state="PAID")
    assert {state_of(sim, f"N{index}") for index in range(100)} == {OrderState.PAID}


def test_set_state_marks_an_order_paid(sim: WeChatPaySimulator, client: CloseOrderClient) -> None:
    add(sim, "A1")
    sim.set_state("A1", OrderState.PAID, mch_id=MCH_ID, sub_mch_id=SUB_MCH_ID)
    assert client.close_order("A1").outcome is Outcome.PAID


def test_set_state_of_an_unknown_order_is_a_key_error(sim: WeChatPaySimulator) -> None:
    with pytest.raises(KeyError):
        sim.set_state("NOPE", OrderState.PAID, mch_id=MCH_ID, sub_mch_id=SUB_MCH_ID)


# -- accounting --------------------------------------------------------------------------------------------


def test_every_request_is_recorded_with_what_was_answered(sim: WeChatPaySimulator) -> None:
    add(sim, "A1")
    add(sim, "A2")
    sim.inject(Fault.DROP_CONNECTION, out_trade_no="A2")
    before = time.time()
    post_raw(sim, b"", method="GET")
    post_raw(sim, b"junk")
    with make_client(sim, sign_type=SignType.MD5) as closer:
        closer.close_order("A1")
        closer.close_order("A2")
    with make_client(sim, api_key=OTHER_KEY) as wrong_key:
        wrong_key.close_order("A1")
    log = sim.requests
    summary = [(r.method, r.out_trade_no, r.sign_type, r.answer, r.http_status, r.fault, r.closed) for r in log]
    assert summary == [
        ("GET", "", "", "FAIL", 200, None, False),
        ("POST", "", "", "FAIL", 200, None, False),
        ("POST", "A1", "", "SUCCESS", 200, None, True),
        ("POST", "A2", "", "DROP_CONNECTION", None, Fault.DROP_CONNECTION, False),
        ("POST", "A1", "HMAC-SHA256", "FAIL", 200, None, False),
    ]
    assert log[4].detail == "Signature Failure"
    assert (log[2].mch_id, log[2].sub_mch_id, log[2].path) == (MCH_ID, SUB_MCH_ID, CLOSEORDER_PATH)
    assert before <= log[0].received_at <= log[-1].received_at <= time.time()


def test_close_requests_are_counted_per_order_and_reset_log_clears_them(
    sim: WeChatPaySimulator, client: CloseOrderClient
) -> None:
    add(sim, "A1")
    for _ in range(3):
        client.close_order("A1")
    client.close_order("A2")
    post_raw(sim, b"", method="GET")
    assert (sim.close_requests_for("A1"), sim.close_requests_for("A2"), sim.close_requests_for("A3")) == (3, 1, 0)
    assert sim.close_request_counts() == {
        OrderKey(MCH_ID, SUB_MCH_ID, "A1"): 3, OrderKey(MCH_ID, SUB_MCH_ID, "A2"): 1,
    }
    sim.reset_log()
    assert (sim.requests, sim.close_request_counts(), sim.close_requests_for("A1")) == ([], {}, 0)


def test_concurrent_requests_are_all_served_and_counted_exactly(sim: WeChatPaySimulator) -> None:
    threads_count, orders_per_thread = 20, 25
    numbers = [[f"T{thread}-{index}" for index in range(orders_per_thread)] for thread in range(threads_count)]
    sim.add_orders([number for batch in numbers for number in batch] + ["SHARED"], mch_id=MCH_ID, sub_mch_id=SUB_MCH_ID)
    outcomes: list[Outcome] = []
    outcomes_lock = threading.Lock()
    start = threading.Barrier(threads_count)

    def close_batch(batch: list[str]) -> None:
        with make_client(sim, read_timeout=5) as closer:
            start.wait()
            results = [closer.close_order(number).outcome for number in [*batch, "SHARED"]]
        with outcomes_lock:
            outcomes.extend(results)

    workers = [threading.Thread(target=close_batch, args=(batch,)) for batch in numbers]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()

    closed_each_once = threads_count * orders_per_thread
    assert outcomes.count(Outcome.CLOSED) == closed_each_once + 1  # exactly one thread closed SHARED
    assert outcomes.count(Outcome.ALREADY_CLOSED) == threads_count - 1
    assert len(sim.requests) == closed_each_once + threads_count
    counts = sim.close_request_counts()
    assert counts.pop(OrderKey(MCH_ID, SUB_MCH_ID, "SHARED")) == threads_count
    assert len(counts) == closed_each_once and set(counts.values()) == {1}
    assert sum(record.closed for record in sim.requests) == closed_each_once + 1


# -- command line ------------------------------------------------------------------------------------------


def run_cli(*args: str) -> tuple[subprocess.Popen[str], str, str]:
    """Start the CLI on a free port; return the process, its base URL and its curl command line."""
    process = subprocess.Popen(
        [sys.executable, "-m", "django_wxpay_close.testing", "--port", "0", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    assert process.stdout is not None
    first = process.stdout.readline()
    assert first.startswith("WeChat Pay simulator listening on http://127.0.0.1:"), first
    base_url = first.rsplit(" ", 1)[1].strip()
    curl = next(line for line in process.stdout if line.startswith("curl "))
    return process, base_url, curl


def stop_cli(process: subprocess.Popen[str]) -> int:
    """SIGTERM, as Ctrl-C would; the exit status says whether it stopped cleanly."""
    process.terminate()
    try:
        process.communicate(timeout=5)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
    return process.returncode


def test_an_answer_leaves_in_one_write() -> None:
    """Headers and body together, as a real front end sends a small answer: the client wakes once per answer.

    The simulator runs in its own process, as the benchmark runs it: with a GIL shared with the client, two
    writes would reach the client together anyway.
    """
    process, base_url, _ = run_cli()
    body = encode_xml(signed_fields(SignType.MD5))
    request = f"POST {CLOSEORDER_PATH} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(body)}\r\n\r\n".encode()
    first_reads = []
    try:
        with socket.create_connection(("127.0.0.1", int(base_url.rsplit(":", 1)[1])), timeout=2) as connection:
            for _ in range(20):
                connection.sendall(request + body)
                select.select([connection], [], [], 2)
                first_reads.append(connection.recv(65536))  # what had arrived when the socket became readable
    finally:
        stop_cli(process)
    assert all(read.endswith(b"</xml>") for read in first_reads)


def test_cli_prints_base_url_and_a_curl_command_that_gets_a_signed_answer() -> None:
    process, base_url, curl = run_cli()
    try:
        argv = shlex.split(curl)
        body = argv[argv.index("--data-binary") + 1].encode()
        assert argv[-1] == base_url + CLOSEORDER_PATH
        answers = [decode_xml(requests.post(argv[-1], data=body, timeout=2).content) for _ in range(2)]
    finally:
        exit_status = stop_cli(process)
    assert exit_status == 0
    assert all(verify_signature(answer, API_KEY, SignType.HMAC_SHA256) for answer in answers)
    assert [answer["result_code"] for answer in answers] == ["SUCCESS", "FAIL"]
    assert answers[1]["err_code"] == "ORDERCLOSED"


def test_cli_takes_merchants_and_open_unknown_orders() -> None:
    process, base_url, _ = run_cli("--merchant", f"10000999:{OTHER_KEY}", "--unknown-orders", "open")
    try:
        merchant = Merchant(APPID, "10000999", SUB_MCH_ID, OTHER_KEY)
        with CloseOrderClient(merchant, base_urls=[base_url], read_timeout=2) as closer:
            result = closer.close_order("ANY1")
    finally:
        stop_cli(process)
    assert (result.outcome, result.signature_verified) == (Outcome.CLOSED, True)


@pytest.mark.parametrize("merchant", ["10000100", "10000100:short", ":" + API_KEY])
def test_cli_rejects_a_malformed_merchant(merchant: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["--merchant", merchant])
    assert exit_info.value.code == 2
    assert "MCH_ID:API_KEY" in capsys.readouterr().err
