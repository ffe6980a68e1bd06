"""`manage.py prune_notification_traces [--older-than 30d] [--dry-run]`: clean up what a flood left behind.

Deletes the traces of unauthenticated bodies (unreadable, unknown merchant, bad signature; never verified, no
order) received before the cut-off, and the per-minute counts of that time. Verified notifications and the close
audit trail are never deleted, by this or anything else. Exit status 0, or 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import re
from datetime import timedelta
from typing import Any

from django.core.management.base import BaseCommand, CommandParser
from django.db import router
from django.utils import timezone
from django.utils.translation import gettext

from django_wxpay_close.models import PaymentNotification, UnauthenticatedNotificationCount

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def age(text: str) -> timedelta:
    """A positive duration like 90s, 30m, 12h or 30d."""
    match = _DURATION.match(text.strip())
    if not match or float(match[1]) <= 0:
        raise argparse.ArgumentTypeError(
            gettext("%(text)r is not a positive duration like 12h or 30d") % {"text": text})
    return timedelta(seconds=float(match[1]) * _UNIT_SECONDS[match[2]])


class Command(BaseCommand):
    help = ("Delete the traces of unauthenticated payment notifications (unreadable, unknown merchant, bad "
            "signature) older than --older-than, with their per-minute counts. Verified notifications are kept.")

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--older-than", type=age, default=timedelta(days=30), metavar="DURATION",
                            help="delete what was received before this long ago, e.g. 12h or 30d (default: 30d)")
        parser.add_argument("--dry-run", action="store_true", help="only say how many would be deleted")

    def handle(self, *args: Any, **options: Any) -> None:
        cutoff = timezone.now() - options["older_than"]
        traces = PaymentNotification.objects.using(router.db_for_write(PaymentNotification))
        counts = UnauthenticatedNotificationCount.objects.using(
            router.db_for_write(UnauthenticatedNotificationCount)).filter(interval_start__lt=cutoff)
        values: dict[str, Any] = {"cutoff": f"{cutoff:%Y-%m-%d %H:%M:%S %Z}"}
        if options["dry_run"]:
            values.update(traces=traces.unauthenticated().filter(received_at__lt=cutoff).count(), counts=counts.count())
            self.stdout.write(gettext("Would delete %(traces)d unauthenticated notification traces and %(counts)d "
                                      "per-minute counts from before %(cutoff)s.") % values)
            return
        values["traces"] = traces.prune_unauthenticated(received_before=cutoff)
        values["counts"], _ = counts.delete()
        self.stdout.write(gettext("Deleted %(traces)d unauthenticated notification traces and %(counts)d per-minute "
                                  "counts from before %(cutoff)s; verified notifications are kept.") % values)
