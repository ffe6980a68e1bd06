"""The notify URL alone, mounted as the README mounts it."""

from django.urls import include, path

urlpatterns = [path("wxpay/notify/", include("django_wxpay_close.urls"))]
