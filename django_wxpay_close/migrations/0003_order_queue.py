"""The order becomes a queue row: `due_at` replaces `next_attempt_at` and `claim_expires_at`, and one partial
index on it serves the sweep's claim. Late answers get a row of their own."""

import django.db.models.deletion
from django.db import migrations, models
from django.db.models.functions import Coalesce


def fill_due_at(apps, schema_editor):
    """An open order is due at its lease's expiry while claimed, else at its retry time, else at its deadline."""
    Order = apps.get_model("django_wxpay_close", "Order")
    orders = Order.objects.using(schema_editor.connection.alias)
    orders.update(due_at=Coalesce("claim_expires_at", "next_attempt_at", "payment_deadline"))
    orders.filter(claim_expires_at__isnull=False).update(in_flight=True)


def fill_back(apps, schema_editor):
    Order = apps.get_model("django_wxpay_close", "Order")
    orders = Order.objects.using(schema_editor.connection.alias)
    orders.filter(in_flight=True).update(claim_expires_at=models.F("due_at"))
    orders.filter(in_flight=False, attempt_count__gt=0).update(next_attempt_at=models.F("due_at"))


class Migration(migrations.Migration):

    dependencies = [
        ("django_wxpay_close", "0002_notifications_and_labels"),
    ]

    operations = [
        migrations.AddField(
            model_name="order",
            name="due_at",
            field=models.DateTimeField(null=True),
        ),
        migrations.AddField(
            model_name="order",
            name="in_flight",
            field=models.BooleanField(default=False, editable=False, help_text="A close holds the order's lease until its due time.", verbose_name="in flight"),
        ),
        migrations.RunPython(fill_due_at, fill_back),
        migrations.AlterField(
            model_name="order",
            name="due_at",
            field=models.DateTimeField(help_text="When the sweep next looks at the order: its deadline, its retry time, or the end of a close in flight.", verbose_name="due at"),
        ),
        migrations.RemoveIndex(
            model_name="order",
            name="wxpay_close_due_idx",
        ),
        migrations.RemoveField(
            model_name="order",
            name="next_attempt_at",
        ),
        migrations.RemoveField(
            model_name="order",
            name="claim_expires_at",
        ),
        migrations.AddIndex(
            model_name="order",
            index=models.Index(condition=models.Q(("on_hold", False), ("state", "open")), fields=["due_at", "id"], name="wxpay_close_queue_idx"),
        ),
        migrations.AddField(
            model_name="closeattempt",
            name="late_answer_to",
            field=models.ForeignKey(blank=True, db_index=False, help_text="The request this answer belongs to, when it came after that request's row was settled as abandoned.", null=True, on_delete=django.db.models.deletion.PROTECT, related_name="late_answers", to="django_wxpay_close.closeattempt", verbose_name="late answer to"),
        ),
    ]
