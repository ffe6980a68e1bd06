"""Django settings for `python -m bench --only scale`: the benchmark's settings with the admin, so its pages can
be timed through Django's test client (DATABASE_URL names the scale section's own database)."""

from __future__ import annotations

from bench.settings import *  # noqa: F403
from bench.settings import INSTALLED_APPS, WXPAY_CLOSE

from .scale import MERCHANTS

INSTALLED_APPS = ["django.contrib.admin", *INSTALLED_APPS, "django.contrib.sessions", "django.contrib.messages"]
MIDDLEWARE = [
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.locale.LocaleMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
]
ROOT_URLCONF = "example_project.urls"
ALLOWED_HOSTS = ["testserver"]
LANGUAGES = [("en", "English"), ("zh-hans", "简体中文"), ("zh-hant", "繁體中文")]
STATIC_URL = "/static/"
TEMPLATES = [{
    "BACKEND": "django.template.backends.django.DjangoTemplates",
    "APP_DIRS": True,
    "OPTIONS": {"context_processors": ["django.template.context_processors.request",
                                       "django.contrib.auth.context_processors.auth",
                                       "django.contrib.messages.context_processors.messages"]},
}]
_MERCHANT = WXPAY_CLOSE["MERCHANTS"]["default"]
WXPAY_CLOSE = {**WXPAY_CLOSE,
               "MERCHANTS": {name: {**_MERCHANT, "MCH_ID": mch_id} for name, mch_id in MERCHANTS.items()}}
