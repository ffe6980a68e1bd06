"""What keeps the admin's lists fast on tables of millions of rows: counts that do not scan, filters whose
choices are known without reading the table, and searches an index serves.

Every list page then runs a constant number of queries, each served by an index of the models (see each
index's comment for the query it serves), whatever the size of the tables.
"""

from __future__ import annotations

import json
from typing import Any

from django.contrib import admin
from django.contrib.admin.options import ShowFacets
from django.core.exceptions import ImproperlyConfigured
from django.core.paginator import Paginator
from django.db import connections
from django.db.models import Q, QuerySet
from django.http import HttpRequest
from django.utils import timezone
from django.utils.functional import cached_property
from django.utils.translation import gettext_lazy as _
from django.utils.translation import pgettext_lazy

from .conf import load_settings
from .models import Order, OrderState
from .selectors import orders_needing_attention

# WeChat's documented closeorder error codes: the err_code filter offers these, not the DISTINCT values of a
# table of millions of rows (a code outside the list is still found by its outcome filter or a search).
CLOSEORDER_ERR_CODES = ("ORDERPAID", "ORDERCLOSED", "ORDERNOTEXIST", "SYSTEMERROR", "SIGNERROR",
                        "REQUIRE_POST_METHOD", "XML_FORMAT_ERROR")


def planner_estimate(queryset: QuerySet[Any]) -> int | None:
    """PostgreSQL's estimate of the rows the query returns (EXPLAIN, nothing is read); None elsewhere."""
    if connections[queryset.db].vendor != "postgresql":
        return None
    plan = json.loads(queryset.explain(format="json"))
    return int(plan[0]["Plan"]["Plan Rows"])


class EstimatedCountPaginator(Paginator):  # type: ignore[type-arg]
    """Counts exactly up to `exact_up_to` rows (a count that stops there); beyond, on PostgreSQL, the planner's
    estimate, and `count_is_estimate` says so, for the page to show "about N". Other databases count exactly.

    An exact count of a ten-million-row table reads all of it; the estimate reads the planner's statistics.
    """

    exact_up_to = 10_000

    count_is_estimate = False

    @cached_property
    def count(self) -> int:
        if not isinstance(self.object_list, QuerySet):
            return super().count
        # COUNT over a LIMIT-ed subquery: reads at most exact_up_to + 1 rows. Unordered, so that the database
        # takes them from whichever index serves the filter, not in the list's order.
        bounded = self.object_list.order_by()[: self.exact_up_to + 1].count()
        if bounded <= self.exact_up_to:
            return bounded
        estimate = planner_estimate(self.object_list)
        if estimate is None:
            return self.object_list.count()
        self.count_is_estimate = True
        return max(estimate, bounded)


class MerchantFilter(admin.SimpleListFilter):
    """The merchants configured in WXPAY_CLOSE['MERCHANTS'] (a row of a merchant since removed is still found
    by a search)."""

    title = _("merchant")
    parameter_name = "merchant"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, Any]]:
        try:
            return [(name, name) for name in sorted(load_settings().merchants)]
        except ImproperlyConfigured:
            return []

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        return queryset.filter(merchant=self.value()) if self.value() else queryset


class ErrCodeFilter(admin.SimpleListFilter):
    title = _("err_code")
    parameter_name = "err_code"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, Any]]:
        return [(code, code) for code in CLOSEORDER_ERR_CODES]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        return queryset.filter(err_code=self.value()) if self.value() else queryset


class OverdueFilter(admin.SimpleListFilter):
    # Translators: a filter's title, shown as "By overdue"; the badge's "overdue" is a separate message.
    title = pgettext_lazy("filter", "overdue")
    parameter_name = "overdue"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, Any]]:
        return [("yes", _("Open past its deadline")), ("no", _("Not overdue"))]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Order]) -> QuerySet[Order]:
        overdue = Q(state=OrderState.OPEN, payment_deadline__lte=timezone.now())
        if self.value() == "yes":
            return queryset.filter(overdue)
        if self.value() == "no":
            return queryset.exclude(overdue)
        return queryset


class NeedsAttentionFilter(admin.SimpleListFilter):
    title = _("needs attention")
    parameter_name = "attention"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, Any]]:
        return [("yes", _("Needs attention"))]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        # The selector's conditions in this query's WHERE (not a pk IN subquery), so that PostgreSQL sees that
        # the partial index wxpay_order_attention_idx holds exactly these rows.
        return queryset & orders_needing_attention() if self.value() == "yes" else queryset


class LargeTableAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    """A list of millions of rows: no full count, no facet counts, no date hierarchy (its year list reads the
    whole table: a date-range filter on an indexed column instead), estimated counts beyond a few thousand."""

    show_full_result_count = False
    show_facets = ShowFacets.NEVER
    paginator = EstimatedCountPaginator
