"""Building blocks for the wire-package tests: a merchant, and WeChat answers signed the way WeChat signs them."""

from __future__ import annotations

from collections.abc import Mapping

from django_wxpay_close.wechat import Merchant, SignType, compute_signature

APPID = "wx2421b1c4370ec43b"
MCH_ID = "10000100"
SUB_MCH_ID = "20000200"
# Recognisable, so a leak into a repr, a message or a log record cannot hide.
API_KEY = "LEAK" * 8
WRONG_KEY = "WRONGKEY" * 4


def make_merchant(
    *, sign_type: SignType | str = SignType.HMAC_SHA256, api_key: str = API_KEY, sub_appid: str | None = None
) -> Merchant:
    """The test merchant, with the recognisable API key unless told otherwise."""
    return Merchant(
        appid=APPID, mch_id=MCH_ID, sub_mch_id=SUB_MCH_ID, api_key=api_key, sign_type=sign_type, sub_appid=sub_appid
    )


def answer_fields(**overrides: str | None) -> dict[str, str]:
    """An unsigned successful closeorder answer for the test merchant; `name=None` drops a field."""
    fields: dict[str, str | None] = {
        "return_code": "SUCCESS",
        "return_msg": "OK",
        "appid": APPID,
        "mch_id": MCH_ID,
        "sub_mch_id": SUB_MCH_ID,
        "nonce_str": "BFK89FC6rxKCOjLX",
        "result_code": "SUCCESS",
        "result_msg": "OK",
    }
    fields.update(overrides)
    return {name: value for name, value in fields.items() if value is not None}


def error_fields(err_code: str, err_code_des: str = "") -> dict[str, str]:
    """An unsigned business-failure answer (result_code FAIL) carrying `err_code`."""
    return answer_fields(result_code="FAIL", result_msg="FAIL", err_code=err_code, err_code_des=err_code_des or None)


def sign(
    fields: Mapping[str, str], *, api_key: str = API_KEY, sign_type: SignType = SignType.HMAC_SHA256
) -> dict[str, str]:
    """`fields` plus the `sign` WeChat would put on them (the answer carries no sign_type)."""
    return {**fields, "sign": compute_signature(fields, api_key, sign_type)}


def cdata_xml(fields: Mapping[str, str]) -> bytes:
    """The body as WeChat writes it: every value in CDATA, one element per line."""
    assert all("]]>" not in value for value in fields.values()), "CDATA cannot carry ]]>"
    lines = [f"   <{name}><![CDATA[{value}]]></{name}>" for name, value in fields.items()]
    return "\n".join(["<xml>", *lines, "</xml>"]).encode("utf-8")


def signed_answer(
    fields: Mapping[str, str], *, api_key: str = API_KEY, sign_type: SignType = SignType.HMAC_SHA256
) -> bytes:
    """A complete, correctly signed WeChat answer body."""
    return cdata_xml(sign(fields, api_key=api_key, sign_type=sign_type))
