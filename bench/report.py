"""The results as a plain-text table (what `python -m bench` prints and docs/performance.md shows)."""

from __future__ import annotations

from typing import Any


def _fig(figure: dict[str, Any], fmt: str = "{:.0f}") -> str:
    return f"{fmt.format(figure['median'])} ({fmt.format(figure['min'])}–{fmt.format(figure['max'])})"


def _pct(figure: dict[str, Any]) -> str:
    return _fig({key: figure[key] * 100 for key in ("median", "min", "max")}, "{:.0f}") + " %"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(str(cell).ljust(width) for cell, width in zip(cells, widths)) + " |"

    return [line(header), "|" + "|".join("-" * (width + 2) for width in widths) + "|", *map(line, rows)]


def _real_sweep_peaks(results: dict[str, Any]) -> list[list[str]]:
    """Peak RSS of the real (sending) PostgreSQL sweeps the ceiling and sweep sections ran, largest worker count."""
    plan, rows = results["plan"], []
    if run := results.get("ceiling", {}).get("ours/postgresql sweep"):
        rows.append([str(plan["ceiling_calls"]), f"real sweep, {results['ceiling']['workers']} workers", "",
                     f"{run['peak_rss_kib'] / 1024:.1f}"])
    if run := results.get("sweep", {}).get(str(max(plan["workers"])), {}).get("ours/postgresql"):
        rows.append([str(plan["sweep_orders"]), f"real sweep, {max(plan['workers'])} workers", "",
                     f"{run['peak_rss_kib'] / 1024:.1f}"])
    return rows


def render(results: dict[str, Any]) -> str:
    """Markdown tables: medians with (min–max) over the repeats noted in each section."""
    out: list[str] = []
    if client := results.get("client"):
        out += [f"### Client CPU per close (sequential, zero latency, {client['calls']} calls × repeats)", ""]
        rows = [[name, _fig(fig)] for name, fig in client["cpu_us_per_close"].items()]
        rows += [["ours ÷ wechatpy", _fig(client["ours_to_wechatpy"], "{:.2f}")],
                 ["ours ÷ http.client floor", _fig(client["ours_to_http_client"], "{:.2f}")]]
        out += _table(["client", "CPU µs per close"], rows) + [""]
    if service := results.get("service"):
        out += ["### close_order() with its database work (zero latency, one order at a time)", ""]
        rows = [[backend, _fig(r["cpu_us_per_order"]), _fig(r["wall_us_per_order"]),
                 ", ".join(f"{n} statements × {count}" for n, count in r["sql_per_order"].items())]
                for backend, r in service.items()]
        out += _table(["database", "CPU µs per order", "wall µs per order", "SQL per order"], rows) + [""]
    if profile := results.get("profile"):
        out += [f"### Where the CPU goes (cProfile self time, % of the total; close_order() on {profile['vendor']})", ""]
        areas = list(dict.fromkeys([*profile["close_order"], *profile["client"]]))
        rows = [[area, f"{profile['client'].get(area, 0):.0f} %", f"{profile['close_order'].get(area, 0):.0f} %"]
                for area in areas]
        out += _table(["area", "client alone", "close_order()"], rows) + [""]
    if sweep := results.get("sweep"):
        latency_ms = results["plan"]["latency"] * 1000
        out += [f"### Sweep: {results['plan']['sweep_orders']} expired orders, simulator latency {latency_ms:g} ms", ""]
        rows = []
        for workers, sides in sweep.items():
            for name, r in sides.items():
                rows.append([workers, name, _fig(r["closes_per_s"]), f"{r['limit_per_s']:.0f}", _pct(r["of_limit"]),
                             f"{r['latency_ms_p50']['median']:.1f} / {r['latency_ms_p99']['median']:.1f}",
                             _fig(r["cores"], "{:.2f}"), _fig(r["machine_busy_cores"], "{:.2f}"),
                             f"{r['peak_rss_kib'] / 1024:.0f}"])
        out += _table(["workers", "who", "closes/s", "limit/s", "of limit", "p50 / p99 ms", "cores (process)",
                       "cores (machine)", "peak RSS MiB"], rows) + [""]
    if ceiling := results.get("ceiling"):
        out += [f"### Ceiling: zero latency, {ceiling['workers']} workers (one process)", ""]
        rows = [[name, _fig(r["closes_per_s"]), _fig(r["cores"], "{:.2f}"), _fig(r["machine_busy_cores"], "{:.2f}")]
                for name, r in ceiling.items() if name != "workers"]
        out += _table(["who", "closes/s", "cores (process)", "cores (machine)"], rows) + [""]
    if processes := results.get("processes"):
        out += [f"### Sweeper processes sharing one database and one backlog of {processes['orders']} orders", ""]
        rows = [[name, _fig(r["window_closes_per_s"]), f"{r['limit_per_s']:.0f}" if r["limit_per_s"] else "–",
                 _pct(r["of_limit"]) if r["of_limit"] else "–", _fig(r["to_first"], "{:.2f}"),
                 _fig(r["seconds"], "{:.1f}"), _fig(r["machine_busy_cores"], "{:.2f}")]
                for name, r in processes["layouts"].items()]
        first = next(iter(processes["layouts"]))
        out += _table(["processes × workers", "closes/s", "limit/s", "of limit", f"whole run ÷ {first}",
                       "seconds for the backlog", "cores (machine)"], rows) + [""]
    if memory := results.get("memory"):
        out += ["### Peak RSS of the sweeper process", ""]
        rows = [[orders, "dry run", f"{r['rss_before_sweep_kib'] / 1024:.1f}", f"{r['peak_rss_kib'] / 1024:.1f}"]
                for orders, r in memory.items()]
        rows += _real_sweep_peaks(results)
        out += _table(["backlog", "mode", "RSS before sweep MiB", "peak RSS MiB"], rows) + [""]
    return "\n".join(out)
