"""What travels between the engine's database thread and its HTTP workers: a claimed order ready to send (a close
or a query), the answer a worker brings back, and how an answer is stored, logged and reported."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Protocol

from ..conf import CloseSettings
from ..models import CloseAttempt, Order, stored_text
from ..reports import CloseAction, OrderCloseResult
from ..wechat import (
    CloseOrderClient,
    CloseResult,
    InvalidRequestField,
    Merchant,
    Outcome,
    PreparedClose,
    PreparedQuery,
    QueryResult,
)
from .decisions import Decision, QueryPurpose, backoff

logger = logging.getLogger("django_wxpay_close")


@lru_cache(maxsize=64)
def cached_client(merchant: Merchant, base_urls: tuple[str, ...], connect_timeout: float, read_timeout: float,
                   max_response_bytes: int, pool_size: int) -> CloseOrderClient:
    """One client (and so one connection pool) per merchant and endpoint settings, reused across calls."""
    return CloseOrderClient(merchant, base_urls=base_urls, connect_timeout=connect_timeout, read_timeout=read_timeout,
                            max_response_bytes=max_response_bytes, pool_size=pool_size)


def exchange_outcome(result: CloseResult | QueryResult) -> Outcome | None:
    """A close's outcome, or a query's failure (None: WeChat answered the query with a trade_state)."""
    return result.outcome if isinstance(result, CloseResult) else result.failure


def audit_answer(result: CloseResult | QueryResult) -> dict[str, Any]:
    """An answer as its audit row stores it."""
    if isinstance(result, QueryResult):
        outcome, trade_state = result.outcome_value, result.trade_state.value if result.trade_state else ""
    else:
        outcome, trade_state = result.outcome.value, ""
    return {
        "url": result.url[:300],
        "failed_over_from": (result.failed_over_from or "")[:300],
        "duration_ms": round(result.elapsed * 1000),
        "http_status": result.http_status,
        "response_body": stored_text(result.response_body),
        "return_code": result.return_code[:16],
        "return_msg": result.return_msg[:128],
        "result_code": result.result_code[:16],
        "err_code": result.err_code[:32],
        "err_code_des": result.err_code_des[:128],
        "signature_verified": result.signature_verified,
        "outcome": outcome,
        "trade_state": trade_state,
        "reason": result.reason,
    }


def order_result(order: Order, action: CloseAction, reason: str = "", *,
                 result: CloseResult | QueryResult | None = None, attempt: CloseAttempt | None = None
                 ) -> OrderCloseResult:
    return OrderCloseResult(
        order_id=order.pk, out_trade_no=order.out_trade_no, merchant=order.merchant, action=action, reason=reason,
        outcome=exchange_outcome(result) if result else None, attempt_id=attempt.pk if attempt else None,
        duration=result.elapsed if result else 0.0, url=result.url if result else "",
    )


@dataclass(frozen=True)
class Job:
    """A claimed order whose audit row is committed and whose signed request (a close, or a query with its
    purpose) is ready to leave."""

    order: Order
    attempt: CloseAttempt
    client: CloseOrderClient
    prepared: PreparedClose | PreparedQuery
    lease_ends: float  # time.monotonic() by which the lease has surely ended (measured from before the claim)
    purpose: QueryPurpose | None = None  # a query's: what its answer may change

    def send(self) -> CloseResult | QueryResult:
        if isinstance(self.prepared, PreparedQuery):
            return self.client.query(self.prepared)
        return self.client.send(self.prepared)


@dataclass(frozen=True)
class Unsendable:
    """A claimed order whose request cannot be built or must not be sent: its UPDATE and what to report."""

    order: Order
    action: CloseAction
    reason: str
    values: dict[str, Any]


@dataclass(frozen=True)
class Answer:
    """What a worker brings back: WeChat's answer, or why the request was not sent."""

    job: Job
    result: CloseResult | QueryResult | None = None
    not_sent: str = ""
    outlived_lease: bool = False  # the exchange ended after the lease: another close may have the order now
    spends_retry: bool = False  # a failure spends one of the order's retries (the run's judgement)
    error: BaseException | None = None  # a bug in sending (the client never raises for the network's doing)


@dataclass(frozen=True)
class Verdict:
    """An answer with what it means for its order, waiting to be written."""

    answer: Answer
    decision: Decision

    @property
    def result(self) -> CloseResult | QueryResult:
        assert self.answer.result is not None  # only an answer WeChat gave has a decision
        return self.answer.result


class Caller(Protocol):
    """Who sends: the engine's settings and the audit fields of its caller."""

    settings: CloseSettings
    trigger: str
    user: Any
    actor: str
    workers: int

    def purpose_for(self, order: Order) -> QueryPurpose | None:
        """Why to ask WeChat about this claimed order, or None to close it."""


def prepare(order: Order, caller: Caller, lease_ends: float) -> Job | Unsendable:
    """Check a claimed order and sign its request, with its audit row ready to insert; or say why it cannot be
    sent (its merchant is gone or changed IDs: backed off like a configuration error; a field WeChat would
    refuse: on hold)."""
    settings = caller.settings
    problem = _configuration_problem(order, settings)
    if problem:
        spent, values = backoff(order, settings, spends_retry=True)
        return Unsendable(order, CloseAction.PUT_ON_HOLD if spent else CloseAction.CONFIGURATION_ERROR, problem,
                          {"last_error": problem, "last_outcome": Outcome.CONFIGURATION_ERROR.value, "on_hold": spent,
                           **values})
    client = cached_client(settings.merchants[order.merchant].merchant, settings.base_urls, settings.connect_timeout,
                           settings.read_timeout, settings.max_response_bytes, caller.workers)
    purpose = caller.purpose_for(order)
    overrides = {"sub_mch_id": order.sub_mch_id, "sub_appid": order.sub_appid or None}
    try:
        prepared: PreparedClose | PreparedQuery = client.prepare(order.out_trade_no, **overrides) \
            if purpose is None else client.prepare_query(order.out_trade_no, **overrides)
    except InvalidRequestField as exc:
        unbuildable = f"cannot build the request: {exc}"
        return Unsendable(order, CloseAction.PUT_ON_HOLD, unbuildable,
                          {"last_error": unbuildable, "last_outcome": Outcome.CLIENT_BUG.value, "on_hold": True})
    attempt = CloseAttempt(
        order=order, merchant=order.merchant, mch_id=order.mch_id, sub_mch_id=order.sub_mch_id,
        out_trade_no=order.out_trade_no, trigger=caller.trigger, user=caller.user, actor=caller.actor,
        api=prepared.api, url=(client.urls if purpose is None else client.query_urls)[0],
        sign_type=prepared.sign_type.value, request_xml=prepared.body.decode("utf-8"),
    )
    return Job(order, attempt, client, prepared, lease_ends, purpose)


def _configuration_problem(order: Order, settings: CloseSettings) -> str:
    configured = settings.merchants.get(order.merchant)
    if configured is None:
        return f"merchant {order.merchant!r} is not in WXPAY_CLOSE['MERCHANTS']"
    merchant = configured.merchant
    if (order.appid, order.mch_id) != (merchant.appid, merchant.mch_id):
        return (f"order was created for appid {order.appid}/mch_id {order.mch_id} but merchant {order.merchant!r} "
                f"is configured with {merchant.appid}/{merchant.mch_id}")
    return ""


def answered(answer: Answer, action: CloseAction, reason: str) -> OrderCloseResult:
    """An answer written: one INFO line, and the result to report."""
    order, result = answer.job.order, answer.result
    assert result is not None
    outcome = audit_answer(result)["outcome"]
    logger.info(
        "%s %s: %s%s", result.api, order.out_trade_no, outcome, f" ({reason})" if reason else "",
        extra={"order_id": order.pk, "out_trade_no": order.out_trade_no, "merchant": order.merchant, "api": result.api,
               "outcome": outcome, "action": action.value, "duration_ms": round(result.elapsed * 1000),
               "attempt_id": answer.job.attempt.pk},
    )
    return order_result(order, action, reason, result=result, attempt=answer.job.attempt)


def failed(answer: Answer, reason: str, exc: BaseException) -> OrderCloseResult:
    """A bug on our side while sending: logged with its traceback."""
    order = answer.job.order
    logger.error("Closing order %s failed unexpectedly", order.out_trade_no, exc_info=exc,
                 extra={"order_id": order.pk, "out_trade_no": order.out_trade_no, "merchant": order.merchant})
    return order_result(order, CloseAction.FAILED, reason, attempt=answer.job.attempt)


def unwritten(answer: Answer, why: str, exc: BaseException | None) -> OrderCloseResult:
    """An answer that cannot be written (the database is away, or refuses it) is logged whole, never dropped;
    its row stays unfinished, and the order is closed again once its claim lapses."""
    order, result = answer.job.order, answer.result
    outcome = audit_answer(result)["outcome"] if result else ""
    logger.error(
        "Could not record the answer to %s %s (outcome %s): %s. Its audit row stays unfinished and the order is "
        "looked at again once its claim lapses. Response body: %s", answer.job.prepared.api, order.out_trade_no,
        outcome or "not sent", why, stored_text(result.response_body) if result else "",
        exc_info=exc, extra={"order_id": order.pk, "out_trade_no": order.out_trade_no,
                             "attempt_id": answer.job.attempt.pk, "outcome": outcome},
    )
    return order_result(order, CloseAction.FAILED, why, result=result, attempt=answer.job.attempt)
