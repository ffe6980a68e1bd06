"""Django settings for the benchmark processes: DATABASE_URL picks the backend, WXPAY_BASE_URL the simulator.

SQLite is configured as example_project/database.py recommends (WAL, IMMEDIATE transactions, busy timeout).
DEBUG stays off, so Django keeps no per-query log that would grow with the backlog.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from django_wxpay_close.testing import API_KEY, APPID, MCH_ID, SUB_MCH_ID
from example_project.database import database_from_url

SQLITE_PATH = Path(tempfile.gettempdir()) / "wxpay_bench.sqlite3"

SECRET_KEY = "benchmark-only-not-secret"
DEBUG = False
USE_TZ = True
TIME_ZONE = "UTC"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
INSTALLED_APPS = ["django.contrib.contenttypes", "django.contrib.auth", "django_wxpay_close"]
DATABASES = {"default": database_from_url(os.environ.get("DATABASE_URL"), sqlite_path=SQLITE_PATH)}

WXPAY_CLOSE = {
    "MERCHANTS": {
        "default": {"APPID": APPID, "MCH_ID": MCH_ID, "SUB_MCH_ID": SUB_MCH_ID, "API_KEY": API_KEY,
                    "SIGN_TYPE": "HMAC-SHA256"},
    },
    "BASE_URL": os.environ.get("WXPAY_BASE_URL", "http://127.0.0.1:8765"),
    "CONNECT_TIMEOUT": 2.0,
    "READ_TIMEOUT": 5.0,
}

LOGGING = {"version": 1, "disable_existing_loggers": False,
           "loggers": {"django_wxpay_close": {"level": "WARNING"}}}
