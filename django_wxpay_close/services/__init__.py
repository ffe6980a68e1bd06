"""The only code that calls WeChat and changes an order's state.

- closing.py: `sweep_expired_orders`, `close_orders`, `close_order`, `check_orders` and `check_order`, all on
  one engine;
- engine.py: the engine, which claims, sends and records closes and queries (jobs.py: what its threads hand each
  other; recording.py: the statements that record their answers);
- decisions.py: what an answer (a close's, a query's) means for its order; judgement.py: what a run learns from
  its answers;
- guards.py: what keeps the engine's thread honest (no caller's transaction, reconnects, the first Ctrl-C);
- reorder.py: `close_before_reorder`, the verdict a shop asks before creating a new order;
- orders.py: recording orders and payments, lifting a hold (no request is sent).

What a run reports (actions, counts, summaries, exit statuses) is in ../reports.py.
"""

from ..reports import CloseAction, CloseReport, OrderCloseResult
from .closing import check_order, check_orders, close_order, close_orders, sweep_expired_orders
from .engine import ABANDONED
from .guards import DatabaseUnavailable
from .orders import InvalidTransition, create_order, lift_hold, paid_amount_mismatch, record_payment
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
    "check_order",
    "check_orders",
    "close_before_reorder",
    "close_order",
    "close_orders",
    "create_order",
    "lift_hold",
    "paid_amount_mismatch",
    "record_payment",
    "sweep_expired_orders",
]
