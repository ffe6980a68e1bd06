"""The audit trail: every exchange with WeChat about an order (closeorder and orderquery), append-only."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from typing import Any, TypeVar

from django.conf import settings
from django.db import connections, models
from django.db.models import Case, Q, Value, When
from django.utils import timezone
from django.utils.translation import gettext
from django.utils.translation import gettext_lazy as _

from .orders import OUTCOME_CHOICES, Order, Trigger


def stored_text(body: bytes) -> str:
    """A raw body as a text column keeps it: bytes that are not UTF-8 stay visible as escapes, and NUL is
    escaped too (PostgreSQL text refuses it)."""
    return body.decode("utf-8", "backslashreplace").replace("\x00", "\\x00")


class Api(models.TextChoices):
    """The WeChat Pay API an audit row's exchange called."""

    CLOSEORDER = "closeorder", "closeorder"  # API names, the same in every language
    ORDERQUERY = "orderquery", "orderquery"


class AuditTrailError(Exception):
    """An audit trail is append-only: a row is written once (a close attempt is completed once), never edited
    or deleted."""


_Row = TypeVar("_Row", bound=models.Model)


class AppendOnlyQuerySet(models.QuerySet[_Row]):
    def delete(self) -> Any:
        raise AuditTrailError(f"{self.model.__name__} rows are an audit trail and are never deleted.")

    def update(self, **kwargs: Any) -> int:
        raise AuditTrailError(f"{self.model.__name__} rows are append-only and never edited.")


class AppendOnly(models.Model):
    """An audit record: saved once, never edited or deleted (its queryset refuses bulk edits and deletes too)."""

    class Meta:
        abstract = True

    def save(self, *args: Any, **kwargs: Any) -> None:
        if not self._state.adding:
            raise AuditTrailError(f"{type(self).__name__} rows are append-only and never edited.")
        super().save(*args, **kwargs)

    def delete(self, *args: Any, **kwargs: Any) -> Any:
        raise AuditTrailError(f"{type(self).__name__} rows are an audit trail and are never deleted.")


# What completing a close attempt may write: the answer, never the request it answers.
ANSWER_FIELDS = frozenset({
    "completed_at", "url", "failed_over_from", "duration_ms", "http_status", "response_body", "return_code",
    "return_msg", "result_code", "err_code", "err_code_des", "signature_verified", "outcome", "trade_state",
    "reason"})


def _answer_fields_only(names: Any, what: str) -> None:
    unknown = set(names) - ANSWER_FIELDS
    if unknown:
        raise AuditTrailError(f"{what} with its answer only, not {sorted(unknown)}")


class CloseAttemptQuerySet(AppendOnlyQuerySet["CloseAttempt"]):
    def unfinished(self) -> CloseAttemptQuerySet:
        return self.filter(completed_at__isnull=True)

    def complete(self, **fields: Any) -> int:
        """Complete the unfinished rows among these with their answer, once; a completed row is never touched
        again."""
        _answer_fields_only(fields, "a close attempt is completed")
        fields.setdefault("completed_at", timezone.now())
        return models.QuerySet.update(self.unfinished(), **fields)

    def complete_each(self, answers: Mapping[CloseAttempt, Mapping[str, Any]]) -> int:
        """Complete each unfinished row with its own answer, once, in as few UPDATEs as the database's parameter
        limit allows: a field every answer shares is set as it is, a field that differs is chosen by row (CASE,
        one WHEN per value: the rows of an equal value share it).
        Returns how many rows were completed (a row completed before is left untouched); when that is all of
        them, the instances hold their answers too."""
        completed_at = timezone.now()
        rows = {attempt.pk: {"completed_at": completed_at, **answer} for attempt, answer in answers.items()}
        if not rows:
            return 0
        ids = list(rows)
        first = rows[ids[0]]
        _answer_fields_only(first, "a close attempt is completed")
        if any(row.keys() != first.keys() for row in rows.values()):
            raise AuditTrailError("the answers completed together must set the same fields")
        names = set(first)
        varying = sorted(name for name in names if any(row[name] != first[name] for row in rows.values()))
        # Parameters per row at most: its id in the filter, its id and value in each varying field's CASE; the
        # shared fields' values counted with every row too, so a statement never carries more than the limit.
        size = max(connections[self.db].ops.bulk_batch_size(["pk", *names, *varying], ids), 1)
        completed = 0
        for start in range(0, len(ids), size):
            chunk = ids[start:start + size]
            values: dict[str, Any] = {name: first[name] for name in names if name not in varying}
            for name in varying:
                field = self.model._meta.get_field(name)
                assert isinstance(field, models.Field)  # an answer field is a column, never a relation
                rows_by_value: dict[Any, list[int]] = defaultdict(list)  # rows with one value share one WHEN
                for pk in chunk:
                    rows_by_value[rows[pk][name]].append(pk)
                values[name] = Case(*(When(pk__in=pks, then=Value(value, output_field=field))
                                      for value, pks in rows_by_value.items()), output_field=field)
            completed += models.QuerySet.update(self.unfinished().filter(pk__in=chunk), **values)
        if completed == len(rows):
            for attempt in answers:
                for name, value in rows[attempt.pk].items():
                    setattr(attempt, name, value)
        return completed


class CloseAttempt(AppendOnly):
    """One HTTP exchange with WeChat about an order, closeorder or orderquery (`api`): created before the request
    leaves, completed once after its answer. An order's rows tell its whole story, closes and queries in turn.

    A row with no `completed_at` belongs to a request whose answer is not written yet: still in flight, or its
    process stopped or lost its database. The next close of the same order completes such a row as abandoned.
    A completed row with no outcome has no answer (`has_no_answer`; `reason` says why: abandoned, or not sent).
    An answer that comes after its row was settled as abandoned (another close took the order over meanwhile) is
    kept in a row of its own, `late_answer_to` that request's row, with no request of its own.
    """

    order = models.ForeignKey(Order, on_delete=models.PROTECT, related_name="close_attempts", verbose_name=_("order"))
    # No index: nothing looks rows up by it (an order's trail lists its rows by order), and the audit table is large.
    late_answer_to = models.ForeignKey(
        "self", on_delete=models.PROTECT, null=True, blank=True, related_name="late_answers", db_index=False,
        verbose_name=_("late answer to"), help_text=_("The request this answer belongs to, when it came after that "
                                                       "request's row was settled as abandoned."))
    merchant = models.CharField(_("merchant"), max_length=64)
    mch_id = models.CharField(_("mch_id"), max_length=32)
    sub_mch_id = models.CharField(_("sub_mch_id"), max_length=32)
    out_trade_no = models.CharField(_("out_trade_no"), max_length=32)
    trigger = models.CharField(_("trigger"), max_length=10, choices=Trigger.choices)
    user = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL,
                             related_name="+", verbose_name=_("user"))
    actor = models.CharField(_("actor"), max_length=150, blank=True,
                             help_text=_("Username at the time; survives the user."))
    url = models.CharField(_("URL"), max_length=300, help_text=_("The URL that answered, or the last one tried."))
    failed_over_from = models.CharField(_("failed over from"), max_length=300, blank=True)
    sign_type = models.CharField(_("sign_type"), max_length=16)
    api = models.CharField(_("API"), max_length=16, choices=Api.choices, default=Api.CLOSEORDER,
                           db_default=Api.CLOSEORDER)
    request_xml = models.TextField(_("request XML"),
                                   help_text=_("The exact body sent (holds the signature, never the key)."))

    started_at = models.DateTimeField(_("started at"), default=timezone.now)
    completed_at = models.DateTimeField(_("completed at"), null=True, blank=True)
    duration_ms = models.PositiveIntegerField(_("duration (ms)"), null=True, blank=True)
    http_status = models.PositiveSmallIntegerField(_("HTTP status"), null=True, blank=True)
    response_body = models.TextField(_("response body"), blank=True,
                                     help_text=_("Raw body, capped; undecodable bytes escaped."))
    return_code = models.CharField(_("return_code"), max_length=16, blank=True)
    return_msg = models.CharField(_("return_msg"), max_length=128, blank=True)
    result_code = models.CharField(_("result_code"), max_length=16, blank=True)
    err_code = models.CharField(_("err_code"), max_length=32, blank=True)
    err_code_des = models.CharField(_("err_code_des"), max_length=128, blank=True)
    signature_verified = models.BooleanField(_("signature verified"), null=True, blank=True)
    outcome = models.CharField(_("outcome"), max_length=32, blank=True, choices=OUTCOME_CHOICES)
    trade_state = models.CharField(_("trade_state"), max_length=16, blank=True,
                                   help_text=_("What an orderquery answer said of the order (SUCCESS, NOTPAY, ...)."))
    reason = models.TextField(_("reason"), blank=True)

    objects = CloseAttemptQuerySet.as_manager()

    class Meta:
        ordering = ["-started_at", "-id"]
        # Closes and queries alike (`api`); the model keeps its first name, which its table and migrations use.
        verbose_name = _("WeChat exchange")
        verbose_name_plural = _("WeChat exchanges")
        indexes = [
            models.Index(fields=["outcome", "started_at"], name="wxpay_attempt_outcome_idx"),
            # The admin's audit list, newest first (Meta.ordering), and its started_at date-range filter.
            models.Index(fields=["started_at", "id"], name="wxpay_attempt_started_idx"),
            # The admin's exact search by out_trade_no.
            models.Index(fields=["out_trade_no"], name="wxpay_attempt_out_trade_no_idx"),
            # The admin's err_code filter, newest first. Partial: a successful close (no err_code) never enters
            # it, and the completion that writes an err_code adds the row's only entry.
            models.Index(fields=["err_code", "started_at"], name="wxpay_attempt_err_code_idx",
                         condition=~Q(err_code="")),
            # The admin's trigger filter for the rare manual closes (admin action, application code), newest
            # first; the sweep's own rows (trigger "command") never enter it.
            models.Index(fields=["trigger", "started_at"], name="wxpay_attempt_trigger_idx",
                         condition=~Q(trigger="command")),
            # The admin's API filter for the orderquery exchanges, newest first; the many closes never enter it.
            models.Index(fields=["api", "started_at"], name="wxpay_attempt_api_idx", condition=Q(api="orderquery")),
        ]

    def __str__(self) -> str:
        status = self.outcome or (gettext("no answer") if self.has_no_answer else gettext("unfinished"))
        return gettext("%(api)s %(out_trade_no)s at %(started)s: %(status)s") % {
            "api": self.api, "out_trade_no": self.out_trade_no, "started": f"{self.started_at:%Y-%m-%d %H:%M:%S}",
            "status": status}

    @property
    def is_finished(self) -> bool:
        return self.completed_at is not None

    @property
    def has_no_answer(self) -> bool:
        """Completed without an answer: every answer, even a timeout, is recorded with an outcome."""
        return self.completed_at is not None and not self.outcome

    def keep_late_answer(self, **answer: Any) -> CloseAttempt:
        """An answer to this request that came after the row was completed (settled as abandoned when another
        close took the order over): kept on a row of its own, tied to this one. The request is not repeated."""
        _answer_fields_only(answer, "a late answer is kept")
        return CloseAttempt.objects.using(self._state.db).create(
            order_id=self.order_id, late_answer_to=self, merchant=self.merchant, mch_id=self.mch_id,
            sub_mch_id=self.sub_mch_id, out_trade_no=self.out_trade_no, trigger=self.trigger, user_id=self.user_id,
            actor=self.actor, api=self.api, sign_type=self.sign_type, request_xml="", started_at=self.started_at,
            **{"completed_at": timezone.now(), **answer})

    def complete(self, **fields: Any) -> bool:
        """Record the answer once. False if the row was already completed (it is then left untouched)."""
        fields.setdefault("completed_at", timezone.now())
        completed = CloseAttempt.objects.using(self._state.db).filter(pk=self.pk).complete(**fields)
        if completed:
            for name, value in fields.items():
                setattr(self, name, value)
        return bool(completed)
