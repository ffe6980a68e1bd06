"""The benchmark's sections. Each runs its measurements in fresh worker processes and returns plain JSON data."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

from . import runner, scale
from .flood import flood  # noqa: F401  (the flood section lives in its own module)
from .machine import BusyCores, DatabaseLoad, cpu_seconds
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


def _database_name(backend: Backend) -> str:
    return urlsplit(backend.url).path.lstrip("/")


def _measured(task: str, backend: Backend, sim: SimulatorProcess, orders: int, waiting: int = 0,
              **kwargs: Any) -> Callable[[], Sample]:
    """One run of `task` over a fresh backlog of `orders`, with what the rest of the machine did meanwhile:
    the simulator's CPU, the database backends' CPU and connections (PostgreSQL), the requests per order."""
    def once() -> Sample:
        prefix = runner.run("seed", backend=backend, orders=orders, waiting=waiting)["prefix"]
        load = DatabaseLoad(backend.url, _database_name(backend)) if backend.name == "postgresql" else None
        load = load.start() if load is not None and load.available else None
        busy, simulator_cpu, ours = BusyCores(), sim.cpu_seconds(), cpu_seconds(children=True)
        began = time.perf_counter()
        try:
            result = runner.run(task, backend=backend, base_url=sim.base_url, **kwargs)
        finally:
            database = load.stop() if load is not None else None
        result["machine_busy_cores"] = busy.stop()
        result["simulator_cpu_s"] = sim.cpu_seconds() - simulator_cpu
        result["database"] = database
        # What the rest of the machine used meanwhile: the busy cores less the measured process (start-up
        # included), the simulator and the database backends. Other work on the machine shows up here.
        measured = cpu_seconds(children=True) - ours + result["simulator_cpu_s"] + (database or {}).get("cpu_s", 0.0)
        result["other_cores"] = max(result["machine_busy_cores"] - measured / (time.perf_counter() - began), 0.0)
        result["requests"] = sim.requests_per_order(prefix)  # the waiting orders are never sent
        result["seeded"] = orders
        return result

    return once


def _bare(task: str, sim: SimulatorProcess, calls: int, workers: int, **kwargs: Any) -> Callable[[], Sample]:
    """A client in a thread pool with no database (bench/tasks/pool.py)."""
    def once() -> Sample:
        busy, simulator_cpu, ours = BusyCores(), sim.cpu_seconds(), cpu_seconds(children=True)
        began = time.perf_counter()
        result = runner.run(task, base_url=sim.base_url, workers=workers, calls=calls, **kwargs)
        result["machine_busy_cores"] = busy.stop()
        result["simulator_cpu_s"] = sim.cpu_seconds() - simulator_cpu
        measured = cpu_seconds(children=True) - ours + result["simulator_cpu_s"]
        result["other_cores"] = max(result["machine_busy_cores"] - measured / (time.perf_counter() - began), 0.0)
        return result

    return once


def _limit(concurrent_requests: int, latency: float) -> float | None:
    """The latency limit, closes/s: every request in flight all the time, each taking the simulated latency."""
    return concurrent_requests / latency if latency else None


def _per_close(runs: list[Sample]) -> dict[str, Any]:
    """CPU milliseconds per close: the sweeper processes, PostgreSQL's backends, both, and the simulator."""
    def figure(values: list[float]) -> dict[str, Any]:
        return Figure.of(values).as_dict()

    out: dict[str, Any] = {"sweeper": figure([1000 * r["cpu_s"] / r["handled"] for r in runs]),
                           "simulator": figure([1000 * r["simulator_cpu_s"] / r["handled"] for r in runs])}
    if all(r.get("database") for r in runs):
        out["database"] = figure([1000 * r["database"]["cpu_s"] / r["handled"] for r in runs])
        out["sweeper_and_database"] = figure([1000 * (r["cpu_s"] + r["database"]["cpu_s"]) / r["handled"]
                                              for r in runs])
    return out


def _once_each(runs: list[Sample]) -> dict[str, Any]:
    """Did the simulator get exactly one closeorder request for every seeded order, in every run?"""
    exact = all(r["requests"]["orders"] == r["seeded"] and r["requests"]["orders_by_requests"] == {"1": r["seeded"]}
                for r in runs)
    return {"exactly_once": exact, "by_run": [r["requests"] for r in runs]}


def _summary(runs: list[Sample], limit: float | None) -> dict[str, Any]:
    """Throughput over every window of every run, its share of the limit, latency, CPU, SQL, connections."""
    throughput = Figure.of([rate for run in runs for rate in run["window_closes_per_s"]])
    summary: dict[str, Any] = {
        "runs": len(runs),
        "handled": [run["handled"] for run in runs],
        "closes_per_s": throughput.as_dict(),
        "run_median_closes_per_s": [statistics.median(run["window_closes_per_s"]) for run in runs],
        "whole_run_closes_per_s": [run["closes_per_s"] for run in runs],
        "limit_per_s": limit,
        "of_limit": throughput.scaled(1 / limit).as_dict() if limit else None,
        "seconds": Figure.of([run["wall_s"] for run in runs]).as_dict(),
        "cores": Figure.of([run["cores"] for run in runs]).as_dict(),
        "machine_busy_cores": Figure.of([run["machine_busy_cores"] for run in runs]).as_dict(),
        "other_cores": Figure.of([run["other_cores"] for run in runs]).as_dict(),
        "peak_rss_kib": max(run["peak_rss_kib"] for run in runs),
    }
    if all("latency_ms_p50" in run for run in runs):
        summary["latency_ms_p50"] = Figure.of([run["latency_ms_p50"] for run in runs]).as_dict()
        summary["latency_ms_p99"] = Figure.of([run["latency_ms_p99"] for run in runs]).as_dict()
    if all("seeded" in run for run in runs):
        summary["cpu_ms_per_close"] = _per_close(runs)
        summary["requests"] = _once_each(runs)
    if all("sql_statements" in run for run in runs):
        summary["sql_per_close"] = Figure.of([run["sql_statements"] / run["handled"] for run in runs]).as_dict()
    if all(run.get("database") for run in runs):
        summary["transactions_per_close"] = Figure.of(
            [run["database"]["transactions"] / run["handled"] for run in runs]).as_dict()
        summary["peak_connections"] = max(run["database"]["peak_connections"] for run in runs)
    if all("sweeper_peak_rss_kib" in run for run in runs):
        summary["sweeper_peak_rss_kib"] = max(run["sweeper_peak_rss_kib"] for run in runs)
    return summary


def _against(runs: Mapping[str, list[Sample]], ours: str, reference: str) -> dict[str, Any]:
    """Ours ÷ the reference, run by run (the two ran in the same repeat), on each run's median window."""
    def rates(side: str) -> list[float]:
        return [statistics.median(run["window_closes_per_s"]) for run in runs[side]]

    return {"ours": ours, "reference": reference, "closes_per_s": ratio(rates(ours), rates(reference)).as_dict()}


CLIENT_ALONE = "our client alone, no database"


def sweep_throughput(plan: Plan, backend: Backend, sim: SimulatorProcess) -> dict[str, Any]:
    """close_expired_orders per worker count, alternated with the reference sweep (wechatpy in a thread pool,
    bench/tasks/reference.py), each over a fresh backlog of the same size on the same database. At the largest
    worker count, our client alone in a thread pool (no database) too: what this machine and simulator allow."""
    results: dict[str, Any] = {}
    ours, reference, alone = f"ours/{backend.name}", f"reference/{backend.name}", CLIENT_ALONE
    for workers in plan.workers:
        largest = workers == max(plan.workers)
        sides = {ours: _measured("sweep", backend, sim, plan.sweep_orders, workers=workers),
                 reference: _measured("reference", backend, sim, plan.sweep_orders, workers=workers)}
        if largest:
            sides[alone] = _bare("pool", sim, plan.sweep_orders, workers, sender="ours")
        runs = alternate(sides, plan.target_runs if largest else 1)
        limit = _limit(workers, sim.latency)
        results[str(workers)] = {
            "sides": {name: _summary(samples, limit) for name, samples in runs.items()},
            "ours_to_reference": _against(runs, ours, reference),
        }
        if largest:
            results[str(workers)]["ours_to_client_alone"] = _against(runs, ours, alone)
    return results


def backoff(plan: Plan, backend: Backend, sim: SimulatorProcess) -> dict[str, Any]:
    """The sweep over its usual backlog, alternated with the same backlog behind nine times as many orders that
    wait for a retry (deadlines earlier, due in an hour: what an outage leaves); then the claim's plan there."""
    workers = max(plan.workers)
    waiting = 9 * plan.sweep_orders
    normal, behind = "due orders only", f"behind {waiting} waiting for a retry"
    sides = {normal: _measured("sweep", backend, sim, plan.sweep_orders, workers=workers),
             behind: _measured("sweep", backend, sim, plan.sweep_orders, waiting=waiting, workers=workers)}
    runs = alternate(sides, plan.target_runs)
    limit = _limit(workers, sim.latency)
    runner.run("seed", backend=backend, orders=plan.sweep_orders, waiting=waiting)
    claim = runner.run("claim_plan", backend=backend, workers=workers) if backend.name == "postgresql" else None
    return {
        "workers": workers, "waiting": waiting,
        "sides": {name: _summary(samples, limit) for name, samples in runs.items()},
        "behind_to_normal": ratio([statistics.median(r["window_closes_per_s"]) for r in runs[behind]],
                                  [statistics.median(r["window_closes_per_s"]) for r in runs[normal]]).as_dict(),
        "claim_plan": claim,
    }


def ceiling(plan: Plan, backend: Backend, sim: SimulatorProcess) -> dict[str, Any]:
    """Zero latency, the largest worker count: the most closes/s one process gets out of this machine,
    the sweeps with their database work and the bare clients without any."""
    workers = max(plan.workers)
    sides = {
        f"ours/{backend.name}": _measured("sweep", backend, sim, plan.ceiling_calls, workers=workers),
        f"reference/{backend.name}": _measured("reference", backend, sim, plan.ceiling_calls, workers=workers),
        "our client, thread pool, no database": _bare("pool", sim, plan.ceiling_calls, workers, sender="ours"),
        "wechatpy, thread pool, no database": _bare("pool", sim, plan.ceiling_calls, workers, sender="wechatpy"),
    }
    runs = alternate(sides, plan.ceiling_repeats)
    return {"workers": workers, "sides": {name: _summary(samples, None) for name, samples in runs.items()}}


def _layout_name(processes: int, workers: int, latency: float) -> str:
    return f"{processes} × {workers}, {latency * 1000:g} ms"


def sweeper_processes(plan: Plan, backend: Backend, simulators: Mapping[float, SimulatorProcess]) -> dict[str, Any]:
    """`close_expired_orders --processes P --workers W` over one shared backlog (`plan.process_layouts`),
    alternated; every order must reach the simulator exactly once."""
    sides = {_layout_name(p, w, latency): _measured("sweep", backend, simulators[latency], plan.processes_orders,
                                                     workers=w, processes=p)
             for p, w, latency in plan.process_layouts}
    limits = {_layout_name(p, w, latency): _limit(p * w, latency) for p, w, latency in plan.process_layouts}
    runs = alternate(sides, plan.processes_repeats)
    return {
        "orders": plan.processes_orders,
        "layouts": {name: {"processes": p, "workers": w, "latency": latency,
                           **_summary(runs[name], limits[name])}
                    for (p, w, latency), name in zip(plan.process_layouts, runs, strict=True)},
    }


def memory(plan: Plan, backend: Backend, sim: SimulatorProcess) -> dict[str, Any]:
    """Peak RSS of a dry-run sweep process per backlog size (seeded by another process)."""
    results = {}
    for orders in plan.memory_orders:
        seeded = runner.run("seed", backend=backend, orders=orders)
        run = runner.run("sweep", backend=backend, base_url=sim.base_url, workers=max(plan.workers), dry_run=True)
        results[str(orders)] = {"handled": run["handled"], "peak_rss_kib": run["peak_rss_kib"],
                                "rss_before_sweep_kib": run["rss_before_sweep_kib"], "seconds": run["wall_s"],
                                "seed_seconds": seeded["seconds"]}
    return results


def admin_at_scale(quick: bool, server_url: str, *, keep: bool) -> dict[str, Any]:
    """Every admin page on years of history, in the section's own database (bench/scale.py); printed as it ends."""
    name = f"{_database_name(Backend('postgresql', server_url)) or 'wxpay_bench'}_scale"
    with scale.own_database(server_url, name, keep=keep) as url:
        result = runner.run("scale", backend=Backend("postgresql", url), quick=quick)
    result["database"] = name if keep else None
    print(scale.render(result), flush=True)
    return result
