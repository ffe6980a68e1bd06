"""How big each measurement is: the full run (docs/performance.md) and the CI-sized `--quick` one."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Plan:
    client_calls: int  # sequential closes per side per repeat
    client_repeats: int
    service_orders: int  # close_order() calls per repeat
    service_repeats: int
    latency: float  # seconds the simulator adds to every answer in the sweep sections
    sweep_orders: int  # backlog per sweep run (ours and the reference alike)
    workers: tuple[int, ...]
    target_runs: int  # runs per side at the largest worker count (the target figures); one at the others
    ceiling_calls: int  # closes per run at zero latency, largest worker count
    ceiling_repeats: int
    processes_orders: int  # backlog shared by the sweeper processes of a layout
    # (processes, workers each, simulator latency in seconds); the first is the baseline
    process_layouts: tuple[tuple[int, int, float], ...]
    processes_repeats: int
    memory_orders: tuple[int, ...]  # dry-run backlogs whose peak RSS is compared
    flood_posts: int = 10_000  # garbage POSTs at the notify URL per backend
    flood_genuine: int = 200  # genuine notifications sent during the flood (and as many without)
    flood_clients: int = 2  # keep-alive connections the garbage comes from
    flood_trace_count: int = 2000  # garbage bodies handled in-process to measure what one trace takes


FULL = Plan(
    client_calls=3000, client_repeats=3,
    service_orders=300, service_repeats=5,
    latency=0.05, sweep_orders=10_000, workers=(8, 16, 32), target_runs=3,
    ceiling_calls=2000, ceiling_repeats=3,
    processes_orders=5_000,
    process_layouts=((1, 32, 0.05), (2, 16, 0.05), (8, 8, 0.2)), processes_repeats=3,
    memory_orders=(10_000, 100_000, 1_000_000),
)

QUICK = Plan(
    client_calls=100, client_repeats=2,
    service_orders=10, service_repeats=2,
    latency=0.01, sweep_orders=100, workers=(8, 32), target_runs=1,
    ceiling_calls=100, ceiling_repeats=1,
    processes_orders=100,
    process_layouts=((1, 32, 0.01), (2, 16, 0.01), (8, 8, 0.04)), processes_repeats=1,
    memory_orders=(100, 1000),
    flood_posts=100, flood_genuine=10, flood_trace_count=100,
)
