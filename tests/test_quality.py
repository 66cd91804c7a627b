"""ruff and mypy are part of the test run, so CI holds the code to them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run_tool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )


def test_ruff_finds_nothing() -> None:
    result = run_tool("ruff", "check", "src", "tests", "benchmarks")
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_format_changes_nothing() -> None:
    result = run_tool("ruff", "format", "--check", "src", "tests", "benchmarks")
    assert result.returncode == 0, result.stdout + result.stderr


# Strict over the tests and benchmarks too: a helper typed wrong there hides the same
# mistakes as in src/. Cold (a fresh clone, no .mypy_cache) this reads the stubs and sources
# of every library the tests import, which can outlast the default 120 s on a busy machine.
@pytest.mark.timeout(360)
def test_mypy_strict_finds_nothing() -> None:
    result = run_tool("mypy", "src", "tests", "benchmarks")
    assert result.returncode == 0, result.stdout + result.stderr
