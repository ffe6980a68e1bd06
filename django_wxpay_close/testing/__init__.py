"""Test helpers that need no Django: a loopback WeChat Pay simulator (closeorder, orderquery, notifications) and
the demo merchant it knows.

Fixtures for pytest live in `django_wxpay_close.testing.pytest_plugin`; `python -m django_wxpay_close.testing`
runs the simulator from the command line.
"""

from .simulator import (
    API_KEY,
    APPID,
    MCH_ID,
    SUB_MCH_ID,
    Fault,
    FaultRule,
    OrderKey,
    OrderState,
    Payment,
    RecordedRequest,
    UnknownOrders,
    WeChatPaySimulator,
)

__all__ = [
    "API_KEY",
    "APPID",
    "MCH_ID",
    "SUB_MCH_ID",
    "Fault",
    "FaultRule",
    "OrderKey",
    "OrderState",
    "Payment",
    "RecordedRequest",
    "UnknownOrders",
    "WeChatPaySimulator",
]
