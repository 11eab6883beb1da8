"""Fixtures of the core (builder and CLI) tests."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.conftest import ROOT


@pytest.fixture
def site(tmp_path: Path, session_keys: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The virtual recipe in a site directory of its own, with keys beside it, and a fresh cache."""
    directory = tmp_path / "site"
    directory.mkdir()
    shutil.copy(ROOT / "recipes/virtual.toml", directory / "virtual.toml")
    shutil.copytree(session_keys, directory / "keys")
    monkeypatch.setenv("FWBUILD_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    return directory / "virtual.toml"
