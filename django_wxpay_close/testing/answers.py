"""The documents the simulated WeChat sends: signed answers in CDATA, its refusals, and gateway error pages."""

from __future__ import annotations

import time
from collections.abc import Mapping

from ..wechat import SignType, compute_signature, new_nonce
from .scenarios import ERR_CODE_DESCRIPTIONS, OrderState, Payment

__all__ = ["beijing_time", "cdata_xml", "html_page", "query_fields", "signed_answer", "unsigned_fail"]

PAYER_OPENID = "oSimulatedPayer0000000000000"
_TRADE_STATE_DESCRIPTIONS: Mapping[str, str] = {
    "SUCCESS": "Payment successful",
    "REFUND": "Order to be refunded",
    "NOTPAY": "Order not paid",
    "CLOSED": "Order closed",
    "REVOKED": "Order revoked",
    "USERPAYING": "Waiting for the user to pay",
    "PAYERROR": "Payment failed",
}


def cdata_xml(fields: Mapping[str, str]) -> bytes:
    """The answer document with every value in CDATA, as WeChat sends it (`]]>` split across two sections)."""
    parts = ["<xml>"]
    for name, value in fields.items():
        parts.append(f"<{name}><![CDATA[{value.replace(']]>', ']]]]><![CDATA[>')}]]></{name}>")
    parts.append("</xml>")
    return "".join(parts).encode("utf-8")


def html_page(status: int, reason: str) -> bytes:
    return (
        f"<html><head><title>{status} {reason}</title></head><body><center><h1>{status} {reason}</h1>"
        "</center><hr><center>stgw</center></body></html>"
    ).encode("ascii")


def unsigned_fail(return_msg: str) -> bytes:
    return cdata_xml({"return_code": "FAIL", "return_msg": return_msg})


def beijing_time(epoch: float) -> str:
    """yyyyMMddHHmmss in Beijing time (GMT+8), as WeChat writes times."""
    return time.strftime("%Y%m%d%H%M%S", time.gmtime(epoch + 8 * 3600))


def signed_answer(
    request: Mapping[str, str], api_key: str, err_code: str | None, extra: Mapping[str, str] | None = None
) -> dict[str, str]:
    """A return_code SUCCESS answer echoing the request's IDs, plus `extra`, signed with its sign type and key."""
    answer = {
        "return_code": "SUCCESS",
        "return_msg": "OK",
        "appid": request["appid"],
        "mch_id": request["mch_id"],
        "sub_mch_id": request["sub_mch_id"],
    }
    if request.get("sub_appid"):
        answer["sub_appid"] = request["sub_appid"]
    answer["nonce_str"] = new_nonce()
    if err_code is None:
        answer.update(result_code="SUCCESS", result_msg="OK")
        answer.update(extra or {})
    else:
        description = ERR_CODE_DESCRIPTIONS.get(err_code, "injected error")
        answer.update(result_code="FAIL", result_msg=description, err_code=err_code, err_code_des=description)
    answer["sign"] = compute_signature(answer, api_key, SignType.parse(request.get("sign_type")))
    return answer


def query_fields(out_trade_no: str, state: OrderState, payment: Payment | None) -> dict[str, str]:
    """What an orderquery answer says about an order in `state`; a paid one carries its `payment`."""
    trade_state = state.trade_state
    fields = {"out_trade_no": out_trade_no, "trade_state": trade_state,
              "trade_state_desc": _TRADE_STATE_DESCRIPTIONS[trade_state]}
    if payment is not None and state.is_paid:
        fields.update(
            openid=PAYER_OPENID, is_subscribe="N", trade_type="JSAPI", bank_type="OTHERS",
            total_fee=str(payment.total_fee), fee_type=payment.fee_type, cash_fee=str(payment.total_fee),
            transaction_id=payment.transaction_id, time_end=payment.time_end,
        )
    return fields
