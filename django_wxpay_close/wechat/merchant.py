"""Who calls and what may be sent: the merchant's IDs and key, and the rules every request field obeys."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from .signing import SignType

__all__ = ["API_KEY_LENGTH", "OUT_TRADE_NO_PATTERN", "InvalidRequestField", "Merchant", "check_id",
           "validate_out_trade_no"]

API_KEY_LENGTH = 32
# The one definition of a valid out_trade_no: the client checks it before sending and the model field validates
# with it. `\Z`, not `$`: `$` would also accept a trailing newline ("ORDER1\n").
OUT_TRADE_NO_PATTERN = r"^[A-Za-z0-9_\-|*@]{1,32}\Z"
_OUT_TRADE_NO = re.compile(OUT_TRADE_NO_PATTERN)
_MAX_ID_LENGTH = 32


class InvalidRequestField(ValueError):
    """Our own input is wrong; raised before anything is sent. `field` names the culprit."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"{field_name}: {message}")
        self.field = field_name


def validate_out_trade_no(out_trade_no: str) -> None:
    if not isinstance(out_trade_no, str) or not _OUT_TRADE_NO.match(out_trade_no):
        raise InvalidRequestField(
            "out_trade_no",
            f"{out_trade_no!r} must be 1-32 characters of letters, digits and _ - | * @",
        )


def check_id(field_name: str, value: str | None, *, required: bool) -> None:
    """An ID field (appid, mch_id, transaction_id, ...): at most 32 printable ASCII characters, no padding."""
    if value is None or value == "":
        if required:
            raise InvalidRequestField(field_name, "is required")
        return
    if not isinstance(value, str):
        raise InvalidRequestField(field_name, f"must be a string, not {type(value).__name__}")
    if len(value) > _MAX_ID_LENGTH or not value.isascii() or not value.isprintable() or value.strip() != value:
        raise InvalidRequestField(field_name, f"{value!r} must be at most 32 printable ASCII characters")


@dataclass(frozen=True)
class Merchant:
    """Who calls: the IDs that go into the request and the key that signs it (never shown)."""

    appid: str
    mch_id: str
    sub_mch_id: str
    api_key: str = field(repr=False)
    sign_type: SignType = SignType.HMAC_SHA256
    sub_appid: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "sign_type", SignType.parse(self.sign_type))
        for name in ("appid", "mch_id", "sub_mch_id"):
            check_id(name, getattr(self, name), required=True)
        check_id("sub_appid", self.sub_appid, required=False)
        if not isinstance(self.api_key, str) or len(self.api_key) != API_KEY_LENGTH or not self.api_key.isascii():
            # Never echo the key itself, not even a wrong one.
            raise InvalidRequestField("api_key", f"must be {API_KEY_LENGTH} ASCII characters")
