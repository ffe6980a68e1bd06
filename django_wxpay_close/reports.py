"""What a run did, for people and for cron: the action taken per order, the run's counts, its summary and the
command's exit status. No database and no HTTP here."""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from enum import Enum
from typing import Any

from django.utils import timezone
from django.utils.translation import gettext, ngettext_lazy, pgettext

from .wechat import Outcome

logger = logging.getLogger("django_wxpay_close")

# The command's exit statuses; when several apply, `exit_status` says which wins.
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_CONFIGURATION = 3
EXIT_ATTENTION = 4
EXIT_DATABASE = 5
EXIT_UNREACHABLE = 6
EXIT_INTERRUPTED = 130  # as a shell reports a process stopped by Ctrl-C



class CloseAction(str, Enum):
    """What the service did with one order; the summaries count these."""

    CLOSED = "closed"
    ALREADY_CLOSED = "already_closed"
    FOUND_PAID = "found_paid"
    RETRY_SCHEDULED = "retry_scheduled"
    QUERY_SCHEDULED = "query_scheduled"  # WeChat will be asked where the order stands (orderquery)
    CHECKED = "checked"  # asked WeChat (orderquery): the answer was recorded, the order did not change
    MARKED_UNKNOWN = "unknown_to_wechat"  # ORDERNOTEXIST until retries ran out
    PUT_ON_HOLD = "on_hold"  # a person must look: untrusted answer, our bug, retries spent
    CONFIGURATION_ERROR = "configuration_error"  # wrong key/sign type/merchant: the order is backed off
    SKIPPED = "skipped"  # nothing sent; `reason` says why
    CLAIM_LOST = "claim_lost"  # answered after another caller took the order over: nothing applied
    FAILED = "failed"  # an unexpected error on our side (logged with its traceback)

    def counted(self, count: int) -> str:
        """'1 was already paid', '2 were already paid': the label with its count, grammatical in each language."""
        return _ACTION_SINGULAR[self] % {"count": count}

    @property
    def is_alarm(self) -> bool:
        """Something cron monitoring should hear about (non-zero exit status)."""
        return self in (CloseAction.CONFIGURATION_ERROR, CloseAction.PUT_ON_HOLD, CloseAction.CLAIM_LOST,
                        CloseAction.FAILED)


# The counted phrases, through ngettext: English has two forms, Chinese one, other languages more.
_ACTION_SINGULAR = {
    CloseAction.CLOSED: ngettext_lazy("%(count)d closed", "%(count)d closed", "count"),
    CloseAction.ALREADY_CLOSED: ngettext_lazy("%(count)d was already closed", "%(count)d were already closed", "count"),
    CloseAction.FOUND_PAID: ngettext_lazy("%(count)d was already paid", "%(count)d were already paid", "count"),
    CloseAction.RETRY_SCHEDULED: ngettext_lazy("%(count)d will be retried", "%(count)d will be retried", "count"),
    CloseAction.QUERY_SCHEDULED: ngettext_lazy("%(count)d will be checked at WeChat",
                                               "%(count)d will be checked at WeChat", "count"),
    CloseAction.CHECKED: ngettext_lazy("%(count)d was checked at WeChat and left as it was",
                                       "%(count)d were checked at WeChat and left as they were", "count"),
    CloseAction.MARKED_UNKNOWN: ngettext_lazy("%(count)d was never known to WeChat",
                                              "%(count)d were never known to WeChat", "count"),
    CloseAction.PUT_ON_HOLD: ngettext_lazy("%(count)d needs attention", "%(count)d need attention", "count"),
    CloseAction.CONFIGURATION_ERROR: ngettext_lazy("%(count)d hit a configuration error",
                                                   "%(count)d hit a configuration error", "count"),
    CloseAction.SKIPPED: ngettext_lazy("%(count)d was skipped", "%(count)d were skipped", "count"),
    CloseAction.CLAIM_LOST: ngettext_lazy("%(count)d was answered after another close took it over",
                                          "%(count)d were answered after another close took them over", "count"),
    CloseAction.FAILED: ngettext_lazy("%(count)d failed unexpectedly", "%(count)d failed unexpectedly", "count"),
}

# Stored in CloseAttempt.reason and compared as they are, so they stay plain English: gettext_noop only puts them


@dataclass(frozen=True)
class OrderCloseResult:
    order_id: int
    out_trade_no: str
    merchant: str
    action: CloseAction
    reason: str = ""
    outcome: Outcome | None = None  # None when nothing was sent
    attempt_id: int | None = None
    duration: float = 0.0  # seconds spent on the HTTP exchange
    url: str = ""  # the URL that answered, or the last one tried

    @property
    def summary_key(self) -> str:
        """A short, low-cardinality reason for summaries: the err_code or outcome, else the reason; a transport
        failure names the URL, which is what an operator checks first."""
        key = self.reason.split(":", 1)[0] if self.reason else (self.outcome.value if self.outcome else "")
        return f"{key} ({self.url})" if self.outcome is not None and self.outcome.failed_in_transport else key


_MAX_SUMMARY_KEYS = 100


@dataclass
class CloseReport:
    """Counts by action, merchant and reason: constant memory whatever the backlog."""

    by_action: Counter[CloseAction] = field(default_factory=Counter)
    by_merchant: Counter[tuple[str, CloseAction]] = field(default_factory=Counter)
    by_reason: Counter[tuple[CloseAction, str]] = field(default_factory=Counter)
    halted_merchants: dict[str, str] = field(default_factory=dict)
    stopped_early: str = ""  # why the run stopped before the backlog was done (WeChat unreachable, say)
    started_at: datetime = field(default_factory=timezone.now)
    finished_at: datetime | None = None
    observer: Callable[[OrderCloseResult], None] | None = field(default=None, repr=False, compare=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, result: OrderCloseResult) -> None:
        with self._lock:
            self.by_action[result.action] += 1
            self.by_merchant[(result.merchant, result.action)] += 1
            key = (result.action, result.summary_key)
            if key in self.by_reason or len(self.by_reason) < _MAX_SUMMARY_KEYS:
                self.by_reason[key] += 1
            if self.observer:
                try:
                    self.observer(result)
                except Exception:  # noqa: BLE001 - the close is done and recorded; only its report failed
                    logger.exception("Reporting a close result failed")

    def finish(self) -> CloseReport:
        self.finished_at = timezone.now()
        return self

    @property
    def total(self) -> int:
        return sum(self.by_action.values())

    @property
    def has_alarms(self) -> bool:
        return bool(self.stopped_early) or any(action.is_alarm for action in self.by_action)

    def sentence(self) -> str:
        """'3 closed, 1 was already paid, 1 will be retried (SYSTEMERROR)' — for people."""
        parts = []
        for action in CloseAction:
            count = self.by_action.get(action, 0)
            if not count:
                continue
            reasons = sorted(reason for (reason_action, reason) in self.by_reason if reason_action is action and reason)
            # Translators: the err_codes or reasons after a counted phrase, e.g. " (SYSTEMERROR)".
            detail = pgettext("summary reasons", " (%(reasons)s)") % {"reasons": "; ".join(reasons[:5])} \
                if reasons and action is not CloseAction.CLOSED else ""
            parts.append(f"{action.counted(count)}{detail}")
        # Translators: between the counted phrases of a summary; Chinese takes a full-width comma.
        return pgettext("list separator", ", ").join(parts) or gettext("nothing to do")


def exit_status(by_action: dict[str, int], *, database_error: str, stopped_early: str) -> int:
    """The command's exit status for a run's counts (see the module docstring)."""
    if database_error:
        return EXIT_DATABASE
    if by_action.get(CloseAction.CONFIGURATION_ERROR.value):
        return EXIT_CONFIGURATION
    if by_action.get(CloseAction.FAILED.value) or by_action.get(CloseAction.CLAIM_LOST.value):
        return EXIT_FAILED
    if by_action.get(CloseAction.PUT_ON_HOLD.value):
        return EXIT_ATTENTION
    return EXIT_UNREACHABLE if stopped_early else 0


def summarise(report: CloseReport, *, dry_run: bool, database_error: str = "") -> dict[str, Any]:
    finished = report.finished_at or report.started_at
    by_action = {action.value: count for action, count in report.by_action.items()}
    return _completed({
        "dry_run": dry_run,
        "total": report.total,
        "started_at": report.started_at.isoformat(),
        "finished_at": finished.isoformat(),
        "seconds": (finished - report.started_at).total_seconds(),
        "by_action": by_action,
        "by_merchant": {
            merchant: {action.value: count for (m, action), count in report.by_merchant.items() if m == merchant}
            for merchant in sorted({m for m, _ in report.by_merchant})
        },
        "reasons": [{"action": action.value, "reason": reason, "count": count}
                    for (action, reason), count in report.by_reason.most_common()],
        "halted_merchants": report.halted_merchants,
        "stopped_early": report.stopped_early,
        "database_error": database_error,
        "sentence": report.sentence(),
    })


def merge_summaries(summaries: list[dict[str, Any]]) -> dict[str, Any]:
    """One summary for several sweeper processes' (a process that printed none counts as failed)."""
    report = CloseReport()
    for summary in summaries:
        for action, count in summary.get("by_action", {}).items():
            report.by_action[CloseAction(action)] += count
        for merchant, counts in summary.get("by_merchant", {}).items():
            for action, count in counts.items():
                report.by_merchant[(merchant, CloseAction(action))] += count
        for row in summary.get("reasons", []):
            report.by_reason[(CloseAction(row["action"]), row["reason"])] += row["count"]
        report.halted_merchants.update(summary.get("halted_merchants", {}))
    report.started_at = min((datetime.fromisoformat(s["started_at"]) for s in summaries if "started_at" in s),
                            default=report.started_at)
    report.finished_at = max((datetime.fromisoformat(s["finished_at"]) for s in summaries if "finished_at" in s),
                             default=report.started_at)
    report.stopped_early = "; ".join(sorted({s["stopped_early"] for s in summaries if s.get("stopped_early")}))
    database_error = "; ".join(sorted({s["database_error"] for s in summaries if s.get("database_error")}))
    merged = {**summarise(report, dry_run=False, database_error=database_error), "processes": len(summaries)}
    # A process that printed no summary, could not use its settings or was interrupted adds its own problem.
    unusual = [s for s in summaries if "by_action" not in s or s.get("configuration_errors") or s.get("interrupted")]
    configuration_errors = {e["id"]: e for s in summaries for e in s.get("configuration_errors", [])}
    if configuration_errors:
        merged["configuration_errors"] = list(configuration_errors.values())
    if any(s.get("interrupted") for s in summaries):
        merged["interrupted"] = True
    statuses = [merged["exit_status"], *(s.get("exit_status", EXIT_FAILED) for s in summaries)]
    merged["exit_status"] = most_urgent(statuses)
    merged["ok"] = merged["exit_status"] == 0
    problems = [merged["problems"], *(s.get("problems", "") for s in unusual)]
    merged["problems"] = "; ".join(dict.fromkeys(filter(None, problems)))  # each once, in order
    return merged


# The exit statuses in the order they win when several apply (the command's docstring, the README's table).
_PRECEDENCE = (EXIT_DATABASE, EXIT_CONFIGURATION, EXIT_FAILED, EXIT_ATTENTION, EXIT_UNREACHABLE, EXIT_USAGE,
               EXIT_INTERRUPTED)


def most_urgent(statuses: list[int]) -> int:
    """The status that wins among several; one of no meaning here (a process killed by a signal) is a failure."""
    known = [status if status in _PRECEDENCE or status == 0 else EXIT_FAILED for status in statuses]
    return min(known, key=lambda status: _PRECEDENCE.index(status) if status else len(_PRECEDENCE), default=0)


def unusable_settings_summary(errors: list[dict[str, str]], *, dry_run: bool) -> dict[str, Any]:
    """The summary of a run that could not start because WXPAY_CLOSE is unusable: nothing claimed, nothing sent.

    `errors` are the settings' error-level problems as {"id", "message", "hint"}; the id is "" for an
    ImproperlyConfigured that is not about WXPAY_CLOSE.
    """
    ids = ", ".join(error["id"] for error in errors if error["id"])
    problem = gettext("WXPAY_CLOSE is not usable (%(ids)s): nothing was sent") % {"ids": ids} if ids \
        else gettext("the settings are not usable (%(error)s): nothing was sent") % {
            "error": "; ".join(error["message"] for error in errors)}
    return {**summarise(CloseReport().finish(), dry_run=dry_run), "configuration_errors": errors,
            "exit_status": EXIT_CONFIGURATION, "ok": False, "problems": problem}


def interrupted_summary(report: CloseReport, *, dry_run: bool) -> dict[str, Any]:
    """The summary of a run stopped by Ctrl-C: what it did until then; interrupted (130) unless a worse status."""
    summary = summarise(report.finish(), dry_run=dry_run)
    status = most_urgent([summary["exit_status"], EXIT_INTERRUPTED])
    problems = [summary["problems"], gettext("interrupted (Ctrl-C)")]
    return {**summary, "interrupted": True, "exit_status": status, "ok": False,
            "problems": pgettext("list separator", ", ").join(filter(None, problems))}


def _completed(summary: dict[str, Any]) -> dict[str, Any]:
    status = exit_status(summary["by_action"], database_error=summary["database_error"],
                         stopped_early=summary["stopped_early"])
    alarms = [CloseAction(a).counted(n) for a, n in summary["by_action"].items() if n and CloseAction(a).is_alarm]
    stopped = [gettext("stopped early (%(reason)s)") % {"reason": summary["stopped_early"]}] \
        if summary["stopped_early"] else []
    problems = pgettext("list separator", ", ").join(alarms + stopped)
    return {**summary, "exit_status": status, "problems": problems, "ok": status == 0}
