"""Settings for `manage.py` processes that a test starts against its own test database and simulator.

The test passes what differs from tests/settings.py through the environment:
- WXPAY_TEST_DB_NAME: the database pytest-django created (test_wxpay_close on PostgreSQL);
- WXPAY_TEST_CLOSE: WXPAY_CLOSE as JSON (durations in seconds), pointing at the test's simulator.
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

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"stderr": {"class": "logging.StreamHandler"}},
    "loggers": {"django_wxpay_close": {"handlers": ["stderr"], "level": "WARNING"}},
}
