"""The closeorder client against a mocked WeChat (`responses`): the request, validation, every
row of the outcome table (docs/protocol.md#outcomes), the immutable result, transport limits, failover and key hygiene."""

from __future__ import annotations

import dataclasses
import io
import logging
import re
import socket
import time
from collections.abc import Iterator

import pytest
import requests
import responses
from urllib3.exceptions import MaxRetryError, NewConnectionError

from django_wxpay_close import __version__
from django_wxpay_close import testing as simulated
from django_wxpay_close.wechat import (
    CLOSEORDER_PATH,
    OUT_TRADE_NO_PATTERN,
    CloseOrderClient,
    CloseResult,
    InvalidRequestField,
    Merchant,
    Outcome,
    SignType,
    decode_xml,
    validate_out_trade_no,
    verify_signature,
)

from .raw_http import RawHTTPServer
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
    sign,
    signed_answer,
)

BASE = "http://wechat.test"
URL = BASE + CLOSEORDER_PATH
SECOND_BASE = "http://wechat-us.test"
SECOND_URL = SECOND_BASE + CLOSEORDER_PATH
ORDER = "ORDER-2025_0001"
HTML_ERROR_PAGE = b"<html><head><title>Bad Gateway</title></head><body><h1>Bad Gateway</h1><hr></body></html>"


@pytest.fixture
def wechat() -> Iterator[responses.RequestsMock]:
    """A mocked WeChat: every registered answer must be asked for, nothing unregistered is reachable."""
    with responses.RequestsMock(assert_all_requests_are_fired=True) as mock:
        yield mock


@pytest.fixture
def client() -> Iterator[CloseOrderClient]:
    with CloseOrderClient(make_merchant(), base_urls=[BASE]) as close_client:
        yield close_client


def close_against(
    wechat: responses.RequestsMock, client: CloseOrderClient, body: bytes | Exception, *, status: int = 200
) -> CloseResult:
    """Register one answer at the primary URL and close ORDER."""
    wechat.add(responses.POST, URL, body=body, status=status)
    return client.close_order(ORDER)


def sent_fields(wechat: responses.RequestsMock, index: int = 0) -> dict[str, str]:
    """The fields of the index-th request the mock received."""
    return decode_xml(wechat.calls[index].request.body)


def refused_connection() -> requests.ConnectionError:
    """What requests raises when the TCP connection is refused: a NewConnectionError reason."""
    message = "Failed to establish a new connection: [Errno 111] Connection refused"
    reason = NewConnectionError(None, message)  # type: ignore[arg-type]
    return requests.ConnectionError(MaxRetryError(None, CLOSEORDER_PATH, reason=reason))  # type: ignore[arg-type]


class CountingBody(io.RawIOBase):
    """An endless-looking response body that counts what was read, optionally slowly."""

    def __init__(self, size: int, delay: float = 0.0) -> None:
        self.remaining = size
        self.served = 0
        self.delay = delay

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray) -> int:  # type: ignore[override]
        time.sleep(self.delay)
        count = min(len(buffer), self.remaining, 8192)
        buffer[:count] = b"x" * count
        self.remaining -= count
        self.served += count
        return count


# --- the request -------------------------------------------------------------------------------


def test_close_posts_to_the_base_url_plus_pay_closeorder(wechat: responses.RequestsMock) -> None:
    wechat.add(responses.POST, "https://apihk.mch.weixin.qq.com/pay/closeorder", body=signed_answer(answer_fields()))
    with CloseOrderClient(make_merchant(), base_urls=["https://apihk.mch.weixin.qq.com/"]) as hk_client:
        result = hk_client.close_order(ORDER)

    assert [call.request.method for call in wechat.calls] == ["POST"]
    assert result.url == "https://apihk.mch.weixin.qq.com/pay/closeorder"


def test_request_carries_the_documented_fields(wechat: responses.RequestsMock, client: CloseOrderClient) -> None:
    close_against(wechat, client, signed_answer(answer_fields()))
    fields = sent_fields(wechat)

    assert set(fields) == {"appid", "mch_id", "sub_mch_id", "out_trade_no", "nonce_str", "sign_type", "sign"}
    assert (fields["appid"], fields["mch_id"], fields["sub_mch_id"]) == (APPID, MCH_ID, SUB_MCH_ID)
    assert fields["out_trade_no"] == ORDER
    assert re.fullmatch(r"[0-9a-f]{32}", fields["nonce_str"])


def test_request_is_sent_as_text_xml(wechat: responses.RequestsMock, client: CloseOrderClient) -> None:
    close_against(wechat, client, signed_answer(answer_fields()))

    assert wechat.calls[0].request.headers["Content-Type"].startswith("text/xml")
    assert wechat.calls[0].request.body.startswith(b"<xml>")


def test_user_agent_names_the_package_and_its_version(wechat: responses.RequestsMock, client: CloseOrderClient) -> None:
    close_against(wechat, client, signed_answer(answer_fields()))

    assert f"django-wxpay-close/{__version__}" in wechat.calls[0].request.headers["User-Agent"]


def test_hmac_sha256_request_says_so_and_is_signed_with_hmac(wechat: responses.RequestsMock) -> None:
    with CloseOrderClient(make_merchant(sign_type=SignType.HMAC_SHA256), base_urls=[BASE]) as hmac_client:
        close_against(wechat, hmac_client, signed_answer(answer_fields()))
    fields = sent_fields(wechat)

    assert fields["sign_type"] == "HMAC-SHA256"
    assert re.fullmatch(r"[0-9A-F]{64}", fields["sign"])
    assert verify_signature(fields, API_KEY, SignType.HMAC_SHA256)


def test_md5_request_sends_no_sign_type_and_is_signed_with_md5(wechat: responses.RequestsMock) -> None:
    with CloseOrderClient(make_merchant(sign_type=SignType.MD5), base_urls=[BASE]) as md5_client:
        close_against(wechat, md5_client, signed_answer(answer_fields(), sign_type=SignType.MD5))
    fields = sent_fields(wechat)

    assert "sign_type" not in fields
    assert re.fullmatch(r"[0-9A-F]{32}", fields["sign"])
    assert verify_signature(fields, API_KEY, SignType.MD5)


def test_sub_appid_is_sent_only_when_set() -> None:
    with CloseOrderClient(make_merchant(sub_appid="wx8888888888888888"), base_urls=[BASE]) as with_sub_appid:
        assert with_sub_appid.prepare(ORDER).fields["sub_appid"] == "wx8888888888888888"
    with CloseOrderClient(make_merchant(), base_urls=[BASE]) as without:
        assert "sub_appid" not in without.prepare(ORDER).fields


def test_sub_mch_id_and_sub_appid_can_be_given_per_call(client: CloseOrderClient) -> None:
    fields = client.prepare(ORDER, sub_mch_id="30000300", sub_appid="wx9999999999999999").fields

    assert (fields["sub_mch_id"], fields["sub_appid"]) == ("30000300", "wx9999999999999999")
    assert verify_signature(fields, API_KEY, SignType.HMAC_SHA256)


def test_every_request_has_a_fresh_nonce(client: CloseOrderClient) -> None:
    assert len({client.prepare(ORDER).fields["nonce_str"] for _ in range(20)}) == 20


def test_prepared_body_is_exactly_what_is_sent(wechat: responses.RequestsMock, client: CloseOrderClient) -> None:
    prepared = client.prepare(ORDER)
    wechat.add(responses.POST, URL, body=signed_answer(answer_fields()))

    result = client.send(prepared)

    assert wechat.calls[0].request.body == prepared.body == result.request_body
    assert decode_xml(prepared.body) == dict(prepared.fields)


# --- validation before anything is sent --------------------------------------------------------


@pytest.mark.parametrize(
    "out_trade_no",
    ["", "A" * 33, "ORDER 1", " ORDER1", "订单1", "ORDER#1", "ORDER/1", "ORDER.1", "ORDER1\n", None],
    ids=["empty", "33-chars", "space", "leading-space", "non-ascii", "hash", "slash", "dot", "newline", "none"],
)
def test_bad_out_trade_no_is_refused_naming_it_before_sending(
    wechat: responses.RequestsMock, client: CloseOrderClient, out_trade_no: str
) -> None:
    with pytest.raises(InvalidRequestField, match="^out_trade_no: ") as excinfo:
        client.close_order(out_trade_no)

    assert excinfo.value.field == "out_trade_no"
    assert len(wechat.calls) == 0


@pytest.mark.parametrize("out_trade_no", ["A_b-c|d*e@f", "A" * 32, "1", "_-|*@"])
def test_out_trade_no_of_letters_digits_and_allowed_specials_is_accepted(
    client: CloseOrderClient, out_trade_no: str
) -> None:
    assert client.prepare(out_trade_no).fields["out_trade_no"] == out_trade_no


@pytest.mark.parametrize("out_trade_no", ["A_b-c|d*e@f", "A" * 32, "", "A" * 33, "ORDER 1", "订单1", "ORDER1\n"])
def test_the_model_field_and_the_client_accept_the_same_out_trade_nos(out_trade_no: str) -> None:
    from django.core.exceptions import ValidationError

    from django_wxpay_close.models import out_trade_no_validator

    try:
        validate_out_trade_no(out_trade_no)
        client_accepts = True
    except InvalidRequestField:
        client_accepts = False
    try:
        out_trade_no_validator(out_trade_no)
        model_accepts = True
    except ValidationError:
        model_accepts = False

    assert out_trade_no_validator.regex.pattern == OUT_TRADE_NO_PATTERN
    assert model_accepts == client_accepts


@pytest.mark.parametrize("field_name", ["appid", "mch_id", "sub_mch_id", "sub_appid"])
def test_an_id_longer_than_32_characters_is_refused_naming_the_field(field_name: str) -> None:
    ids = {"appid": APPID, "mch_id": MCH_ID, "sub_mch_id": SUB_MCH_ID, field_name: "9" * 33}

    with pytest.raises(InvalidRequestField, match=f"^{field_name}: ") as excinfo:
        Merchant(**ids, api_key=API_KEY)

    assert excinfo.value.field == field_name


@pytest.mark.parametrize("field_name", ["appid", "mch_id", "sub_mch_id"])
def test_a_missing_required_id_is_refused_naming_the_field(field_name: str) -> None:
    ids = {"appid": APPID, "mch_id": MCH_ID, "sub_mch_id": SUB_MCH_ID, field_name: ""}

    with pytest.raises(InvalidRequestField, match=f"^{field_name}: is required"):
        Merchant(**ids, api_key=API_KEY)


def test_a_per_call_sub_mch_id_over_32_characters_is_refused(client: CloseOrderClient) -> None:
    with pytest.raises(InvalidRequestField, match="^sub_mch_id: "):
        client.prepare(ORDER, sub_mch_id="9" * 33)


@pytest.mark.parametrize(
    "bad_key", [API_KEY + "0", API_KEY[:-1], API_KEY[:-4] + "ÄÖÜß"], ids=["33-chars", "31-chars", "non-ascii"]
)
def test_an_api_key_of_the_wrong_shape_is_refused_without_echoing_it(bad_key: str) -> None:
    with pytest.raises(InvalidRequestField, match="^api_key: ") as excinfo:
        make_merchant(api_key=bad_key)

    assert "LEAK" not in str(excinfo.value)
    assert "LEAK" not in repr(excinfo.value)


def test_an_unknown_sign_type_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown sign type 'SHA1'"):
        make_merchant(sign_type="SHA1")


def test_a_sign_type_given_as_a_string_is_parsed() -> None:
    assert make_merchant(sign_type="MD5").sign_type is SignType.MD5


# --- the outcome table (docs/protocol.md#outcomes), one row at a time -------------------------


def test_result_code_success_is_closed(wechat: responses.RequestsMock, client: CloseOrderClient) -> None:
    result = close_against(wechat, client, signed_answer(answer_fields()))

    assert (result.outcome, result.reason, result.signature_verified) == (Outcome.CLOSED, "", True)


def test_md5_merchant_verifies_an_md5_signed_answer(wechat: responses.RequestsMock) -> None:
    with CloseOrderClient(make_merchant(sign_type=SignType.MD5), base_urls=[BASE]) as md5_client:
        result = close_against(wechat, md5_client, signed_answer(answer_fields(), sign_type=SignType.MD5))

    assert result.outcome is Outcome.CLOSED


def test_orderclosed_is_already_closed(wechat: responses.RequestsMock, client: CloseOrderClient) -> None:
    result = close_against(wechat, client, signed_answer(error_fields("ORDERCLOSED", "Order is closed.")))

    assert result.outcome is Outcome.ALREADY_CLOSED


def test_orderpaid_is_paid(wechat: responses.RequestsMock, client: CloseOrderClient) -> None:
    result = close_against(wechat, client, signed_answer(error_fields("ORDERPAID", "Order is paid.")))

    assert result.outcome is Outcome.PAID


def test_ordernotexist_is_not_found(wechat: responses.RequestsMock, client: CloseOrderClient) -> None:
    result = close_against(wechat, client, signed_answer(error_fields("ORDERNOTEXIST")))

    assert result.outcome is Outcome.NOT_FOUND


def test_systemerror_is_retryable_error(wechat: responses.RequestsMock, client: CloseOrderClient) -> None:
    result = close_against(wechat, client, signed_answer(error_fields("SYSTEMERROR", "System error")))

    assert result.outcome is Outcome.RETRYABLE_ERROR
    assert result.reason == "SYSTEMERROR: System error"


@pytest.mark.parametrize("err_code", ["ORDERPAID", "ORDERCLOSED", "ORDERNOTEXIST", "SYSTEMERROR"])
def test_a_signed_success_carrying_an_err_code_is_untrusted_as_contradictory(
    wechat: responses.RequestsMock, client: CloseOrderClient, err_code: str
) -> None:
    contradictory = answer_fields(err_code=err_code, err_code_des="Order is paid.")

    result = close_against(wechat, client, signed_answer(contradictory))

    assert (result.outcome, result.signature_verified) == (Outcome.UNTRUSTED_RESPONSE, True)
    assert result.reason == f"contradictory answer: result_code SUCCESS with err_code {err_code}"
    assert result.outcome.needs_attention and not result.outcome.order_is_closed


@pytest.mark.parametrize(
    "error",
    [requests.ConnectionError("reset"), requests.ReadTimeout("read timed out"), requests.ConnectTimeout("timed out")],
    ids=lambda error: type(error).__name__,
)
def test_a_network_failure_is_network_error(
    wechat: responses.RequestsMock, client: CloseOrderClient, error: Exception
) -> None:
    result = close_against(wechat, client, error)

    assert result.outcome is Outcome.NETWORK_ERROR
    assert (result.http_status, result.response_body, dict(result.response_fields)) == (None, b"", {})


@pytest.mark.parametrize("status", [500, 502, 503])
def test_an_http_5xx_html_page_is_invalid_response(
    wechat: responses.RequestsMock, client: CloseOrderClient, status: int
) -> None:
    result = close_against(wechat, client, HTML_ERROR_PAGE, status=status)

    assert result.outcome is Outcome.INVALID_RESPONSE
    assert (result.http_status, result.reason, result.response_body) == (status, f"HTTP {status}", HTML_ERROR_PAGE)


def test_a_non_xml_200_body_is_invalid_response(wechat: responses.RequestsMock, client: CloseOrderClient) -> None:
    result = close_against(wechat, client, b"<html><body>Maintenance</body></html>")

    assert result.outcome is Outcome.INVALID_RESPONSE
    assert result.reason.startswith("unreadable body: ")


def test_a_return_code_neither_success_nor_fail_is_invalid_response(
    wechat: responses.RequestsMock, client: CloseOrderClient
) -> None:
    result = close_against(wechat, client, cdata_xml({"return_code": "MAYBE"}))

    assert result.outcome is Outcome.INVALID_RESPONSE


def test_a_signed_signerror_is_configuration_error(wechat: responses.RequestsMock, client: CloseOrderClient) -> None:
    result = close_against(wechat, client, signed_answer(error_fields("SIGNERROR", "Signature error")))

    assert result.outcome is Outcome.CONFIGURATION_ERROR
    assert result.signature_verified is True


@pytest.mark.parametrize(
    "body",
    [cdata_xml(error_fields("SIGNERROR")), signed_answer(error_fields("SIGNERROR"), api_key=WRONG_KEY)],
    ids=["unsigned", "signed-with-another-key"],
)
def test_an_unverifiable_signerror_is_configuration_error(
    wechat: responses.RequestsMock, client: CloseOrderClient, body: bytes
) -> None:
    result = close_against(wechat, client, body)

    assert result.outcome is Outcome.CONFIGURATION_ERROR
    assert result.signature_verified is False


def test_return_code_fail_is_configuration_error(wechat: responses.RequestsMock, client: CloseOrderClient) -> None:
    result = close_against(wechat, client, cdata_xml({"return_code": "FAIL", "return_msg": "签名错误"}))

    assert result.outcome is Outcome.CONFIGURATION_ERROR
    assert "签名错误" in result.reason
    assert result.signature_verified is None


@pytest.mark.parametrize("err_code", ["REQUIRE_POST_METHOD", "XML_FORMAT_ERROR"])
def test_a_malformed_request_answer_is_client_bug(
    wechat: responses.RequestsMock, client: CloseOrderClient, err_code: str
) -> None:
    result = close_against(wechat, client, signed_answer(error_fields(err_code)))

    assert result.outcome is Outcome.CLIENT_BUG


def test_a_success_body_with_a_wrong_signature_is_untrusted(
    wechat: responses.RequestsMock, client: CloseOrderClient
) -> None:
    result = close_against(wechat, client, signed_answer(answer_fields(), api_key=WRONG_KEY))

    assert result.outcome is Outcome.UNTRUSTED_RESPONSE
    assert result.signature_verified is False


def test_a_success_body_without_a_signature_is_untrusted(
    wechat: responses.RequestsMock, client: CloseOrderClient
) -> None:
    result = close_against(wechat, client, cdata_xml(answer_fields()))

    assert result.outcome is Outcome.UNTRUSTED_RESPONSE
    assert "missing" in result.reason


def test_an_unverified_orderpaid_is_untrusted_not_paid(
    wechat: responses.RequestsMock, client: CloseOrderClient
) -> None:
    result = close_against(wechat, client, signed_answer(error_fields("ORDERPAID"), api_key=WRONG_KEY))

    assert result.outcome is Outcome.UNTRUSTED_RESPONSE


def test_an_answer_signed_with_the_other_sign_type_is_untrusted(
    wechat: responses.RequestsMock, client: CloseOrderClient
) -> None:
    result = close_against(wechat, client, signed_answer(answer_fields(), sign_type=SignType.MD5))

    assert result.outcome is Outcome.UNTRUSTED_RESPONSE


def test_an_unknown_err_code_is_unexpected_error_recorded_verbatim(
    wechat: responses.RequestsMock, client: CloseOrderClient
) -> None:
    body = signed_answer(error_fields("TRADE_STATE_ERROR", "订单状态错误 (state=NOTPAY)"))

    result = close_against(wechat, client, body)

    assert result.outcome is Outcome.UNEXPECTED_ERROR
    assert result.reason == "TRADE_STATE_ERROR: 订单状态错误 (state=NOTPAY)"
    assert result.err_code == "TRADE_STATE_ERROR"


@pytest.mark.parametrize(
    "echoed", [{"mch_id": "99999999"}, {"appid": "wx0000000000000000"}, {"sub_mch_id": "88888888"}],
    ids=["mch_id", "appid", "sub_mch_id"],
)
def test_a_signed_answer_echoing_another_merchant_is_untrusted(
    wechat: responses.RequestsMock, client: CloseOrderClient, echoed: dict[str, str]
) -> None:
    result = close_against(wechat, client, signed_answer(answer_fields(**echoed)))

    assert result.outcome is Outcome.UNTRUSTED_RESPONSE
    assert result.signature_verified is True


def test_the_answer_signature_covers_fields_wechat_adds(
    wechat: responses.RequestsMock, client: CloseOrderClient
) -> None:
    result = close_against(wechat, client, signed_answer(answer_fields(settlement_hint="NEW-FIELD")))

    assert result.outcome is Outcome.CLOSED
    assert result.response_fields["settlement_hint"] == "NEW-FIELD"


def test_tampering_with_a_field_wechat_added_makes_the_answer_untrusted(
    wechat: responses.RequestsMock, client: CloseOrderClient
) -> None:
    tampered = {**sign(answer_fields(settlement_hint="NEW-FIELD")), "settlement_hint": "CHANGED"}

    result = close_against(wechat, client, cdata_xml(tampered))

    assert result.outcome is Outcome.UNTRUSTED_RESPONSE


# What each outcome means (docs/protocol.md#outcomes): closed?, retry?, halt the merchant?, needs a person?
OUTCOME_MEANINGS = {
    Outcome.CLOSED: (True, False, False, False),
    Outcome.ALREADY_CLOSED: (True, False, False, False),
    Outcome.PAID: (False, False, False, False),
    Outcome.NOT_FOUND: (False, True, False, False),
    Outcome.RETRYABLE_ERROR: (False, True, False, False),
    Outcome.NETWORK_ERROR: (False, True, False, False),
    Outcome.INVALID_RESPONSE: (False, True, False, False),
    Outcome.CONFIGURATION_ERROR: (False, False, True, False),
    Outcome.CLIENT_BUG: (False, False, False, True),
    Outcome.UNTRUSTED_RESPONSE: (False, False, False, True),
    Outcome.UNEXPECTED_ERROR: (False, False, False, True),
}


def test_the_meaning_table_covers_every_outcome() -> None:
    assert set(OUTCOME_MEANINGS) == set(Outcome)


@pytest.mark.parametrize(("outcome", "meaning"), OUTCOME_MEANINGS.items(), ids=lambda value: getattr(value, "name", ""))
def test_outcome_properties_match_the_protocol_table(outcome: Outcome, meaning: tuple[bool, bool, bool, bool]) -> None:
    assert (outcome.order_is_closed, outcome.is_retryable, outcome.halts_merchant, outcome.needs_attention) == meaning


# --- the result --------------------------------------------------------------------------------


def test_the_result_is_immutable(wechat: responses.RequestsMock, client: CloseOrderClient) -> None:
    result = close_against(wechat, client, signed_answer(answer_fields()))

    with pytest.raises(dataclasses.FrozenInstanceError):
        result.outcome = Outcome.PAID  # type: ignore[misc]
    with pytest.raises(TypeError):
        result.response_fields["result_code"] = "FAIL"  # type: ignore[index]


def test_the_result_records_the_whole_exchange(wechat: responses.RequestsMock, client: CloseOrderClient) -> None:
    answer = signed_answer(answer_fields())

    result = close_against(wechat, client, answer)

    assert result.out_trade_no == ORDER
    assert result.request_body == wechat.calls[0].request.body
    assert result.response_body == answer
    assert result.response_fields == decode_xml(answer)
    assert (result.http_status, result.url, result.failed_over_from) == (200, URL, None)
    assert (result.return_code, result.result_code, result.err_code) == ("SUCCESS", "SUCCESS", "")
    assert result.sign_type is SignType.HMAC_SHA256
    assert result.elapsed > 0


# --- transport limits --------------------------------------------------------------------------


def test_an_oversized_answer_is_invalid_response_without_reading_it_all(wechat: responses.RequestsMock) -> None:
    body = CountingBody(size=50 * 1024 * 1024)
    wechat.add(responses.POST, URL, body=io.BufferedReader(body))

    with CloseOrderClient(make_merchant(), base_urls=[BASE], max_response_bytes=16 * 1024) as capped:
        result = capped.close_order(ORDER)

    assert result.outcome is Outcome.INVALID_RESPONSE
    assert "16384-byte limit" in result.reason
    assert body.served < 256 * 1024


def test_an_answer_still_arriving_after_the_deadline_is_network_error(wechat: responses.RequestsMock) -> None:
    wechat.add(responses.POST, URL, body=io.BufferedReader(CountingBody(size=64 * 1024, delay=0.02)))

    with CloseOrderClient(make_merchant(), base_urls=[BASE], connect_timeout=0.01, read_timeout=0.01) as impatient:
        result = impatient.close_order(ORDER)

    assert result.outcome is Outcome.NETWORK_ERROR
    assert "not complete within" in result.reason


def _trickle_then_fall_silent(server: RawHTTPServer, conn: socket.socket) -> None:
    """Headers, then a byte each 0.5 s (within any read timeout over 0.5 s) three times, then nothing."""
    server.send(conn, b"HTTP/1.1 200 OK\r\nContent-Type: text/xml\r\nContent-Length: 100\r\n\r\n")
    for _ in range(3):
        server.send(conn, b"<")
        time.sleep(0.5)
    time.sleep(3)


def test_a_read_still_waiting_at_the_deadline_is_cut_there_not_at_the_read_timeout() -> None:
    # connect 0.3 s + read 1.0 s: the deadline falls 0.3 s into the silence, the read timeout only 1.0 s into it.
    with RawHTTPServer(lambda conn: _trickle_then_fall_silent(server, conn)) as server, \
            CloseOrderClient(make_merchant(), base_urls=[server.url], connect_timeout=0.3, read_timeout=1.0) as client:
        result = client.close_order(ORDER)

    assert result.outcome is Outcome.NETWORK_ERROR
    assert result.reason == "response not complete within the 1s read timeout plus connect time"


def test_a_connection_cut_at_the_deadline_is_not_reused() -> None:
    answers = iter([lambda conn: _trickle_then_fall_silent(server, conn),
                    lambda conn: server.send(conn, _http_200(signed_answer(answer_fields())))])
    with RawHTTPServer(lambda conn: next(answers)(conn)) as server, \
            CloseOrderClient(make_merchant(), base_urls=[server.url], connect_timeout=0.3, read_timeout=1.0) as client:
        outcomes = [client.close_order(ORDER).outcome, client.close_order(ORDER).outcome]

    assert outcomes == [Outcome.NETWORK_ERROR, Outcome.CLOSED]
    assert len(server.requests) == 2


def _http_200(body: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Type: text/xml\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)


def test_a_redirect_is_not_followed(wechat: responses.RequestsMock, client: CloseOrderClient) -> None:
    wechat.add(responses.POST, URL, status=302, headers={"Location": "http://elsewhere.test/pay/closeorder"})

    result = client.close_order(ORDER)

    assert len(wechat.calls) == 1
    assert (result.outcome, result.http_status) == (Outcome.INVALID_RESPONSE, 302)


def test_a_cookie_the_server_sets_is_never_sent_back(wechat: responses.RequestsMock, client: CloseOrderClient) -> None:
    for _ in range(2):
        wechat.add(responses.POST, URL, body=signed_answer(answer_fields()), headers={"Set-Cookie": "route=a1; Path=/"})

    client.close_order(ORDER)
    client.close_order(ORDER)

    assert [call.request.headers.get("Cookie") for call in wechat.calls] == [None, None]


def test_a_proxy_named_in_the_environment_carries_the_request(monkeypatch: pytest.MonkeyPatch) -> None:
    with RawHTTPServer(lambda conn: proxy.send(conn, _http_200(signed_answer(answer_fields())))) as proxy:
        monkeypatch.setenv("HTTP_PROXY", proxy.url)
        monkeypatch.delenv("NO_PROXY", raising=False)
        monkeypatch.delenv("no_proxy", raising=False)
        with CloseOrderClient(make_merchant(), base_urls=[BASE]) as proxied:
            result = proxied.close_order(ORDER)

    assert result.outcome is Outcome.CLOSED
    assert proxy.requests[0].startswith(f"POST {URL} HTTP/1.1".encode())


# --- failover ----------------------------------------------------------------------------------


@pytest.fixture
def two_region_client() -> Iterator[CloseOrderClient]:
    with CloseOrderClient(make_merchant(), base_urls=[BASE, SECOND_BASE]) as close_client:
        yield close_client


@pytest.mark.parametrize(
    "never_connected",
    [refused_connection(), requests.ConnectTimeout("connect timed out")],
    ids=["refused", "connect-timeout"],
)
def test_a_connection_never_made_fails_over_to_the_next_url_in_the_same_call(
    wechat: responses.RequestsMock, two_region_client: CloseOrderClient, never_connected: Exception
) -> None:
    wechat.add(responses.POST, URL, body=never_connected)
    wechat.add(responses.POST, SECOND_URL, body=signed_answer(answer_fields()))

    result = two_region_client.close_order(ORDER)

    assert result.outcome is Outcome.CLOSED
    assert (result.url, result.failed_over_from) == (SECOND_URL, URL)
    assert wechat.calls[0].request.body == wechat.calls[1].request.body == result.request_body


def test_refused_everywhere_is_network_error_from_the_last_url(
    wechat: responses.RequestsMock, two_region_client: CloseOrderClient
) -> None:
    wechat.add(responses.POST, URL, body=refused_connection())
    wechat.add(responses.POST, SECOND_URL, body=refused_connection())

    result = two_region_client.close_order(ORDER)

    assert result.outcome is Outcome.NETWORK_ERROR
    assert (result.url, result.failed_over_from) == (SECOND_URL, URL)


def test_a_read_timeout_does_not_fail_over(wechat: responses.RequestsMock, two_region_client: CloseOrderClient) -> None:
    wechat.add(responses.POST, URL, body=requests.ReadTimeout("read timed out"))

    result = two_region_client.close_order(ORDER)

    assert result.outcome is Outcome.NETWORK_ERROR
    assert (result.url, result.failed_over_from, len(wechat.calls)) == (URL, None, 1)


@pytest.mark.parametrize(
    ("body", "status"),
    [(signed_answer(error_fields("SYSTEMERROR")), 200), (HTML_ERROR_PAGE, 503), (b"junk", 200)],
    ids=["systemerror", "http-503", "junk"],
)
def test_any_answer_from_the_first_url_does_not_fail_over(
    wechat: responses.RequestsMock, two_region_client: CloseOrderClient, body: bytes, status: int
) -> None:
    wechat.add(responses.POST, URL, body=body, status=status)

    result = two_region_client.close_order(ORDER)

    assert (result.url, result.failed_over_from, len(wechat.calls)) == (URL, None, 1)


@pytest.fixture
def refusing_base(wechat: responses.RequestsMock) -> Iterator[str]:
    """A loopback base URL that really refuses connections (bound, not listening), let past the mock."""
    with socket.socket() as closed_port:
        closed_port.bind(("127.0.0.1", 0))
        base = f"http://127.0.0.1:{closed_port.getsockname()[1]}"
        wechat.add_passthru(base)
        yield base


def test_a_real_refused_connection_is_recognised_for_failover(
    wechat: responses.RequestsMock, refusing_base: str
) -> None:
    # No mock for the first URL: requests and urllib3 really try to connect, so the exception is the genuine one.
    wechat.add(responses.POST, SECOND_URL, body=signed_answer(answer_fields()))
    with CloseOrderClient(make_merchant(), base_urls=[refusing_base, SECOND_BASE]) as close_client:
        result = close_client.close_order(ORDER)

    assert result.outcome is Outcome.CLOSED
    assert result.failed_over_from == refusing_base + CLOSEORDER_PATH


# --- the API key never shows -------------------------------------------------------------------


def test_the_api_key_appears_in_no_repr_body_error_or_log_record(
    wechat: responses.RequestsMock, refusing_base: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="urllib3")
    merchant = make_merchant()
    for body, status in [
        (signed_answer(answer_fields()), 200),  # after a real refused connection on the first URL
        (requests.ConnectionError("reset by peer"), 200),
        (HTML_ERROR_PAGE, 502),
        (signed_answer(answer_fields(), api_key=WRONG_KEY), 200),
        (cdata_xml({"return_code": "FAIL", "return_msg": "签名错误"}), 200),
    ]:
        wechat.add(responses.POST, SECOND_URL, body=body, status=status)
    bad_inputs = [
        lambda: make_merchant(api_key=API_KEY + "0"),
        lambda: make_merchant(sign_type="SHA1"),
        lambda: one_region.close_order("bad order"),
        lambda: one_region.prepare(ORDER, sub_appid="x" * 33),
    ]
    texts: list[str] = [repr(merchant), str(merchant)]

    with CloseOrderClient(merchant, base_urls=[refusing_base, SECOND_BASE]) as two_regions:
        with CloseOrderClient(merchant, base_urls=[SECOND_BASE]) as one_region:
            texts += [repr(two_regions), repr(one_region), repr(one_region.prepare(ORDER))]
            results = [two_regions.close_order(ORDER)] + [one_region.close_order(ORDER) for _ in range(4)]
            for bad_input in bad_inputs:
                with pytest.raises(ValueError) as excinfo:
                    bad_input()
                texts += [str(excinfo.value), repr(excinfo.value)]

    assert [result.outcome for result in results] == [
        Outcome.CLOSED, Outcome.NETWORK_ERROR, Outcome.INVALID_RESPONSE, Outcome.UNTRUSTED_RESPONSE,
        Outcome.CONFIGURATION_ERROR,
    ]
    for result in results:
        texts += [repr(result), result.reason, result.request_body.decode(), result.response_body.decode()]
    assert any(record.name.startswith("urllib3") for record in caplog.records), "the real connection attempt logs"
    texts += [record.getMessage() for record in caplog.records] + [caplog.text]
    assert [text for text in texts if "LEAK" in text] == []


SIMULATED_MERCHANT = Merchant(appid=simulated.APPID, mch_id=simulated.MCH_ID, sub_mch_id=simulated.SUB_MCH_ID,
                              api_key=simulated.API_KEY)


def test_successive_closes_reuse_one_kept_alive_connection() -> None:
    with simulated.WeChatPaySimulator(unknown_orders="open") as simulator, \
            CloseOrderClient(SIMULATED_MERCHANT, base_urls=[simulator.base_url]) as client:
        outcomes = {client.close_order(f"KEEP{n}").outcome for n in range(5)}
        assert outcomes == {Outcome.CLOSED} and simulator.connections_opened == 1


def test_a_client_whose_connections_were_closed_connects_again() -> None:
    with simulated.WeChatPaySimulator(unknown_orders="open") as simulator, \
            CloseOrderClient(SIMULATED_MERCHANT, base_urls=[simulator.base_url]) as client:
        assert client.close_order("AGAIN1").outcome is Outcome.CLOSED
        client.close()
        assert client.close_order("AGAIN2").outcome is Outcome.CLOSED
        assert simulator.connections_opened == 2
