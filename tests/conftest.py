"""Shared test fixtures."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from fwbuild.cache import Cache

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class VirtualSet:
    """The virtual recipe built once per session: its output, keys and package cache."""

    out: Path
    keys: Path
    cache: Cache


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


@pytest.fixture(scope="session")
def virtual_set(tmp_path_factory: pytest.TempPathFactory) -> VirtualSet:
    """`recipes/virtual.toml` built with fresh site keys (the end-to-end tests boot it)."""
    from fwbuild.build import build
    from fwbuild.keys import init_keys
    from fwbuild.recipe import load_recipe

    cache = Cache(tmp_path_factory.getbasetemp() / "fwbuild-cache")
    work = tmp_path_factory.mktemp("virtual-build")
    keys = init_keys(work / "keys").directory
    result = build(load_recipe(ROOT / "recipes" / "virtual.toml"), out_root=work / "out",
                   keys_dir=keys, cache=cache)
    return VirtualSet(result.out_dir, keys, cache)
