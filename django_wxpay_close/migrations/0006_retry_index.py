from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ("django_wxpay_close", "0005_admin_indexes"),
    ]

    operations = [
        migrations.AddIndex(
            model_name="order",
            index=models.Index(condition=models.Q(('attempt_count__gt', 0), ('in_flight', False), ('on_hold', False), ('state', 'open')), fields=["due_at"], name="wxpay_close_retry_idx"),
        ),
    ]
