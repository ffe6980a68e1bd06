"""`python -m bench.ab REF`: this checkout's sweep against git REF's, in alternated runs on PostgreSQL.

How a change is measured: the two sides sweep a fresh backlog in turns (A B, B A, …), so the machine's drift
hits both alike, each side with its own code and its own simulator. REF is checked out in a temporary git
worktree and swept by its own `bench/tasks/sweep.py` (any REF whose bench has one, old or new). The backlog is
seeded by this checkout's code for both sides (they share the database, so the order and audit tables must be
the same). Both sides run in this environment, so it needs REF's dependencies too (a REF from before the
thread-pool engine imports aiohttp). Per side: the share of the latency limit (each run's median window), and
the CPU per close of the sweeper process plus PostgreSQL's backends serving the database (sampled from /proc
by this process).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import tempfile
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from . import runner
from .machine import DatabaseLoad
from .simproc import SimulatorProcess, simulator_process
from .stats import Figure, alternate

# A database of its own: the sides' seeding empties its tables, which must never be a full run's.
DEFAULT_POSTGRES = runner.DEFAULT_POSTGRES + "_ab"
THIS = "this checkout"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.ab", description=__doc__)
    parser.add_argument("ref", help="the git commit (or branch, tag) to compare this checkout with")
    parser.add_argument("--pairs", type=int, default=3, help="runs per side, alternated (default 3)")
    parser.add_argument("--orders", type=int, default=4000, help="backlog per run (default 4000)")
    parser.add_argument("--workers", type=int, default=32, help="concurrent requests per process (default 32)")
    parser.add_argument("--processes", type=int, default=1, help="sweeper processes (default 1)")
    parser.add_argument("--latency", type=float, default=0.05, help="simulator latency in seconds (default 0.05)")
    parser.add_argument("--postgres-url", default=DEFAULT_POSTGRES,
                        help=f"database, created if missing; its tables are emptied (default {DEFAULT_POSTGRES})")
    return parser


def main() -> None:
    args = _parser().parse_args()
    backend = runner.postgres_backend(args.postgres_url)
    if backend is None:
        raise SystemExit(f"nothing answers at {args.postgres_url}: the comparison needs PostgreSQL")
    limit = args.processes * args.workers / args.latency
    with tempfile.TemporaryDirectory(prefix="wxpay-ab-") as tmp, ExitStack() as cleanup:
        base = Path(tmp) / "ref"
        subprocess.run(["git", "worktree", "add", "--detach", "--quiet", str(base), args.ref], cwd=runner.ROOT,
                       check=True)
        cleanup.callback(subprocess.run, ["git", "worktree", "remove", "--force", str(base)], cwd=runner.ROOT,
                         check=False)
        roots = {args.ref: base, THIS: runner.ROOT}
        simulators = {name: cleanup.enter_context(simulator_process(args.latency, root))
                      for name, root in roots.items()}

        def side(name: str) -> Callable[[], dict[str, Any]]:
            return lambda: _sweep(name, roots[name], simulators[name], backend, args.orders, args.workers,
                                  args.processes, limit)

        runs = alternate({name: side(name) for name in roots}, args.pairs)
    print()
    for name, results in runs.items():
        shares = [100 * result["of_limit"] for result in results]
        share = Figure.of(shares)
        print(f"{name:>16}: {share.median:.1f} % of the limit ({share.low:.1f}–{share.high:.1f} %), runs: "
              + ", ".join(f"{value:.1f}" for value in shares))
        if all("cpu_ms_per_close" in result for result in results):
            for part in ("sweeper", "database", "both"):
                cpu = Figure.of([result["cpu_ms_per_close"][part] for result in results])
                print(f"{'':>16}  CPU ms per close, {part}: {cpu.median:.2f} ({cpu.low:.2f}–{cpu.high:.2f})")
    pairs = [this["of_limit"] / ref["of_limit"] for ref, this in zip(runs[args.ref], runs[THIS], strict=True)]
    print(f"{THIS} ÷ {args.ref}, pair by pair, closes/s: {', '.join(f'{ratio:.3f}' for ratio in pairs)}")
    if all("cpu_ms_per_close" in result for result in runs[args.ref] + runs[THIS]):
        cpu_pairs = [this["cpu_ms_per_close"]["both"] / ref["cpu_ms_per_close"]["both"]
                     for ref, this in zip(runs[args.ref], runs[THIS], strict=True)]
        print(f"{THIS} ÷ {args.ref}, pair by pair, CPU per close (sweeper + PostgreSQL): "
              + ", ".join(f"{ratio:.3f}" for ratio in cpu_pairs))


def _sweep(name: str, root: Path, simulator: SimulatorProcess, backend: runner.Backend, orders: int, workers: int,
           processes: int, limit: float) -> dict[str, Any]:
    """Seed a fresh backlog and sweep it with `root`'s code; the median window's share of the limit, CPU."""
    runner.run("seed", backend=backend, orders=orders)
    watcher = DatabaseLoad(backend.url, urlsplit(backend.url).path.lstrip("/"))
    load = watcher.start() if watcher.available else None
    try:
        result = runner.run("sweep", backend=backend, base_url=simulator.base_url, root=root, workers=workers,
                            processes=processes)
    finally:
        database = load.stop() if load is not None else None
    rate = statistics.median(result["window_closes_per_s"])
    result["of_limit"] = rate / limit
    cpu = ""
    if database is not None:
        result["cpu_ms_per_close"] = {
            "sweeper": 1000 * result["cpu_s"] / result["handled"],
            "database": 1000 * database["cpu_s"] / result["handled"],
            "both": 1000 * (result["cpu_s"] + database["cpu_s"]) / result["handled"],
        }
        cpu = (f", CPU per close {result['cpu_ms_per_close']['sweeper']:.2f} ms sweeper + "
               f"{result['cpu_ms_per_close']['database']:.2f} ms PostgreSQL, "
               f"{database['peak_connections']} connections")
    print(f"{name:>16}: {rate:6.0f} closes/s, {100 * rate / limit:5.1f} % of the limit{cpu}, {result['by_action']}",
          flush=True)
    return result


if __name__ == "__main__":
    main()
