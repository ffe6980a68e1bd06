"""What travels between the engine's database thread and its HTTP workers: a claimed order ready to send, the
answer a worker brings back, and how an answer is stored, logged and reported."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Protocol

from ..conf import CloseSettings
from ..models import CloseAttempt, Order, stored_text
from ..reports import CloseAction, OrderCloseResult
from ..wechat import CloseOrderClient, CloseResult, InvalidRequestField, Merchant, Outcome, PreparedClose
from .decisions import Decision, backoff

logger = logging.getLogger("django_wxpay_close")


@lru_cache(maxsize=64)
def cached_client(merchant: Merchant, base_urls: tuple[str, ...], connect_timeout: float, read_timeout: float,
                   max_response_bytes: int, pool_size: int) -> CloseOrderClient:
    """One client (and so one connection pool) per merchant and endpoint settings, reused across calls."""
    return CloseOrderClient(merchant, base_urls=base_urls, connect_timeout=connect_timeout, read_timeout=read_timeout,
                            max_response_bytes=max_response_bytes, pool_size=pool_size)


def audit_answer(result: CloseResult) -> dict[str, Any]:
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
        "outcome": result.outcome.value,
        "reason": result.reason,
    }


def order_result(order: Order, action: CloseAction, reason: str = "", *, result: CloseResult | None = None,
                  attempt: CloseAttempt | None = None) -> OrderCloseResult:
    return OrderCloseResult(
        order_id=order.pk, out_trade_no=order.out_trade_no, merchant=order.merchant, action=action, reason=reason,
        outcome=result.outcome if result else None, attempt_id=attempt.pk if attempt else None,
        duration=result.elapsed if result else 0.0, url=result.url if result else "",
    )


@dataclass(frozen=True)
class Job:
    """A claimed order whose audit row is committed and whose signed request is ready to leave."""

    order: Order
    attempt: CloseAttempt
    client: CloseOrderClient
    prepared: PreparedClose
    lease_ends: float  # time.monotonic() by which the lease has surely ended (measured from before the claim)


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
    result: CloseResult | None = None
    not_sent: str = ""
    outlived_lease: bool = False  # the exchange ended after the lease: another close may have the order now
    spends_retry: bool = False  # a failure spends one of the order's retries (the run's judgement)
    error: BaseException | None = None  # a bug in sending (the client never raises for the network's doing)


@dataclass(frozen=True)
class Verdict:
    """An answer with what it means for its order, waiting to be written."""

    answer: Answer
    decision: Decision


class Caller(Protocol):
    """Who sends: the engine's settings and the audit fields of its caller."""

    settings: CloseSettings
    trigger: str
    user: Any
    actor: str
    workers: int


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
    try:
        prepared = client.prepare(order.out_trade_no, sub_mch_id=order.sub_mch_id, sub_appid=order.sub_appid or None)
    except InvalidRequestField as exc:
        unbuildable = f"cannot build the request: {exc}"
        return Unsendable(order, CloseAction.PUT_ON_HOLD, unbuildable,
                          {"last_error": unbuildable, "last_outcome": Outcome.CLIENT_BUG.value, "on_hold": True})
    attempt = CloseAttempt(
        order=order, merchant=order.merchant, mch_id=order.mch_id, sub_mch_id=order.sub_mch_id,
        out_trade_no=order.out_trade_no, trigger=caller.trigger, user=caller.user, actor=caller.actor,
        url=client.urls[0], sign_type=prepared.sign_type.value, request_xml=prepared.body.decode("utf-8"),
    )
    return Job(order, attempt, client, prepared, lease_ends)


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
    logger.info(
        "closeorder %s: %s%s", order.out_trade_no, result.outcome.value, f" ({reason})" if reason else "",
        extra={"order_id": order.pk, "out_trade_no": order.out_trade_no, "merchant": order.merchant,
               "outcome": result.outcome.value, "action": action.value, "duration_ms": round(result.elapsed * 1000),
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
    logger.error(
        "Could not record the answer to closeorder %s (outcome %s): %s. Its audit row stays unfinished and the order "
        "is closed again once its claim lapses. Response body: %s", order.out_trade_no,
        result.outcome.value if result else "not sent", why, stored_text(result.response_body) if result else "",
        exc_info=exc, extra={"order_id": order.pk, "out_trade_no": order.out_trade_no,
                             "attempt_id": answer.job.attempt.pk, "outcome": result.outcome.value if result else ""},
    )
    return order_result(order, CloseAction.FAILED, why, result=result, attempt=answer.job.attempt)
