"""The only code that calls WeChat and changes an order's state.

- engine.py: claims, sends and records closes; the sweep, the admin action and `close_order` all run on it;
- reorder.py: `close_before_reorder`, the verdict a shop asks before creating a new order;
- orders.py: recording orders and payments, lifting a hold (no request is sent).

What a run reports (actions, counts, summaries, exit statuses) is in ../reports.py.
"""

from ..reports import CloseAction, CloseReport, OrderCloseResult
from .engine import ABANDONED, DatabaseUnavailable, close_order, close_orders, sweep_expired_orders
from .orders import InvalidTransition, create_order, lift_hold, record_payment
from .reorder import ReorderAnswer, ReorderVerdict, close_before_reorder

__all__ = [
    "ABANDONED",
    "CloseAction",
    "CloseReport",
    "DatabaseUnavailable",
    "InvalidTransition",
    "OrderCloseResult",
    "ReorderAnswer",
    "ReorderVerdict",
    "close_before_reorder",
    "close_order",
    "close_orders",
    "create_order",
    "lift_hold",
    "record_payment",
    "sweep_expired_orders",
]
