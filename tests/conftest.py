"""Shared test fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def session_keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A key directory (boot-signing.pem, ssh-ca) made once per test session."""
    from fwbuild.keys import init_keys

    directory = tmp_path_factory.mktemp("keys")
    init_keys(directory)
    return directory


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Never touch the user's ~/.cache/fwbuild from tests (a per-session cache instead)."""
    monkeypatch.setenv("FWBUILD_CACHE", str(tmp_path_factory.getbasetemp() / "fwbuild-cache"))
