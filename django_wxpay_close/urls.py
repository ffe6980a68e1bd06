"""Mount with `path("wxpay/notify/", include("django_wxpay_close.urls"))`, or route to `views.payment_notification`.

The URL name is "django_wxpay_close:payment_notification"; give WeChat its full https URL as notify_url.
"""

from django.urls import path

from . import views

app_name = "django_wxpay_close"

urlpatterns = [
    path("", views.payment_notification, name="payment_notification"),
]
