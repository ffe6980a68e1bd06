from django.apps import AppConfig


class DemoConfig(AppConfig):
    name = "example_project.demo"
    label = "wxpay_demo"
    verbose_name = "django-wxpay-close demo"
