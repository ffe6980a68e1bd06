"""Throughput against workers, ours and wechatpy, with the latency limit: docs/img/throughput.png."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def throughput(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    sweep = results["sweep"]
    workers = [int(w) for w in sweep]
    figure, axes = pyplot.subplots(figsize=(7, 4.5), dpi=120)
    axes.plot(workers, [sweep[str(w)][next(iter(sweep[str(w)]))]["limit_per_s"] for w in workers], "k--",
              label="limit: workers ÷ latency")
    for name in sweep[str(workers[0])]:
        medians = [sweep[str(w)][name]["closes_per_s"]["median"] for w in workers]
        lows = [m - sweep[str(w)][name]["closes_per_s"]["min"] for w, m in zip(workers, medians)]
        highs = [sweep[str(w)][name]["closes_per_s"]["max"] - m for w, m in zip(workers, medians)]
        label = "wechatpy 1.8, thread pool (no database)" if name == "wechatpy" else f"close_expired_orders, {name.split('/')[1]}"
        axes.errorbar(workers, medians, yerr=[lows, highs], marker="o", capsize=3, label=label)
    latency_ms = results["plan"]["latency"] * 1000
    axes.set(xlabel="workers (concurrent requests)", ylabel="closes per second", xticks=workers,
             title=f"Sweep throughput, simulator latency {latency_ms:g} ms, {results['machine']['cores']} cores")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    pyplot.close(figure)
