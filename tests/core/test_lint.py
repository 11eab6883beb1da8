"""Linters as tests: `ruff` and `mypy --strict` run by the README test command.

Both are installed by the project (`pip install -e .[test]`, which scripts/setup runs); a
missing tool fails the test with that hint rather than skipping, so lint never silently
stops running.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

from tests.conftest import ROOT

RUFF_PATHS = ("fwbuild", "server", "tests", "bench")
MYPY_PATHS = ("fwbuild", "server")


def _run_module(module: str, *args: str) -> subprocess.CompletedProcess[str]:
    if importlib.util.find_spec(module) is None:
        pytest.fail(f"{module} is not installed: run scripts/setup (pip install -e '.[test]')")
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True,
                          text=True, check=False)


def test_ruff_clean() -> None:
    result = _run_module("ruff", "check", "--no-cache", *RUFF_PATHS)
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_strict_clean() -> None:
    result = _run_module("mypy", "--strict", *MYPY_PATHS)
    assert result.returncode == 0, result.stdout + result.stderr
