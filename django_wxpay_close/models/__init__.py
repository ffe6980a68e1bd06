"""The app's models, one file per table family: orders.py (orders, their states and transitions), audit.py (the
append-only trail of every exchange with WeChat) and notifications.py (payment notifications received). No HTTP
here: the services are the only writers of state."""

from .audit import (
    ANSWER_FIELDS,
    Api,
    AppendOnly,
    AppendOnlyQuerySet,
    AuditTrailError,
    CloseAttempt,
    CloseAttemptQuerySet,
    stored_text,
)
from .notifications import (
    UNAUTHENTICATED_VERDICTS,
    NotificationVerdict,
    PaymentNotification,
    PaymentNotificationQuerySet,
    UnauthenticatedNotificationCount,
)
from .orders import (
    ALLOWED_TRANSITIONS,
    OUTCOME_LABELS,
    QUERY_OUTCOME_LABELS,
    STORED_OUTCOME_LABELS,
    Order,
    OrderState,
    Trigger,
    out_trade_no_validator,
    write_database,
)

__all__ = [
    "ALLOWED_TRANSITIONS", "ANSWER_FIELDS", "OUTCOME_LABELS", "QUERY_OUTCOME_LABELS", "STORED_OUTCOME_LABELS",
    "UNAUTHENTICATED_VERDICTS", "Api", "AppendOnly", "AppendOnlyQuerySet", "AuditTrailError", "CloseAttempt",
    "CloseAttemptQuerySet", "NotificationVerdict", "Order", "OrderState", "PaymentNotification",
    "PaymentNotificationQuerySet", "Trigger", "UnauthenticatedNotificationCount", "out_trade_no_validator",
    "stored_text", "write_database",
]
