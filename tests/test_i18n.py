"""Translations: the admin and the command in Simplified and Traditional Chinese, and catalogues that are complete
and compiled.

The admin follows Accept-Language (the example project enables LocaleMiddleware) or, without one, LANGUAGE_CODE.
"""

from __future__ import annotations

import ast
import gettext
import html
import os
import re
import shutil
from dataclasses import dataclass
from io import StringIO
from pathlib import Path
from typing import Any

import pytest
from django.contrib.admin.helpers import ACTION_CHECKBOX_NAME
from django.core.management import call_command
from django.test import Client
from django.urls import reverse
from django.utils import translation

import django_wxpay_close
from django_wxpay_close.admin_text import DETAIL_PARTS, translated_detail
from django_wxpay_close.models import OUTCOME_LABELS, Order, PaymentNotification
from django_wxpay_close.wechat import Outcome

from .conftest import closed_at_the_second_try

LOCALE = Path(django_wxpay_close.__file__).resolve().parent / "locale"
LANGUAGES = {"zh-hans": "zh_Hans", "zh-hant": "zh_Hant"}  # language code -> locale directory
CHANGELIST = "admin:django_wxpay_close_order_changelist"

# A few labels per language: the action, a column heading, a state badge, a filter's state label, the inline's
# title, a sentence of the order's story, the way back to the list.
EXPECTED = {
    "zh-hans": {"action": "关闭所选订单", "column": "商户订单号", "badge": "已逾期", "state": "进行中（待支付）",
                "trail": "审计记录（最新的在前）", "story": "已于 ", "back": "返回订单列表",
                "dry_run": "试运行：有 1 笔订单到期待关闭；未发送任何请求。"},
    "zh-hant": {"action": "關閉所選訂單", "column": "商戶訂單號", "badge": "已逾期", "state": "進行中（待付款）",
                "trail": "稽核紀錄（最新的在前）", "story": "已於 ", "back": "返回訂單列表",
                "dry_run": "試執行：有 1 筆訂單到期待關閉；未發送任何請求。"},
}


@pytest.fixture
def closed_after_a_retry(make_order: Any, simulator: Any) -> Order:
    """An order with two exchanges in its audit trail: SYSTEMERROR, then closed."""
    return closed_at_the_second_try(make_order("I18N-1"), simulator)


def get(client: Client, url: str, language: str) -> str:
    response = client.get(url, HTTP_ACCEPT_LANGUAGE=language)
    assert response.status_code == 200
    return response.content.decode()


@pytest.mark.parametrize("language", list(LANGUAGES))
def test_the_order_list_is_translated(admin_client, make_order, language):
    make_order("LATE-1")
    expected = EXPECTED[language]

    page = get(admin_client, reverse(CHANGELIST), language)

    assert f'<html lang="{language}"' in page
    assert f">{expected['action']}</option>" in page
    assert f">{expected['column']}</a>" in page  # the sortable column heading
    assert f">{expected['badge']}</span>" in page
    assert expected["state"] in page  # the state filter
    assert "Close selected orders" not in page and "awaiting payment" not in page


@pytest.mark.parametrize("language", list(LANGUAGES))
def test_an_order_page_with_its_exchanges_is_translated(admin_client, closed_after_a_retry, language):
    expected = EXPECTED[language]
    url = reverse("admin:django_wxpay_close_order_change", args=[closed_after_a_retry.pk])

    page = get(admin_client, url, language)

    assert expected["trail"] in page
    assert expected["story"] in page and "Closed at " not in page
    assert f'class="closelink">{expected["back"]}</a>' in page
    assert "SYSTEMERROR" in page  # WeChat's own codes stay as WeChat sent them


def test_language_code_decides_without_accept_language(admin_client, make_order, settings):
    settings.LANGUAGE_CODE = "zh-hans"
    make_order()

    page = admin_client.get(reverse(CHANGELIST)).content.decode()

    assert EXPECTED["zh-hans"]["action"] in page


def test_english_is_unchanged_for_an_english_browser(admin_client, make_order):
    make_order()

    page = get(admin_client, reverse(CHANGELIST), "en-US,en;q=0.9")

    assert ">Close selected orders</option>" in page and ">overdue</span>" in page


@pytest.mark.parametrize("language", list(LANGUAGES))
def test_the_command_prints_in_the_active_language(make_order, language):
    make_order()
    out = StringIO()

    with translation.override(language):
        call_command("close_expired_orders", "--dry-run", "--progress", "none", stdout=out)

    assert out.getvalue().splitlines()[-1] == EXPECTED[language]["dry_run"]


# -- what the admin shows that was stored in English or as codes ---------------------------------------------

DETAIL_WORDS = {"zh-hans": "验证 sign 不通过", "zh-hant": "驗證 sign 不通過"}


@pytest.fixture
def notify_url(live_server: Any, wxpay_settings: dict[str, Any]) -> str:
    return f"{live_server.url}{reverse('django_wxpay_close:payment_notification')}"


@pytest.mark.parametrize("language", list(LANGUAGES))
def test_a_notifications_stored_detail_is_shown_in_the_readers_language(admin_client, make_order, simulator,
                                                                        notify_url, language):
    make_order("PAY-1", amount=1000, currency="HKD")
    simulator.notify(notify_url, "PAY-1", total_fee=1000, fee_type="HKD", tamper=True, claim_sign_type="MD5")
    simulator.notify(notify_url, "PAY-1", total_fee=999, fee_type="HKD")
    forged, short = PaymentNotification.objects.order_by("id")
    assert "does not verify" in forged.detail and "amount is 1000" in short.detail  # stored in English

    forged_page, short_page = (html.unescape(get(admin_client, reverse(
        "admin:django_wxpay_close_paymentnotification_change", args=[row.pk]), language)) for row in (forged, short))
    order_page = html.unescape(get(admin_client, reverse("admin:django_wxpay_close_order_change",
                                                         args=[short.order_id]), language))

    assert DETAIL_WORDS[language] in forged_page and "'MD5'" in forged_page  # the values as stored
    assert "does not verify" not in forged_page and "never used to verify" not in forged_page
    assert "1000" in short_page and "amount is" not in short_page and "not recorded as paid" not in short_page
    assert "amount is" not in order_page  # the order page's notification inline


def test_every_stored_detail_shape_is_in_both_catalogues():
    for language in LANGUAGES:
        with translation.override(language):
            assert [shape for shape in DETAIL_PARTS if translation.gettext(shape) == shape] == []


def test_a_detail_part_of_another_shape_is_shown_as_stored():
    with translation.override("zh-hans"):
        assert translated_detail("WXPAY_CLOSE is not set; already recorded") == "WXPAY_CLOSE is not set；已记录过"


@pytest.mark.parametrize("language", list(LANGUAGES))
def test_an_attempts_page_title_names_its_outcome_in_words(admin_client, closed_after_a_retry, language):
    attempt = closed_after_a_retry.close_attempts.order_by("-started_at", "-id").first()
    with translation.override(language):
        closed = str(OUTCOME_LABELS[Outcome.CLOSED])

    page = get(admin_client, reverse("admin:django_wxpay_close_closeattempt_change", args=[attempt.pk]), language)
    title = re.search(r"<title>(.*?)</title>", page, re.DOTALL).group(1)
    breadcrumbs = re.search(r'<div class="breadcrumbs">(.*?)</div>', page, re.DOTALL).group(1)

    assert closed in title and closed in breadcrumbs
    assert "closed" not in title and "closed" not in breadcrumbs


@pytest.mark.parametrize("language", list(LANGUAGES))
def test_the_confirmation_tables_headings_are_translated(admin_client, make_order, language):
    order = make_order("LATE-1")

    response = admin_client.post(reverse(CHANGELIST), {"action": "close_selected_orders",
                                                       ACTION_CHECKBOX_NAME: [order.pk]},
                                 HTTP_ACCEPT_LANGUAGE=language)

    page = response.content.decode()
    assert f"<th>{EXPECTED[language]['column']}</th>" in page and "<th>out_trade_no</th>" not in page


# -- the catalogues ---------------------------------------------------------------------------------------------


@dataclass
class Entry:
    context: str | None
    msgid: str
    plural: str | None
    strings: list[str]  # msgstr, or msgstr[0..n]
    flags: set[str]


def read_po(path: Path) -> tuple[dict[str, str], list[Entry]]:
    """The header's fields and the entries of a .po file (without the header; obsolete entries would fail)."""
    header, *rest = po_entries(path)
    assert header.msgid == "", f"{path} does not start with its header"
    assert "fuzzy" not in header.flags, f"{path}: the header is fuzzy (gettext would ignore the catalogue's charset)"
    meta = dict(line.split(": ", 1) for line in header.strings[0].splitlines() if ": " in line)
    return meta, rest


def po_entries(path: Path) -> list[Entry]:
    """Every entry of a .po file, its header first."""
    entries: list[Entry] = []
    for block in path.read_text(encoding="utf-8").strip().split("\n\n"):
        fields: dict[str, str] = {}
        flags: set[str] = set()
        current = None
        for line in block.splitlines():
            if line.startswith("#,"):
                flags |= {flag.strip() for flag in line[2:].split(",")}
            elif line.startswith("#~"):
                raise AssertionError(f"{path}: obsolete entry left in: {block!r}")
            elif line.startswith("#"):
                continue
            elif line.startswith('"'):
                fields[current] += ast.literal_eval(line)
            else:
                keyword, _, value = line.partition(" ")
                current = keyword
                fields[current] = ast.literal_eval(value)
        strings = [fields[key] for key in sorted(fields) if key.startswith("msgstr")]
        entries.append(Entry(fields.get("msgctxt"), fields["msgid"], fields.get("msgid_plural"), strings, flags))
    return entries


def placeholders(text: str) -> list[str]:
    return sorted(re.findall(r"%\((\w+)\)", text))


@pytest.mark.parametrize("directory", LANGUAGES.values())
def test_every_message_is_translated_and_none_is_fuzzy(directory):
    meta, entries = read_po(LOCALE / directory / "LC_MESSAGES" / "django.po")

    assert meta["Plural-Forms"] == "nplurals=1; plural=0;"  # Chinese has one form
    assert meta["Language"] == directory
    assert len(entries) > 200
    assert [e.msgid for e in entries if "fuzzy" in e.flags] == []
    assert [e.msgid for e in entries if not all(e.strings) or len(e.strings) != 1] == []
    # A translation that drops or renames a %(name)s placeholder raises KeyError (or loses a fact) at run time.
    assert [e.msgid for e in entries if placeholders(e.msgid) != placeholders(e.strings[0])
            and placeholders(e.plural or "") != placeholders(e.strings[0])] == []


@pytest.mark.parametrize("directory", LANGUAGES.values())
def test_the_compiled_catalogues_match_the_po_files(directory):
    """The committed .mo says what the .po says: run `django-admin compilemessages` after editing a .po."""
    _meta, entries = read_po(LOCALE / directory / "LC_MESSAGES" / "django.po")
    with open(LOCALE / directory / "LC_MESSAGES" / "django.mo", "rb") as stream:
        compiled = gettext.GNUTranslations(stream)

    stale = []
    for entry in entries:
        if entry.plural is not None:
            found = compiled.npgettext(entry.context, entry.msgid, entry.plural, 2) if entry.context \
                else compiled.ngettext(entry.msgid, entry.plural, 2)
        else:
            found = compiled.pgettext(entry.context, entry.msgid) if entry.context else compiled.gettext(entry.msgid)
        if found != entry.strings[0]:
            stale.append((entry.msgid, found, entry.strings[0]))
    assert stale == []


def translated_by_django(entry: Entry, language: str) -> bool:
    """Django's own catalogues translate it (a string of an admin template the app overrides)."""
    with translation.override(language):
        if entry.plural is not None:
            found = translation.npgettext(entry.context, entry.msgid, entry.plural, 2) if entry.context \
                else translation.ngettext(entry.msgid, entry.plural, 2)
            return found != entry.plural
        found = translation.pgettext(entry.context, entry.msgid) if entry.context else translation.gettext(entry.msgid)
        return found != entry.msgid


def test_every_message_of_the_code_and_templates_is_in_both_catalogues(tmp_path, monkeypatch):
    """What makemessages finds in the package is translated: a message added without its .po entries fails here."""
    if shutil.which("xgettext") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("the catalogue check must run under CI=true: xgettext is missing (apt-get install gettext)")
        pytest.skip("xgettext is not installed (apt-get install gettext)")
    package = tmp_path / "django_wxpay_close"
    shutil.copytree(LOCALE.parent, package, ignore=shutil.ignore_patterns("locale", "__pycache__"))
    (package / "locale").mkdir()
    monkeypatch.chdir(package)
    call_command("makemessages", locale=["zh_Hans"], verbosity=0)
    extracted = po_entries(package / "locale" / "zh_Hans" / "LC_MESSAGES" / "django.po")[1:]

    for language, directory in LANGUAGES.items():
        _meta, entries = read_po(LOCALE / directory / "LC_MESSAGES" / "django.po")
        ours = {(entry.context, entry.msgid) for entry in entries}
        missing = [entry.msgid for entry in extracted
                   if (entry.context, entry.msgid) not in ours and not translated_by_django(entry, language)]
        assert missing == [], f"not in {directory}/LC_MESSAGES/django.po"


CHECKED_WORDS = {"zh-hans": ("在微信支付查询状态", "已向微信支付查询"),
                 "zh-hant": ("在微信支付查詢狀態", "已向微信支付查詢")}


@pytest.mark.parametrize("language", list(LANGUAGES))
def test_the_check_action_and_its_result_are_translated(admin_client, make_order, language):
    order = make_order()
    action, result = CHECKED_WORDS[language]

    listing = get(admin_client, reverse(CHANGELIST), language)
    response = admin_client.post(reverse(CHANGELIST), {"action": "check_status_at_wechat", "confirm": "yes",
                                                       ACTION_CHECKBOX_NAME: [order.pk]},
                                 HTTP_ACCEPT_LANGUAGE=language, follow=True)

    assert f">{action}</option>" in listing
    [message] = [str(message) for message in response.context["messages"]]
    assert result in message and "checked" not in message
