from django.contrib import admin
from django.urls import include, path

urlpatterns = [
    path("admin/", admin.site.urls),
    # WeChat Pay's payment result notifications: the notify_url given to the unified order.
    path("wxpay/notify/", include("django_wxpay_close.urls")),
]
