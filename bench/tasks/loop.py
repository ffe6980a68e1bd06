"""Our client's concurrent sender (the sweep's transport) on one event loop, no database: its ceiling."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from django_wxpay_close.testing import API_KEY, APPID, MCH_ID, SUB_MCH_ID
from django_wxpay_close.wechat import CloseOrderClient, Merchant, Outcome, SignType
from django_wxpay_close.wechat.async_sender import AsyncCloseSender

from ..machine import cpu_seconds
from .pool import summary
from .senders import order_numbers


def run(*, base_url: str, workers: int, calls: int, **_unused: Any) -> dict[str, Any]:
    """`calls` closes, `workers` in flight at once, as the sweep's pipeline sends them."""
    return asyncio.run(_run(base_url, workers, calls))


async def _run(base_url: str, workers: int, calls: int) -> dict[str, Any]:
    merchant = Merchant(APPID, MCH_ID, SUB_MCH_ID, API_KEY, sign_type=SignType.HMAC_SHA256)
    client = CloseOrderClient(merchant, base_urls=[base_url], pool_size=workers)
    sender = AsyncCloseSender(client, concurrency=workers)
    next_number = order_numbers()
    finished: list[float] = []
    latencies: list[float] = []

    async def close(out_trade_no: str, timed: bool) -> None:
        began = time.perf_counter()
        result = await sender.send(client.prepare(out_trade_no))
        if result.outcome is not Outcome.CLOSED:
            raise RuntimeError(f"our concurrent sender: {result.outcome} {result.reason}")
        if timed:
            done = time.perf_counter()
            latencies.append((done - began) * 1000)
            finished.append(done)

    async def worker(numbers: list[str]) -> None:
        for number in numbers:
            await close(number, timed=True)

    try:
        await asyncio.gather(*(close(next_number(), timed=False) for _ in range(workers)))  # connections open
        numbers = [next_number() for _ in range(calls)]
        cpu, started = cpu_seconds(), time.perf_counter()
        await asyncio.gather(*(worker(numbers[n::workers]) for n in range(workers)))
        wall, cpu = time.perf_counter() - started, cpu_seconds() - cpu
    finally:
        await sender.aclose()
    return summary("ours-loop", workers, started, wall, cpu, finished, latencies)
