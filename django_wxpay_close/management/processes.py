"""`close_expired_orders --processes N`: N sweeper processes sharing the backlog, and one summary of them all."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from typing import Any

from django.conf import settings
from django.core.management.base import CommandError
from django.utils.translation import gettext

from django_wxpay_close.reports import EXIT_FAILED, EXIT_INTERRUPTED, merge_summaries, most_urgent


def run_processes(options: dict[str, Any]) -> dict[str, Any]:
    """N copies of the command (`--processes 1 --json`), sharing the backlog through the claim protocol.

    A Ctrl-C in a terminal reaches the children too (one process group): each stops claiming, records the
    answers in flight and prints its summary, which is merged here as for any run.
    """
    count = options["processes"]
    forwarded = ["--processes", "1", "--json", "--verbosity", "0"]
    if options["workers"]:
        forwarded += ["--workers", str(options["workers"])]
    if options["check_held"]:  # each process asks about the held orders it claims: each order once
        forwarded.append("--check-held")
    for merchant in options["merchants"] or []:
        forwarded += ["--merchant", merchant]
    if options["older_than"] is not None:
        forwarded += ["--older-than", f"{options['older_than'].total_seconds()}s"]
    # The children read the settings module again: settings changed at run time (override_settings) stay here.
    settings_module = settings.SETTINGS_MODULE or os.environ.get("DJANGO_SETTINGS_MODULE")
    if not settings_module:
        raise CommandError("--processes needs DJANGO_SETTINGS_MODULE: each process reads the settings again")
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": settings_module,
           "PYTHONPATH": os.pathsep.join(path for path in sys.path if path)}
    children = []
    for index in range(count):
        share = None if options["limit"] is None else options["limit"] // count + (index < options["limit"] % count)
        if share == 0:
            continue
        children.append(subprocess.Popen(
            [sys.executable, "-m", "django", "close_expired_orders", *forwarded,
             *([] if share is None else ["--limit", str(share)])],
            env=env, stdout=subprocess.PIPE, text=True))  # stderr (logs, errors) passes through
    outputs, interrupted = _collect_outputs(children)
    merged = merge_summaries([_child_summary(child, out, interrupted)
                              for child, out in zip(children, outputs, strict=True)])
    if interrupted and not merged.get("interrupted"):  # the children had finished: still, the run was stopped
        merged = {**merged, "interrupted": True, "ok": False,
                  "exit_status": most_urgent([merged["exit_status"], EXIT_INTERRUPTED])}
    return merged


def _collect_outputs(children: list[subprocess.Popen[str]]) -> tuple[list[str], bool]:
    """Every child's stdout, read in threads: a Ctrl-C here only interrupts the waiting, while the children (which
    got the SIGINT too) write the answers in flight and print their summaries. Returns (outputs, interrupted).

    The waiting is on an Event, never Thread.join(): before Python 3.13 a join interrupted by Ctrl-C can mark a
    running thread as stopped, and the next join returns at once.
    """
    outputs: list[str | None] = [None] * len(children)
    all_read = threading.Event()
    if not children:
        all_read.set()

    def read(index: int, child: subprocess.Popen[str]) -> None:
        text = ""
        try:
            assert child.stdout is not None
            text = child.stdout.read()
            child.wait()
        finally:
            outputs[index] = text
            if all(output is not None for output in outputs):
                all_read.set()

    for item in enumerate(children):
        threading.Thread(target=read, args=item, daemon=True).start()
    interrupted = False
    while not all_read.is_set():
        try:
            all_read.wait()
        except KeyboardInterrupt:
            interrupted = True
    return [output or "" for output in outputs], interrupted


def _child_summary(child: subprocess.Popen[str], out: str, interrupted: bool) -> dict[str, Any]:
    try:
        summary: dict[str, Any] = json.loads(out)
        return summary
    except ValueError:
        # No summary: the process died before it could print one (by the Ctrl-C itself, during its start).
        stopped_by_ctrl_c = interrupted and child.returncode in (-signal.SIGINT, EXIT_INTERRUPTED)
        return {"exit_status": EXIT_INTERRUPTED if stopped_by_ctrl_c else child.returncode or EXIT_FAILED,
                "problems": gettext("a sweeper process exited with status %(status)s") % {"status": child.returncode}}
