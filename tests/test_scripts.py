"""The developer scripts: scripts/test's closing summary (scripts/test-summary) and scripts/reliability-figures."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from .conftest import ROOT

PASS_FAIL_AND_SKIP = """
import pytest

def test_passes():
    pass

def test_fails():
    assert False

def test_needs_faketime():
    pytest.skip("needs faketime to shift a sweeper's clock: apt-get install faketime")

def test_needs_chromium():
    pytest.skip("no Chromium at /usr/bin/chromium (apt-get install chromium, or set WXPAY_CHROMIUM)")
"""
PASSES_ONLY = "def test_passes():\n    pass\n"


def pytest_pass(directory: Path, name: str, source: str) -> tuple[int, Path]:
    """A pytest run as scripts/test makes one (--junitxml), on a test file of its own: (exit status, junit file)."""
    (directory / f"test_{name}.py").write_text(source)
    junit = directory / f"{name}.xml"
    environment = {key: value for key, value in os.environ.items() if key != "DJANGO_SETTINGS_MODULE"}
    done = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:django", "-p", "no:cacheprovider",
                           f"--junitxml={junit}", f"test_{name}.py"],
                          cwd=directory, env=environment, capture_output=True, text=True, timeout=60)
    return done.returncode, junit


def summary(passes: list[str], directory: Path) -> list[str]:
    (directory / "passes").write_text("".join(line + "\n" for line in passes))
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "test-summary"), str(directory / "passes")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def test_scripts_test_ends_with_one_summary_across_its_passes(tmp_path):
    sqlite_status, sqlite_junit = pytest_pass(tmp_path, "sqlite", PASS_FAIL_AND_SKIP)
    postgres_status, postgres_junit = pytest_pass(tmp_path, "postgresql", PASSES_ONLY)
    mariadb_not_run = ("MariaDB\tmysqlclient cannot be built (pkg-config finds no libmariadb or mysqlclient); "
                       "to run it: apt-get install pkg-config libmariadb-dev")

    lines = summary([f"ran\tSQLite\t{sqlite_status}\t{sqlite_junit}",
                     f"ran\tPostgreSQL\t{postgres_status}\t{postgres_junit}", f"not run\t{mariadb_not_run}"], tmp_path)

    assert lines == [
        "== Summary ==",
        "SQLite: 1 passed, 1 failed, 2 skipped (pytest exit status 1)",
        "PostgreSQL: 1 passed, 0 failed, 0 skipped",
        "MariaDB: not run: mysqlclient cannot be built (pkg-config finds no libmariadb or mysqlclient); to run it: "
        "apt-get install pkg-config libmariadb-dev",
        "Skipped, and why:",
        "  SQLite 1: needs faketime to shift a sweeper's clock: apt-get install faketime",
        "  SQLite 1: no Chromium at /usr/bin/chromium (apt-get install chromium, or set WXPAY_CHROMIUM)",
        "2 passed, 1 failed, 2 skipped",  # the line CI reads
    ]


def test_a_pass_that_failed_without_a_failed_test_counts_as_a_failure(tmp_path):
    status, junit = pytest_pass(tmp_path, "broken", "import no_such_module\n")  # a collection error

    lines = summary([f"ran\tSQLite\t{status}\t{junit}"], tmp_path)

    assert status == 2
    assert lines[-1] == "0 passed, 1 failed, 0 skipped"


def test_a_pass_whose_tests_were_all_deselected_is_no_failure(tmp_path):
    _, junit = pytest_pass(tmp_path, "sqlite", PASSES_ONLY)

    lines = summary([f"ran\tSQLite\t0\t{junit}", f"ran\tPostgreSQL\t5\t{tmp_path / 'none.xml'}"], tmp_path)

    assert lines[-1] == "1 passed, 0 failed, 0 skipped"


def test_reliability_figures_with_a_python_lacking_the_dependencies_prints_no_figures_and_says_how_to_run_it():
    # -S: without site-packages, as a system python3 without the project's dependencies.
    done = subprocess.run([sys.executable, "-S", "scripts/reliability-figures"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)

    assert (done.returncode, done.stdout) == (2, "")
    assert "lacks Django, pytest, pytest-django, psycopg" in done.stderr
    assert "Run it with the project's venv (scripts/test makes it): .venv/bin/python scripts/reliability-figures" \
        in done.stderr


def test_reliability_figures_prints_no_figures_when_the_tests_fail():
    # Nothing listens on port 1: every test errors while setting up its database. pytest stops at the first
    # (-x): the script sees a failed run either way, without waiting for each test's error.
    environment = {**os.environ, "PG_URL": "postgres://postgres@127.0.0.1:1/wxpay_close", "PYTEST_ADDOPTS": "-x"}
    done = subprocess.run([sys.executable, "scripts/reliability-figures"], cwd=ROOT, capture_output=True, text=True,
                          env=environment, timeout=300)

    assert done.returncode != 0
    assert done.stdout == ""
    assert done.stderr.rstrip().splitlines()[-1].startswith(
        "No figures: the reliability tests did not pass (pytest exit status ")
