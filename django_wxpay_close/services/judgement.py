"""What a run learns from its answers: whether WeChat looks unreachable, which merchants to halt, and whether a
failure spends one of the order's retries.

The rule for retries, in one sentence: every failed exchange spends a retry, except one that outlived its
claim's lease (the process, not WeChat, was too slow) and those the run judges part of an outage: when it
stops for one, it gives back the retries its recent transport failures spent.

The HTTP workers call `learn` as each answer arrives, so a halt or an outage stops the requests queued behind it
at once. The retries to give back are given back by the engine when the run ends, after every answer is written.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter, deque
from dataclasses import dataclass

from django.utils.translation import gettext_noop

from ..wechat import CloseResult, Outcome, QueryResult
from .jobs import exchange_outcome

logger = logging.getLogger("django_wxpay_close")

# A merchant is halted for the rest of a run after this many of its orders in a row hit a configuration error:
# one such order may be poison (an order-specific FAIL), two in a row mean the key or sign type is wrong.
HALT_AFTER_CONFIGURATION_ERRORS = 2
# The circuit breaker: over the last BREAKER_WINDOW exchanges of a run, once at least BREAKER_MIN_EXCHANGES and
# at least BREAKER_SHARE of them failed in transport, WeChat is taken to be unreachable and the run stops.
BREAKER_WINDOW = 20
BREAKER_MIN_EXCHANGES = 5
BREAKER_SHARE = 0.8

MERCHANT_HALTED = gettext_noop(
    "its merchant is halted for this run: two of its orders in a row hit a configuration error")


@dataclass(frozen=True)
class _Exchange:
    order_id: int
    failed_in_transport: bool
    spent_retry: bool


class Judgement:
    def __init__(self) -> None:
        self.halted: dict[str, str] = {}  # merchant -> why
        self.unreachable = ""  # why the run judged WeChat unreachable, once it has
        self._configuration_errors: Counter[str] = Counter()
        self.given_back: list[int] = []  # orders whose transport failure's retry is given back
        self._recent: deque[_Exchange] = deque(maxlen=BREAKER_WINDOW)
        self._lock = threading.Lock()

    def learn(self, order_id: int, merchant: str, result: CloseResult | QueryResult, *,
              outlived_lease: bool) -> bool:
        """Note one answer (a close's or a query's); returns whether, if it is a failure, it spends one of the
        order's retries."""
        outcome = exchange_outcome(result)
        with self._lock:
            if outcome is Outcome.CONFIGURATION_ERROR:
                self._configuration_error(merchant, result.reason)
            elif result.signature_verified:  # a verified answer proves the key and sign type work
                self._configuration_errors[merchant] = 0
            if outlived_lease:  # the process was paused or starved: the exchange says nothing about WeChat
                return False
            spends_retry = not self.unreachable
            failed_in_transport = outcome is not None and outcome.failed_in_transport
            self._recent.append(_Exchange(order_id, failed_in_transport, spends_retry))
            failures = sum(exchange.failed_in_transport for exchange in self._recent)
            if self.unreachable or len(self._recent) < BREAKER_MIN_EXCHANGES or \
                    failures < BREAKER_SHARE * len(self._recent):
                return spends_retry
            self.unreachable = (f"WeChat looks unreachable: {failures} of the last {len(self._recent)} requests "
                                f"failed in transport (last: {result.reason})")
            logger.error("Stopping the run early: %s", self.unreachable,
                         extra={"outcome": outcome.value if outcome else ""})
            self.given_back = [exchange.order_id for exchange in self._recent
                               if exchange.failed_in_transport and exchange.spent_retry]
            return spends_retry

    def configuration_error(self, merchant: str, reason: str) -> None:
        with self._lock:
            self._configuration_error(merchant, reason)

    def _configuration_error(self, merchant: str, reason: str) -> None:
        """Two in a row halt the merchant for the rest of the run."""
        self._configuration_errors[merchant] += 1
        if self._configuration_errors[merchant] >= HALT_AFTER_CONFIGURATION_ERRORS and merchant not in self.halted:
            self.halted[merchant] = reason
            logger.error("Stopped closing orders of merchant %r for this run: %s", merchant, reason,
                         extra={"merchant": merchant, "outcome": Outcome.CONFIGURATION_ERROR.value})
