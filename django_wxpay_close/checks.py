"""System checks: `manage.py check` reports what `load_settings()` would refuse, with stable ids.

Ids in use: E001–E011, W001–W003 (see conf.py). Retired ids are never reused. The check has a tag of its
own, so `manage.py check --tag django_wxpay_close` runs it alone; a plain `manage.py check` runs it too.
"""

from __future__ import annotations

from typing import Any

from django.core import checks

from .conf import inspect_settings


@checks.register("django_wxpay_close")
def check_wxpay_close_settings(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    _, problems = inspect_settings()
    return [
        (checks.Error if problem.is_error else checks.Warning)(
            problem.message, hint=problem.hint or None, id=problem.id)
        for problem in problems
    ]
