"""Settings for the test suite: the example project's, with a test database and test merchants.

DATABASE_URL picks the backend (SQLite by default). SQLite tests use a file, not :memory:, so worker
threads, the live server and subprocesses all see one database.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from example_project.database import database_from_url
from example_project.settings import *  # noqa: F403

DEBUG = False
ALLOWED_HOSTS = ["*"]
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
LOGGING = {"version": 1, "disable_existing_loggers": False}

_sqlite_test_file = Path(tempfile.gettempdir()) / f"wxpay-close-test-{os.getpid()}.sqlite3"
DATABASES = {"default": database_from_url(os.environ.get("DATABASE_URL"), sqlite_path=_sqlite_test_file)}
if DATABASES["default"]["ENGINE"].endswith("sqlite3"):
    DATABASES["default"]["TEST"] = {"NAME": str(_sqlite_test_file)}

# Tests point this at their own loopback simulator (tests/conftest.py, fixture `wxpay_settings`).
WXPAY_CLOSE = {**WXPAY_CLOSE, "BASE_URL": "http://127.0.0.1:9"}  # noqa: F405  (nothing listens on port 9)

# The test suite's own `flush` command (tests/management/commands/flush.py): a transactional test's cleanup.
INSTALLED_APPS = [*INSTALLED_APPS, "tests"]  # noqa: F405
