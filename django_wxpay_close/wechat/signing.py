"""WeChat Pay v2 signatures (MD5 and HMAC-SHA256), as docs/protocol.md#signature describes them.

Both directions use the same rule, so the simulator and the client share this module.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Mapping
from enum import Enum

__all__ = ["SignType", "signing_string", "compute_signature", "verify_signature", "new_nonce"]


class SignType(str, Enum):
    MD5 = "MD5"
    HMAC_SHA256 = "HMAC-SHA256"

    @classmethod
    def parse(cls, value: str | SignType | None) -> SignType:
        """An absent sign type means MD5 (the API's default); anything else unknown is an error."""
        if value is None or value == "":
            return cls.MD5
        try:
            return cls(value)
        except ValueError:
            raise ValueError(
                f"unknown sign type {value!r}: expected one of {', '.join(t.value for t in cls)}"
            ) from None


def signing_string(fields: Mapping[str, str], api_key: str) -> str:
    """The string that is hashed: non-empty fields but `sign`, ASCII-sorted, raw values, then the key."""
    pairs = sorted((name, value) for name, value in fields.items() if name != "sign" and value != "")
    return "&".join(f"{name}={value}" for name, value in pairs) + f"&key={api_key}"


def compute_signature(fields: Mapping[str, str], api_key: str, sign_type: SignType | str) -> str:
    """Upper-case hex MD5 or HMAC-SHA256 of `signing_string`; a plain "HMAC-SHA256" str counts too."""
    sign_type = SignType.parse(sign_type)  # an identity test on a str would silently fall back to MD5
    payload = signing_string(fields, api_key).encode("utf-8")
    if sign_type is SignType.HMAC_SHA256:
        digest = hmac.new(api_key.encode("utf-8"), payload, hashlib.sha256).hexdigest()
    else:
        digest = hashlib.md5(payload, usedforsecurity=False).hexdigest()
    return digest.upper()


def verify_signature(fields: Mapping[str, str], api_key: str, sign_type: SignType | str) -> bool:
    """True only when `fields` carries a `sign` equal to ours, compared in constant time."""
    received = fields.get("sign", "")
    if not received:
        return False
    expected = compute_signature(fields, api_key, sign_type)
    # compare_digest on bytes: a non-ASCII str would raise TypeError instead of returning False.
    return hmac.compare_digest(expected.encode("utf-8"), received.encode("utf-8", "surrogatepass"))


def new_nonce() -> str:
    """32 hex characters from the OS CSPRNG: the longest nonce the API takes."""
    return secrets.token_hex(16)
