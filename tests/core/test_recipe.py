"""Recipe parsing: the shipped recipes parse; every invalid recipe fails with its own message."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from click.testing import CliRunner

from fwbuild.cli import main
from fwbuild.errors import RecipeError
from fwbuild.recipe import apply_override, load_recipe, parse_recipe

ROOT = Path(__file__).resolve().parents[2]
BASE = ROOT / "tests" / "recipes" / "base.toml"
_SOURCE = ('pieeprom = { url = "https://example.invalid/pieeprom.bin", '
           'sha256 = "faf29252673a5d699a774a1953b95e4d8d714dd39b676e9db89a6208b14fe326" }')

# Each invalid recipe is tests/recipes/base.toml with one line changed:
# name: (the line of the base, its replacement, "what @ key path" the error must say)
INVALID: dict[str, tuple[str, str, str]] = {
    "bad_sha256": (_SOURCE, _SOURCE.replace("faf29252", "FAF29252"),
                   "malformed sha256 @ sources.pieeprom.sha256"),
    "compression": ('compression = "zstd"', 'compression = "lz4"',
                    "unknown compression 'lz4' @ initramfs.compression"),
    "fake_recovery_on_pi5": ('target = "virtual"', 'target = "pi5"',
                             "a fake recovery.bin only suits virtual recipes @ recovery.recovery_bin"),
    "http_host_port": ('http_host = "127.0.0.1"', 'http_host = "boot.example.org:8080"',
                       "HTTP_HOST 'boot.example.org:8080' has a port @ site.http_host"),
    "http_host_scheme": ('http_host = "127.0.0.1"', 'http_host = "http://boot.example.org"',
                         "HTTP_HOST 'http://boot.example.org' has a URL scheme @ site.http_host"),
    "http_host_upper": ('http_host = "127.0.0.1"', 'http_host = "Boot.Example.org"',
                        "HTTP_HOST 'Boot.Example.org' is not lowercase @ site.http_host"),
    "http_path": ('http_path = "walt-vpn/boot"', 'http_path = "/walt-vpn/boot"',
                  "HTTP_PATH '/walt-vpn/boot' must not start or end with `/` @ site.http_path"),
    "kernel_source": ('kernel = "package"', 'kernel = "source:vmlinuz"',
                      "source `vmlinuz` is not declared @ bootimg.kernel"),
    "list_item_type": ('modules = ["virtio_net",', 'modules = [3, "virtio_net",',
                       "expected a string, got 3 @ initramfs.modules[0]"),
    "missing_name": ('name = "virtual"', "", "missing required key `name` @ recipe.name"),
    "missing_source": ('base = "synthetic:ab"', 'base = "source:pieprom"',
                       "source `pieprom` is not declared @ eeprom.base"),
    "no_kernel_package": ('kernel_package = "linux-image-cloud-arm64"', "",
                          ('bootimg.kernel = "package" but no kernel package is named '
                          "@ initramfs.kernel_package")),
    "port_type": ("http_port = 8080", 'http_port = "8080"',
                  "expected an integer, got '8080' @ site.http_port"),
    "recipe_name": ('name = "virtual"', 'name = "My Recipe"',
                    "invalid recipe name 'My Recipe' @ recipe.name"),
    "toml_syntax": ("[site]", "[site", "invalid TOML"),
    "unknown_key": ('http_host = "127.0.0.1"', 'htp_host = "127.0.0.1"',
                    "unknown key `htp_host` @ site.htp_host"),
    "unknown_table": ("[eeprom]", "[eprom]", "unknown table `eprom` @ eprom"),
    "url_and_path": (_SOURCE, _SOURCE.replace("url = ", 'path = "x.bin", url = '),
                     "a source needs exactly one of `url` or `path` @ sources.pieeprom"),
    "variant_typo": ('variants = ["recovery", "permissive", "enforced"]',
                     'variants = ["recovery", "permisive", "enforced"]',
                     "unknown EEPROM variant 'permisive' @ eeprom.variants[1]"),
    "bad_reference": ('init = "builtin:vpn"', 'init = "vpn"', "invalid init 'vpn' @ initramfs.init"),
    "init_variable": ('compression = "zstd"', 'compression = "zstd"\nvariables = { retires = "3" }',
                      "unknown init setting 'retires' @ initramfs.variables.retires"),
    "unknown_target": ('target = "virtual"', 'target = "virtaul"',
                       "unknown target 'virtaul' @ recipe.target"),
}


def invalid_recipe(name: str, directory: Path) -> Path:
    """tests/recipes/base.toml with case `name`'s one line changed, written into `directory`."""
    old, new, _expect = INVALID[name]
    lines = BASE.read_text().split("\n")
    matches = [i for i, line in enumerate(lines) if line.startswith(old)]
    assert len(matches) == 1, f"{name}: {old!r} must be one line of the base"
    lines[matches[0]] = new + lines[matches[0]][len(old):]
    path = directory / f"invalid_{name}.toml"
    path.write_text("\n".join(lines))
    return path


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


def test_the_base_of_the_invalid_recipes_is_valid(no_network: None) -> None:
    assert load_recipe(BASE).name == "virtual"


@pytest.mark.parametrize("name", sorted(INVALID))
def test_invalid_recipe_is_rejected_with_its_message(name: str, no_network: None, tmp_path: Path) -> None:
    path = invalid_recipe(name, tmp_path)
    result = CliRunner().invoke(main, ["build", str(path), "--out", str(tmp_path / "out"),
                                       "--keys", str(tmp_path / "keys")])
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    first = result.output.splitlines()[0]
    assert first.startswith("Error: ")
    what, _, key_path = INVALID[name][2].partition(" @ ")
    assert what in first
    assert f"({path}" in first, "the message names the recipe file"
    if key_path:
        assert f": {key_path})" in first, "the message names the key path"
    assert not (tmp_path / "out").exists(), "a rejected recipe must not create any output"


def test_invalid_messages_are_distinct() -> None:
    expectations = [expect for _old, _new, expect in INVALID.values()]
    assert len(set(expectations)) == len(expectations)


def test_near_miss_hint_is_printed(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["build", str(invalid_recipe("unknown_key", tmp_path))])
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
