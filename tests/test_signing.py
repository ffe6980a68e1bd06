"""WeChat Pay v2 signatures, as docs/protocol.md#signature describes them."""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from django_wxpay_close.wechat import SignType, compute_signature, new_nonce, signing_string, verify_signature

from .wechat_answers import API_KEY, WRONG_KEY

# The worked example of docs/protocol.md#signature, from the public WeChat Pay documentation.
EXAMPLE_FIELDS = {
    "appid": "wxd930ea5d5a258f4f",
    "mch_id": "10000100",
    "device_info": "1000",
    "body": "test",
    "nonce_str": "ibuaiVcKdpRxkhJA",
}
EXAMPLE_KEY = "192006250b4c09247ec02edce69f6a2d"
EXAMPLE_STRING = (
    "appid=wxd930ea5d5a258f4f&body=test&device_info=1000&mch_id=10000100&nonce_str=ibuaiVcKdpRxkhJA"
    "&key=192006250b4c09247ec02edce69f6a2d"
)
EXAMPLE_MD5 = "9A0A8659F005D6984697E2CA0A9CF3B7"

BOTH_SIGN_TYPES = pytest.mark.parametrize("sign_type", list(SignType), ids=lambda t: t.value)

field_names = st.text(min_size=1, max_size=16).filter(lambda name: name != "sign")
field_dicts = st.dictionaries(field_names, st.text(max_size=40), max_size=8)


def independent_hmac(string: str, key: str) -> str:
    """HMAC-SHA256 computed here, not by the code under test."""
    return hmac.new(key.encode(), string.encode(), hashlib.sha256).hexdigest().upper()


# --- computing ---------------------------------------------------------------------------------


def test_md5_signature_matches_the_public_worked_example() -> None:
    assert compute_signature(EXAMPLE_FIELDS, EXAMPLE_KEY, SignType.MD5) == EXAMPLE_MD5


def test_signing_string_of_the_worked_example_is_sorted_joined_and_keyed() -> None:
    assert signing_string(EXAMPLE_FIELDS, EXAMPLE_KEY) == EXAMPLE_STRING


def test_hmac_sha256_signature_is_upper_case_hex_hmac_keyed_with_the_api_key() -> None:
    signature = compute_signature(EXAMPLE_FIELDS, EXAMPLE_KEY, SignType.HMAC_SHA256)

    assert signature == independent_hmac(EXAMPLE_STRING, EXAMPLE_KEY)
    assert re.fullmatch(r"[0-9A-F]{64}", signature)


@BOTH_SIGN_TYPES
def test_sign_type_given_as_a_plain_string_selects_the_same_algorithm(sign_type: SignType) -> None:
    assert compute_signature(EXAMPLE_FIELDS, EXAMPLE_KEY, sign_type.value) == compute_signature(
        EXAMPLE_FIELDS, EXAMPLE_KEY, sign_type
    )


def test_unknown_sign_type_is_refused_rather_than_falling_back_to_md5() -> None:
    with pytest.raises(ValueError, match="unknown sign type"):
        compute_signature(EXAMPLE_FIELDS, EXAMPLE_KEY, "SHA1")  # type: ignore[arg-type]


def test_empty_values_are_not_signed() -> None:
    with_empty = {**EXAMPLE_FIELDS, "attach": "", "detail": ""}

    assert signing_string(with_empty, EXAMPLE_KEY) == EXAMPLE_STRING
    assert compute_signature(with_empty, EXAMPLE_KEY, SignType.MD5) == EXAMPLE_MD5


def test_the_sign_field_itself_is_not_signed() -> None:
    assert compute_signature({**EXAMPLE_FIELDS, "sign": "ANYTHING"}, EXAMPLE_KEY, SignType.MD5) == EXAMPLE_MD5


def test_value_zero_is_signed() -> None:
    assert signing_string({"a": "1", "total_fee": "0"}, "K") == "a=1&total_fee=0&key=K"


def test_fields_sort_in_case_sensitive_ascii_order() -> None:
    # ASCII: "B" (66) < "_" (95) < "a" (97) < "b" (98); a case-insensitive sort would differ.
    fields = {"b": "1", "a": "2", "_": "3", "B": "4"}

    assert signing_string(fields, "K") == "B=4&_=3&a=2&b=1&key=K"


def test_values_are_signed_raw_not_xml_or_url_escaped() -> None:
    fields = {"body": "Tom & Jerry <DVD>", "detail": "中文 100%"}
    expected_string = "body=Tom & Jerry <DVD>&detail=中文 100%&key=" + EXAMPLE_KEY

    assert signing_string(fields, EXAMPLE_KEY) == expected_string
    assert compute_signature(fields, EXAMPLE_KEY, SignType.MD5) == (
        hashlib.md5(expected_string.encode("utf-8")).hexdigest().upper()
    )


def test_sign_type_field_is_signed_like_any_other_field() -> None:
    fields = {**EXAMPLE_FIELDS, "sign_type": "HMAC-SHA256"}

    assert "&sign_type=HMAC-SHA256&key=" in signing_string(fields, EXAMPLE_KEY)
    assert compute_signature(fields, EXAMPLE_KEY, SignType.HMAC_SHA256) != compute_signature(
        EXAMPLE_FIELDS, EXAMPLE_KEY, SignType.HMAC_SHA256
    )


# --- verifying ---------------------------------------------------------------------------------


def signed(sign_type: SignType = SignType.HMAC_SHA256, key: str = API_KEY) -> dict[str, str]:
    """The worked example's fields with a `sign` made by `key`."""
    return {**EXAMPLE_FIELDS, "sign": compute_signature(EXAMPLE_FIELDS, key, sign_type)}


@BOTH_SIGN_TYPES
def test_verify_accepts_a_correct_signature(sign_type: SignType) -> None:
    assert verify_signature(signed(sign_type), API_KEY, sign_type) is True


def test_verify_compares_with_hmac_compare_digest(monkeypatch: pytest.MonkeyPatch) -> None:
    real_compare = hmac.compare_digest
    calls: list[tuple[object, object]] = []

    def recording_compare(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real_compare(a, b)

    monkeypatch.setattr(hmac, "compare_digest", recording_compare)
    fields = signed()

    assert verify_signature(fields, API_KEY, SignType.HMAC_SHA256) is True
    assert calls == [(fields["sign"].encode(), fields["sign"].encode())]


def test_verify_rejects_a_missing_signature() -> None:
    assert verify_signature(EXAMPLE_FIELDS, API_KEY, SignType.HMAC_SHA256) is False
    assert verify_signature({**EXAMPLE_FIELDS, "sign": ""}, API_KEY, SignType.HMAC_SHA256) is False


def test_verify_rejects_a_wrong_signature() -> None:
    assert verify_signature({**EXAMPLE_FIELDS, "sign": "0" * 64}, API_KEY, SignType.HMAC_SHA256) is False


def test_verify_rejects_a_signature_made_with_another_key() -> None:
    assert verify_signature(signed(key=WRONG_KEY), API_KEY, SignType.HMAC_SHA256) is False


def test_verify_rejects_a_signature_made_with_the_other_sign_type() -> None:
    assert verify_signature(signed(SignType.MD5), API_KEY, SignType.HMAC_SHA256) is False


def test_verify_rejects_the_lower_case_form_of_the_right_signature() -> None:
    fields = signed()
    fields["sign"] = fields["sign"].lower()

    assert verify_signature(fields, API_KEY, SignType.HMAC_SHA256) is False


@pytest.mark.parametrize("bad_sign", ["签名错误", "Ä" * 64, "\udcff" * 64], ids=["cjk", "latin1", "lone-surrogate"])
def test_verify_rejects_a_non_ascii_signature_without_raising(bad_sign: str) -> None:
    assert verify_signature({**EXAMPLE_FIELDS, "sign": bad_sign}, API_KEY, SignType.HMAC_SHA256) is False


# --- nonce -------------------------------------------------------------------------------------


def test_nonce_is_32_lower_case_hex_characters() -> None:
    assert re.fullmatch(r"[0-9a-f]{32}", new_nonce())


def test_nonces_are_distinct_across_calls() -> None:
    assert len({new_nonce() for _ in range(1000)}) == 1000


def test_nonce_comes_from_the_secrets_csprng(monkeypatch: pytest.MonkeyPatch) -> None:
    requested: list[int | None] = []

    def recording_token_hex(nbytes: int | None = None) -> str:
        requested.append(nbytes)
        return "f" * 32

    monkeypatch.setattr(secrets, "token_hex", recording_token_hex)

    assert new_nonce() == "f" * 32
    assert requested == [16]


# --- properties --------------------------------------------------------------------------------


@settings(max_examples=200)
@given(fields=field_dicts, sign_type=st.sampled_from(SignType))
def test_sign_then_verify_round_trips_for_any_fields(fields: dict[str, str], sign_type: SignType) -> None:
    fields["sign"] = compute_signature(fields, API_KEY, sign_type)

    assert verify_signature(fields, API_KEY, sign_type)


@settings(max_examples=200)
@given(data=st.data(), fields=field_dicts.filter(bool), sign_type=st.sampled_from(SignType))
def test_changing_any_field_value_breaks_verification(
    data: st.DataObject, fields: dict[str, str], sign_type: SignType
) -> None:
    signature = compute_signature(fields, API_KEY, sign_type)
    name = data.draw(st.sampled_from(sorted(fields)), label="changed field")
    new_value = data.draw(st.text(max_size=40).filter(lambda value: value != fields[name]), label="new value")

    tampered = {**fields, name: new_value, "sign": signature}

    assert not verify_signature(tampered, API_KEY, sign_type)
