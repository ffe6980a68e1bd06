"""Where the CPU of one close goes: cProfile (process-time clock) of the client alone and of close_order(),
self time summed by library as a share of the total (cProfile's own overhead inflates absolute times)."""

from __future__ import annotations

import cProfile
import pstats
import time
from collections import Counter
from typing import Any

from .. import django_env
from .senders import order_numbers, ours

# First match wins: a function's file path → the area its self time is charged to.
AREAS = (
    ("django_wxpay_close/wechat", "our client (sign, XML, verify, result)"),
    ("django_wxpay_close", "our service (claim, audit, state)"),
    ("/requests/", "requests"),
    ("/urllib3/", "urllib3"),
    ("/http/client.py", "http.client + email header parser"),
    ("/email/", "http.client + email header parser"),
    ("socket", "sockets (syscalls)"),
    ("defusedxml", "XML parsing (defusedxml/expat)"),
    ("xml/etree", "XML parsing (defusedxml/expat)"),
    ("expat", "XML parsing (defusedxml/expat)"),
    ("/django/db/models/", "Django ORM (query building, compiling, models)"),
    ("/django/db/backends/", "Django DB backend"),
    ("/psycopg/", "psycopg (parameter quoting, protocol)"),
    ("sqlite3", "sqlite3 module"),
    ("hmac", "hashing"),
    ("hashlib", "hashing"),
    ("secrets", "nonce (os.urandom)"),
)


def _area(filename: str, function: str) -> str:
    where = f"{filename}:{function}"
    return next((area for marker, area in AREAS if marker in where), "other (stdlib, builtins, Django utils)")


def _profile(calls: int, work: Any) -> dict[str, float]:
    """Percent of profiled CPU per area; a builtin's time is charged to the areas of its callers."""
    profiler = cProfile.Profile(time.process_time)
    profiler.enable()
    for _ in range(calls):
        work()
    profiler.disable()
    areas: Counter[str] = Counter()
    for (filename, _, function), (_, _, self_time, _, callers) in pstats.Stats(profiler).stats.items():  # type: ignore[attr-defined]
        if filename == "~" and callers:
            for (caller_file, _, caller_function), (_, _, caller_share, _) in callers.items():
                areas[_area(caller_file, caller_function)] += caller_share
        else:
            areas[_area(filename, function)] += self_time
    total = sum(areas.values()) or 1.0
    return {area: round(seconds / total * 100, 1) for area, seconds in areas.most_common()}


def run(*, base_url: str, calls: int, **_unused: Any) -> dict[str, Any]:
    """Share of profiled CPU by area: our client alone, then close_order() on the seeded backlog."""
    close, next_number = ours(base_url), order_numbers()
    for _ in range(50):
        close(next_number())
    client = _profile(calls, lambda: close(next_number()))

    django_env.setup()
    from django.db import connection

    from django_wxpay_close.models import Order
    from django_wxpay_close.services import close_order

    backlog = iter(list(Order.objects.order_by("pk")[: calls + 50]))
    actions: Counter[str] = Counter()

    def close_next() -> None:
        actions[close_order(next(backlog)).action.value] += 1

    for _ in range(50):
        close_next()
    service = _profile(calls, close_next)
    if set(actions) != {"closed"}:
        raise RuntimeError(f"expected every order closed, got {dict(actions)}")
    return {"calls": calls, "vendor": connection.vendor, "client": client, "close_order": service}
