"""The results as plain-text tables (what `python -m bench` prints): medians with (min–max) over the repeats."""

from __future__ import annotations

from typing import Any

from . import flood


def _fig(figure: dict[str, Any] | None, fmt: str = "{:.0f}") -> str:
    if not figure:
        return "–"
    return f"{fmt.format(figure['median'])} ({fmt.format(figure['min'])}–{fmt.format(figure['max'])})"


def _pct(figure: dict[str, Any] | None) -> str:
    if not figure:
        return "–"
    return _fig({key: figure[key] * 100 for key in ("median", "min", "max")}, "{:.0f}") + " %"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows, strict=True)]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(str(cell).ljust(width) for cell, width in zip(cells, widths, strict=True)) + " |"

    return [line(header), "|" + "|".join("-" * (width + 2) for width in widths) + "|", *map(line, rows)]


def _cpu(r: dict[str, Any]) -> list[str]:
    """CPU ms per close: the sweeper process(es), PostgreSQL's backends, the two together."""
    cpu = r.get("cpu_ms_per_close", {})
    return [_fig(cpu.get("sweeper"), "{:.2f}"), _fig(cpu.get("database"), "{:.2f}"),
            _fig(cpu.get("sweeper_and_database"), "{:.2f}")]


def _once(r: dict[str, Any]) -> str:
    requests = r.get("requests")
    return "–" if requests is None else ("yes" if requests["exactly_once"] else "NO")


def _latency(r: dict[str, Any]) -> str:
    if "latency_ms_p50" not in r:
        return "–"
    return f"{r['latency_ms_p50']['median']:.1f} / {r['latency_ms_p99']['median']:.1f}"


def _busy(r: dict[str, Any]) -> str:
    """Cores busy machine-wide, and of those, the ones used by other work than the measured processes."""
    return f"{r['machine_busy_cores']['median']:.2f} / {r['other_cores']['median']:.2f}"


_BUSY_HEADER = "cores busy: machine / other work"
_CPU_HEADER = ["CPU ms/close sweeper", "CPU ms/close PostgreSQL", "CPU ms/close both"]


def render(results: dict[str, Any]) -> str:
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
        out += [f"### Where the CPU goes (cProfile self time, % of the total; close_order() on {profile['vendor']})",
                ""]
        areas = list(dict.fromkeys([*profile["close_order"], *profile["client"]]))
        rows = [[area, f"{profile['client'].get(area, 0):.0f} %", f"{profile['close_order'].get(area, 0):.0f} %"]
                for area in areas]
        out += _table(["area", "client alone", "close_order()"], rows) + [""]
    if sweep := results.get("sweep"):
        latency_ms = results["plan"]["latency"] * 1000
        out += [f"### Sweep: {results['plan']['sweep_orders']} expired orders per run, one process, "
                f"simulator latency {latency_ms:g} ms", ""]
        rows = []
        for workers, entry in sweep.items():
            for name, r in entry["sides"].items():
                rows.append([workers, name, str(r["runs"]), _fig(r["closes_per_s"]), f"{r['limit_per_s']:.0f}",
                             _pct(r["of_limit"]), _latency(r), *_cpu(r), _fig(r.get("sql_per_close"), "{:.2f}"),
                             _fig(r.get("transactions_per_close"), "{:.2f}"), str(r.get("peak_connections", "–")),
                             _busy(r), f"{r['peak_rss_kib'] / 1024:.0f}", _once(r)])
        out += _table(["workers", "who", "runs", "closes/s", "limit/s", "of limit", "p50 / p99 ms", *_CPU_HEADER,
                       "SQL/close", "transactions/close", "connections", _BUSY_HEADER, "peak RSS MiB",
                       "each order sent once"], rows) + [""]
        rows = [[workers, f"{entry[key]['ours']} ÷ {entry[key]['reference']}", _fig(entry[key]["closes_per_s"], "{:.2f}")]
                for workers, entry in sweep.items() for key in ("ours_to_reference", "ours_to_client_alone")
                if key in entry]
        out += _table(["workers", "closes/s, run by run", "ratio"], rows) + [""]
    if backoff := results.get("backoff"):
        latency_ms = results["plan"]["latency"] * 1000
        out += [f"### A backlog behind orders waiting for a retry: {results['plan']['sweep_orders']} due orders, "
                f"{backoff['workers']} workers, {latency_ms:g} ms", ""]
        rows = [[name, str(r["runs"]), _fig(r["closes_per_s"]), _pct(r["of_limit"]), *_cpu(r),
                 _fig(r.get("sql_per_close"), "{:.2f}"), _once(r)] for name, r in backoff["sides"].items()]
        out += _table(["backlog", "runs", "closes/s", "of limit", *_CPU_HEADER, "SQL/close", "each order sent once"],
                      rows) + [""]
        out += [f"behind ÷ due only, run by run: {_fig(backoff['behind_to_normal'], '{:.2f}')}", ""]
        if claim := backoff.get("claim_plan"):
            out += [f"The claim's plan behind {backoff['waiting']} waiting orders (rows removed by filter: "
                    f"{claim['rows_removed_by_filter']}):", "", "```", claim["plan"], "```", ""]
            for key, what in (("waiting_count_plan", "counting the orders that wait (capped)"),
                              ("waiting_next_plan", "the next retry's time")):
                if key in claim:
                    out += [f"The summary's plan, {what}:", "", "```", claim[key], "```", ""]
    if ceiling := results.get("ceiling"):
        out += [f"### Ceiling: zero latency, {ceiling['workers']} workers, one process", ""]
        rows = [[name, _fig(r["closes_per_s"]), _fig(r["cores"], "{:.2f}"), *_cpu(r), _busy(r)]
                for name, r in ceiling["sides"].items()]
        out += _table(["who", "closes/s", "cores (process)", *_CPU_HEADER, _BUSY_HEADER], rows) + [""]
    if processes := results.get("processes"):
        out += [f"### Sweeper processes (close_expired_orders --processes P --workers W) sharing one backlog of "
                f"{processes['orders']} orders", ""]
        rows = [[name, _fig(r["closes_per_s"]), f"{r['limit_per_s']:.0f}", _pct(r["of_limit"]),
                 _fig(r["seconds"], "{:.1f}"), *_cpu(r), str(r.get("peak_connections", "–")),
                 _busy(r), _once(r)]
                for name, r in processes["layouts"].items()]
        out += _table(["processes × workers, latency", "closes/s", "limit/s", "of limit", "seconds for the backlog",
                       *_CPU_HEADER, "connections", _BUSY_HEADER, "each order sent once"], rows) + [""]
    if memory := results.get("memory"):
        out += ["### Peak RSS of the sweeper process", ""]
        rows = [[orders, "dry run", f"{r['rss_before_sweep_kib'] / 1024:.1f}", f"{r['peak_rss_kib'] / 1024:.1f}"]
                for orders, r in memory.items()]
        rows += _real_sweep_peaks(results)
        out += _table(["backlog", "mode", "RSS before sweep MiB", "peak RSS MiB"], rows) + [""]
    if floods := results.get("flood"):
        out += flood.render(floods)
    return "\n".join(out)


def _real_sweep_peaks(results: dict[str, Any]) -> list[list[str]]:
    """Peak RSS of the real (sending) PostgreSQL sweeps of the sweep and ceiling sections."""
    plan, rows = results["plan"], []
    for workers, entry in results.get("sweep", {}).items():
        if run := entry["sides"].get("ours/postgresql"):
            rows.append([str(plan["sweep_orders"]), f"real sweep, {workers} workers", "",
                         f"{run['peak_rss_kib'] / 1024:.1f}"])
    if run := results.get("ceiling", {}).get("sides", {}).get("ours/postgresql"):
        rows.append([str(plan["ceiling_calls"]), f"real sweep, {results['ceiling']['workers']} workers, 0 ms", "",
                     f"{run['peak_rss_kib'] / 1024:.1f}"])
    return rows
