"""System checks: each broken setting is reported with its stable id and a clear message."""

from __future__ import annotations

from datetime import timedelta
from io import StringIO
from typing import Any

import pytest
from django.core.checks import run_checks
from django.core.exceptions import ImproperlyConfigured
from django.core.management import call_command
from django.core.management.base import SystemCheckError

from django_wxpay_close.checks import check_wxpay_close_settings
from django_wxpay_close.conf import MAX_WORKERS, load_settings
from django_wxpay_close.models import Order
from django_wxpay_close.services import create_order
from django_wxpay_close.wechat import SignType
from tests.conftest import merchant_config

VALID: dict[str, Any] = {"MERCHANTS": {"default": merchant_config()}, "BASE_URL": "https://apihk.mch.weixin.qq.com"}


def problems(settings: Any, config: Any) -> list[tuple[str, str]]:
    settings.WXPAY_CLOSE = config
    return [(message.id, message.msg) for message in check_wxpay_close_settings()]


def with_merchant(**overrides: Any) -> dict[str, Any]:
    return {**VALID, "MERCHANTS": {"default": {**merchant_config(), **overrides}}}


def ours(messages: list[Any]) -> list[tuple[str, str]]:
    """This app's messages among every registered check's."""
    return [(m.id, m.msg) for m in messages if (m.id or "").startswith("django_wxpay_close.")]


def finite_seconds_error(key: str, value: Any) -> tuple[str, str]:
    return ("django_wxpay_close.E009",
            f"WXPAY_CLOSE['{key}'] must be a positive, finite number of seconds, got {value!r}.")


def finite_duration_error(key: str, value: Any) -> tuple[str, str]:
    return ("django_wxpay_close.E009",
            f"WXPAY_CLOSE['{key}'] must be a positive, finite timedelta or number of seconds, got {value!r}.")


def test_a_valid_configuration_has_no_problems(settings):
    assert problems(settings, VALID) == []


def test_missing_settings_are_e001(settings):
    del settings.WXPAY_CLOSE
    assert [m.id for m in check_wxpay_close_settings()] == ["django_wxpay_close.E001"]


def test_no_merchants_is_e002(settings):
    assert problems(settings, {**VALID, "MERCHANTS": {}}) == [
        ("django_wxpay_close.E002", "WXPAY_CLOSE['MERCHANTS'] must name at least one merchant.")
    ]


def test_a_merchant_missing_its_api_key_is_e003_naming_the_key(settings):
    config = with_merchant()
    del config["MERCHANTS"]["default"]["API_KEY"]
    assert problems(settings, config) == [
        ("django_wxpay_close.E003", "WXPAY_CLOSE['MERCHANTS']['default'] is missing API_KEY.")
    ]


def test_an_overlong_id_is_e004(settings):
    [(check_id, message)] = problems(settings, with_merchant(SUB_MCH_ID="9" * 33))
    assert check_id == "django_wxpay_close.E004" and "sub_mch_id" in message


def test_a_key_of_the_wrong_length_is_e005_without_showing_the_key(settings):
    [(check_id, message)] = problems(settings, with_merchant(API_KEY="SHORTSECRETKEY"))
    assert check_id == "django_wxpay_close.E005" and "SHORTSECRETKEY" not in message


@pytest.mark.parametrize("empty", ["", None])
def test_an_empty_sign_type_is_e006_not_md5(settings, empty):
    assert problems(settings, with_merchant(SIGN_TYPE=empty)) == [
        ("django_wxpay_close.E006",
         "WXPAY_CLOSE['MERCHANTS']['default']['SIGN_TYPE'] is empty: expected one of MD5, HMAC-SHA256.")
    ]


def test_a_merchant_without_a_sign_type_signs_with_hmac_sha256(settings):
    config = with_merchant()
    del config["MERCHANTS"]["default"]["SIGN_TYPE"]
    settings.WXPAY_CLOSE = config
    assert load_settings().merchants["default"].merchant.sign_type is SignType.HMAC_SHA256


def test_an_unknown_sign_type_is_e006(settings):
    assert problems(settings, with_merchant(SIGN_TYPE="SHA1")) == [
        ("django_wxpay_close.E006",
         "WXPAY_CLOSE['MERCHANTS']['default']['SIGN_TYPE']: unknown sign type 'SHA1': expected one of MD5, HMAC-SHA256.")
    ]


def test_a_base_url_that_is_not_a_url_is_e007(settings):
    assert [i for i, _ in problems(settings, {**VALID, "BASE_URL": "apihk.mch.weixin.qq.com"})] == ["django_wxpay_close.E007"]


def test_plain_http_outside_debug_is_e008(settings):
    settings.DEBUG = False
    assert problems(settings, {**VALID, "BASE_URL": "http://apihk.mch.weixin.qq.com"}) == [
        ("django_wxpay_close.E008", "WXPAY_CLOSE['BASE_URL'] 'http://apihk.mch.weixin.qq.com' is not HTTPS.")
    ]


def test_plain_http_is_allowed_in_debug_and_to_a_loopback_simulator(settings):
    settings.DEBUG = False
    assert problems(settings, {**VALID, "BASE_URL": "http://127.0.0.1:8765"}) == []
    settings.DEBUG = True
    assert problems(settings, {**VALID, "BASE_URL": "http://wechat.internal"}) == []


@pytest.mark.parametrize("key, value", [("READ_TIMEOUT", 0), ("MAX_ATTEMPTS", 0), ("WORKERS", "8"),
                                        ("RETRY_BACKOFF", "1m"), ("MIN_ORDER_AGE", timedelta(0))])
def test_malformed_numbers_and_durations_are_e009(settings, key, value):
    assert [i for i, _ in problems(settings, {**VALID, key: value})] == ["django_wxpay_close.E009"]


def test_a_nan_timeout_is_e009_in_the_system_checks(settings):
    settings.WXPAY_CLOSE = {**VALID, "READ_TIMEOUT": float("nan")}
    assert ours(run_checks()) == [finite_seconds_error("READ_TIMEOUT", float("nan"))]


def test_a_nan_timeout_makes_load_settings_refuse_with_e009(settings):
    settings.WXPAY_CLOSE = {**VALID, "CONNECT_TIMEOUT": float("nan")}
    with pytest.raises(ImproperlyConfigured, match=r"CONNECT_TIMEOUT'\] must be a positive, finite .*\.E009\)"):
        load_settings()


@pytest.mark.django_db
def test_a_nan_timeout_makes_create_order_refuse_and_record_nothing(settings):
    settings.WXPAY_CLOSE = {**VALID, "READ_TIMEOUT": float("nan")}
    with pytest.raises(ImproperlyConfigured, match="E009"):
        create_order(out_trade_no="SHOP-NAN")
    assert not Order.objects.exists()


@pytest.mark.parametrize("key", ["CONNECT_TIMEOUT", "READ_TIMEOUT"])
@pytest.mark.parametrize("value", [float("inf"), float("-inf"), 10**400], ids=["inf", "-inf", "10**400"])
def test_an_infinite_timeout_is_e009(settings, key, value):
    assert problems(settings, {**VALID, key: value}) == [finite_seconds_error(key, value)]


DURATIONS = ["PAYMENT_WINDOW", "MIN_ORDER_AGE", "RETRY_BACKOFF", "RETRY_BACKOFF_MAX", "CLAIM_TIMEOUT"]


@pytest.mark.parametrize("key", DURATIONS)
@pytest.mark.parametrize("value", [float("inf"), float("nan"), 1e300, 10**400], ids=["inf", "nan", "1e300", "10**400"])
def test_an_infinite_nan_or_out_of_range_duration_is_e009(settings, key, value):
    assert problems(settings, {**VALID, key: value}) == [finite_duration_error(key, value)]


def test_an_infinite_duration_makes_load_settings_refuse_with_e009(settings):
    settings.WXPAY_CLOSE = {**VALID, "PAYMENT_WINDOW": float("inf")}
    with pytest.raises(ImproperlyConfigured, match=r"PAYMENT_WINDOW'\] must be a positive, finite .*E009"):
        load_settings()


def test_timeouts_longer_than_any_timedelta_are_e010(settings):
    assert problems(settings, {**VALID, "CONNECT_TIMEOUT": 1e300}) == [
        ("django_wxpay_close.E010",
         "WXPAY_CLOSE['CLAIM_TIMEOUT'] (0:02:00) must exceed the longest close exchange (1e+300 seconds).")
    ]


def test_the_retry_delay_of_a_long_backoff_stops_at_its_cap(settings):
    settings.WXPAY_CLOSE = {**VALID, "RETRY_BACKOFF": timedelta(days=1), "RETRY_BACKOFF_MAX": timedelta.max}
    assert load_settings().retry_delay(40) == timedelta.max


def test_more_workers_than_max_workers_is_e011(settings):
    settings.WXPAY_CLOSE = {**VALID, "WORKERS": MAX_WORKERS + 1}
    [message] = check_wxpay_close_settings()
    assert (message.id, message.msg, message.hint) == (
        "django_wxpay_close.E011", "WXPAY_CLOSE['WORKERS'] is 65, more than the maximum of 64.",
        "Each worker holds a database connection of its own; to close faster, run more sweeper processes: "
        "they share the backlog safely.",
    )


def test_max_workers_is_allowed(settings):
    assert problems(settings, {**VALID, "WORKERS": MAX_WORKERS}) == []


def test_the_check_is_listed_under_the_apps_own_tag():
    out = StringIO()
    call_command("check", "--list-tags", stdout=out)
    assert "django_wxpay_close" in out.getvalue().split()


def test_the_apps_tag_runs_the_settings_check(settings):
    settings.WXPAY_CLOSE = {**VALID, "WORKERS": MAX_WORKERS + 1}
    assert [i for i, _ in ours(run_checks(tags=["django_wxpay_close"]))] == ["django_wxpay_close.E011"]


def test_manage_py_check_with_the_apps_tag_reports_a_broken_configuration(settings):
    settings.WXPAY_CLOSE = {**VALID, "WORKERS": MAX_WORKERS + 1}
    with pytest.raises(SystemCheckError, match="django_wxpay_close.E011"):
        call_command("check", "--tag", "django_wxpay_close", stdout=StringIO(), stderr=StringIO())


def test_manage_py_check_with_the_apps_tag_passes_a_valid_configuration(settings):
    settings.WXPAY_CLOSE = VALID
    out = StringIO()
    call_command("check", "--tag", "django_wxpay_close", stdout=out)
    assert "no issues" in out.getvalue()


def test_a_claim_shorter_than_the_longest_exchange_is_e010(settings):
    config = {**VALID, "CLAIM_TIMEOUT": 20, "FAILOVER_BASE_URL": "https://apius.mch.weixin.qq.com"}
    assert [i for i, _ in problems(settings, config)] == ["django_wxpay_close.E010"]


def test_unknown_keys_are_warnings(settings):
    config = with_merchant(APP_ID="typo")
    config["TIMEOUTS"] = 3
    assert [i for i, _ in problems(settings, config)] == ["django_wxpay_close.W001", "django_wxpay_close.W002"]


def test_a_minimum_age_under_five_minutes_is_w003(settings):
    assert [i for i, _ in problems(settings, {**VALID, "MIN_ORDER_AGE": 60})] == ["django_wxpay_close.W003"]


def test_the_service_refuses_a_broken_configuration_naming_every_error(settings):
    settings.WXPAY_CLOSE = with_merchant(SIGN_TYPE="SHA1", API_KEY="x")
    with pytest.raises(ImproperlyConfigured, match="E005"):
        load_settings()
