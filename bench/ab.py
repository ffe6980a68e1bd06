"""`python -m bench.ab REF`: this checkout's sweep against git REF's, in alternated runs on PostgreSQL.

How docs/performance.md measures a change: the two sides sweep a fresh backlog in turns (A B, B A, …), so
the machine's drift hits both alike, each side with its own code and its own simulator. REF is checked out
in a temporary git worktree; both sides must share their migrations, as they share the database.
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

from . import runner
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
    parser.add_argument("--workers", type=int, default=32, help="concurrent requests (default 32)")
    parser.add_argument("--latency", type=float, default=0.05, help="simulator latency in seconds (default 0.05)")
    parser.add_argument("--postgres-url", default=DEFAULT_POSTGRES,
                        help=f"database, created if missing; its tables are emptied (default {DEFAULT_POSTGRES})")
    return parser


def main() -> None:
    args = _parser().parse_args()
    backend = runner.postgres_backend(args.postgres_url)
    if backend is None:
        raise SystemExit(f"nothing answers at {args.postgres_url}: the comparison needs PostgreSQL")
    limit = args.workers / args.latency
    with tempfile.TemporaryDirectory(prefix="wxpay-ab-") as tmp, ExitStack() as cleanup:
        base = Path(tmp) / "ref"
        subprocess.run(["git", "worktree", "add", "--detach", "--quiet", str(base), args.ref], cwd=runner.ROOT,
                       check=True)
        cleanup.callback(subprocess.run, ["git", "worktree", "remove", "--force", str(base)], cwd=runner.ROOT,
                         check=False)
        roots = {args.ref: base, THIS: runner.ROOT}
        simulators = {name: cleanup.enter_context(simulator_process(args.latency, root)) for name, root in roots.items()}

        def side(name: str) -> Callable[[], dict[str, Any]]:
            return lambda: _sweep(name, roots[name], simulators[name], backend, args.orders, args.workers, limit)

        runs = alternate({name: side(name) for name in roots}, args.pairs)
    print()
    for name, results in runs.items():
        shares = [100 * result["of_limit"] for result in results]
        share = Figure.of(shares)
        print(f"{name:>16}: {share.median:.1f} % of the limit ({share.low:.1f}–{share.high:.1f} %), runs: "
              + ", ".join(f"{value:.1f}" for value in shares))
    pairs = [this["of_limit"] / ref["of_limit"] for ref, this in zip(runs[args.ref], runs[THIS], strict=True)]
    print(f"{THIS} ÷ {args.ref}, pair by pair: {', '.join(f'{ratio:.3f}' for ratio in pairs)}")


def _sweep(name: str, root: Path, simulator: SimulatorProcess, backend: runner.Backend, orders: int, workers: int,
           limit: float) -> dict[str, Any]:
    """Seed a fresh backlog and sweep it with `root`'s code; the median window's share of the limit."""
    runner.run("seed", backend=backend, root=root, orders=orders)
    result = runner.run("sweep", backend=backend, base_url=simulator.base_url, root=root, workers=workers)
    rate = statistics.median(result["window_closes_per_s"])
    result["of_limit"] = rate / limit
    print(f"{name:>16}: {rate:6.0f} closes/s, {100 * rate / limit:5.1f} % of the limit, "
          f"{result['cores']:.2f} cores, {result['by_action']}", flush=True)
    return result


if __name__ == "__main__":
    main()
