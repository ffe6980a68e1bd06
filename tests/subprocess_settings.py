"""Settings for `manage.py` processes that a test starts against its own test database and simulator.

The test passes what differs from tests/settings.py through the environment:
- WXPAY_TEST_DB_NAME: the database pytest-django created (test_wxpay_close on PostgreSQL);
- WXPAY_TEST_CLOSE: WXPAY_CLOSE as JSON (durations in seconds), pointing at the test's simulator;
- WXPAY_TEST_LOG_LEVEL: the level every logger writes to stderr at (default WARNING).
"""

from __future__ import annotations

import json
import os

from tests.settings import *  # noqa: F403
from tests.settings import DATABASES

if os.environ.get("WXPAY_TEST_DB_NAME"):
    DATABASES["default"]["NAME"] = os.environ["WXPAY_TEST_DB_NAME"]

if os.environ.get("WXPAY_TEST_CLOSE"):
    WXPAY_CLOSE = json.loads(os.environ["WXPAY_TEST_CLOSE"])

# Every logger to stderr at WXPAY_TEST_LOG_LEVEL (default WARNING), so a test can read what a process logged.
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(name)s %(levelname)s %(message)s"}},
    "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["stderr"], "level": os.environ.get("WXPAY_TEST_LOG_LEVEL", "WARNING")},
}
