"""The `WXPAY_CLOSE` settings dict: read lazily (so `override_settings` works), validated in one place.

`inspect_settings()` lists every problem with a stable check id; the system checks show them and
`load_settings()` refuses to run with any error-level one, so nothing is sent on a broken config.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from ipaddress import ip_address
from typing import Any
from urllib.parse import urlsplit

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.utils.translation import gettext as _

from .wechat import InvalidRequestField, Merchant, SignType
from .wechat.client import API_KEY_LENGTH

__all__ = [
    "DEFAULTS", "MAX_WORKERS", "MerchantSettings", "CloseSettings", "SettingProblem",
    "inspect_settings", "load_settings",
]

HONG_KONG_BASE_URL = "https://apihk.mch.weixin.qq.com"
UNITED_STATES_BASE_URL = "https://apius.mch.weixin.qq.com"
# The most worker threads a sweep or an admin action runs (WORKERS, check E011). Each holds a database
# connection of its own and a kept-alive one to WeChat, so more would exhaust a database's connection limit
# sooner than they speed anything up: more throughput comes from more sweeper processes, which share the backlog.
MAX_WORKERS = 64

DEFAULTS: dict[str, Any] = {
    "MERCHANTS": {},
    "BASE_URL": HONG_KONG_BASE_URL,
    "FAILOVER_BASE_URL": None,
    "CONNECT_TIMEOUT": 3.05,
    "READ_TIMEOUT": 10.0,
    "MAX_RESPONSE_BYTES": 64 * 1024,
    "PAYMENT_WINDOW": timedelta(minutes=30),
    "MIN_ORDER_AGE": timedelta(minutes=5),
    "MAX_ATTEMPTS": 8,
    "RETRY_BACKOFF": timedelta(minutes=1),
    "RETRY_BACKOFF_MAX": timedelta(hours=1),
    "CLAIM_TIMEOUT": timedelta(minutes=2),
    "WORKERS": 8,
    "BATCH_SIZE": 100,
    "ADMIN_MAX_SELECTION": 500,
    "NOTIFICATION_TRACES_PER_MINUTE": 60,
}
_DURATIONS = ("PAYMENT_WINDOW", "MIN_ORDER_AGE", "RETRY_BACKOFF", "RETRY_BACKOFF_MAX", "CLAIM_TIMEOUT")
_POSITIVE_NUMBERS = ("CONNECT_TIMEOUT", "READ_TIMEOUT")
_POSITIVE_INTEGERS = ("MAX_RESPONSE_BYTES", "MAX_ATTEMPTS", "WORKERS", "BATCH_SIZE", "ADMIN_MAX_SELECTION",
                      "NOTIFICATION_TRACES_PER_MINUTE")
# Past this many unauthenticated notification traces a minute, a flood's traces stop being small (check W004).
NOTIFICATION_TRACES_WARNING = 1000
_MERCHANT_REQUIRED = ("APPID", "MCH_ID", "SUB_MCH_ID", "API_KEY")
_MERCHANT_KEYS = frozenset(_MERCHANT_REQUIRED + ("SUB_APPID", "SIGN_TYPE"))
_LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})


@dataclass(frozen=True)
class MerchantSettings:
    name: str
    merchant: Merchant  # holds the API key; its repr never shows it


@dataclass(frozen=True)
class CloseSettings:
    merchants: Mapping[str, MerchantSettings]
    base_url: str
    failover_base_url: str | None
    connect_timeout: float
    read_timeout: float
    max_response_bytes: int
    payment_window: timedelta
    min_order_age: timedelta
    max_attempts: int
    retry_backoff: timedelta
    retry_backoff_max: timedelta
    claim_timeout: timedelta
    workers: int
    batch_size: int
    admin_max_selection: int
    notification_traces_per_minute: int = DEFAULTS["NOTIFICATION_TRACES_PER_MINUTE"]

    @property
    def base_urls(self) -> tuple[str, ...]:
        return (self.base_url, self.failover_base_url) if self.failover_base_url else (self.base_url,)

    @property
    def longest_exchange(self) -> timedelta:
        """The most one close can take: every region tried, each up to connect + read time."""
        return timedelta(seconds=len(self.base_urls) * (self.connect_timeout + self.read_timeout))

    def retry_delay(self, retry_number: int) -> timedelta:
        """Exponential backoff: RETRY_BACKOFF, doubled per retry, capped at RETRY_BACKOFF_MAX."""
        doublings = min(max(retry_number - 1, 0), 32)
        try:
            return min(self.retry_backoff * (1 << doublings), self.retry_backoff_max)
        except OverflowError:  # a backoff of days, doubled 32 times, passes timedelta.max: the cap applies
            return self.retry_backoff_max


@dataclass(frozen=True)
class SettingProblem:
    id: str  # "django_wxpay_close.E001": stable, never reused
    message: str
    hint: str = ""
    is_error: bool = True


@dataclass
class _Inspection:
    problems: list[SettingProblem] = field(default_factory=list)

    def error(self, number: int, message: str, hint: str = "") -> None:
        self.problems.append(SettingProblem(f"django_wxpay_close.E{number:03d}", message, hint))

    def warning(self, number: int, message: str, hint: str = "") -> None:
        self.problems.append(SettingProblem(f"django_wxpay_close.W{number:03d}", message, hint, is_error=False))


def _finite_seconds(value: Any) -> float | None:
    """A number as a float; None for anything else, NaN, an infinity or an int past the float range."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        seconds = float(value)
    except OverflowError:
        return None
    return seconds if math.isfinite(seconds) else None


def _as_timedelta(value: Any) -> timedelta | None:
    if isinstance(value, timedelta):
        return value
    if _finite_seconds(value) is None:
        return None
    try:
        return timedelta(seconds=value)
    except (OverflowError, ValueError):  # past timedelta.max (1e300); ValueError is what NaN would raise
        return None


def _is_loopback(host: str) -> bool:
    if host in _LOOPBACK_NAMES:
        return True
    try:
        return ip_address(host).is_loopback
    except ValueError:
        return False


def _check_base_url(name: str, url: Any, report: _Inspection) -> str | None:
    parts = urlsplit(url) if isinstance(url, str) else None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
        report.error(7, _("WXPAY_CLOSE['%(name)s'] must be an http(s) URL without query, got %(url)r.")
                     % {"name": name, "url": url},
                     _("Use %(hong_kong)r or %(united_states)r.")
                     % {"hong_kong": HONG_KONG_BASE_URL, "united_states": UNITED_STATES_BASE_URL})
        return None
    if parts.scheme == "http" and not settings.DEBUG and not _is_loopback(parts.hostname):
        report.error(8, _("WXPAY_CLOSE['%(name)s'] %(url)r is not HTTPS.") % {"name": name, "url": url},
                     _("Outside DEBUG only HTTPS (or a loopback simulator) may receive signed requests."))
        return None
    return str(url).rstrip("/")


def _inspect_merchant(name: str, raw: Any, report: _Inspection) -> MerchantSettings | None:
    where = f"WXPAY_CLOSE['MERCHANTS'][{name!r}]"
    if not isinstance(raw, Mapping):
        report.error(3, _("%(where)s must be a dict, got %(type)s.") % {"where": where, "type": type(raw).__name__})
        return None
    missing = [key for key in _MERCHANT_REQUIRED if not raw.get(key)]
    if missing:
        report.error(3, _("%(where)s is missing %(keys)s.") % {"where": where, "keys": ", ".join(missing)},
                     _("Every merchant needs APPID, MCH_ID, SUB_MCH_ID and API_KEY "
                       "(from the WeChat Pay merchant platform)."))
        return None
    unknown = sorted(set(raw) - _MERCHANT_KEYS)
    if unknown:
        report.warning(2, _("%(where)s has unknown keys %(keys)s; they are ignored.")
                       % {"where": where, "keys": ", ".join(unknown)},
                       _("Known keys: %(keys)s.") % {"keys": ", ".join(sorted(_MERCHANT_KEYS))})
    sign_type: SignType | None = None
    raw_sign_type = raw.get("SIGN_TYPE", SignType.HMAC_SHA256.value)
    if raw_sign_type is None or raw_sign_type == "":  # SignType.parse reads these as MD5: say so instead
        report.error(6, _("%(where)s['SIGN_TYPE'] is empty: expected one of %(types)s.")
                     % {"where": where, "types": ", ".join(t.value for t in SignType)},
                     _("Leave SIGN_TYPE out for HMAC-SHA256."))
    else:
        try:
            sign_type = SignType.parse(raw_sign_type)
        except ValueError as exc:
            report.error(6, f"{where}['SIGN_TYPE']: {exc}.")
    api_key = raw["API_KEY"]
    key_ok = isinstance(api_key, str) and len(api_key) == API_KEY_LENGTH and api_key.isascii()
    if not key_ok:  # the message never echoes the key, not even a wrong one
        report.error(5, _("%(where)s['API_KEY'] must be the %(length)d-character API key.")
                     % {"where": where, "length": API_KEY_LENGTH},
                     _("Copy it from the merchant platform (API security); it is never shown here."))
    if sign_type is None or not key_ok:
        return None
    try:
        merchant = Merchant(
            appid=raw["APPID"], mch_id=str(raw["MCH_ID"]), sub_mch_id=str(raw["SUB_MCH_ID"]),
            api_key=api_key, sign_type=sign_type, sub_appid=raw.get("SUB_APPID") or None,
        )
    except InvalidRequestField as exc:
        report.error(4, f"{where}: {exc}.")
        return None
    return MerchantSettings(name=name, merchant=merchant)


def inspect_settings() -> tuple[CloseSettings | None, list[SettingProblem]]:
    """Parse `settings.WXPAY_CLOSE`; the settings object is None when any problem is an error."""
    report = _Inspection()
    raw = getattr(settings, "WXPAY_CLOSE", None)
    if not isinstance(raw, Mapping):
        report.error(1, _("settings.WXPAY_CLOSE is missing or not a dict."),
                     _("Add WXPAY_CLOSE = {'MERCHANTS': {'default': {...}}}; see the README."))
        return None, report.problems
    unknown = sorted(set(raw) - set(DEFAULTS))
    if unknown:
        report.warning(1, _("WXPAY_CLOSE has unknown keys %(keys)s; they are ignored.") % {"keys": ", ".join(unknown)},
                       _("Known keys: %(keys)s.") % {"keys": ", ".join(sorted(DEFAULTS))})
    values = {**DEFAULTS, **raw}

    merchants: dict[str, MerchantSettings] = {}
    if not isinstance(values["MERCHANTS"], Mapping) or not values["MERCHANTS"]:
        report.error(2, _("WXPAY_CLOSE['MERCHANTS'] must name at least one merchant."),
                     _("For example {'default': {'APPID': ..., 'MCH_ID': ..., 'SUB_MCH_ID': ..., 'API_KEY': ...}}."))
    else:
        for name, merchant_raw in values["MERCHANTS"].items():
            parsed = _inspect_merchant(str(name), merchant_raw, report)
            if parsed:
                merchants[parsed.name] = parsed

    base_url = _check_base_url("BASE_URL", values["BASE_URL"], report)
    failover = values["FAILOVER_BASE_URL"]
    if failover is not None:
        failover = _check_base_url("FAILOVER_BASE_URL", failover, report)

    converted: dict[str, Any] = {}
    for key in _DURATIONS:
        duration = _as_timedelta(values[key])
        if duration is None or duration <= timedelta(0):
            report.error(9, _("WXPAY_CLOSE['%(key)s'] must be a positive, finite timedelta or number of seconds, "
                              "got %(value)r.") % {"key": key, "value": values[key]})
        converted[key] = duration
    for key in _POSITIVE_NUMBERS:
        seconds = _finite_seconds(values[key])
        if seconds is None or seconds <= 0:  # NaN compares false to everything: it must not get past here
            report.error(9, _("WXPAY_CLOSE['%(key)s'] must be a positive, finite number of seconds, got %(value)r.")
                         % {"key": key, "value": values[key]})
        converted[key] = seconds
    for key in _POSITIVE_INTEGERS:
        number = values[key]
        if isinstance(number, bool) or not isinstance(number, int) or number < 1:
            report.error(9, _("WXPAY_CLOSE['%(key)s'] must be a whole number of at least 1, got %(value)r.")
                         % {"key": key, "value": number})
        elif key == "WORKERS" and number > MAX_WORKERS:
            report.error(11, _("WXPAY_CLOSE['WORKERS'] is %(workers)d, more than the maximum of %(maximum)d.")
                         % {"workers": number, "maximum": MAX_WORKERS},
                         _("Each worker holds a database connection of its own; to close faster, run more "
                           "sweeper processes: they share the backlog safely."))
        converted[key] = number

    if any(problem.is_error for problem in report.problems):
        return None, report.problems
    parsed_settings = CloseSettings(
        merchants=merchants, base_url=base_url or "", failover_base_url=failover,
        connect_timeout=converted["CONNECT_TIMEOUT"], read_timeout=converted["READ_TIMEOUT"],
        max_response_bytes=converted["MAX_RESPONSE_BYTES"], payment_window=converted["PAYMENT_WINDOW"],
        min_order_age=converted["MIN_ORDER_AGE"], max_attempts=converted["MAX_ATTEMPTS"],
        retry_backoff=converted["RETRY_BACKOFF"], retry_backoff_max=converted["RETRY_BACKOFF_MAX"],
        claim_timeout=converted["CLAIM_TIMEOUT"], workers=converted["WORKERS"], batch_size=converted["BATCH_SIZE"],
        admin_max_selection=converted["ADMIN_MAX_SELECTION"],
        notification_traces_per_minute=converted["NOTIFICATION_TRACES_PER_MINUTE"],
    )
    try:
        longest: timedelta | str = parsed_settings.longest_exchange
    except OverflowError:  # timeouts past timedelta.max: longer than any CLAIM_TIMEOUT can be
        seconds = len(parsed_settings.base_urls) * (parsed_settings.connect_timeout + parsed_settings.read_timeout)
        longest = _("%(seconds)g seconds") % {"seconds": seconds}
    if not isinstance(longest, timedelta) or parsed_settings.claim_timeout <= longest:
        report.error(10, _("WXPAY_CLOSE['CLAIM_TIMEOUT'] (%(claim)s) must exceed the longest close exchange "
                           "(%(longest)s).") % {"claim": parsed_settings.claim_timeout, "longest": longest},
                     _("Otherwise a claim could expire while its request is in flight and a second sweeper "
                       "resend it."))
        return None, report.problems
    if parsed_settings.min_order_age < timedelta(minutes=5):
        report.warning(3, _("WXPAY_CLOSE['MIN_ORDER_AGE'] is %(age)s, under 5 minutes.")
                       % {"age": parsed_settings.min_order_age},
                       _("WeChat rejects or mishandles closing an order younger than 5 minutes."))
    if parsed_settings.notification_traces_per_minute > NOTIFICATION_TRACES_WARNING:
        report.warning(4, _("WXPAY_CLOSE['NOTIFICATION_TRACES_PER_MINUTE'] is %(traces)d, more than %(limit)d.")
                       % {"traces": parsed_settings.notification_traces_per_minute,
                          "limit": NOTIFICATION_TRACES_WARNING},
                       _("Each trace of an unauthenticated notification is about a kilobyte: under a flood this many "
                         "a minute is over %(megabytes)d MB an hour. Genuine notifications are never limited.")
                       % {"megabytes": parsed_settings.notification_traces_per_minute * 60 // 1000})
    return parsed_settings, report.problems


def load_settings() -> CloseSettings:
    """The validated settings, or `ImproperlyConfigured` listing every error (nothing is sent then)."""
    parsed, problems = inspect_settings()
    if parsed is None:
        errors = "; ".join(f"{p.message} ({p.id})" for p in problems if p.is_error)
        raise ImproperlyConfigured(_("WXPAY_CLOSE is not usable: %(errors)s") % {"errors": errors})
    return parsed
