"""`manage.py close_expired_orders`: the cron job. Parses flags, calls the sweep service, reports."""

from __future__ import annotations

import json
import re
import threading
import time
from datetime import datetime, timedelta, timezone
from typing import Any

from django.core.exceptions import ImproperlyConfigured
from django.core.management.base import BaseCommand, CommandError, CommandParser

from django_wxpay_close.services import CloseAction, CloseReport, OrderCloseResult, sweep_expired_orders

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> timedelta:
    match = _DURATION.match(text.strip())
    if not match:
        raise ValueError(f"{text!r} is not a duration like 90s, 30m, 2h or 1d")
    return timedelta(seconds=float(match[1]) * _UNIT_SECONDS[match[2]])


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError("must be at least 1")
    return value


class Command(BaseCommand):
    help = (
        "Close open WeChat Pay orders whose payment window has passed. Safe to run from several hosts "
        "at once. Exits non-zero on a configuration error, an order needing attention or an unexpected failure."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--dry-run", action="store_true", help="List the orders that are due; send nothing.")
        parser.add_argument("--limit", type=_positive_int, help="Close at most this many orders in this run.")
        parser.add_argument("--batch-size", type=_positive_int, help="Orders claimed per database round trip.")
        parser.add_argument("--workers", type=_positive_int, help="Concurrent requests to WeChat.")
        parser.add_argument("--merchant", action="append", dest="merchants", metavar="NAME",
                            help="Only this merchant (a key of WXPAY_CLOSE['MERCHANTS']); repeatable.")
        parser.add_argument("--older-than", type=parse_duration, metavar="DURATION",
                            help="Only orders whose deadline passed at least this long ago (90s, 30m, 2h, 1d).")
        parser.add_argument("--json", action="store_true", help="Print the summary as JSON (nothing else on stdout).")
        parser.add_argument("--progress", choices=["auto", "bar", "log", "none"], default="auto",
                            help="auto: a bar on a terminal, periodic lines otherwise.")
        parser.add_argument("--no-fail-on-error", dest="fail_on_error", action="store_false",
                            help="Exit 0 even when something needs attention.")

    def handle(self, *args: Any, **options: Any) -> None:
        progress = _Progress(self, mode="none" if options["json"] else options["progress"])
        try:
            report = sweep_expired_orders(
                merchants=options["merchants"], older_than=options["older_than"], limit=options["limit"],
                batch_size=options["batch_size"], workers=options["workers"], dry_run=options["dry_run"],
                on_result=progress.update,
            )
        except ImproperlyConfigured as exc:
            raise CommandError(str(exc)) from exc
        finally:
            progress.close()
        if options["json"]:
            self.stdout.write(json.dumps(_summary(report, dry_run=options["dry_run"]), indent=2))
        else:
            self._print_table(report, dry_run=options["dry_run"])
        if report.has_alarms and options["fail_on_error"]:
            problems = ", ".join(
                a.counted(report.by_action[a]) for a in CloseAction if a.is_alarm and report.by_action[a]
            )
            raise CommandError(f"close_expired_orders finished with problems: {problems}")

    def _print_table(self, report: CloseReport, *, dry_run: bool) -> None:
        if dry_run:
            self.stdout.write(f"Dry run: {report.total} orders are due for closing; nothing was sent.")
            return
        merchants = sorted({merchant for merchant, _ in report.by_merchant})
        actions = [action for action in CloseAction if report.by_action[action]]
        elapsed = ((report.finished_at or report.started_at) - report.started_at).total_seconds()
        self.stdout.write(f"Swept {report.total} orders in {elapsed:.1f}s: {report.sentence()}")
        if not actions:
            return
        # One row per outcome, one column per merchant, totals last: readable in a terminal and in a cron mail.
        first = max(len("outcome"), *(len(a.value) for a in actions))
        widths = [max(len(m), 5) for m in merchants]

        def cells(label: str, values: list[Any], total: Any) -> str:
            return label.ljust(first) + "".join(f"  {v:>{w}}" for v, w in zip(values, widths)) + f"  {total:>7}"

        self.stdout.write(self.style.MIGRATE_HEADING(cells("outcome", merchants, "total")))
        for action in actions:
            line = cells(action.value, [report.by_merchant[(m, action)] for m in merchants], report.by_action[action])
            self.stdout.write(self.style.ERROR(line) if action.is_alarm else line)
        totals = [sum(report.by_merchant[(m, a)] for a in actions) for m in merchants]
        self.stdout.write(cells("total", totals, report.total))
        reasons = [(a, r, n) for (a, r), n in report.by_reason.most_common() if r and a is not CloseAction.CLOSED]
        if reasons:
            self.stdout.write("Not closed, and why:")
            for action, reason, count in reasons:
                self.stdout.write(f"  {count:>6}  {action.value:<{first}}  {reason}")
        for merchant, reason in sorted(report.halted_merchants.items()):
            self.stderr.write(self.style.ERROR(f"Merchant {merchant!r} halted for this run: {reason}"))


def _summary(report: CloseReport, *, dry_run: bool) -> dict[str, Any]:
    return {
        "dry_run": dry_run,
        "total": report.total,
        "started_at": report.started_at.isoformat(),
        "finished_at": report.finished_at.isoformat() if report.finished_at else None,
        "by_action": {action.value: count for action, count in report.by_action.items()},
        "by_merchant": {
            merchant: {action.value: count for (m, action), count in report.by_merchant.items() if m == merchant}
            for merchant in sorted({m for m, _ in report.by_merchant})
        },
        "reasons": [
            {"action": action.value, "reason": reason, "count": count}
            for (action, reason), count in report.by_reason.most_common()
        ],
        "halted_merchants": report.halted_merchants,
        "ok": not report.has_alarms,
    }


class _Progress:
    """A tqdm bar on a terminal; plain periodic lines otherwise (cron logs). Called from the pipeline's threads."""

    LOG_EVERY_SECONDS = 10.0

    def __init__(self, command: BaseCommand, *, mode: str) -> None:
        stream = command.stdout
        if mode == "auto":
            mode = "bar" if stream.isatty() else "log"
        self.mode = mode
        self.command = command
        self.done = 0
        self.closed = 0
        self.started = time.monotonic()
        self.last_line = self.started
        self.lock = threading.Lock()
        self.bar = None
        if mode == "bar":
            from tqdm import tqdm

            self.bar = tqdm(unit=" orders", desc="closing", file=stream._out, dynamic_ncols=True)

    def update(self, result: OrderCloseResult) -> None:
        with self.lock:
            self.done += 1
            self.closed += result.action in (CloseAction.CLOSED, CloseAction.ALREADY_CLOSED)
            if self.bar is not None:
                self.bar.update(1)
            elif self.mode == "log" and time.monotonic() - self.last_line >= self.LOG_EVERY_SECONDS:
                self.last_line = time.monotonic()
                self._log_line()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def _log_line(self) -> None:
        elapsed = max(time.monotonic() - self.started, 1e-9)
        # Cron logs often carry no timestamps of their own.
        stamp = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        self.command.stdout.write(
            f"{stamp} progress: {self.done} orders handled, {self.closed} closed, {self.done / elapsed:.1f}/s"
        )
