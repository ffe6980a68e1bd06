"""The precompiled hot-path statements behave like the ORM updates they replace, on every backend."""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any

import pytest
from django.db import IntegrityError, connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from django_wxpay_close.models import CloseAttempt, Order, OrderState, Trigger
from django_wxpay_close.services import CloseAction, close_order
from django_wxpay_close.statements import Add, ClearIfClaimedBy, RowUpdate, insert_row, insert_rows, update_rows

AWKWARD_TEXT = "it's 100% \\ \"quoted\" %s %(name)s $1 订单 -- ; DROP TABLE x"


def test_a_release_clears_only_its_own_claim(make_order):
    order = make_order()
    theirs = uuid.uuid4()
    Order.objects.filter(pk=order.pk).update(claim_token=theirs, claim_expires_at=timezone.now() + timedelta(minutes=1))

    mine = ClearIfClaimedBy(uuid.uuid4())
    update_rows(RowUpdate(Order, order.pk, {"last_error": "x", "claim_expires_at": mine, "claim_token": mine}))
    order.refresh_from_db()
    assert order.claim_token == theirs and order.claim_expires_at is not None and order.last_error == "x"

    ours = ClearIfClaimedBy(theirs)
    update_rows(RowUpdate(Order, order.pk, {"claim_expires_at": ours, "claim_token": ours}))
    order.refresh_from_db()
    assert order.claim_token is None and order.claim_expires_at is None


def test_a_conditional_update_changes_nothing_when_its_condition_fails(make_order):
    order = make_order(state=OrderState.PAID)
    (changed,) = update_rows(RowUpdate(Order, order.pk, {"state": OrderState.CLOSED}, where={"state": OrderState.OPEN}))
    order.refresh_from_db()
    assert changed == 0 and order.state == OrderState.PAID


def test_add_increments_in_the_database_not_from_a_stale_copy(make_order):
    order = make_order()
    Order.objects.filter(pk=order.pk).update(attempt_count=5)
    update_rows(RowUpdate(Order, order.pk, {"attempt_count": Add(1), "retry_count": Add(2)}))
    order.refresh_from_db()
    assert (order.attempt_count, order.retry_count) == (6, 2)


def test_an_inserted_row_takes_model_defaults_and_reads_back_as_written(make_order):
    order = make_order()
    pk = insert_row(CloseAttempt, {"order_id": order.pk, "merchant": "default", "mch_id": order.mch_id,
                                   "sub_mch_id": order.sub_mch_id, "out_trade_no": order.out_trade_no,
                                   "trigger": Trigger.COMMAND, "url": "http://x", "sign_type": "MD5",
                                   "request_xml": "<xml>订单</xml>"})
    attempt = CloseAttempt.objects.get(pk=pk)
    assert attempt.request_xml == "<xml>订单</xml>" and attempt.started_at <= timezone.now()
    assert attempt.completed_at is None and attempt.outcome == "" and attempt.user_id is None


def test_text_with_quotes_backslashes_placeholders_and_unicode_is_stored_as_given(make_order):
    order = make_order()
    attempt = CloseAttempt.start(order=order, merchant="default", mch_id=order.mch_id, sub_mch_id=order.sub_mch_id,
                                 out_trade_no=order.out_trade_no, trigger=Trigger.CODE, url="http://x",
                                 sign_type="MD5", request_xml=AWKWARD_TEXT)
    update_rows(attempt.completion(reason=AWKWARD_TEXT, response_body=AWKWARD_TEXT),
                RowUpdate(Order, order.pk, {"last_error": AWKWARD_TEXT}))

    stored = CloseAttempt.objects.get(pk=attempt.pk)
    assert stored.request_xml == stored.reason == stored.response_body == AWKWARD_TEXT
    assert Order.objects.get(pk=order.pk).last_error == AWKWARD_TEXT


def audit_row(order: Order, **values: Any) -> dict[str, Any]:
    return {"order_id": order.pk, "merchant": "default", "mch_id": order.mch_id, "sub_mch_id": order.sub_mch_id,
            "out_trade_no": order.out_trade_no, "trigger": Trigger.COMMAND, "url": "http://x",
            "sign_type": "MD5", **values}


def test_several_rows_inserted_together_get_their_keys_back_in_the_order_given(make_order):
    orders = [make_order() for _ in range(5)]
    keys = insert_rows(CloseAttempt, [audit_row(order, request_xml=f"<xml>{n}</xml>") for n, order in enumerate(orders)])
    stored = CloseAttempt.objects.in_bulk(keys)
    assert [stored[key].out_trade_no for key in keys] == [order.out_trade_no for order in orders]
    assert [stored[key].request_xml for key in keys] == [f"<xml>{n}</xml>" for n in range(5)]


def test_rows_inserted_together_keep_awkward_text_nulls_and_defaults_as_given(make_order):
    order, other = make_order(), make_order()
    first, second = insert_rows(CloseAttempt, [
        audit_row(order, request_xml=AWKWARD_TEXT, http_status=None, signature_verified=None),
        audit_row(other, request_xml="", http_status=200, signature_verified=True, reason=AWKWARD_TEXT),
    ])
    one, two = CloseAttempt.objects.get(pk=first), CloseAttempt.objects.get(pk=second)
    assert (one.request_xml, one.http_status, one.signature_verified, one.reason) == (AWKWARD_TEXT, None, None, "")
    assert (two.request_xml, two.http_status, two.signature_verified, two.reason) == ("", 200, True, AWKWARD_TEXT)
    assert one.completed_at is None and one.started_at <= timezone.now() and one.user_id is None


def test_on_postgresql_rows_inserted_together_are_one_statement_whatever_their_number(make_order):
    if connection.vendor != "postgresql":
        pytest.skip("the one-statement UNNEST insert is PostgreSQL's")
    orders = [make_order() for _ in range(7)]
    with CaptureQueriesContext(connection) as queries:
        insert_rows(CloseAttempt, [audit_row(order) for order in orders[:3]])
        insert_rows(CloseAttempt, [audit_row(order) for order in orders[3:]])
    assert len(queries) == 2 and queries[0]["sql"] == queries[1]["sql"]
    assert CloseAttempt.objects.count() == 7


def test_on_postgresql_the_statements_bind_values_server_side_and_prepare_nothing(make_order):
    # Server-side binding keeps the quoting of two dozen values off the sweep's GIL; leaving prepare_threshold
    # as Django sets it (off) keeps PgBouncer in transaction mode working.
    if connection.vendor != "postgresql":
        pytest.skip("server-side binding is psycopg 3's; other backends use Django's own cursor")
    import psycopg

    from django_wxpay_close.statements import _cursor

    with _cursor(connection) as cursor:
        assert isinstance(cursor.cursor, psycopg.Cursor) and not isinstance(cursor.cursor, psycopg.ClientCursor)
    for _ in range(8):  # psycopg's own default would prepare a statement on its sixth run
        assert close_order(make_order()).action is CloseAction.CLOSED
    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM pg_prepared_statements")
        assert cursor.fetchone()[0] == 0


def test_on_postgresql_a_prepare_threshold_in_options_prepares_the_statements(make_order):
    # README: OPTIONS["prepare_threshold"] is how a user without a transaction-mode pooler opts in.
    if connection.vendor != "postgresql":
        pytest.skip("prepared statements here are psycopg 3's")
    connection.ensure_connection()
    connection.connection.prepare_threshold = 1  # what OPTIONS["prepare_threshold"] sets on a new connection
    try:
        for _ in range(3):
            assert close_order(make_order()).action is CloseAction.CLOSED
        with connection.cursor() as cursor:
            cursor.execute("SELECT statement FROM pg_prepared_statements")
            prepared = [statement for (statement,) in cursor.fetchall()]
        assert any(statement.startswith(f'INSERT INTO "{CloseAttempt._meta.db_table}"') for statement in prepared)
    finally:
        connection.close()  # the next test gets a connection as Django configures it


def test_on_postgresql_the_statements_reconnect_after_a_failed_health_check_as_django_does(make_order):
    # With CONN_HEALTH_CHECKS, Django's cursor() replaces a dead connection at its first use in a request;
    # the statements here open their own cursor and must do the same.
    if connection.vendor != "postgresql":
        pytest.skip("the statements have their own cursor on PostgreSQL only")
    import psycopg

    order = make_order()
    connection.ensure_connection()
    params = connection.get_connection_params()
    address = {key: params[key] for key in ("host", "port", "user", "password", "dbname") if key in params}
    with psycopg.connect(autocommit=True, **address) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", [connection.connection.info.backend_pid])
    connection.health_check_enabled, connection.health_check_done = True, False  # a new request, checks on

    assert update_rows(RowUpdate(Order, order.pk, {"last_error": "after a reconnect"})) == (1,)
    assert Order.objects.get(pk=order.pk).last_error == "after a reconnect"


def test_completing_an_attempt_twice_keeps_the_first_answer(make_order):
    attempt = CloseAttempt.start(order=make_order(), merchant="default", mch_id="1", sub_mch_id="2",
                                 out_trade_no="T1", trigger=Trigger.CODE, url="http://x", sign_type="MD5",
                                 request_xml="<xml/>")
    assert attempt.complete(outcome="closed", http_status=200)
    assert not attempt.complete(outcome="paid")
    assert CloseAttempt.objects.get(pk=attempt.pk).outcome == "closed"


def _unfinished_attempt(order: Order) -> CloseAttempt:
    return CloseAttempt.start(order=order, merchant="default", mch_id=order.mch_id, sub_mch_id=order.sub_mch_id,
                              out_trade_no=order.out_trade_no, trigger=Trigger.CODE, url="http://x",
                              sign_type="MD5", request_xml="<xml/>")


def test_several_updates_report_the_rows_each_one_changed(make_order):
    order = make_order()
    attempt = _unfinished_attempt(order)

    counts = update_rows(
        attempt.completion(outcome="closed"),
        RowUpdate(Order, order.pk, {"state": OrderState.CLOSED}, where={"state": OrderState.PAID}),
    )

    order.refresh_from_db()
    assert counts == (1, 0)
    assert CloseAttempt.objects.get(pk=attempt.pk).outcome == "closed" and order.state == OrderState.OPEN


def test_on_postgresql_the_completion_and_the_order_update_land_together_or_not_at_all(make_order):
    if connection.vendor != "postgresql":
        pytest.skip("one statement of data-modifying CTEs is PostgreSQL's; elsewhere each update commits alone")
    order = make_order()
    attempt = _unfinished_attempt(order)
    now = timezone.now()

    with pytest.raises(IntegrityError):  # closed and paid at once breaks wxpay_close_not_closed_and_paid
        update_rows(attempt.completion(outcome="closed"),
                    RowUpdate(Order, order.pk, {"closed_at": now, "paid_at": now}))

    assert CloseAttempt.objects.get(pk=attempt.pk).completed_at is None


def test_close_order_costs_the_same_few_statements_for_every_order(make_order):
    # claim, audit row, completion + order update (one statement on PostgreSQL, two elsewhere), re-read
    expected = 4 if connection.vendor == "postgresql" else 5
    for order in [make_order(), make_order()]:
        with CaptureQueriesContext(connection) as queries:
            assert close_order(order).action is CloseAction.CLOSED
        assert len(queries) == expected, [q["sql"][:80] for q in queries]
