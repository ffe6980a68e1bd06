"""`python -m bench [--quick]`: every figure in docs/performance.md, printed as tables and written as JSON."""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from . import machine, plot, report, runner, sections
from .plan import FULL, QUICK
from .settings import SQLITE_PATH
from .simproc import simulator_process

SECTIONS = ("client", "service", "profile", "sweep", "ceiling", "processes", "memory")
RESULTS = Path(__file__).parent / "results"



def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="CI-sized: proves the benchmark runs, measures little")
    parser.add_argument("--postgres-url", default=os.environ.get("BENCH_POSTGRES_URL"),
                        help=f"database to use, created if missing (default {runner.DEFAULT_POSTGRES}, _quick appended "
                             "with --quick); its sections are skipped if nothing answers")
    parser.add_argument("--latency", type=float, help="simulator latency in seconds for the sweep sections")
    parser.add_argument("--only", help=f"comma-separated sections: {','.join(SECTIONS)}")
    parser.add_argument("--output", type=Path, help="JSON file (default: bench/results/latest.json, quick.json with --quick)")
    parser.add_argument("--plot", type=Path, help="write the throughput plot (PNG) here")
    return parser


def main() -> None:
    args = _parser().parse_args()
    path = Path(tempfile.gettempdir()) / f"wxpay_bench{_suffix(args)}.lock"
    with path.open("w") as lock:  # runs of one size share their databases: one at a time
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for another `python -m bench` to finish (lock {path})", flush=True)
            fcntl.flock(lock, fcntl.LOCK_EX)
        run(args)


def _suffix(args: argparse.Namespace) -> str:
    """Quick runs get their own databases, so CI or a quick check never empties a full run's tables."""
    return "_quick" if args.quick else ""


def run(args: argparse.Namespace) -> None:
    plan = QUICK if args.quick else FULL
    if args.latency is not None:
        plan = type(plan)(**{**plan.__dict__, "latency": args.latency})
    wanted = set(args.only.split(",")) if args.only else set(SECTIONS)
    suffix = _suffix(args)
    postgres_url = args.postgres_url or runner.DEFAULT_POSTGRES + suffix
    postgres = runner.postgres_backend(postgres_url)
    sqlite = runner.sqlite_backend(SQLITE_PATH.with_name(f"{SQLITE_PATH.stem}{suffix}{SQLITE_PATH.suffix}"))
    backends = [b for b in (postgres, sqlite) if b is not None]
    results: dict[str, Any] = {"machine": machine.describe(), "plan": plan.__dict__, "quick": args.quick,
                               "postgres": postgres is not None, "skipped": []}
    if postgres is None:
        results["skipped"].append(f"PostgreSQL sections: nothing answers at {postgres_url}")
    output = args.output or RESULTS / ("quick.json" if args.quick else "latest.json")
    started = time.perf_counter()
    with simulator_process(0.0) as instant, simulator_process(plan.latency) as slow:
        if "client" in wanted:
            results["client"] = sections.client_overhead(plan, instant)
        if "service" in wanted:
            results["service"] = sections.service_overhead(plan, backends, instant)
        if "profile" in wanted:
            results["profile"] = sections.profile(plan, backends[0], instant)
        if "sweep" in wanted:
            results["sweep"] = sections.sweep_throughput(plan, backends, slow)
        if postgres is not None:
            if "ceiling" in wanted:
                results["ceiling"] = sections.ceiling(plan, postgres, instant)
            if "processes" in wanted:
                results["processes"] = sections.sweeper_processes(plan, postgres, slow)
            if "memory" in wanted:
                results["memory"] = sections.memory(plan, postgres, instant)
    results["seconds"] = time.perf_counter() - started
    results["machine"]["load_average_at_end"] = os.getloadavg()
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2))
    if args.plot and "sweep" in results:
        plot.throughput(results, args.plot)
    print(report.render(results))
    for note in results["skipped"]:
        print(f"skipped: {note}")
    print(f"{results['seconds']:.0f} s; JSON in {output}")


if __name__ == "__main__":
    main()
