"""The flat `<xml><field>value</field>…</xml>` documents WeChat Pay v2 speaks.

Decoding is the one place hostile bytes meet a parser, so it is defusedxml only, size-capped,
and every failure becomes `InvalidXMLBody` (never a parser exception leaking out).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from xml.sax.saxutils import escape

from defusedxml import ElementTree as SafeElementTree
from defusedxml.common import DefusedXmlException

__all__ = ["DEFAULT_MAX_BODY_BYTES", "InvalidXMLBody", "encode_xml", "decode_xml"]

DEFAULT_MAX_BODY_BYTES = 64 * 1024

_FIELD_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# XML 1.0 forbids these code points outright; escaping cannot carry them.
_XML_ILLEGAL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff\ud800-\udfff]")
# A literal CR reaches the reader as LF (XML end-of-line normalisation); a character reference survives.
_ESCAPE_CR = {"\r": "&#13;"}


class InvalidXMLBody(ValueError):
    """A body that is not a flat WeChat XML document: empty, oversized, not UTF-8, malformed, or hostile."""


def encode_xml(fields: Mapping[str, str]) -> bytes:
    """UTF-8 bytes of `<xml>…</xml>`; values escaped (`&`, `<`, `>`, CR), non-ASCII kept as UTF-8."""
    parts = ["<xml>"]
    for name, value in fields.items():
        if not _FIELD_NAME.match(name):
            raise ValueError(f"invalid XML field name {name!r}")
        if _XML_ILLEGAL.search(value):
            raise ValueError(f"field {name!r} contains a character XML cannot carry")
        parts.append(f"<{name}>{escape(value, _ESCAPE_CR)}</{name}>")
    parts.append("</xml>")
    return "".join(parts).encode("utf-8")


def decode_xml(body: bytes, *, max_bytes: int = DEFAULT_MAX_BODY_BYTES) -> dict[str, str]:
    """Field name → text of a flat `<xml>` document. Raises `InvalidXMLBody` for anything else."""
    if not body or not body.strip():
        raise InvalidXMLBody("empty body")
    if len(body) > max_bytes:
        raise InvalidXMLBody(f"body of {len(body)} bytes exceeds the {max_bytes}-byte limit")
    try:
        text = body.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InvalidXMLBody(f"body is not UTF-8 ({exc.reason} at byte {exc.start})") from None
    try:
        # Parsing str, not bytes: expat then ignores a lying encoding declaration.
        root = SafeElementTree.fromstring(text, forbid_dtd=True, forbid_entities=True, forbid_external=True)
    except DefusedXmlException as exc:
        raise InvalidXMLBody(f"forbidden XML construct: {type(exc).__name__}") from None
    except (SyntaxError, ValueError, RecursionError) as exc:
        raise InvalidXMLBody(f"malformed XML: {exc}") from None
    if root.tag != "xml":
        raise InvalidXMLBody(f"root element is <{root.tag}>, expected <xml>")
    fields: dict[str, str] = {}
    for child in root:
        if len(child):
            raise InvalidXMLBody(f"element <{child.tag}> is nested; WeChat documents are flat")
        if child.tag in fields:
            raise InvalidXMLBody(f"element <{child.tag}> appears twice")
        fields[child.tag] = child.text or ""
    return fields
