"""`flush` for the test suite: what a transactional test (pytest-django's `transactional_db`) runs after each test.

On PostgreSQL Django empties the tables with TRUNCATE, which costs a few hundred milliseconds on tables this
small (new files for every table and index); DELETE of every row, in one transaction with the foreign keys
checked at its commit, leaves the same empty tables in a few milliseconds. Sequences are not reset, as with
Django's flush in a test (reset_sequences=False); the post_migrate signal is sent as Django's flush sends it.
Anything else (other databases, reset_sequences, an interactive flush) is Django's own command.
"""

from __future__ import annotations

from typing import Any

from django.core.management.commands import flush
from django.core.management.sql import emit_post_migrate_signal
from django.db import connections, transaction


class Command(flush.Command):
    def handle(self, **options: Any) -> None:
        database = options["database"]
        connection = connections[database]
        if connection.vendor != "postgresql" or options.get("reset_sequences", True) or options["interactive"]:
            super().handle(**options)
            return
        tables = connection.introspection.django_table_names(only_existing=True, include_views=False)
        with transaction.atomic(using=database), connection.cursor() as cursor:
            cursor.execute("SET CONSTRAINTS ALL DEFERRED")
            for table in tables:
                cursor.execute(f"DELETE FROM {connection.ops.quote_name(table)}")
        if tables and not options.get("inhibit_post_migrate", False):
            emit_post_migrate_signal(options["verbosity"], False, database)
