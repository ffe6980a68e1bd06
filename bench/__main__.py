"""`python -m bench [--quick]`: every figure in docs/performance.md, printed as tables and written as JSON."""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from . import machine, plot, report, runner, sections
from .plan import FULL, QUICK
from .settings import SQLITE_PATH
from .simproc import simulator_process

SECTIONS = ("client", "service", "profile", "sweep", "backoff", "ceiling", "processes", "memory", "flood", "scale")
RESULTS = Path(__file__).parent / "results"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="CI-sized: proves the benchmark runs, measures little")
    parser.add_argument("--postgres-url", default=os.environ.get("BENCH_POSTGRES_URL"),
                        help=f"database to use, created if missing (default {runner.DEFAULT_POSTGRES}, _quick appended "
                             "with --quick); its sections are skipped if nothing answers")
    parser.add_argument("--latency", type=float,
                        help="simulator latency in seconds for the sweep section (the process layouts keep theirs)")
    parser.add_argument("--only", help=f"comma-separated sections: {','.join(SECTIONS)}")
    parser.add_argument("--keep-scale-db", action="store_true",
                        help="keep the scale section's seeded database (named in its output) instead of dropping it")
    parser.add_argument("--output", type=Path,
                        help="JSON file (default: bench/results/latest.json, quick.json with --quick)")
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
    results: dict[str, Any] = {
        "machine": machine.describe(postgres_url if postgres else None), "plan": plan.__dict__, "quick": args.quick,
        "postgres": postgres is not None, "skipped": [], "section_seconds": {},
    }
    if postgres is None:
        results["skipped"].append(f"PostgreSQL sections: nothing answers at {postgres_url}")
    output = args.output or RESULTS / ("quick.json" if args.quick else "latest.json")
    started = time.perf_counter()
    latencies = {0.0, plan.latency, *(latency for _, _, latency in plan.process_layouts)}
    with ExitStack() as stack:
        sims = {latency: stack.enter_context(simulator_process(latency)) for latency in sorted(latencies)}
        instant, slow = sims[0.0], sims[plan.latency]
        runs: dict[str, Callable[[], Any]] = {
            "client": lambda: sections.client_overhead(plan, instant),
            "service": lambda: sections.service_overhead(plan, backends, instant),
            "profile": lambda: sections.profile(plan, backends[0], instant),
            "sweep": lambda: sections.sweep_throughput(plan, backends[0], slow),
            "flood": lambda: sections.flood(plan, backends),
        }
        if postgres is not None:  # the PostgreSQL-only sections
            runs["backoff"] = lambda: sections.backoff(plan, postgres, slow)
            runs["ceiling"] = lambda: sections.ceiling(plan, postgres, instant)
            runs["processes"] = lambda: sections.sweeper_processes(plan, postgres, sims)
            runs["memory"] = lambda: sections.memory(plan, postgres, instant)
            runs["scale"] = lambda: sections.admin_at_scale(args.quick, postgres_url, keep=args.keep_scale_db)
        for name in SECTIONS:
            if name in wanted and name in runs:
                began = time.perf_counter()
                print(f"{name}…", flush=True)
                results[name] = runs[name]()
                results["section_seconds"][name] = time.perf_counter() - began
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
