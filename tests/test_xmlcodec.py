"""The flat `<xml>` documents of WeChat Pay v2: encoding requests, decoding (hostile) answers."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from django_wxpay_close.wechat import DEFAULT_MAX_BODY_BYTES, InvalidXMLBody, decode_xml, encode_xml

# The response example of the seed page, verbatim: CDATA values, indentation and newlines between elements.
SEED_RESPONSE = b"""<xml>
   <return_code><![CDATA[SUCCESS]]></return_code>
   <return_msg><![CDATA[OK]]></return_msg>
   <appid><![CDATA[wx2421b1c4370ec43b]]></appid>
   <mch_id><![CDATA[10000100]]></mch_id>
   <nonce_str><![CDATA[BFK89FC6rxKCOjLX]]></nonce_str>
   <sign><![CDATA[72B321D92A7BFA0B2509F3D13C7B1631]]></sign>
   <result_code><![CDATA[SUCCESS]]></result_code>
</xml>"""

NGINX_502 = (
    b"<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n"
    b"<center><h1>502 Bad Gateway</h1></center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n"
)
BILLION_LAUGHS = b"""<?xml version="1.0"?>
<!DOCTYPE xml [
  <!ENTITY lol "lol">
  <!ENTITY lol1 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
  <!ENTITY lol2 "&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;">
  <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
  <!ENTITY lol4 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">
]>
<xml><return_msg>&lol4;</return_msg></xml>"""
XXE = b"""<?xml version="1.0"?>
<!DOCTYPE xml [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>
<xml><return_msg>&xxe;</return_msg></xml>"""

# Code points XML 1.0 cannot carry, even escaped.
XML_ILLEGAL = [chr(c) for c in (*range(0x00, 0x09), 0x0B, 0x0C, *range(0x0E, 0x20), 0xFFFE, 0xFFFF)]

field_names = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,15}", fullmatch=True)
xml_text = st.text(st.characters(exclude_categories=("Cs",), exclude_characters=XML_ILLEGAL), max_size=40)
# Pieces of XML and junk bytes, so the fuzzer reaches the parser and not only the UTF-8 check.
XML_FRAGMENTS = [
    b"<xml>", b"</xml>", b"<a>", b"</a>", b"<b/>", b"<![CDATA[", b"]]>", b"<!DOCTYPE xml>", b"<!--", b"-->",
    b'<?xml version="1.0" encoding="GBK"?>', b"&amp;", b"&#0;", b"&#x10FFFF;", b"&e;", b"\xef\xbb\xbf", b"\xe4\xb8\xad",
    b'<a x="1">', b"<ns:a xmlns:ns='u'>", b" \n",
]
xmlish_bytes = st.one_of(
    st.binary(max_size=64),
    st.lists(st.one_of(st.sampled_from(XML_FRAGMENTS), st.binary(max_size=3)), max_size=12).map(b"".join),
)


def assert_refused(body: bytes, match: str | None = None, **kwargs: int) -> InvalidXMLBody:
    """decode_xml refuses `body` with InvalidXMLBody, chaining no parser exception."""
    with pytest.raises(InvalidXMLBody, match=match) as excinfo:
        decode_xml(body, **kwargs)
    error = excinfo.value
    assert type(error) is InvalidXMLBody
    assert error.__cause__ is None
    assert error.__context__ is None or error.__suppress_context__
    return error


# --- encoding ----------------------------------------------------------------------------------


def test_encode_writes_a_flat_xml_document_in_field_order() -> None:
    body = encode_xml({"appid": "wx1", "mch_id": "10000100"})

    assert body == b"<xml><appid>wx1</appid><mch_id>10000100</mch_id></xml>"


def test_encode_escapes_ampersand_and_angle_brackets() -> None:
    assert b"<body>Tom &amp; Jerry &lt;DVD&gt; ]]&gt;</body>" in encode_xml({"body": "Tom & Jerry <DVD> ]]>"})


def test_encode_writes_non_ascii_as_utf8() -> None:
    assert "<body>微信支付</body>".encode() in encode_xml({"body": "微信支付"})


def test_escaped_and_non_ascii_values_round_trip() -> None:
    fields = {"body": "Tom & Jerry <DVD>", "detail": "微信支付 Ünïcödé 😀", "attach": "a>b&&c<"}

    assert decode_xml(encode_xml(fields)) == fields


def test_carriage_returns_survive_the_round_trip() -> None:
    # A literal CR would be read back as LF (XML end-of-line handling) and break the signature.
    fields = {"detail": "line1\r\nline2\rline3\n"}

    assert decode_xml(encode_xml(fields)) == fields


@pytest.mark.parametrize("char", ["\x00", "\x08", "\x0b", "\x1b", "\ufffe", "\ud800"], ids=repr)
def test_encode_refuses_an_xml_illegal_character_naming_the_field(char: str) -> None:
    with pytest.raises(ValueError, match="'attach'"):
        encode_xml({"appid": "wx1", "attach": f"a{char}b"})


@pytest.mark.parametrize("name", ["", "1abc", "a b", "a<b", "sign>"])
def test_encode_refuses_a_name_that_is_not_an_xml_element_name(name: str) -> None:
    with pytest.raises(ValueError, match="invalid XML field name"):
        encode_xml({name: "x"})


# --- decoding what WeChat sends ------------------------------------------------------------------


def test_decode_reads_the_seed_response_with_cdata_and_whitespace_between_elements() -> None:
    assert decode_xml(SEED_RESPONSE) == {
        "return_code": "SUCCESS",
        "return_msg": "OK",
        "appid": "wx2421b1c4370ec43b",
        "mch_id": "10000100",
        "nonce_str": "BFK89FC6rxKCOjLX",
        "sign": "72B321D92A7BFA0B2509F3D13C7B1631",
        "result_code": "SUCCESS",
    }


def test_decode_reads_an_empty_element_as_the_empty_string() -> None:
    assert decode_xml(b"<xml><err_code/><err_code_des></err_code_des></xml>") == {"err_code": "", "err_code_des": ""}


def test_decode_ignores_a_lying_encoding_declaration() -> None:
    body = '<?xml version="1.0" encoding="GBK"?><xml><return_msg>签名错误</return_msg></xml>'.encode()

    assert decode_xml(body) == {"return_msg": "签名错误"}


def test_decode_accepts_a_utf8_byte_order_mark() -> None:
    assert decode_xml(b"\xef\xbb\xbf<xml><a>1</a></xml>") == {"a": "1"}


def test_decode_accepts_a_body_of_exactly_max_bytes() -> None:
    body = b"<xml><a>" + b"x" * 100 + b"</a></xml>"

    assert decode_xml(body, max_bytes=len(body)) == {"a": "x" * 100}


# --- decoding refusals -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "match"),
    [
        pytest.param(b"", "empty", id="empty"),
        pytest.param(b" \r\n\t ", "empty", id="whitespace-only"),
        pytest.param(b"<xml><a>\xff\xfe</a></xml>", "not UTF-8", id="invalid-utf8"),
        pytest.param("<xml><a>中</a></xml>".encode("gbk"), "not UTF-8", id="gbk-bytes"),
        pytest.param(NGINX_502, "malformed", id="html-page"),
        pytest.param(b"<html><body><h1>Service Unavailable</h1></body></html>", "root element", id="html-wellformed"),
        pytest.param(b"Service Unavailable", "malformed", id="plain-text"),
        pytest.param(b'{"return_code": "SUCCESS"}', "malformed", id="json"),
        pytest.param(SEED_RESPONSE[:-20], "malformed", id="truncated"),
        pytest.param(b"<response><a>1</a></response>", "root element", id="wrong-root"),
        pytest.param(b"<xml><a><b>1</b></a></xml>", "nested", id="nested"),
        pytest.param(b"<xml><err_code>A</err_code><err_code>B</err_code></xml>", "twice", id="duplicate"),
        pytest.param(b"<xml><a>1</a></xml><xml/>", "malformed", id="two-roots"),
        pytest.param(b"<!DOCTYPE xml><xml><a>1</a></xml>", "forbidden", id="doctype"),
        pytest.param(BILLION_LAUGHS, "forbidden", id="billion-laughs"),
        pytest.param(XXE, "forbidden", id="xxe-file"),
        pytest.param(b"<xml><a>&undeclared;</a></xml>", "malformed", id="undeclared-entity"),
        pytest.param(b"<xml><a>&#0;</a></xml>", "malformed", id="nul-reference"),
    ],
)
def test_decode_refuses_with_invalid_xml_body(body: bytes, match: str) -> None:
    assert_refused(body, match)


def test_decode_refuses_a_body_over_max_bytes() -> None:
    body = b"<xml><a>" + b"x" * 100 + b"</a></xml>"

    assert_refused(body, f"body of {len(body)} bytes exceeds the {len(body) - 1}-byte limit", max_bytes=len(body) - 1)


def test_decode_refuses_a_body_over_the_default_cap() -> None:
    body = b"<xml><a>" + b"x" * DEFAULT_MAX_BODY_BYTES + b"</a></xml>"

    assert_refused(body, "exceeds")


def test_decode_refuses_external_entities_without_reading_the_file() -> None:
    error = assert_refused(XXE)

    assert "root:" not in str(error)


# --- properties --------------------------------------------------------------------------------


@settings(max_examples=200)
@given(fields=st.dictionaries(field_names, xml_text, max_size=8))
def test_encode_then_decode_round_trips_any_xml_legal_text(fields: dict[str, str]) -> None:
    assert decode_xml(encode_xml(fields)) == fields


@settings(max_examples=200)
@given(body=xmlish_bytes)
def test_decode_of_arbitrary_bytes_gives_a_dict_of_str_or_invalid_xml_body(body: bytes) -> None:
    try:
        fields = decode_xml(body)
    except InvalidXMLBody:
        return
    assert isinstance(fields, dict)
    assert all(isinstance(name, str) and isinstance(value, str) for name, value in fields.items())
