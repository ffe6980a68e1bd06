"""Settings for the test suite. DATABASE_URL picks the backend (SQLite by default)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from example_project.database import database_from_url

SECRET_KEY = "tests-only-not-secret"
DEBUG = False
USE_TZ = True
TIME_ZONE = "UTC"
ALLOWED_HOSTS = ["*"]
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django_wxpay_close",
]
MIDDLEWARE = [
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
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
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]

# SQLite tests use a file (not :memory:) so worker threads and subprocesses share one database.
_sqlite_test_file = Path(tempfile.gettempdir()) / f"wxpay-close-test-{os.getpid()}.sqlite3"
DATABASES = {"default": database_from_url(os.environ.get("DATABASE_URL"), sqlite_path=_sqlite_test_file)}
DATABASES["default"].setdefault("TEST", {})
if DATABASES["default"]["ENGINE"].endswith("sqlite3"):
    DATABASES["default"]["TEST"]["NAME"] = str(_sqlite_test_file)

# Filled in per test by fixtures pointing at the loopback simulator; see tests/conftest.py.
WXPAY_CLOSE: dict = {
    "MERCHANTS": {
        "default": {
            "APPID": "wx2421b1c4370ec43b",
            "MCH_ID": "10000100",
            "SUB_MCH_ID": "20000200",
            "API_KEY": "TESTKEY0TESTKEY1TESTKEY2TESTKEY3",
            "SIGN_TYPE": "HMAC-SHA256",
        }
    },
    "BASE_URL": "http://127.0.0.1:9",
}
