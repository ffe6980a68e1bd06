"""The orderquery client against a mocked WeChat (`responses`): the signed request, what each trade_state means
for the local order (docs/protocol.md#orderquery), hostile or unclear answers, and failover."""

from __future__ import annotations

import io
from collections.abc import Iterator

import pytest
import requests
import responses
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from urllib3.exceptions import MaxRetryError, NewConnectionError

from django_wxpay_close.wechat import (
    ORDERQUERY_PATH,
    CloseOrderClient,
    InvalidRequestField,
    Outcome,
    QueryResult,
    QueryVerdict,
    SignType,
    TradeState,
    decode_xml,
    encode_xml,
    verify_signature,
)

from .wechat_answers import (
    API_KEY,
    APPID,
    MCH_ID,
    SUB_MCH_ID,
    WRONG_KEY,
    answer_fields,
    cdata_xml,
    error_fields,
    make_merchant,
    signed_answer,
)

BASE = "http://wechat.test"
URL = BASE + ORDERQUERY_PATH
SECOND_BASE = "http://wechat-us.test"
SECOND_URL = SECOND_BASE + ORDERQUERY_PATH
ORDER = "ORDER-2025_0001"
TRANSACTION_ID = "4200000001202501011234567890"


def query_fields(trade_state: str, **overrides: str | None) -> dict[str, str]:
    """An unsigned orderquery answer about ORDER in `trade_state`; a paid one carries its amount."""
    fields = answer_fields(out_trade_no=ORDER, trade_state=trade_state, trade_state_desc=f"{trade_state} desc")
    if trade_state in ("SUCCESS", "REFUND"):
        fields.update(transaction_id=TRANSACTION_ID, total_fee="1999", fee_type="HKD", cash_fee="1650",
                      cash_fee_type="CNY", time_end="20250101120000")
    fields.update(overrides)
    return {name: value for name, value in fields.items() if value is not None}


@pytest.fixture
def wechat() -> Iterator[responses.RequestsMock]:
    with responses.RequestsMock(assert_all_requests_are_fired=True) as mock:
        yield mock


@pytest.fixture
def client() -> Iterator[CloseOrderClient]:
    with CloseOrderClient(make_merchant(), base_urls=[BASE]) as query_client:
        yield query_client


def query_against(
    wechat: responses.RequestsMock, client: CloseOrderClient, body: bytes | Exception, *, status: int = 200
) -> QueryResult:
    wechat.add(responses.POST, URL, body=body, status=status)
    return client.query_order(ORDER)


# --- the request -------------------------------------------------------------------------------


def test_a_query_posts_the_documented_signed_fields_to_pay_orderquery(
    wechat: responses.RequestsMock, client: CloseOrderClient
) -> None:
    result = query_against(wechat, client, signed_answer(query_fields("NOTPAY")))

    sent = decode_xml(wechat.calls[0].request.body)
    assert wechat.calls[0].request.url == URL and result.url == URL
    assert set(sent) == {"appid", "mch_id", "sub_mch_id", "out_trade_no", "nonce_str", "sign_type", "sign"}
    assert (sent["appid"], sent["mch_id"], sent["sub_mch_id"], sent["out_trade_no"]) == (APPID, MCH_ID, SUB_MCH_ID,
                                                                                          ORDER)
    assert sent["sign_type"] == "HMAC-SHA256" and verify_signature(sent, API_KEY, SignType.HMAC_SHA256)
    assert wechat.calls[0].request.body == result.request_body


def test_an_md5_merchant_queries_without_sign_type_and_verifies_an_md5_answer(wechat: responses.RequestsMock) -> None:
    with CloseOrderClient(make_merchant(sign_type=SignType.MD5), base_urls=[BASE]) as md5_client:
        result = query_against(wechat, md5_client, signed_answer(query_fields("NOTPAY"), sign_type=SignType.MD5))

    sent = decode_xml(result.request_body)
    assert "sign_type" not in sent and verify_signature(sent, API_KEY, SignType.MD5)
    assert result.verdict is QueryVerdict.PAYABLE


def test_a_query_can_name_the_order_by_transaction_id(wechat: responses.RequestsMock, client: CloseOrderClient) -> None:
    wechat.add(responses.POST, URL, body=signed_answer(query_fields("SUCCESS")))

    result = client.query_order(transaction_id=TRANSACTION_ID)

    sent = decode_xml(result.request_body)
    assert sent["transaction_id"] == TRANSACTION_ID and "out_trade_no" not in sent
    assert (result.verdict, result.out_trade_no) == (QueryVerdict.PAID, ORDER)


@pytest.mark.parametrize("names", [{}, {"out_trade_no": ORDER, "transaction_id": TRANSACTION_ID}],
                         ids=["neither", "both"])
def test_a_query_names_the_order_exactly_once(client: CloseOrderClient, names: dict[str, str]) -> None:
    with pytest.raises(InvalidRequestField, match="exactly one"):
        client.prepare_query(**names)


def test_a_bad_out_trade_no_is_refused_before_a_query_is_sent(
    wechat: responses.RequestsMock, client: CloseOrderClient
) -> None:
    with pytest.raises(InvalidRequestField, match="^out_trade_no: "):
        client.query_order("ORDER 1")

    assert len(wechat.calls) == 0


def test_the_prepared_query_and_its_result_name_their_api(
    wechat: responses.RequestsMock, client: CloseOrderClient
) -> None:
    prepared = client.prepare_query(ORDER)
    wechat.add(responses.POST, URL, body=signed_answer(query_fields("NOTPAY")))

    assert (prepared.api, client.query(prepared).api, client.prepare(ORDER).api) == (
        "orderquery", "orderquery", "closeorder")


def test_every_query_has_a_fresh_nonce(client: CloseOrderClient) -> None:
    assert client.prepare_query(ORDER).fields["nonce_str"] != client.prepare_query(ORDER).fields["nonce_str"]


# --- what each trade_state means --------------------------------------------------------------


@pytest.mark.parametrize(("trade_state", "verdict"), [
    (TradeState.SUCCESS, QueryVerdict.PAID),
    (TradeState.REFUND, QueryVerdict.PAID),
    (TradeState.CLOSED, QueryVerdict.CLOSED),
    (TradeState.REVOKED, QueryVerdict.CLOSED),
    (TradeState.NOTPAY, QueryVerdict.PAYABLE),
    (TradeState.PAYERROR, QueryVerdict.PAYABLE),
    (TradeState.USERPAYING, QueryVerdict.PAYING),
], ids=lambda value: getattr(value, "name", ""))
def test_each_trade_state_has_its_meaning_for_the_local_order(
    wechat: responses.RequestsMock, client: CloseOrderClient, trade_state: TradeState, verdict: QueryVerdict
) -> None:
    result = query_against(wechat, client, signed_answer(query_fields(trade_state.value)))

    assert (result.verdict, result.trade_state, result.failure) == (verdict, trade_state, None)
    assert result.reason == f"trade_state {trade_state.value}: {trade_state.value} desc"
    assert result.signature_verified is True


def test_a_paid_answer_carries_the_payment(wechat: responses.RequestsMock, client: CloseOrderClient) -> None:
    result = query_against(wechat, client, signed_answer(query_fields("SUCCESS")))

    assert (result.transaction_id, result.total_fee, result.fee_type, result.cash_fee, result.time_end) == (
        TRANSACTION_ID, 1999, "HKD", 1650, "20250101120000")


def test_only_paid_and_closed_settle_an_order() -> None:
    assert {verdict for verdict in QueryVerdict if verdict.settles_order} == {QueryVerdict.PAID, QueryVerdict.CLOSED}


@pytest.mark.parametrize("total_fee", [None, "", "12.5", "-1", "１２"], ids=["missing", "empty", "decimal", "negative",
                                                                           "fullwidth-digits"])
def test_a_paid_answer_without_a_valid_amount_settles_nothing(
    wechat: responses.RequestsMock, client: CloseOrderClient, total_fee: str | None
) -> None:
    result = query_against(wechat, client, signed_answer(query_fields("SUCCESS", total_fee=total_fee)))

    assert (result.verdict, result.failure, result.trade_state) == (QueryVerdict.UNKNOWN, Outcome.UNEXPECTED_ERROR,
                                                                     None)
    assert "without a valid total_fee" in result.reason


def test_an_unknown_trade_state_is_unknown(wechat: responses.RequestsMock, client: CloseOrderClient) -> None:
    result = query_against(wechat, client, signed_answer(query_fields("ACCEPTED")))

    assert (result.verdict, result.failure, result.reason) == (
        QueryVerdict.UNKNOWN, Outcome.UNEXPECTED_ERROR, "unknown trade_state 'ACCEPTED'")


def test_ordernotexist_is_not_found(wechat: responses.RequestsMock, client: CloseOrderClient) -> None:
    result = query_against(wechat, client, signed_answer(error_fields("ORDERNOTEXIST", "Order does not exist.")))

    assert (result.verdict, result.failure) == (QueryVerdict.NOT_FOUND, Outcome.NOT_FOUND)


def test_systemerror_is_unknown_and_retryable(wechat: responses.RequestsMock, client: CloseOrderClient) -> None:
    result = query_against(wechat, client, signed_answer(error_fields("SYSTEMERROR", "System error")))

    assert (result.verdict, result.failure, result.reason) == (
        QueryVerdict.UNKNOWN, Outcome.RETRYABLE_ERROR, "SYSTEMERROR: System error")


@pytest.mark.parametrize("err_code", ["ORDERPAID", "ORDERCLOSED"])
def test_a_closeorder_err_code_in_a_query_answer_settles_nothing(
    wechat: responses.RequestsMock, client: CloseOrderClient, err_code: str
) -> None:
    result = query_against(wechat, client, signed_answer(error_fields(err_code)))

    assert (result.verdict, result.failure) == (QueryVerdict.UNKNOWN, Outcome.UNEXPECTED_ERROR)


# --- answers that are not believed -------------------------------------------------------------


@pytest.mark.parametrize(("body", "failure"), [
    (signed_answer(query_fields("SUCCESS"), api_key=WRONG_KEY), Outcome.UNTRUSTED_RESPONSE),
    (cdata_xml(query_fields("SUCCESS")), Outcome.UNTRUSTED_RESPONSE),
    (signed_answer(query_fields("SUCCESS"), sign_type=SignType.MD5), Outcome.UNTRUSTED_RESPONSE),
    (signed_answer(query_fields("SUCCESS", out_trade_no="ANOTHER-ORDER")), Outcome.UNTRUSTED_RESPONSE),
    (signed_answer(query_fields("SUCCESS", mch_id="10000999")), Outcome.UNTRUSTED_RESPONSE),
    (signed_answer(query_fields("SUCCESS", err_code="ORDERNOTEXIST")), Outcome.UNTRUSTED_RESPONSE),
    (cdata_xml({"return_code": "FAIL", "return_msg": "签名错误"}), Outcome.CONFIGURATION_ERROR),
    (b"<html>busy</html>", Outcome.INVALID_RESPONSE),
    (signed_answer(query_fields("SUCCESS"))[:60], Outcome.INVALID_RESPONSE),
    (b'<!DOCTYPE xml [<!ENTITY x "paid">]><xml><trade_state>&x;</trade_state></xml>', Outcome.INVALID_RESPONSE),
], ids=["wrong-signature", "unsigned", "other-sign-type", "another-order", "another-merchant", "contradictory",
        "return-fail", "not-xml", "cut-in-half", "entity"])
def test_an_answer_that_is_not_believed_settles_nothing_and_shows_no_payment(
    wechat: responses.RequestsMock, client: CloseOrderClient, body: bytes, failure: Outcome
) -> None:
    result = query_against(wechat, client, body)

    assert (result.verdict, result.trade_state, result.failure) == (QueryVerdict.UNKNOWN, None, failure)
    assert (result.total_fee, result.transaction_id, result.time_end) == (None, "", "")


def test_a_contradictory_query_answer_says_so(wechat: responses.RequestsMock, client: CloseOrderClient) -> None:
    result = query_against(wechat, client, signed_answer(query_fields("SUCCESS", err_code="ORDERNOTEXIST")))

    assert result.reason == "contradictory answer: result_code SUCCESS with err_code ORDERNOTEXIST"


def test_an_answer_about_another_order_says_so(wechat: responses.RequestsMock, client: CloseOrderClient) -> None:
    result = query_against(wechat, client, signed_answer(query_fields("SUCCESS", out_trade_no="ANOTHER-ORDER")))

    assert result.reason == "signed answer echoes another out_trade_no"


def test_an_http_error_page_is_invalid_response(wechat: responses.RequestsMock, client: CloseOrderClient) -> None:
    result = query_against(wechat, client, b"<html>Bad Gateway</html>", status=502)

    assert (result.verdict, result.failure, result.http_status, result.reason) == (
        QueryVerdict.UNKNOWN, Outcome.INVALID_RESPONSE, 502, "HTTP 502")


def test_an_oversized_answer_is_not_read_past_the_cap(wechat: responses.RequestsMock) -> None:
    wechat.add(responses.POST, URL, body=io.BufferedReader(io.BytesIO(b"x" * (1024 * 1024))))

    with CloseOrderClient(make_merchant(), base_urls=[BASE], max_response_bytes=16 * 1024) as capped:
        result = capped.query_order(ORDER)

    assert (result.verdict, result.failure) == (QueryVerdict.UNKNOWN, Outcome.INVALID_RESPONSE)
    assert "16384-byte limit" in result.reason and result.response_body == b""


# --- transport and failover --------------------------------------------------------------------


def refused_connection() -> requests.ConnectionError:
    reason = NewConnectionError(None, "Failed to establish a new connection: [Errno 111] Connection refused")  # type: ignore[arg-type]
    return requests.ConnectionError(MaxRetryError(None, ORDERQUERY_PATH, reason=reason))  # type: ignore[arg-type]


@pytest.fixture
def two_region_client() -> Iterator[CloseOrderClient]:
    with CloseOrderClient(make_merchant(), base_urls=[BASE, SECOND_BASE]) as query_client:
        yield query_client


def test_a_query_that_never_connected_fails_over_to_the_other_region(
    wechat: responses.RequestsMock, two_region_client: CloseOrderClient
) -> None:
    wechat.add(responses.POST, URL, body=refused_connection())
    wechat.add(responses.POST, SECOND_URL, body=signed_answer(query_fields("CLOSED")))

    result = two_region_client.query_order(ORDER)

    assert (result.verdict, result.url, result.failed_over_from) == (QueryVerdict.CLOSED, SECOND_URL, URL)
    assert two_region_client.query_urls == (URL, SECOND_URL)


def test_a_query_read_timeout_does_not_fail_over(
    wechat: responses.RequestsMock, two_region_client: CloseOrderClient
) -> None:
    wechat.add(responses.POST, URL, body=requests.ReadTimeout("read timed out"))

    result = two_region_client.query_order(ORDER)

    assert (result.verdict, result.failure, result.url, result.failed_over_from) == (
        QueryVerdict.UNKNOWN, Outcome.NETWORK_ERROR, URL, None)
    assert result.reason.startswith("read timeout")


# --- fuzzed: nothing but a correctly signed answer settles an order -----------------------------

FIELD_NAMES = st.sampled_from(["trade_state", "total_fee", "transaction_id", "out_trade_no", "result_code", "err_code",
                               "return_code", "mch_id", "sign", "time_end"]) | st.from_regex(r"[a-z_]{1,12}",
                                                                                                fullmatch=True)
FIELD_VALUES = st.sampled_from(["SUCCESS", "REFUND", "CLOSED", "FAIL", "1999", ORDER, MCH_ID, ""]) | st.text(
    st.characters(codec="utf-8", exclude_categories=["Cs", "Cc"]), max_size=20)


@hypothesis_settings(max_examples=60, deadline=None, database=None,
                     suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(fields=st.dictionaries(FIELD_NAMES, FIELD_VALUES, max_size=12),
       signing=st.sampled_from(["wrong-key", "unsigned", "tampered"]))
def test_an_answer_not_signed_with_our_key_never_settles_an_order(
    client: CloseOrderClient, fields: dict[str, str], signing: str
) -> None:
    answer = {**query_fields("SUCCESS"), **fields}
    if signing == "wrong-key":
        body = signed_answer(answer, api_key=WRONG_KEY)
    elif signing == "unsigned":
        answer.pop("sign", None)
        body = encode_xml(answer)
    else:
        signed = decode_xml(signed_answer(answer)) if "sign" not in fields else answer
        signed["total_fee"] = signed.get("total_fee", "") + "0"
        body = encode_xml(signed)
    with responses.RequestsMock() as wechat:
        wechat.add(responses.POST, URL, body=body)
        result = client.query_order(ORDER)

    assert not result.verdict.settles_order and result.total_fee is None


@hypothesis_settings(max_examples=60, deadline=None, database=None,
                     suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.binary(max_size=2048))
def test_arbitrary_bytes_never_settle_an_order(client: CloseOrderClient, body: bytes) -> None:
    with responses.RequestsMock() as wechat:
        wechat.add(responses.POST, URL, body=body)
        result = client.query_order(ORDER)

    assert (result.verdict, result.trade_state) == (QueryVerdict.UNKNOWN, None)
