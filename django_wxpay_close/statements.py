"""The writes every close makes, as SQL compiled once per statement shape instead of by the ORM per call.

Each order costs three statements (audit row, its completion, the order's update). Django's query
compiler costs about four times what executing them does (docs/performance.md), and a sweep runs them
thousands of times in one GIL-bound process. Values still go through each field's own
`get_db_prep_save` / `get_db_prep_value`, so SQLite, PostgreSQL and MariaDB get exactly what the ORM
would give them. On PostgreSQL the completion and the order's update travel as one statement
(`update_rows`): one round trip and one commit fewer per close, and the two land together or not at all.
On PostgreSQL with psycopg 3 these statements also bind their values server-side (`_cursor`).
Everything else (claims, reads, the admin) uses the ORM.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any
from uuid import UUID

from django.db import connections
from django.db.backends.base.base import BaseDatabaseWrapper
from django.db.backends.utils import CursorWrapper
from django.db.models import Model

__all__ = ["Add", "ClearIfClaimedBy", "RowUpdate", "insert_row", "insert_rows", "update_rows"]


@dataclass(frozen=True)
class Add:
    """SET column = column + amount."""

    amount: int = 1


@dataclass(frozen=True)
class ClearIfClaimedBy:
    """SET column = NULL if the row's claim_token is `token`, else leave it.

    MySQL and MariaDB apply SET assignments left to right, each seeing the ones before it: put
    claim_token itself last, or the other columns would compare against the NULL just written.
    """

    token: UUID | None


@dataclass(frozen=True)
class RowUpdate:
    """UPDATE one row by primary key, only if `where` holds (a None value there means IS NULL)."""

    model: type[Model]
    pk: int
    values: Mapping[str, Any]
    where: Mapping[str, Any] = field(default_factory=dict)

    def apply_to(self, instance: Model) -> None:
        """Copy the plain values onto `instance`; Add and ClearIfClaimedBy results only the database knows."""
        for name, value in self.values.items():
            if not isinstance(value, (Add, ClearIfClaimedBy)):
                setattr(instance, name, value)


def _column(model: type[Model], name: str) -> tuple[Any, str]:
    field = model._meta.get_field(name)
    return field, field.column


@lru_cache(maxsize=256)
def _update_sql(model: type[Model], using: str, sets: tuple[tuple[str, str], ...],
                wheres: tuple[tuple[str, bool], ...]) -> str:
    quote = connections[using].ops.quote_name
    assignments = []
    for name, kind in sets:
        column = quote(_column(model, name)[1])
        if kind == "add":
            assignments.append(f"{column} = {column} + %s")
        elif kind == "clear_if_claimed":
            token = quote(_column(model, "claim_token")[1])
            assignments.append(f"{column} = CASE WHEN {token} = %s THEN NULL ELSE {column} END")
        else:
            assignments.append(f"{column} = %s")
    conditions = [f"{quote(model._meta.pk.column)} = %s"] + [
        f"{quote(_column(model, name)[1])} IS NULL" if is_null else f"{quote(_column(model, name)[1])} = %s"
        for name, is_null in wheres
    ]
    return f"UPDATE {quote(model._meta.db_table)} SET {', '.join(assignments)} WHERE {' AND '.join(conditions)}"


def update_rows(*updates: RowUpdate, using: str = "default") -> tuple[int, ...]:
    """Run single-row UPDATEs; the number of rows each changed.

    On PostgreSQL several go as one statement of data-modifying CTEs: one round trip, one commit, all or
    none. Elsewhere they run one after another, each committed on its own (SQLite has no such CTEs and
    commits cheaply; MySQL has neither).
    """
    connection = connections[using]
    compiled = [_compile_update(update, connection, using) for update in updates]
    with _cursor(connection) as cursor:
        if len(compiled) > 1 and connection.vendor == "postgresql":
            cursor.execute(_combined_sql(tuple(sql for sql, _ in compiled)), [p for _, params in compiled for p in params])
            return tuple(int(count) for count in cursor.fetchone())
        counts = []
        for sql, params in compiled:
            cursor.execute(sql, params)
            counts.append(cursor.rowcount)
        return tuple(counts)


def _compile_update(update: RowUpdate, connection: Any, using: str) -> tuple[str, list[Any]]:
    model = update.model
    sets: list[tuple[str, str]] = []
    params: list[Any] = []
    for name, value in update.values.items():
        field_, _ = _column(model, name)
        if isinstance(value, Add):
            sets.append((name, "add"))
            params.append(value.amount)
        elif isinstance(value, ClearIfClaimedBy):
            sets.append((name, "clear_if_claimed"))
            params.append(_column(model, "claim_token")[0].get_db_prep_value(value.token, connection))
        else:
            sets.append((name, "set"))
            params.append(field_.get_db_prep_save(value, connection))
    params.append(update.pk)
    wheres = []
    for name, value in update.where.items():
        wheres.append((name, value is None))
        if value is not None:
            params.append(_column(model, name)[0].get_db_prep_value(value, connection))
    return _update_sql(model, using, tuple(sets), tuple(wheres)), params


@lru_cache(maxsize=256)
def _combined_sql(statements: tuple[str, ...]) -> str:
    """WITH u0 AS (UPDATE … RETURNING 1), u1 AS (…) SELECT (SELECT count(*) FROM u0), … (PostgreSQL)."""
    ctes = ", ".join(f"u{n} AS ({sql} RETURNING 1)" for n, sql in enumerate(statements))
    counts = ", ".join(f"(SELECT count(*) FROM u{n})" for n in range(len(statements)))
    return f"WITH {ctes} SELECT {counts}"


def _insert_into(model: type[Model], using: str) -> tuple[str, str, tuple[Any, ...]]:
    """`INSERT INTO table (columns)`, ` RETURNING pk`, and the fields whose values follow, in column order."""
    quote = connections[using].ops.quote_name
    fields = tuple(f for f in model._meta.concrete_fields if not f.primary_key)
    insert = f"INSERT INTO {quote(model._meta.db_table)} ({', '.join(quote(f.column) for f in fields)})"
    return insert, f" RETURNING {quote(model._meta.pk.column)}", fields


@lru_cache(maxsize=128)
def _insert_sql(model: type[Model], using: str, returning: bool, rows: int = 1) -> tuple[str, tuple[Any, ...]]:
    insert, returning_pk, fields = _insert_into(model, using)
    row = f"({', '.join(['%s'] * len(fields))})"
    return f"{insert} VALUES {', '.join([row] * rows)}{returning_pk if returning else ''}", fields


def insert_row(model: type[Model], values: Mapping[str, Any], *, using: str = "default") -> int:
    """INSERT one row (fields not given take their model default); its new primary key."""
    connection = connections[using]
    returning = connection.features.can_return_columns_from_insert
    sql, fields = _insert_sql(model, using, returning)
    params = _insert_params(fields, values, connection)
    with _cursor(connection) as cursor:
        cursor.execute(sql, params)
        if returning:
            return cursor.fetchone()[0]
        return connection.ops.last_insert_id(cursor, model._meta.db_table, model._meta.pk.column)


def insert_rows(model: type[Model], rows: Sequence[Mapping[str, Any]], *, using: str = "default") -> list[int]:
    """INSERT several rows in one statement (one round trip, one commit); their new primary keys, in order.

    Relies, as Django's bulk_create does, on INSERT … RETURNING giving the rows back in the order given.
    On PostgreSQL the values travel as one array per column (`_unnest_insert_sql`, as bulk_create does
    since Django 5.2): one statement text whatever the number of rows, so psycopg parses it once and caches
    it, where a VALUES list of n rows would be a new text, parsed in Python on every call. Where the database
    cannot return several rows' keys (MySQL), the rows go one statement each.
    """
    connection = connections[using]
    if len(rows) == 1 or not connection.features.can_return_rows_from_bulk_insert:
        return [insert_row(model, values, using=using) for values in rows]
    if connection.vendor == "postgresql":
        sql, fields = _unnest_insert_sql(model, using)
        params = [list(column) for column in zip(*(_insert_params(fields, values, connection) for values in rows))]
    else:
        sql, fields = _insert_sql(model, using, True, len(rows))
        params = [param for values in rows for param in _insert_params(fields, values, connection)]
    with _cursor(connection) as cursor:
        cursor.execute(sql, params)
        return [pk for (pk,) in cursor.fetchall()]


@lru_cache(maxsize=16)
def _unnest_insert_sql(model: type[Model], using: str) -> tuple[str, tuple[Any, ...]]:
    insert, returning_pk, fields = _insert_into(model, using)
    arrays = ", ".join(f"(%s)::{f.db_type(connections[using])}[]" for f in fields)
    return f"{insert} SELECT * FROM UNNEST({arrays}){returning_pk}", fields


def _insert_params(fields: tuple[Any, ...], values: Mapping[str, Any], connection: BaseDatabaseWrapper) -> list[Any]:
    return [
        f.get_db_prep_save(values[f.attname] if f.attname in values else f.get_default(), connection) for f in fields
    ]


@lru_cache(maxsize=1)
def _server_binding_cursor_class() -> type | None:
    from django.db.backends.postgresql.psycopg_any import is_psycopg3

    if not is_psycopg3:
        return None
    from django.db.backends.postgresql.base import ServerBindingCursor

    return ServerBindingCursor


def _cursor(connection: BaseDatabaseWrapper) -> CursorWrapper:
    """A cursor for these statements; on PostgreSQL with psycopg 3, one that binds values server-side.

    Django's default psycopg 3 cursor binds client-side: it quotes every value into the SQL text in
    Python, two dozen of them for the audit row, on the GIL the sweep's threads share. Server-side
    binding sends them as parameters (a sweep at 32 workers: 64-69 % -> 67-73 % of the latency limit,
    docs/performance.md). It is the cursor Django itself uses with `OPTIONS["server_side_binding"]`, made
    here for these statements only, and wrapped like any Django cursor (execute wrappers, query logging,
    error translation). Whether they become prepared statements still follows the connection's
    `prepare_threshold`, which Django leaves off unless OPTIONS turns it on, so poolers like PgBouncer
    in transaction mode keep working.
    """
    if connection.vendor != "postgresql" or (cursor_class := _server_binding_cursor_class()) is None:
        return connection.cursor()
    # The steps of Django's own connection.cursor(), with this cursor class instead of the connection's default.
    connection.close_if_health_check_failed()
    connection.ensure_connection()
    with connection.wrap_database_errors:
        return connection._prepare_cursor(cursor_class(connection.connection))
