"""`python -m bench.worker TASK '{json kwargs}'`: run one measurement in this fresh process, print JSON."""

from __future__ import annotations

import importlib
import json
import resource
import sys

TASKS = ("claim_plan", "client", "flood", "pool", "profile", "reference", "scale", "service", "seed", "sweep")


def main(argv: list[str]) -> int:
    task, kwargs = argv[0], json.loads(argv[1]) if len(argv) > 1 else {}
    if task not in TASKS:
        raise SystemExit(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    result = importlib.import_module(f"bench.tasks.{task}").run(**kwargs)
    result["peak_rss_kib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
