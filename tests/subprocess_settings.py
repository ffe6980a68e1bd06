"""Settings for `manage.py` processes that a test starts against its own test database and simulator.

The test passes what differs from tests/settings.py through the environment:
- WXPAY_TEST_DB_NAME: the database pytest-django created (test_wxpay_close on PostgreSQL);
- WXPAY_TEST_CLOSE: WXPAY_CLOSE as JSON (durations in seconds), pointing at the test's simulator;
- WXPAY_TEST_LOG_LEVEL: the level every logger writes to stderr at (default WARNING);
- WXPAY_TEST_CLOSE=null: no WXPAY_CLOSE setting at all;
- WXPAY_TEST_CHILD_CLOSE: WXPAY_CLOSE for the sweeper processes `--processes N` starts (`python -m django`),
  as a deployment whose settings differ between two reads;
- WXPAY_TEST_SETTINGS: other settings as JSON, e.g. {"TEMPLATES": []}.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from tests.settings import *  # noqa: F403
from tests.settings import DATABASES

if os.environ.get("WXPAY_TEST_DB_NAME"):
    DATABASES["default"]["NAME"] = os.environ["WXPAY_TEST_DB_NAME"]

if os.environ.get("WXPAY_TEST_CLOSE"):
    WXPAY_CLOSE = json.loads(os.environ["WXPAY_TEST_CLOSE"])
    if WXPAY_CLOSE is None:
        del WXPAY_CLOSE

if os.environ.get("WXPAY_TEST_CHILD_CLOSE") and Path(sys.argv[0]).parent.name == "django":  # python -m django
    WXPAY_CLOSE = json.loads(os.environ["WXPAY_TEST_CHILD_CLOSE"])

globals().update(json.loads(os.environ.get("WXPAY_TEST_SETTINGS") or "{}"))

# Every logger to stderr at WXPAY_TEST_LOG_LEVEL (default WARNING), so a test can read what a process logged.
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(name)s %(levelname)s %(message)s"}},
    "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["stderr"], "level": os.environ.get("WXPAY_TEST_LOG_LEVEL", "WARNING")},
}
