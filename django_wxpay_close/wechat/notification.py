"""WeChat Pay v2 payment result notifications: what WeChat POSTs to the shop's notify_url, and the reply.

A notification is the same flat signed XML as an API answer, so it goes through the same hardened codec
(`decode_xml`: size cap, defusedxml, no DTDs) and the same constant-time `verify_signature`. Its signature
is checked with the sign type configured for the merchant, never the one the body names: WeChat signs a
notification with the sign type of the unified order and often leaves `sign_type` out (an HMAC-SHA256
notification would then read as MD5), and a body must not choose how it is checked.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from types import MappingProxyType

from .signing import SignType, verify_signature
from .xmlcodec import DEFAULT_MAX_BODY_BYTES, decode_xml, encode_xml

__all__ = ["CHINA_STANDARD_TIME", "Notification", "notification_reply", "read_notification"]

# time_end is Beijing time (GMT+8), whatever the merchant's country.
CHINA_STANDARD_TIME = timezone(timedelta(hours=8), "GMT+8")
_RETURN_MSG_LENGTH = 128  # return_msg is String(128)


@dataclass(frozen=True)
class Notification:
    """The fields of one decoded notification, believed only once `verify` says so."""

    fields: Mapping[str, str]

    def get(self, name: str) -> str:
        return self.fields.get(name, "")

    @property
    def return_code(self) -> str:
        return self.get("return_code")

    @property
    def result_code(self) -> str:
        return self.get("result_code")

    @property
    def appid(self) -> str:
        return self.get("appid")

    @property
    def mch_id(self) -> str:
        return self.get("mch_id")

    @property
    def sub_mch_id(self) -> str:
        return self.get("sub_mch_id")

    @property
    def sub_appid(self) -> str:
        return self.get("sub_appid")

    @property
    def out_trade_no(self) -> str:
        return self.get("out_trade_no")

    @property
    def transaction_id(self) -> str:
        return self.get("transaction_id")

    @property
    def total_fee(self) -> str:
        """As received: an integer in the currency's minor unit when WeChat sent it."""
        return self.get("total_fee")

    @property
    def fee_type(self) -> str:
        return self.get("fee_type")

    @property
    def claimed_sign_type(self) -> str:
        """The `sign_type` the body names ("" when absent): shown to people, never used to verify."""
        return self.get("sign_type")

    @property
    def total_fee_amount(self) -> int | None:
        """total_fee as a number; None when it is absent or not a plain non-negative integer."""
        value = self.total_fee
        return int(value) if value.isascii() and value.isdigit() else None

    @property
    def paid_at(self) -> datetime | None:
        """time_end (yyyyMMddHHmmss, GMT+8) as an aware datetime; None when absent or malformed."""
        value = self.get("time_end")
        if len(value) != 14 or not (value.isascii() and value.isdigit()):
            return None
        try:
            return datetime.strptime(value, "%Y%m%d%H%M%S").replace(tzinfo=CHINA_STANDARD_TIME)
        except ValueError:
            return None

    def verify(self, api_key: str, sign_type: SignType | str) -> bool:
        """True only for a `sign` made with `api_key` and the configured `sign_type` over every field received."""
        return verify_signature(self.fields, api_key, sign_type)


def read_notification(body: bytes, *, max_bytes: int = DEFAULT_MAX_BODY_BYTES) -> Notification:
    """Decode a notification body; raises `InvalidXMLBody` for anything but a flat `<xml>` within `max_bytes`."""
    return Notification(MappingProxyType(decode_xml(body, max_bytes=max_bytes)))


def notification_reply(*, success: bool, message: str = "") -> bytes:
    """The body WeChat expects back: SUCCESS/OK stops its retries; FAIL (with why) makes it notify again."""
    if success:
        return encode_xml({"return_code": "SUCCESS", "return_msg": "OK"})
    # Our own text, but keep it a one-line String(128) WeChat accepts.
    text = " ".join(message.split())[:_RETURN_MSG_LENGTH] or "FAIL"
    return encode_xml({"return_code": "FAIL", "return_msg": text})
