"""Medians with their spread, and same-run comparisons that alternate the two sides."""

from __future__ import annotations

import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Figure:
    """The median of several samples with their min and max."""

    median: float
    low: float
    high: float
    samples: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Figure:
        if not values:
            raise ValueError("a figure needs at least one sample")
        return cls(statistics.median(values), min(values), max(values), len(values))

    def scaled(self, factor: float) -> Figure:
        return Figure(self.median * factor, self.low * factor, self.high * factor, self.samples)

    def as_dict(self) -> dict[str, Any]:
        return {"median": self.median, "min": self.low, "max": self.high, "samples": self.samples}


def alternate(sides: Mapping[str, Callable[[], T]], repeats: int) -> dict[str, list[T]]:
    """Run every side `repeats` times, in A B, B A, A B… order so drift hits each side alike."""
    names = list(sides)
    samples: dict[str, list[T]] = {name: [] for name in names}
    for repeat in range(repeats):
        for name in names if repeat % 2 == 0 else reversed(names):
            samples[name].append(sides[name]())
    return samples


def ratio(numerators: Sequence[float], denominators: Sequence[float]) -> Figure:
    """Per-repeat ratios of two sides measured in the same repeat."""
    return Figure.of([a / b for a, b in zip(numerators, denominators, strict=True)])


def percentile(sorted_values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile of already sorted values."""
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, round(fraction * len(sorted_values) + 0.5) - 1))
    return sorted_values[index]


def windows(finished: Sequence[float], started: float, count: int) -> list[float]:
    """Throughput (per second) of `count` consecutive equal parts of the completion times `finished`."""
    ordered = sorted(finished)
    size = len(ordered) // count
    if not size:
        return [len(ordered) / max(ordered[-1] - started, 1e-9)] if ordered else []
    edges = [started] + [ordered[(k + 1) * size - 1] for k in range(count)]
    return [size / max(edges[k + 1] - edges[k], 1e-9) for k in range(count)]
