"""`python -m bench.simserver LATENCY`: the package's loopback simulator for the benchmark, in its own process.

It closes any order it is asked about (`unknown_orders="open"`, so every seeded order gets a signed first-time
SUCCESS) and answers one command on stdin, `count PREFIX`, with a JSON line saying how many closeorder
requests each order numbered PREFIX… received since the last count: how the benchmark proves that sweeper
processes sharing a backlog sent each order exactly once.
"""

from __future__ import annotations

import json
import sys
from collections import Counter

from django_wxpay_close.testing import WeChatPaySimulator


def main(argv: list[str]) -> int:
    simulator = WeChatPaySimulator(unknown_orders="open", latency=float(argv[0]))
    with simulator:
        print(f"listening on {simulator.base_url}", flush=True)
        for line in sys.stdin:
            command, _, prefix = line.strip().partition(" ")
            if command != "count":
                print(json.dumps({"error": f"unknown command {command!r}"}), flush=True)
                continue
            counts = [n for key, n in simulator.close_request_counts().items() if key.out_trade_no.startswith(prefix)]
            simulator.reset_log()
            per_order = Counter(counts)
            print(json.dumps({"orders": len(counts), "requests": sum(counts),
                              "orders_by_requests": {str(k): v for k, v in sorted(per_order.items())}}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
