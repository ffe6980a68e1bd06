"""What a closeorder answer means, as the outcome table in docs/protocol.md#outcomes says, and the checks every
answer of the API passes before its fields are believed. No I/O here."""

from __future__ import annotations

from collections.abc import Mapping
from enum import Enum

__all__ = ["AnswerFields", "Outcome", "answer_failure", "classify_answer", "contradiction"]


class AnswerFields:
    """The fields every WeChat answer may carry, read from its parsed `response_fields` ("" when absent)."""

    response_fields: Mapping[str, str]

    @property
    def return_code(self) -> str:
        return self.response_fields.get("return_code", "")

    @property
    def return_msg(self) -> str:
        return self.response_fields.get("return_msg", "")

    @property
    def result_code(self) -> str:
        return self.response_fields.get("result_code", "")

    @property
    def err_code(self) -> str:
        return self.response_fields.get("err_code", "")

    @property
    def err_code_des(self) -> str:
        return self.response_fields.get("err_code_des", "")


class Outcome(str, Enum):
    """The classification of one closeorder exchange; its value is what the audit stores."""

    CLOSED = "closed"  # result_code SUCCESS
    ALREADY_CLOSED = "already_closed"  # ORDERCLOSED
    PAID = "paid"  # ORDERPAID: the payer paid; never mark it closed
    NOT_FOUND = "not_found"  # ORDERNOTEXIST: maybe still pending at WeChat
    RETRYABLE_ERROR = "retryable_error"  # SYSTEMERROR
    NETWORK_ERROR = "network_error"  # no HTTP answer: refused, reset, timeout
    INVALID_RESPONSE = "invalid_response"  # an HTTP answer that is not WeChat XML (5xx page, junk)
    CONFIGURATION_ERROR = "configuration_error"  # SIGNERROR or return_code FAIL: wrong key/sign type
    CLIENT_BUG = "client_bug"  # REQUIRE_POST_METHOD, XML_FORMAT_ERROR: our side sent it wrong
    # SUCCESS body whose signature is bad or missing, that echoes another merchant, or contradicts itself
    UNTRUSTED_RESPONSE = "untrusted_response"
    UNEXPECTED_ERROR = "unexpected_error"  # any other err_code, recorded verbatim

    @property
    def failed_in_transport(self) -> bool:
        """No WeChat answer came back (no HTTP answer, or one that is not WeChat's XML)."""
        return self in (Outcome.NETWORK_ERROR, Outcome.INVALID_RESPONSE)

    @property
    def order_is_closed(self) -> bool:
        return self in (Outcome.CLOSED, Outcome.ALREADY_CLOSED)

    @property
    def is_retryable(self) -> bool:
        """The close may be tried again later with backoff (it is idempotent)."""
        return self in _RETRYABLE

    @property
    def halts_merchant(self) -> bool:
        """Every order of this merchant would fail the same way: stop calling for it in this run."""
        return self is Outcome.CONFIGURATION_ERROR

    @property
    def needs_attention(self) -> bool:
        """No automatic retry: a person has to look (bug, untrusted answer, unknown code)."""
        return self in (Outcome.CLIENT_BUG, Outcome.UNTRUSTED_RESPONSE, Outcome.UNEXPECTED_ERROR)


_RETRYABLE = frozenset(
    {Outcome.NOT_FOUND, Outcome.RETRYABLE_ERROR, Outcome.NETWORK_ERROR, Outcome.INVALID_RESPONSE}
)

_ERR_CODE_OUTCOMES: Mapping[str, Outcome] = {
    "ORDERCLOSED": Outcome.ALREADY_CLOSED,
    "ORDERPAID": Outcome.PAID,
    "ORDERNOTEXIST": Outcome.NOT_FOUND,
    "SYSTEMERROR": Outcome.RETRYABLE_ERROR,
    "SIGNERROR": Outcome.CONFIGURATION_ERROR,
    "REQUIRE_POST_METHOD": Outcome.CLIENT_BUG,
    "XML_FORMAT_ERROR": Outcome.CLIENT_BUG,
}


def classify_answer(fields: Mapping[str, str], *, signature_verified: bool) -> tuple[Outcome, str]:
    """Outcome and a one-line reason for a parsed closeorder answer (HTTP 200, well-formed XML)."""
    return answer_failure(fields, signature_verified=signature_verified) or (Outcome.CLOSED, "")


def answer_failure(fields: Mapping[str, str], *, signature_verified: bool) -> tuple[Outcome, str] | None:
    """Why a parsed answer (of any API) cannot be taken at its word, or None for a verified, self-consistent
    result_code SUCCESS, whose other fields the caller then reads."""
    return_code = fields.get("return_code", "")
    if return_code == "FAIL":
        return Outcome.CONFIGURATION_ERROR, f"return_code FAIL: {fields.get('return_msg', '') or 'no return_msg'}"
    if return_code != "SUCCESS":
        return Outcome.INVALID_RESPONSE, f"return_code is {return_code!r}, expected SUCCESS or FAIL"
    if not signature_verified:
        if fields.get("err_code") == "SIGNERROR":
            # A wrong key cannot verify WeChat's answer either; neither outcome changes the order.
            return Outcome.CONFIGURATION_ERROR, "SIGNERROR (answer unverifiable: the API key or sign type is wrong)"
        reason = "missing" if not fields.get("sign") else "does not verify"
        return Outcome.UNTRUSTED_RESPONSE, f"SUCCESS body whose signature {reason}"
    result_code = fields.get("result_code", "")
    err_code = fields.get("err_code", "")
    if result_code == "SUCCESS":
        if err_code:
            # Signed, yet it says both "done" and "failed": believing either half could settle the order wrongly.
            return Outcome.UNTRUSTED_RESPONSE, contradiction(result_code, err_code)
        return None
    reason = f"{err_code}: {fields.get('err_code_des', '')}".rstrip(": ") if err_code else (
        f"result_code {result_code!r} without err_code"
    )
    return _ERR_CODE_OUTCOMES.get(err_code, Outcome.UNEXPECTED_ERROR), reason


def contradiction(result_code: str, err_code: str) -> str:
    """The reason recorded for a verified answer whose result_code and err_code contradict each other."""
    return f"contradictory answer: result_code {result_code} with err_code {err_code}"
