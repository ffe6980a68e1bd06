"""System checks: each broken setting is reported with its stable id and a clear message."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from django.core.exceptions import ImproperlyConfigured

from django_wxpay_close.checks import check_wxpay_close_settings
from django_wxpay_close.conf import load_settings
from tests.conftest import merchant_config

VALID: dict[str, Any] = {"MERCHANTS": {"default": merchant_config()}, "BASE_URL": "https://apihk.mch.weixin.qq.com"}


def problems(settings: Any, config: Any) -> list[tuple[str, str]]:
    settings.WXPAY_CLOSE = config
    return [(message.id, message.msg) for message in check_wxpay_close_settings()]


def with_merchant(**overrides: Any) -> dict[str, Any]:
    return {**VALID, "MERCHANTS": {"default": {**merchant_config(), **overrides}}}


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
