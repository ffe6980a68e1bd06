"""The example shop: SQLite by default (DATABASE_URL for PostgreSQL), the admin, and WeChat Pay
pointed at the loopback simulator (`python -m django_wxpay_close.testing --port 8765`).

For production, see the README: real merchant credentials from the environment and
BASE_URL = "https://apihk.mch.weixin.qq.com" (or apius), never a simulator.
"""

from __future__ import annotations

import os
from pathlib import Path

from django_wxpay_close.testing import API_KEY, APPID, MCH_ID, SUB_MCH_ID
from example_project.database import database_from_url

BASE_DIR = Path(__file__).resolve().parent.parent

SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "example-project-only-not-secret")
DEBUG = os.environ.get("DJANGO_DEBUG", "1") == "1"
ALLOWED_HOSTS = ["localhost", "127.0.0.1", "[::1]"]
USE_TZ = True
TIME_ZONE = "UTC"
# The admin follows the browser's Accept-Language (LocaleMiddleware); django_wxpay_close ships both Chinese scripts.
LANGUAGE_CODE = "en"
LANGUAGES = [("en", "English"), ("zh-hans", "简体中文"), ("zh-hant", "繁體中文")]
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django_wxpay_close",
    "example_project.demo",
]
MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    # After sessions, before CommonMiddleware: where Django's translation docs place it.
    "django.middleware.locale.LocaleMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]
ROOT_URLCONF = "example_project.urls"
TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ]
        },
    }
]
STATIC_URL = "/static/"
DATABASES = {"default": database_from_url(os.environ.get("DATABASE_URL"), sqlite_path=BASE_DIR / "example.sqlite3")}

WXPAY_CLOSE = {
    "MERCHANTS": {
        # The simulator's demo merchant. In production read these from the environment.
        "default": {
            "APPID": APPID,
            "MCH_ID": MCH_ID,
            "SUB_MCH_ID": SUB_MCH_ID,
            "API_KEY": os.environ.get("WXPAY_API_KEY", API_KEY),
            "SIGN_TYPE": "HMAC-SHA256",
        },
    },
    "BASE_URL": os.environ.get("WXPAY_BASE_URL", "http://127.0.0.1:8765"),
    "CONNECT_TIMEOUT": 2.0,
    "READ_TIMEOUT": 5.0,
}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "loggers": {"django_wxpay_close": {"handlers": ["console"], "level": os.environ.get("WXPAY_LOG_LEVEL", "WARNING")}},
}
