from django.apps import AppConfig
from django.utils.translation import gettext_lazy as _


class WxpayCloseConfig(AppConfig):
    name = "django_wxpay_close"
    verbose_name = _("WeChat Pay order closing")
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from . import checks  # noqa: F401  (registers the system checks)
