"""The three ways of sending closeorder that the client benchmark compares, behind one signature.

Each factory returns `close(out_trade_no) -> None` bound to the simulator at `base_url`; each raises if the
answer is not a successful close, so a broken side cannot look fast.
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import itertools
import secrets
from collections.abc import Callable
from urllib.parse import urlsplit

from defusedxml import ElementTree

from django_wxpay_close.testing import API_KEY, APPID, MCH_ID, SUB_MCH_ID
from django_wxpay_close.wechat import CLOSEORDER_PATH, CloseOrderClient, Merchant, Outcome, SignType

Close = Callable[[str], None]


def ours(base_url: str, pool_size: int = 10) -> Close:
    """Our CloseOrderClient: HMAC-SHA256 (the default), defusedxml, response signature verified."""
    merchant = Merchant(APPID, MCH_ID, SUB_MCH_ID, API_KEY, sign_type=SignType.HMAC_SHA256)
    client = CloseOrderClient(merchant, base_urls=[base_url], pool_size=pool_size)

    def close(out_trade_no: str) -> None:
        result = client.close_order(out_trade_no)
        if result.outcome is not Outcome.CLOSED:
            raise RuntimeError(f"our client: {result.outcome} {result.reason}")

    return close


def wechatpy(base_url: str, pool_size: int = 10) -> Close:
    """wechatpy 1.8 `WeChatPay.order.close` (MD5, xmltodict, no response signature check).

    wechatpy joins `API_BASE_URL` and the endpoint, so the simulator's URL with a trailing slash replaces
    WeChat's. Its requests pool is widened to `pool_size` so a thread pool is not penalised by the default 10.
    """
    from requests.adapters import HTTPAdapter
    from wechatpy.pay import WeChatPay

    pay = WeChatPay(APPID, API_KEY, MCH_ID, sub_mch_id=SUB_MCH_ID, sandbox=False)
    pay.API_BASE_URL = base_url.rstrip("/") + "/"
    pay._http.mount("http://", HTTPAdapter(pool_maxsize=pool_size))

    def close(out_trade_no: str) -> None:
        answer = pay.order.close(out_trade_no)
        if answer.get("result_code") != "SUCCESS":
            raise RuntimeError(f"wechatpy: {answer}")

    return close


def http_client_floor(base_url: str, pool_size: int = 10) -> Close:
    """The least any Python client can do: sign, one keep-alive http.client POST, parse with defusedxml."""
    parts = urlsplit(base_url)
    connection = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port)
    key = API_KEY.encode()
    headers = {"Content-Type": "text/xml; charset=utf-8"}
    fixed = {"appid": APPID, "mch_id": MCH_ID, "sub_mch_id": SUB_MCH_ID, "sign_type": "HMAC-SHA256"}

    def close(out_trade_no: str) -> None:
        fields = {**fixed, "out_trade_no": out_trade_no, "nonce_str": secrets.token_hex(16)}
        signed = "&".join(f"{k}={fields[k]}" for k in sorted(fields)) + f"&key={API_KEY}"
        fields["sign"] = hmac.new(key, signed.encode(), hashlib.sha256).hexdigest().upper()
        body = "<xml>" + "".join(f"<{k}>{v}</{k}>" for k, v in fields.items()) + "</xml>"
        connection.request("POST", CLOSEORDER_PATH, body.encode(), headers)
        root = ElementTree.fromstring(connection.getresponse().read())
        if root.findtext("result_code") != "SUCCESS":
            raise RuntimeError("http.client floor: the close did not succeed")

    return close


SENDERS: dict[str, Callable[..., Close]] = {"ours": ours, "wechatpy": wechatpy, "http.client": http_client_floor}


def order_numbers() -> Callable[[], str]:
    """A fresh out_trade_no per call, unique across processes, so every answer is a first close."""
    prefix = "B" + secrets.token_hex(5)
    counter = itertools.count()
    return lambda: f"{prefix}{next(counter):09d}"
