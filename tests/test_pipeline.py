"""The pipeline's own promises, apart from what it runs: leaving it always ends."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from django_wxpay_close.pipeline import ClosePipeline, Sending


async def finished() -> None:
    return None


def test_leaving_ends_when_a_finished_send_is_still_listed_as_in_flight(transactional_db: None) -> None:
    # A task that is done but whose done-callback has not yet taken it off the list: Python 3.12+'s gather()
    # returns at once for such tasks without yielding to the loop, which once made leaving spin forever.
    pipeline: ClosePipeline[Any, Any] = ClosePipeline(
        concurrency=1, start=lambda jobs: [], answered=lambda sending, result: None,
        withdraw=lambda sending, interrupted: None, record=lambda answered: None,
        on_result=lambda result: None, guard=lambda order, step: step(), waiting=1,
    )

    async def done_task() -> asyncio.Task[None]:
        task = asyncio.ensure_future(finished())
        await task
        return task

    task = asyncio.run_coroutine_threadsafe(done_task(), pipeline._loop).result(timeout=5)
    pipeline._loop.call_soon_threadsafe(pipeline._tasks.add, task)
    leaving = threading.Thread(target=pipeline.join, daemon=True)
    leaving.start()
    leaving.join(timeout=10)
    assert not leaving.is_alive(), "leaving the pipeline did not end"


def test_a_send_task_that_fails_outside_its_guard_is_logged_and_leaving_still_ends(transactional_db: None,
                                                                                   caplog: Any) -> None:
    def failing_guard(order: Any, step: Any) -> Any:
        raise RuntimeError("the guard itself failed")

    pipeline: ClosePipeline[Any, Any] = ClosePipeline(
        concurrency=1, start=lambda jobs: [Sending(job, None, None, None) for job in jobs],  # type: ignore[arg-type]
        answered=lambda sending, result: None, withdraw=lambda sending, interrupted: "not sent",
        record=lambda answered: None, on_result=lambda result: None, guard=failing_guard, waiting=1,
    )
    leaving = threading.Thread(target=lambda: (pipeline.submit("job"), pipeline.join()), daemon=True)
    leaving.start()
    leaving.join(timeout=10)

    assert not leaving.is_alive(), "leaving the pipeline did not end"
    [logged] = [r for r in caplog.records if r.getMessage() == "A close's send task failed outside its guard"]
    assert logged.levelname == "ERROR" and "the guard itself failed" in str(logged.exc_info[1])
