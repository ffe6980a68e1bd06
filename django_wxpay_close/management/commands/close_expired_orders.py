"""`manage.py close_expired_orders`: the cron job. Parses flags, calls the sweep service, reports.

Exit statuses (when several apply, the first in this list wins):
  5  the database became unavailable mid-run (every answer it could not write is logged at ERROR)
  3  a configuration error: WXPAY_CLOSE is unusable (nothing is sent; the system check ids are named), or
     WeChat refused a merchant's key or sign type
  1  an unexpected failure (a bug, logged with its traceback), or an answer that came after another
     sweeper had taken its order over; also another app's failed system check, as for any Django command
  4  orders were put on hold: a person must look (admin filter "needs attention")
  6  WeChat looked unreachable: most requests failed in transport, so the run stopped early
  2  bad command-line arguments, or a --merchant that WXPAY_CLOSE does not name
  130  interrupted (Ctrl-C): it claimed nothing more and recorded the answers in flight
  0  otherwise (orders whose close will be retried are not a problem)
`--no-fail-on-error` makes 1, 4 and 6, and 3 for WeChat's refusal of a key, exit 0 (interrupted: 130). An
unusable WXPAY_CLOSE always exits 3, as 5 and 2 always fail: the sweep could not run, and unpaid orders would
stay payable unnoticed.
"""
from __future__ import annotations

import argparse
import json
import re
import threading
import time
import unicodedata
from collections.abc import Callable, Mapping
from datetime import datetime, timedelta, timezone
from typing import Any

from django.conf import settings
from django.core import checks
from django.core.exceptions import ImproperlyConfigured
from django.core.management.base import BaseCommand, CommandError, CommandParser, SystemCheckError
from django.utils.translation import gettext, ngettext

from django_wxpay_close.conf import MAX_WORKERS, inspect_settings
from django_wxpay_close.management.processes import run_processes
from django_wxpay_close.reports import (
    EXIT_ATTENTION,
    EXIT_CONFIGURATION,
    EXIT_DATABASE,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    CloseAction,
    CloseReport,
    OrderCloseResult,
    interrupted_summary,
    summarise,
    unusable_settings_summary,
)
from django_wxpay_close.selectors import orders_waiting_for_retry
from django_wxpay_close.services import DatabaseUnavailable, sweep_expired_orders

MAX_PROCESSES = 32
CHECK_ID_PREFIX = "django_wxpay_close."  # the ids of this app's system checks (checks.py)
# What --no-fail-on-error turns into 0 (not for an unusable WXPAY_CLOSE: see the module docstring).
FORGIVABLE = (EXIT_FAILED, EXIT_CONFIGURATION, EXIT_ATTENTION, EXIT_UNREACHABLE)

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> timedelta:
    match = _DURATION.match(text.strip())
    if not match:
        raise ValueError(gettext("%(text)r is not a duration like 90s, 30m, 2h or 1d") % {"text": text})
    return timedelta(seconds=float(match[1]) * _UNIT_SECONDS[match[2]])


def _duration_argument(text: str) -> timedelta:
    # argparse shows an ArgumentTypeError's message as it is; for a ValueError it names this function instead.
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _whole_number(maximum: int | None = None) -> Callable[[str], int]:
    """An argparse type: a whole number from 1 (to `maximum`), refused with a message that says so."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = 0
        if value < 1 or (maximum is not None and value > maximum):
            expected = gettext("a whole number of at least 1") if maximum is None \
                else gettext("a whole number from 1 to %(maximum)d") % {"maximum": maximum}
            raise argparse.ArgumentTypeError(gettext("%(text)r is not %(expected)s") % {"text": text,
                                                                                        "expected": expected})
        return value

    return parse


def _width(text: str) -> int:
    """Terminal columns: a Chinese character takes two, so the table stays aligned in every language."""
    return sum(2 if unicodedata.east_asian_width(char) in "WF" else 1 for char in text)


def _ljust(text: str, width: int) -> str:
    return text + " " * max(width - _width(text), 0)


def _rjust(text: str, width: int) -> str:
    return " " * max(width - _width(text), 0) + text


def _unusable_settings() -> list[dict[str, str]]:
    """WXPAY_CLOSE's error-level problems (what `manage.py check` reports with these ids), as {id, message, hint}."""
    _, problems = inspect_settings()
    return [{"id": p.id, "message": p.message, "hint": p.hint} for p in problems if p.is_error]


class Command(BaseCommand):
    # Django's system checks run in handle() instead, so that this app's own errors (an unusable WXPAY_CLOSE)
    # exit 3 with a summary like any other configuration error; another app's errors still fail as usual.
    requires_system_checks: list[str] = []

    @property
    def help(self) -> str:  # type: ignore[override]
        # A property, not a lazy string: argparse runs regular expressions over it, which a lazy proxy fails.
        # Evaluated when the parser is built, so in the command's language (LANGUAGE_CODE).
        return gettext(
            "Close open WeChat Pay orders whose payment window has passed. Safe to run from several hosts "
            "at once. Exit status: 0 fine, 1 unexpected failure, 2 bad arguments, 3 configuration error, 4 orders "
            "need a person, 5 database unavailable, 6 WeChat unreachable, 130 interrupted."
        )

    def add_arguments(self, parser: CommandParser) -> None:
        # argparse %-formats help texts: a literal percent sign would have to be written %%.
        parser.add_argument("--dry-run", action="store_true",
                            help=gettext("List the orders that are due; send nothing."))
        parser.add_argument("--limit", type=_whole_number(),
                            help=gettext("Close at most this many orders in this run."))
        parser.add_argument("--batch-size", type=_whole_number(), help=gettext("Orders a dry run reads per query."))
        parser.add_argument("--workers", type=_whole_number(MAX_WORKERS),
                            help=gettext("Worker threads, each closing one order at a time (1 to %(maximum)d).")
                            % {"maximum": MAX_WORKERS})
        parser.add_argument("--processes", type=_whole_number(MAX_PROCESSES), default=1,
                            help=gettext("Sweeper processes sharing the backlog, each with --workers threads "
                                         "(1 to %(maximum)d).") % {"maximum": MAX_PROCESSES})
        parser.add_argument("--merchant", action="append", dest="merchants", metavar="NAME",
                            help=gettext("Only this merchant (a key of WXPAY_CLOSE['MERCHANTS']); repeatable."))
        parser.add_argument("--older-than", type=_duration_argument, metavar="DURATION",
                            help=gettext("Only orders whose deadline passed at least this long ago "
                                         "(90s, 30m, 2h, 1d)."))
        parser.add_argument("--check-held", action="store_true",
                            help=gettext("First ask WeChat (orderquery) about every open order on hold and settle "
                                         "what its answer settles; then sweep."))
        parser.add_argument("--json", action="store_true",
                            help=gettext("Print the summary as JSON (nothing else on stdout)."))
        parser.add_argument("--progress", choices=["auto", "bar", "log", "none"], default="auto",
                            help=gettext("auto: a bar on a terminal (needs tqdm), periodic lines otherwise."))
        # Django adds this flag only to commands whose system checks it runs itself.
        parser.add_argument("--skip-checks", action="store_true", help=gettext("Skip Django's system checks."))
        parser.add_argument("--no-fail-on-error", dest="fail_on_error", action="store_false",
                            help=gettext("Exit 0 even when something needs attention; not when the sweep could "
                                         "not run (database unavailable, WXPAY_CLOSE unusable) or was interrupted."))

    def handle(self, *args: Any, **options: Any) -> None:
        if not options["skip_checks"]:
            self._check_other_apps()
        unusable = _unusable_settings()
        if unusable:
            summary = unusable_settings_summary(unusable, dry_run=options["dry_run"])
        else:
            self._require_known_merchants(options["merchants"])
            summary = self._sweep(options)
        self._report(summary, options)

    def _check_other_apps(self) -> None:
        """Django's system checks, as manage.py runs them before a command; an unusable WXPAY_CLOSE is left to
        handle() (exit 3), any other app's error raises SystemCheckError (exit 1) with Django's own report."""
        try:
            self.check()
        except SystemCheckError:
            failing = [issue for issue in checks.run_checks() if issue.is_serious() and not issue.is_silenced()]
            if not failing or any(not (issue.id or "").startswith(CHECK_ID_PREFIX) for issue in failing):
                raise

    def _require_known_merchants(self, names: list[str] | None) -> None:
        merchants = settings.WXPAY_CLOSE.get("MERCHANTS")
        configured = [str(name) for name in merchants] if isinstance(merchants, Mapping) else []
        unknown = [name for name in names or [] if name not in configured]
        if unknown:
            raise CommandError(
                gettext("--merchant %(unknown)s: not in WXPAY_CLOSE['MERCHANTS'], which names %(configured)s")
                % {"unknown": ", ".join(map(repr, unknown)), "configured": ", ".join(map(repr, configured))},
                returncode=EXIT_USAGE)

    def _sweep(self, options: dict[str, Any]) -> dict[str, Any]:
        if options["processes"] > 1 and not options["dry_run"]:
            return run_processes(options)
        quiet = options["json"] or options["verbosity"] == 0
        progress = _Progress(self, mode="none" if quiet else options["progress"],
                             each=options["verbosity"] >= 2 or (options["dry_run"] and not quiet))
        # The same counts as the sweep's report, kept here too: after Ctrl-C the sweep returns none.
        seen = CloseReport(observer=progress.update)
        try:
            report = sweep_expired_orders(
                merchants=options["merchants"], older_than=options["older_than"], limit=options["limit"],
                batch_size=options["batch_size"], workers=options["workers"], dry_run=options["dry_run"],
                check_held=options["check_held"], on_result=seen.add,
            )
            return summarise(report, dry_run=options["dry_run"])
        except ImproperlyConfigured as exc:  # settings that changed since the check, or a backend's own
            errors = _unusable_settings() or [{"id": "", "message": str(exc), "hint": ""}]
            return unusable_settings_summary(errors, dry_run=options["dry_run"])
        except DatabaseUnavailable as exc:
            return summarise(exc.report or seen.finish(), dry_run=False, database_error=str(exc))
        except KeyboardInterrupt:  # the sweep stopped claiming and wrote the answers in flight
            return interrupted_summary(seen, dry_run=options["dry_run"])
        finally:
            progress.close()

    def _report(self, summary: dict[str, Any], options: dict[str, Any]) -> None:
        """Print the summary (table or JSON) and exit with its status (CommandError carries it)."""
        errors = summary.get("configuration_errors", [])
        for error in errors:
            line = f"{error['id']}: {error['message']}" if error["id"] else error["message"]
            self.stderr.write(self.style.ERROR(line))
            if error["hint"]:
                self.stderr.write(f"\t{gettext('HINT')}: {error['hint']}")
        if options["json"]:
            self.stdout.write(json.dumps(summary, indent=2))
        elif options["verbosity"] >= 1 and (summary["total"] or not errors):  # a run that did something
            self._print_table(summary)
        status = summary["exit_status"]
        if not options["fail_on_error"] and status in FORGIVABLE and not errors:
            status = EXIT_INTERRUPTED if summary.get("interrupted") else 0
        if not status:
            return
        if status == EXIT_DATABASE:
            message = gettext("close_expired_orders stopped: %(error)s") % {"error": summary["database_error"]}
        elif status == EXIT_INTERRUPTED:
            message = gettext("close_expired_orders was interrupted; the closes in flight were recorded")
        elif errors:
            message = gettext("close_expired_orders: %(problems)s.") % {"problems": summary["problems"]}
            if any(error["id"] for error in errors):
                message += " " + gettext("`manage.py check` explains each problem.")
        else:
            message = gettext("close_expired_orders finished with problems: %(problems)s") % {
                "problems": summary["problems"]}
        raise CommandError(message, returncode=status)

    def _print_table(self, summary: dict[str, Any]) -> None:
        if summary["dry_run"]:
            self.stdout.write(ngettext("Dry run: %(count)d order is due for closing; nothing was sent.",
                                       "Dry run: %(count)d orders are due for closing; nothing was sent.",
                                       summary["total"]) % {"count": summary["total"]})
            return
        by_merchant: dict[str, dict[str, int]] = summary["by_merchant"]
        merchants = sorted(by_merchant)
        actions = [action for action in CloseAction if summary["by_action"].get(action.value)]
        processes = ngettext(" by %(count)d process", " by %(count)d processes", summary["processes"]) % {
            "count": summary["processes"]} if summary.get("processes", 1) > 1 else ""
        self.stdout.write(ngettext("Swept %(count)d order in %(seconds).1fs%(processes)s: %(sentence)s",
                                   "Swept %(count)d orders in %(seconds).1fs%(processes)s: %(sentence)s",
                                   summary["total"])
                          % {"count": summary["total"], "seconds": summary["seconds"], "processes": processes,
                             "sentence": summary["sentence"]})
        if summary.get("database_error"):
            self.stderr.write(self.style.ERROR(gettext("Stopped: %(error)s") % {"error": summary["database_error"]}))
        if summary["stopped_early"]:
            self.stderr.write(self.style.ERROR(gettext("Stopped early: %(reason)s")
                                               % {"reason": summary["stopped_early"]}))
        if not actions:
            waiting = orders_waiting_for_retry()
            if waiting["count"]:
                when = f"{waiting['next_at']:%Y-%m-%d %H:%M:%S %Z}".rstrip()
                self.stdout.write(gettext(
                    "More than %(count)d overdue orders wait for a retry; the next is due at %(when)s.",
                ) % {"count": waiting["count"], "when": when} if waiting["more"] else ngettext(
                    "%(count)d overdue order waits for a retry; the next is due at %(when)s.",
                    "%(count)d overdue orders wait for a retry; the next is due at %(when)s.", waiting["count"],
                ) % {"count": waiting["count"], "when": when})
            return
        # One row per outcome, one column per merchant, totals last: readable in a terminal and in a cron mail.
        # The rows are the actions' codes (as in --json); only the two headings are words.
        outcome_heading, total_heading = gettext("outcome"), gettext("total")
        first = max(_width(outcome_heading), _width(total_heading), *(len(a.value) for a in actions))
        widths = [max(len(m), 5) for m in merchants]

        def cells(label: str, values: list[Any], total: Any) -> str:
            row = "".join(f"  {_rjust(str(v), w)}" for v, w in zip(values, widths, strict=True))
            return _ljust(label, first) + row + f"  {_rjust(str(total), 7)}"

        self.stdout.write(self.style.MIGRATE_HEADING(cells(outcome_heading, merchants, total_heading)))
        for action in actions:
            line = cells(action.value, [by_merchant[m].get(action.value, 0) for m in merchants],
                         summary["by_action"][action.value])
            self.stdout.write(self.style.ERROR(line) if action.is_alarm else line)
        totals = [sum(by_merchant[m].values()) for m in merchants]
        self.stdout.write(cells(total_heading, totals, summary["total"]))
        reasons = [r for r in summary["reasons"] if r["reason"] and r["action"] != CloseAction.CLOSED.value]
        if reasons:
            self.stdout.write(gettext("Not closed, and why:"))
            for row in reasons:
                self.stdout.write(f"  {row['count']:>6}  {row['action']:<{first}}  {row['reason']}")
        for merchant, reason in sorted(summary["halted_merchants"].items()):
            self.stderr.write(self.style.ERROR(gettext("Merchant %(merchant)r halted for this run: %(reason)s")
                                               % {"merchant": merchant, "reason": reason}))


class _Progress:
    """A tqdm bar on a terminal (if tqdm is installed); plain periodic lines otherwise (cron logs); with
    `each`, one line per order. Called from the sweep's worker threads."""

    LOG_EVERY_SECONDS = 10.0

    def __init__(self, command: BaseCommand, *, mode: str, each: bool = False) -> None:
        if mode in ("auto", "bar"):
            try:
                from tqdm import tqdm
            except ImportError:
                tqdm = None
            mode = "bar" if tqdm is not None and (mode == "bar" or command.stdout.isatty()) else "log"
        self.mode = "none" if each else mode
        self.each = each
        self.command = command
        self.done = 0
        self.closed = 0
        self.started = time.monotonic()
        self.last_line = self.started
        self.lock = threading.Lock()
        self.bar = tqdm(unit=gettext(" orders"), desc=gettext("closing"), file=_Unended(command.stdout),
                        dynamic_ncols=True) if self.mode == "bar" else None

    def update(self, result: OrderCloseResult) -> None:
        with self.lock:
            self.done += 1
            self.closed += result.action in (CloseAction.CLOSED, CloseAction.ALREADY_CLOSED)
            if self.each:
                reason = f" ({result.reason})" if result.reason else ""
                self.command.stdout.write(f"{result.out_trade_no}  {result.merchant}  {result.action.value}{reason}")
            elif self.bar is not None:
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
            ngettext("%(stamp)s progress: %(done)d order handled, %(closed)d closed, %(rate).1f/s",
                     "%(stamp)s progress: %(done)d orders handled, %(closed)d closed, %(rate).1f/s", self.done)
            % {"stamp": stamp, "done": self.done, "closed": self.closed, "rate": self.done / elapsed}
        )


class _Unended:
    """The command's stdout for tqdm, which draws a bar with carriage returns: no newline added per write."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream

    def write(self, text: str) -> None:
        self.stream.write(text, ending="")

    def flush(self) -> None:
        self.stream.flush()
