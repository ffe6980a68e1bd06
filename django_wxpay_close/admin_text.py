"""Texts the app stores in English, shown in the reader's language.

A payment notification's `detail` is written once, in English, by notifications.py (with the wire codec's
words for an unreadable body) and is never edited. The admin shows it translated: each "; "-separated part that
has one of the shapes below is rendered from its catalogue entry with the values it holds; any other part (a
settings error, a parser's message, a shape added since) is shown as stored.
"""

from __future__ import annotations

import re
from functools import lru_cache

from django.utils.translation import gettext, gettext_noop, pgettext

# The shapes of the parts of a stored detail, exactly as notifications.py and wechat/xmlcodec.py word them.
DETAIL_PARTS = (
    gettext_noop("no merchant in WXPAY_CLOSE['MERCHANTS'] has mch_id %(mch_id)s"),
    gettext_noop("the body carries no sign"),
    gettext_noop("the sign does not verify with the key and sign type (%(sign_type)s) of merchant %(merchant)s"),
    gettext_noop("the body names sign_type %(sign_type)s, which is never used to verify"),
    gettext_noop("the payment did not succeed (%(codes)s)"),
    gettext_noop("no order %(out_trade_no)s of merchant %(merchant)s (sub_mch_id %(sub_mch_id)s)"),
    gettext_noop("WeChat will notify again"),
    gettext_noop("total_fee %(total_fee)s but the order's amount is %(amount)s"),
    gettext_noop("fee_type %(fee_type)s but the order's currency is %(currency)s"),
    gettext_noop("not recorded as paid"),
    gettext_noop("WeChat took a payment (transaction_id %(transaction_id)s) for an order we had closed"),
    gettext_noop("it stays closed: refund the payer or fulfil the order"),
    gettext_noop("already recorded"),
    gettext_noop("empty body"),
    gettext_noop("body of %(size)s bytes exceeds the %(limit)s-byte limit"),
    gettext_noop("body is not UTF-8 (%(reason)s at byte %(position)s)"),
    gettext_noop("forbidden XML construct: %(construct)s"),
    gettext_noop("malformed XML: %(error)s"),
    gettext_noop("root element is <%(tag)s>, expected <xml>"),
    gettext_noop("element <%(tag)s> is nested"),
    gettext_noop("WeChat documents are flat"),
    gettext_noop("element <%(tag)s> appears twice"),
)

_PLACEHOLDER = re.compile(r"%\\\(([a-z_]+)\\\)s")


@lru_cache(maxsize=1)
def _patterns() -> tuple[tuple[re.Pattern[str], str], ...]:
    return tuple((re.compile(_PLACEHOLDER.sub(r"(?P<\1>.+?)", re.escape(shape)), re.DOTALL), shape)
                 for shape in DETAIL_PARTS)


def _translated_part(part: str) -> str:
    for pattern, shape in _patterns():
        match = pattern.fullmatch(part)
        if match:
            return gettext(shape) % match.groupdict()
    return part


def translated_detail(detail: str) -> str:
    """The stored detail in the active language, part by part (the parts' values as stored)."""
    if not detail:
        return ""
    # Translators: joins the parts of a notification's detail; Chinese uses "；".
    return pgettext("detail parts separator", "; ").join(_translated_part(part) for part in detail.split("; "))
