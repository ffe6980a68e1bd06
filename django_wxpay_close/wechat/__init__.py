"""The WeChat Pay v2 wire protocol for closeorder and orderquery: signing, XML, the HTTP client, outcome
classification, and the payment notifications WeChat sends back.

Nothing in this package imports Django; the simulator and the benchmarks use it as it is.
"""

from .client import CLOSEORDER_PATH, CloseOrderClient, CloseResult, PreparedClose
from .merchant import OUT_TRADE_NO_PATTERN, InvalidRequestField, Merchant, validate_out_trade_no
from .notification import Notification, notification_reply, read_notification
from .outcomes import Outcome, classify_answer
from .query import ORDERQUERY_PATH, PreparedQuery, QueryResult, QueryVerdict, TradeState, classify_query
from .signing import SignType, compute_signature, new_nonce, signing_string, verify_signature
from .xmlcodec import DEFAULT_MAX_BODY_BYTES, InvalidXMLBody, decode_xml, encode_xml

__all__ = [
    "CLOSEORDER_PATH",
    "CloseOrderClient",
    "CloseResult",
    "DEFAULT_MAX_BODY_BYTES",
    "InvalidRequestField",
    "InvalidXMLBody",
    "Merchant",
    "Notification",
    "ORDERQUERY_PATH",
    "OUT_TRADE_NO_PATTERN",
    "Outcome",
    "PreparedClose",
    "PreparedQuery",
    "QueryResult",
    "QueryVerdict",
    "SignType",
    "TradeState",
    "classify_answer",
    "classify_query",
    "compute_signature",
    "decode_xml",
    "encode_xml",
    "new_nonce",
    "notification_reply",
    "read_notification",
    "signing_string",
    "validate_out_trade_no",
    "verify_signature",
]
