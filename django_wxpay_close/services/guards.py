"""What keeps the engine's database thread honest when its surroundings fail: it refuses to run inside a caller's
transaction, reconnects after a lost database connection (or gives up with `DatabaseUnavailable`), and turns the
first Ctrl-C into a flag instead of an exception in the middle of a write."""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from django.db import InterfaceError, OperationalError, connections, transaction

from ..reports import CloseReport

logger = logging.getLogger("django_wxpay_close")
T = TypeVar("T")

# Reconnect delays (seconds) after a lost database connection; then the database counts as unavailable.
DATABASE_RETRY_DELAYS = (0.2, 0.5, 1.0, 2.0, 4.0)


class DatabaseUnavailable(Exception):
    """The database stayed away through every reconnect; `report` holds what the run did until then.

    Every answer that could not be written was logged at ERROR (out_trade_no, outcome, response body).
    """

    def __init__(self, message: str, report: CloseReport | None = None) -> None:
        super().__init__(message)
        self.report = report


def require_autocommit(using: str) -> None:
    """The services send requests, so they must not run inside `transaction.atomic()`: a rollback of the caller's
    transaction would erase the audit rows of requests that really went out."""
    if transaction.get_connection(using).in_atomic_block:
        raise transaction.TransactionManagementError(
            "django_wxpay_close services send requests to WeChat and must run outside transaction.atomic(): "
            "a rollback would erase the audit rows of requests that really went out."
        )


def with_database(using: str, step: Callable[[], T]) -> T:
    """Run `step` (one transaction, or a read); after a lost connection reconnect and run it again, and after
    the last try raise `DatabaseUnavailable`."""
    for delay in (*DATABASE_RETRY_DELAYS, None):
        try:
            return step()
        except (OperationalError, InterfaceError) as exc:
            connections[using].close()  # the next query opens a new connection
            if delay is None:
                first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise DatabaseUnavailable(f"the database is unavailable: {first_line}") from exc
            logger.warning("Lost the database connection (%s); reconnecting in %.1fs", exc, delay)
            time.sleep(delay)
    raise AssertionError("unreachable: the last try raises")


@contextmanager
def first_ctrl_c_calls(on_first: Callable[[], None]) -> Iterator[None]:
    """The first Ctrl-C (SIGINT) only calls `on_first`: the caller stops claiming and sending and writes what is
    in flight, without an exception landing in the middle of a claim or a write. A second one does what SIGINT
    did before (KeyboardInterrupt: stop now). Signal handlers belong to the main thread: elsewhere (the admin
    action in a web worker thread) nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def first(signum: int, frame: Any) -> None:
        on_first()
        signal.signal(signal.SIGINT, previous)

    previous = signal.signal(signal.SIGINT, first)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
