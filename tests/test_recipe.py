"""Recipe parsing: the shipped recipes parse; every invalid recipe fails with its own message."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from click.testing import CliRunner

from fwbuild.cli import main
from fwbuild.errors import RecipeError
from fwbuild.recipe import apply_override, load_recipe, parse_recipe

ROOT = Path(__file__).resolve().parent.parent
INVALID = sorted((ROOT / "tests" / "recipes").glob("invalid_*.toml"))


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a recipe check touched the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.mark.parametrize("name", ["virtual", "walt-vpn"])
def test_shipped_recipes_parse(name: str, no_network: None) -> None:
    recipe = load_recipe(ROOT / "recipes" / f"{name}.toml")
    assert recipe.name == name
    assert set(recipe.eeprom.variants) == {"recovery", "permissive", "enforced"}
    assert len(recipe.digest) == 64


def test_real_recipe_pins_upstream_files() -> None:
    recipe = load_recipe(ROOT / "recipes" / "walt-vpn.toml")
    assert recipe.sources["pieeprom"].sha256 == "faf29252673a5d699a774a1953b95e4d8d714dd39b676e9db89a6208b14fe326"
    assert recipe.sources["recovery_bin"].size == 105420
    assert recipe.apt_repositories[0].uri == "http://archive.raspberrypi.com/debian/"


def test_there_are_enough_invalid_recipes() -> None:
    assert len(INVALID) >= 12


def _expected(path: Path) -> str:
    first = path.read_text().splitlines()[0]
    assert first.startswith("# expect: "), f"{path.name} lacks its `# expect:` line"
    return first[len("# expect: "):]


@pytest.mark.parametrize("path", INVALID, ids=[p.stem for p in INVALID])
def test_invalid_recipe_is_rejected_with_its_message(path: Path, no_network: None, tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["build", str(path), "--out", str(tmp_path / "out"),
                                       "--keys", str(tmp_path / "keys")])
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    first = result.output.splitlines()[0]
    assert first.startswith("Error: ")
    what, _, key_path = _expected(path).partition(" @ ")
    assert what in first
    assert f"({path}" in first, "the message names the recipe file"
    if key_path:
        assert f": {key_path})" in first, "the message names the key path"
    assert not (tmp_path / "out").exists(), "a rejected recipe must not create any output"


def test_invalid_messages_are_distinct() -> None:
    expectations = [_expected(p) for p in INVALID]
    assert len(set(expectations)) == len(expectations)


def test_near_miss_hint_is_printed(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["build", str(ROOT / "tests/recipes/invalid_unknown_key.toml")])
    assert "Hint: did you mean `http_host`?" in result.output


def test_set_overrides_recipe_values(no_network: None) -> None:
    recipe = load_recipe(ROOT / "recipes" / "virtual.toml",
                         ["site.http_host=boot.example.org", "site.http_port=8081", "site.http_port=9000"])
    assert recipe.site.http_host == "boot.example.org"
    assert recipe.site.http_port == 9000  # later wins
    plain = load_recipe(ROOT / "recipes" / "virtual.toml")
    assert plain.digest != recipe.digest


def test_set_override_is_validated_like_the_file(no_network: None) -> None:
    with pytest.raises(RecipeError) as info:
        load_recipe(ROOT / "recipes" / "virtual.toml", ["site.http_host=https://x.org"])
    assert "has a URL scheme" in info.value.what
    with pytest.raises(RecipeError):
        apply_override({}, "no-equals-sign")


def test_defaults_apply_for_optional_tables() -> None:
    recipe = parse_recipe({"recipe": {"name": "mini", "target": "virtual"},
                           "site": {"http_host": "10.0.0.1"}, "initramfs": {"kernel_package": "k"}})
    assert str(recipe.eeprom.base) == "synthetic:ab" and recipe.eeprom.base.kind == "synthetic"
    assert recipe.initramfs.compression == "zstd"
    assert recipe.site.http_port == 80


def test_missing_recipe_file_is_a_clear_error(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["build", str(tmp_path / "nope.toml")])
    assert result.exit_code == 2
    assert result.output.startswith("Error: recipe file not found")
