"""The flood section: what a flood of garbage at the public notify URL costs in storage, and what it does to the
answer times of WeChat's genuine notifications sent meanwhile (one run per backend; figures in
docs/performance.md)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from . import runner
from .plan import Plan
from .runner import Backend


def flood(plan: Plan, backends: Sequence[Backend]) -> dict[str, Any]:
    return {backend.name: runner.run("flood", backend=backend, posts=plan.flood_posts, genuine=plan.flood_genuine,
                                     clients=plan.flood_clients, trace_count=plan.flood_trace_count)
            for backend in backends}


def render(results: dict[str, Any]) -> list[str]:
    """The section's table lines for `bench.report.render`."""
    out = ["### Flood: 64 KiB garbage POSTs at the notify URL of a threaded runserver, genuine notifications "
           "sent one at a time meanwhile", "",
           "| database | garbage POSTs | garbage/s | growth | growth per 10,000 | traces | bytes per trace | "
           "genuine recorded | genuine answer ms, flood: median / p95 / max | without flood: median / p95 / max |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        during, quiet = r["genuine_during_flood"], r["genuine_without_flood"]
        out.append(
            f"| {name} | {r['garbage_posts']} | {r['garbage_per_s']:.0f} | {r['growth_bytes'] / 1024:.0f} KiB | "
            f"{r['growth_bytes_per_10000'] / 1024:.0f} KiB | {r['traces']} in {r['minutes_counted']} min | "
            f"{r['bytes_per_trace']:.0f} | "
            f"{r['genuine_recorded']} of {r['genuine_sent']} | "
            f"{during['median_ms']:.0f} / {during['p95_ms']:.0f} / {during['max_ms']:.0f} | "
            f"{quiet['median_ms']:.0f} / {quiet['p95_ms']:.0f} / {quiet['max_ms']:.0f} |")
    return [*out, ""]
