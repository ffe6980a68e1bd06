"""The simulator's notifying side: WeChat's payment result notifications, posted to a shop's loopback notify_url."""

from __future__ import annotations

import ipaddress
import itertools
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from urllib.parse import urlsplit

from ..wechat import DEFAULT_MAX_BODY_BYTES, SignType, compute_signature, decode_xml, new_nonce
from .answers import PAYER_OPENID, beijing_time, cdata_xml
from .httpserver import XML_CONTENT_TYPE
from .scenarios import APPID, MCH_ID, SUB_MCH_ID, OrderKey, OrderState, Payment

__all__ = ["NotifyingSide"]

_LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})


def _check_loopback(url: str) -> None:
    """Notifications go to this machine only: the simulator must never post to a real shop."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    try:
        loopback = host in _LOOPBACK_NAMES or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if parts.scheme not in ("http", "https") or not loopback:
        raise ValueError(f"notifications are only sent to loopback http(s) URLs, not {url!r}")


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None  # urllib then raises the 3xx as an HTTPError, which post_notification returns


class NotifyingSide:
    """WeChatPaySimulator's methods that play the payment notifications; they share its lock and order table."""

    merchants: Mapping[str, str]
    _lock: threading.Lock
    _orders: dict[OrderKey, OrderState]
    _payments: dict[OrderKey, Payment]
    _last_notification: bytes | None
    _transaction_numbers: itertools.count[int]

    # -- payment notifications (WeChat's side of the shop's notify_url) ---------------------------------

    def notify(
        self,
        url: str,
        out_trade_no: str,
        *,
        total_fee: int,
        fee_type: str,
        mch_id: str = MCH_ID,
        sub_mch_id: str = SUB_MCH_ID,
        result_code: str = "SUCCESS",
        sign_type: SignType | str = SignType.HMAC_SHA256,
        claim_sign_type: str | None = None,
        tamper: bool = False,
        timeout: float = 10.0,
    ) -> tuple[int, bytes]:
        """The payer paid a known order: mark it PAID here, then POST WeChat's notification to `url`.

        Returns the HTTP status and the body the shop answered. The table is changed first, as at WeChat, and
        whatever the order's state (a payment for an order closed here is how a shop's incident path is tested);
        a close sent later answers ORDERPAID, a query SUCCESS with this payment. `total_fee`/`fee_type` are what
        the payer paid: pass other values than the shop's order has to send a wrong amount. `tamper=True` sends a
        forged body instead: a valid notification whose total_fee is changed after signing; the table is left as
        it is (nobody paid).
        A `result_code` other than SUCCESS reports a failed payment and leaves the table too. KeyError for an
        order the simulator does not know; for one, send `notification_body(...)` with `post_notification`.
        The body is kept for `replay_last_notification`.
        """
        key = OrderKey(mch_id, sub_mch_id, out_trade_no)
        body = self.notification_body(
            out_trade_no, total_fee=total_fee, fee_type=fee_type, mch_id=mch_id, sub_mch_id=sub_mch_id,
            result_code=result_code, sign_type=sign_type, claim_sign_type=claim_sign_type, tamper=tamper,
        )
        _check_loopback(url)
        with self._lock:
            if key not in self._orders:
                raise KeyError(key)
            if result_code == "SUCCESS" and not tamper:
                self._orders[key] = OrderState.PAID
                sent = decode_xml(body)
                self._payments[key] = Payment(total_fee, fee_type, sent["transaction_id"], sent["time_end"])
            self._last_notification = body
        return self.post_notification(url, body, timeout=timeout)

    def notification_body(
        self,
        out_trade_no: str,
        *,
        total_fee: int,
        fee_type: str,
        mch_id: str = MCH_ID,
        sub_mch_id: str = SUB_MCH_ID,
        appid: str = APPID,
        sub_appid: str | None = None,
        result_code: str = "SUCCESS",
        sign_type: SignType | str = SignType.HMAC_SHA256,
        claim_sign_type: str | None = None,
        tamper: bool = False,
    ) -> bytes:
        """A payment result notification as WeChat sends it (fields sorted, values in CDATA); no side effects.

        Signed with `mch_id`'s key (KeyError for a merchant the simulator does not know) and `sign_type`. Like
        WeChat's, the body names no sign_type unless `claim_sign_type` gives one (it is then signed too).
        """
        api_key = self.merchants[mch_id]
        now = time.time()
        fields = {
            "return_code": "SUCCESS",
            "return_msg": "OK",
            "appid": appid,
            "mch_id": mch_id,
            "sub_mch_id": sub_mch_id,
            "nonce_str": new_nonce(),
            "result_code": result_code,
            "openid": PAYER_OPENID,
            "is_subscribe": "N",
            "trade_type": "JSAPI",
            "bank_type": "OTHERS",
            "total_fee": str(total_fee),
            "fee_type": fee_type,
            "transaction_id": f"4200{int(now):010d}{next(self._transaction_numbers):014d}",
            "out_trade_no": out_trade_no,
            "time_end": beijing_time(now),
        }
        if sub_appid:
            fields["sub_appid"] = sub_appid
        if result_code != "SUCCESS":
            fields.update(err_code="SYSTEMERROR", err_code_des="System error")
        if claim_sign_type is not None:
            fields["sign_type"] = claim_sign_type
        fields["sign"] = compute_signature(fields, api_key, sign_type)
        if tamper:
            fields["total_fee"] = str(total_fee + 1)
        return cdata_xml(dict(sorted(fields.items())))

    def post_notification(self, url: str, body: bytes, *, timeout: float = 10.0) -> tuple[int, bytes]:
        """POST `body` (any bytes: a replay, a hostile body) to a loopback `url`: (HTTP status, answer body).

        No proxy and no redirects: a 3xx is returned as it came, as WeChat would count it a failure.
        """
        _check_loopback(url)
        request = urllib.request.Request(
            url, data=body, method="POST", headers={"Content-Type": XML_CONTENT_TYPE},
        )
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirects())
        try:
            with opener.open(request, timeout=timeout) as response:
                return int(response.status), bytes(response.read(DEFAULT_MAX_BODY_BYTES))
        except urllib.error.HTTPError as error:
            with error:
                return int(error.code), bytes(error.read(DEFAULT_MAX_BODY_BYTES))

    @property
    def last_notification(self) -> bytes | None:
        """The body `notify()` sent last, or None."""
        with self._lock:
            return self._last_notification

    def replay_last_notification(self, url: str, *, timeout: float = 10.0) -> tuple[int, bytes]:
        """Send the last `notify()` body again, byte for byte, as WeChat repeats a notification."""
        body = self.last_notification
        if body is None:
            raise RuntimeError("no notification was sent yet")
        return self.post_notification(url, body, timeout=timeout)
