"""Reusable pytest fixtures; enable them with `pytest_plugins = ["django_wxpay_close.testing.pytest_plugin"]`."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from .simulator import WeChatPaySimulator


@pytest.fixture
def wxpay_simulator() -> Iterator[WeChatPaySimulator]:
    """A started simulator that knows the demo merchant (APPID, MCH_ID, SUB_MCH_ID, API_KEY); stopped afterwards."""
    with WeChatPaySimulator() as simulator:
        yield simulator
