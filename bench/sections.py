"""The benchmark's sections. Each runs its measurements in fresh worker processes and returns plain JSON data."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from . import runner
from .machine import BusyCores
from .plan import Plan
from .runner import Backend
from .simproc import SimulatorProcess
from .stats import Figure, alternate, ratio

Sample = dict[str, Any]


def client_overhead(plan: Plan, sim: SimulatorProcess) -> dict[str, Any]:
    """Client CPU per close, sequential, zero latency; ratios per repeat, sides alternated inside the process."""
    samples = runner.run("client", base_url=sim.base_url, calls=plan.client_calls, repeats=plan.client_repeats)
    cpu = samples["cpu_us_per_close"]
    return {
        "calls": plan.client_calls,
        "cpu_us_per_close": {name: Figure.of(values).as_dict() for name, values in cpu.items()},
        "ours_to_wechatpy": ratio(cpu["ours"], cpu["wechatpy"]).as_dict(),
        "ours_to_http_client": ratio(cpu["ours"], cpu["http.client"]).as_dict(),
    }


def service_overhead(plan: Plan, backends: Sequence[Backend], sim: SimulatorProcess) -> dict[str, Any]:
    """close_order() with its database work, one order at a time, per backend."""
    results = {}
    for backend in backends:
        runner.run("seed", backend=backend, orders=plan.service_orders * plan.service_repeats)
        measured = runner.run("service", backend=backend, base_url=sim.base_url, orders=plan.service_orders,
                              repeats=plan.service_repeats)
        results[backend.name] = {
            "orders": plan.service_orders,
            "cpu_us_per_order": Figure.of(measured["cpu_us_per_order"]).as_dict(),
            "wall_us_per_order": Figure.of(measured["wall_us_per_order"]).as_dict(),
            "sql_per_order": measured["sql_per_order"],
        }
    return results


def profile(plan: Plan, backend: Backend, sim: SimulatorProcess) -> dict[str, Any]:
    """cProfile self time per close, by library: the client alone and close_order() with its database work."""
    calls = max(plan.service_orders, 20)
    runner.run("seed", backend=backend, orders=calls + 50)
    return runner.run("profile", backend=backend, base_url=sim.base_url, calls=calls)


def _sweep(backend: Backend, sim: SimulatorProcess, orders: int, workers: int) -> Callable[[], Sample]:
    def once() -> Sample:
        runner.run("seed", backend=backend, orders=orders)
        busy, simulator_cpu = BusyCores(), sim.cpu_seconds()
        result = runner.run("sweep", backend=backend, base_url=sim.base_url, workers=workers)
        result["machine_busy_cores"] = busy.stop()
        result["simulator_cores"] = (sim.cpu_seconds() - simulator_cpu) / result["wall_s"]
        return result

    return once


def _pool(sender: str, sim: SimulatorProcess, calls: int, workers: int) -> Callable[[], Sample]:
    return _bare("pool", sim, calls, workers, sender=sender)


def _bare(task: str, sim: SimulatorProcess, calls: int, workers: int, **kwargs: Any) -> Callable[[], Sample]:
    """A client with no database: `pool` (a thread per request in flight) or `loop` (the sweep's sender)."""
    def once() -> Sample:
        busy = BusyCores()
        result = runner.run(task, base_url=sim.base_url, workers=workers, calls=calls, **kwargs)
        result["machine_busy_cores"] = busy.stop()
        return result

    return once


def _limit(concurrent_requests: int, sim: SimulatorProcess) -> float | None:
    """The latency limit, closes/s: every request in flight all the time, each taking the simulated latency."""
    return concurrent_requests / sim.latency if sim.latency else None


def _windowed(runs: list[Sample], limit: float | None) -> tuple[Figure, dict[str, Any]]:
    """Throughput over every window of every run, and its share of `limit` (None: no limit at zero latency)."""
    throughput = Figure.of([rate for run in runs for rate in run["window_closes_per_s"]])
    return throughput, {"limit_per_s": limit, "of_limit": throughput.scaled(1 / limit).as_dict() if limit else None}


def _summary(runs: list[Sample], limit: float | None) -> dict[str, Any]:
    """Throughput over every window of every run, with latency and CPU medians."""
    throughput, against_limit = _windowed(runs, limit)
    summary: dict[str, Any] = {
        "runs": len(runs),
        "closes_per_s": throughput.as_dict(),
        "latency_ms_p50": Figure.of([run["latency_ms_p50"] for run in runs]).as_dict(),
        "latency_ms_p99": Figure.of([run["latency_ms_p99"] for run in runs]).as_dict(),
        "cores": Figure.of([run["cores"] for run in runs]).as_dict(),
        "machine_busy_cores": Figure.of([run["machine_busy_cores"] for run in runs]).as_dict(),
        "peak_rss_kib": max(run["peak_rss_kib"] for run in runs),
        "whole_run_closes_per_s": [run["closes_per_s"] for run in runs],
    }
    for key in ("wait_for_slot_ms_p50", "wait_for_slot_ms_p99"):  # our sweeps only (bench/tasks/sweep.py)
        if all(key in run for run in runs):
            summary[key] = Figure.of([run[key] for run in runs]).as_dict()
    if limit:
        summary.update(against_limit)
    return summary


def sweep_throughput(plan: Plan, backends: Sequence[Backend], sim: SimulatorProcess) -> dict[str, Any]:
    """close_expired_orders per worker count and backend, alternated with wechatpy in a thread pool."""
    results: dict[str, Any] = {}
    for workers in plan.workers:
        sides = {f"ours/{b.name}": _sweep(b, sim, plan.sweep_orders, workers) for b in backends}
        sides["wechatpy"] = _pool("wechatpy", sim, plan.pool_calls, workers)
        repeats = plan.target_runs if workers == max(plan.workers) else 1
        limit = _limit(workers, sim)
        results[str(workers)] = {name: _summary(runs, limit) for name, runs in alternate(sides, repeats).items()}
    return results


def ceiling(plan: Plan, backend: Backend, sim: SimulatorProcess) -> dict[str, Any]:
    """Zero latency, the largest worker count: the most closes/s one process gets out of this machine."""
    workers = max(plan.workers)
    sides = {
        f"ours/{backend.name} sweep": _sweep(backend, sim, plan.ceiling_calls, workers),
        "ours client, event loop": _bare("loop", sim, plan.ceiling_calls, workers),
        "ours client, thread pool": _pool("ours", sim, plan.ceiling_calls, workers),
        "wechatpy, thread pool": _pool("wechatpy", sim, plan.ceiling_calls, workers),
    }
    runs = alternate(sides, plan.ceiling_repeats)
    return {"workers": workers, **{name: _summary(samples, None) for name, samples in runs.items()}}


def _processes(backend: Backend, sim: SimulatorProcess, orders: int, workers: int, count: int) -> Callable[[], Sample]:
    def once() -> Sample:
        runner.run("seed", backend=backend, orders=orders)
        busy = BusyCores()
        started = [runner.start("sweep", backend=backend, base_url=sim.base_url, workers=workers, analyse=False)
                   for _ in range(count)]
        runs = [runner.finish(process) for process in started]
        busy_cores = busy.stop()
        span = max(r["ended_epoch"] for r in runs) - min(r["started_epoch"] for r in runs)
        handled = sum(r["handled"] for r in runs)
        # The same windows as the sweep section, over every process's completions together.
        windows = runner.run("audit", backend=backend)["window_closes_per_s"]
        return {"handled": handled, "per_process": [r["handled"] for r in runs], "seconds": span,
                "closes_per_s": handled / span, "window_closes_per_s": windows, "machine_busy_cores": busy_cores}

    return once


def sweeper_processes(plan: Plan, backend: Backend, sim: SimulatorProcess) -> dict[str, Any]:
    """One sweeper process against several sharing the same backlog and database (`plan.process_layouts`)."""
    sides = {f"{count} × {workers}": _processes(backend, sim, plan.processes_orders, workers, count)
             for count, workers in plan.process_layouts}
    runs = alternate(sides, plan.processes_repeats)
    baseline = [r["closes_per_s"] for r in next(iter(runs.values()))]
    limits = {f"{count} × {workers}": _limit(count * workers, sim) for count, workers in plan.process_layouts}

    def windowed(samples: list[Sample], limit: float | None) -> dict[str, Any]:
        throughput, against_limit = _windowed(samples, limit)
        return {"window_closes_per_s": throughput.as_dict(), **against_limit}

    return {
        "orders": plan.processes_orders,
        "layouts": {
            name: {
                **windowed(samples, limits[name]),
                "closes_per_s": Figure.of([r["closes_per_s"] for r in samples]).as_dict(),
                "seconds": Figure.of([r["seconds"] for r in samples]).as_dict(),
                "to_first": ratio([r["closes_per_s"] for r in samples], baseline).as_dict(),
                "machine_busy_cores": Figure.of([r["machine_busy_cores"] for r in samples]).as_dict(),
            }
            for name, samples in runs.items()
        },
        "runs": runs,
    }


def memory(plan: Plan, backend: Backend, sim: SimulatorProcess) -> dict[str, Any]:
    """Peak RSS of a dry-run sweep process per backlog size (seeded by another process)."""
    results = {}
    for orders in plan.memory_orders:
        runner.run("seed", backend=backend, orders=orders)
        run = runner.run("sweep", backend=backend, base_url=sim.base_url, workers=max(plan.workers), dry_run=True)
        results[str(orders)] = {"handled": run["handled"], "peak_rss_kib": run["peak_rss_kib"],
                                "rss_before_sweep_kib": run["rss_before_sweep_kib"], "seconds": run["wall_s"]}
    return results
