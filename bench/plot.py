"""Sweep throughput against workers, ours and the reference sweep, with the latency limit: docs/img/throughput.png."""

from __future__ import annotations

from pathlib import Path
from typing import Any

_LABELS = {
    "ours/postgresql": "close_expired_orders, PostgreSQL",
    "ours/sqlite": "close_expired_orders, SQLite",
    "reference/postgresql": "reference: wechatpy + ORM writes, thread pool, PostgreSQL",
    "reference/sqlite": "reference: wechatpy + ORM writes, thread pool, SQLite",
}


def throughput(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    sweep = results["sweep"]
    workers = [int(w) for w in sweep]
    sides = {w: sweep[str(w)]["sides"] for w in workers}
    figure, axes = pyplot.subplots(figsize=(7, 4.5), dpi=120)
    axes.plot(workers, [next(iter(sides[w].values()))["limit_per_s"] for w in workers], "k--",
              label="limit: workers ÷ latency")
    for name in sides[workers[0]]:
        medians = [sides[w][name]["closes_per_s"]["median"] for w in workers]
        lows = [m - sides[w][name]["closes_per_s"]["min"] for w, m in zip(workers, medians, strict=True)]
        highs = [sides[w][name]["closes_per_s"]["max"] - m for w, m in zip(workers, medians, strict=True)]
        axes.errorbar(workers, medians, yerr=[lows, highs], marker="o", capsize=3, label=_LABELS.get(name, name))
    latency_ms = results["plan"]["latency"] * 1000
    axes.set(xlabel="workers (concurrent requests), one process", ylabel="closes per second", xticks=workers,
             title=f"Sweep throughput, simulator latency {latency_ms:g} ms, {results['machine']['cores']} cores")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    pyplot.close(figure)
