"""The one config model (fwbuild/configmodel.py), references (fwbuild/refs.py) and the
field table that drives `--set` and `fwbuild initramfs build`'s options."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import click
import pytest

from fwbuild.configmodel import Option, from_table, in_file, setting, settings
from fwbuild.errors import BootconfError, ConfigError, RecipeError, UsageError
from fwbuild.initramfs.builder import InitramfsSpec
from fwbuild.initramfs.options import apply_options, option_settings
from fwbuild.recipe import Initramfs, apply_override, load_recipe
from fwbuild.refs import Ref, parse_ref
from tests.conftest import ROOT


@dataclass(frozen=True)
class Inner:
    needed: str
    port: int = 80


@dataclass(frozen=True)
class Doc:
    inner: Inner
    name: str | None = None
    mode: str = setting("a", choices=("alpha", "a", "beta"))
    ref: Ref = setting(Ref("fake"), parse=lambda text, where: parse_ref(text, where, ("fake", "source")))
    tags: tuple[str, ...] = ()
    extra: Mapping[str, int] = field(default_factory=dict)


def _error(mapping: dict[str, object]) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        from_table(Doc, mapping)
    return info.value


def test_a_document_converts_with_defaults_and_optional_fields() -> None:
    doc = from_table(Doc, {"inner": {"needed": "x"}, "tags": ["t"], "extra": {"k": 1}, "ref": "source:s"})
    assert doc == Doc(Inner("x"), None, "a", Ref("source", "s"), ("t",), {"k": 1})
    assert from_table(Doc, {"inner": {"needed": "x"}, "name": "n"}).name == "n"


@pytest.mark.parametrize("mapping,what,where,hint", [
    ({}, "missing required key `needed`", "inner.needed", None),  # the missing table is read as empty
    ({"inner": {"needed": "x", "prot": 1}}, "unknown key `prot`", "inner.prot", "did you mean `port`?"),
    ({"inner": {"needed": "x", "zzz": 1}}, "unknown key `zzz`", "inner.zzz", "known keys: needed, port"),
    ({"inner": {"needed": "x"}, "zzz": {}}, "unknown table `zzz`", "zzz", None),
    ({"inner": {"needed": "x", "port": "8080"}}, "expected an integer, got '8080'", "inner.port",
     "remove the quotes: `port = 8080` (TOML quotes make a string)"),
    ({"inner": {"needed": "x"}, "name": 3}, "expected a string, got 3", "name", None),
    ({"inner": {"needed": "x"}, "mode": "bet"}, "unknown mode 'bet'", "mode", "did you mean `beta`?"),
    ({"inner": {"needed": "x"}, "mode": "zz"}, "unknown mode 'zz'", "mode", "use `alpha`, `a` or `beta`"),
    ({"inner": {"needed": "x"}, "ref": "builtin:x"}, "invalid reference 'builtin:x'", "ref",
     "use `fake` or `source:<name>`"),
    ({"inner": {"needed": "x"}, "tags": ["a", 2]}, "expected a string, got 2", "tags[1]", None),
    ({"inner": "x"}, "expected a table, got str", "inner", "write it as a [inner] table"),
])
def test_errors_name_what_where_and_a_hint(mapping: dict[str, object], what: str, where: str,
                                           hint: str | None) -> None:
    error = _error(mapping)
    assert (error.what, error.where) == (what, where)
    if hint is not None:
        assert error.hint == hint
    assert isinstance(error, UsageError) and error.exit_code == 2


def test_in_file_prefixes_key_paths_only() -> None:
    assert in_file(ConfigError("w", "a.b[1]"), "f.toml").where == "f.toml: a.b[1]"
    assert in_file(ConfigError("w", "/keys/hosts:3"), "f.toml").where == "/keys/hosts:3"
    assert in_file(ConfigError("w"), "f.toml").where == "f.toml"


def test_one_error_type_and_the_compatibility_alias() -> None:
    assert RecipeError is ConfigError
    assert BootconfError("x").exit_code == 1 and not isinstance(BootconfError("x"), ConfigError)


@pytest.mark.parametrize("text,kinds,expected", [
    ("source:pieeprom", ("synthetic", "source"), Ref("source", "pieeprom")),
    ("synthetic:non-ab", ("synthetic", "source"), Ref("synthetic", "non-ab")),
    ("builtin:vpn", ("builtin", "template"), Ref("builtin", "vpn")),
    ("init/my.sh.j2", ("builtin", "template"), Ref("template", "init/my.sh.j2")),
    ("package", ("package", "source"), Ref("package")),
    ("fake", ("fake", "source"), Ref("fake")),
])
def test_references_parse_once_and_print_as_written(text: str, kinds: tuple[str, ...],
                                                    expected: Ref) -> None:
    ref = parse_ref(text, "k", kinds)
    assert ref == expected and str(ref) == text and hash(ref) == hash(expected)
    with pytest.raises(AttributeError):
        ref.kind = "x"  # type: ignore[misc]


@pytest.mark.parametrize("text", ["source:", "synthetic:x", "fake", "builtin:", "x.j2", "src:a"])
def test_a_reference_of_the_wrong_kind_is_refused(text: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_ref(text, "eeprom.base", ("synthetic", "source"))
    assert info.value.where == "eeprom.base"
    assert info.value.hint == "use `synthetic:ab`, `synthetic:non-ab` or `source:<name>`"


def test_recipe_references_are_tagged() -> None:
    recipe = load_recipe(ROOT / "recipes/virtual.toml")
    assert recipe.eeprom.base.kind == "synthetic" and recipe.recovery.recovery_bin.kind == "fake"
    assert recipe.initramfs.init.kind == "builtin" and recipe.info.name == recipe.name == "virtual"


def test_set_reads_values_by_the_field_table() -> None:
    mapping: dict[str, object] = {}
    for assignment in ("recipe.name=2024", "site.http_port=8080", "bootimg.compress_kernel=false",
                       "initramfs.packages=[\"a\", \"b\"]", "sources.k.size=12", "site.http_host=true"):
        apply_override(mapping, assignment)
    assert mapping == {"recipe": {"name": "2024"}, "site": {"http_port": 8080, "http_host": "true"},
                       "bootimg": {"compress_kernel": False}, "initramfs": {"packages": ["a", "b"]},
                       "sources": {"k": {"size": 12}}}


def test_initramfs_build_options_are_the_field_table() -> None:
    from fwbuild.cli import main

    rows = option_settings()
    assert [row.name for row in rows] == ["packages", "binaries", "modules", "kernel_package",
                                          "init", "compression", "files", "stub_libraries"]
    assert all(isinstance(row.option, Option) for row in rows)
    assert {row.name for row in settings(Initramfs)} - {row.name for row in rows} == {"variables"}
    initramfs = main.commands["initramfs"]
    assert isinstance(initramfs, click.Group)
    command = initramfs.commands["build"]
    flags = {opt for param in command.params for opt in param.opts}
    assert {row.option.flag for row in rows if row.option} <= flags
    by_name = {param.name: param for param in command.params}
    assert by_name["packages"].multiple and by_name["files"].multiple
    assert not by_name["init"].multiple


def test_options_add_to_lists_merge_tables_and_replace_scalars() -> None:
    spec = InitramfsSpec(packages=("busybox-static",), files={"/a": "x"})
    merged = apply_options(spec, {"packages": ("dropbear", "busybox-static"), "binaries": ("/bin/sh",),
                                  "files": ("/a=y", "/b=z"), "init": "builtin:vpn",
                                  "compression": "xz", "kernel_package": None, "modules": ()})
    assert merged.packages == ("busybox-static", "dropbear")
    assert merged.paths == (*spec.paths, "/bin/sh")
    assert merged.files == {"/a": "y", "/b": "z"}
    assert (merged.init, merged.compression, merged.kernel_package) == ("builtin:vpn", "xz", "")
    with pytest.raises(ConfigError, match="invalid init 'nope'") as info:
        apply_options(spec, {"init": "nope"})
    assert info.value.where == "--init"
    with pytest.raises(UsageError, match="bad --file"):
        apply_options(spec, {"files": ("no-equals",)})


def test_server_toml_uses_the_same_model(tmp_path: Path) -> None:
    from server.config import load_config

    config = tmp_path / "server.toml"
    config.write_text('[server]\nartifacts = "out"\nstate_dir = "s"\nkeys_dir = "k"\n'
                      'enrollment_subnets = ["10.0.0.0/8"]\nnode_root = "/n/{mac12}"\nport = "8080"\n')
    with pytest.raises(ConfigError) as info:
        load_config(config)
    assert info.value.where == f"{config}: server.port"
    assert info.value.hint == "remove the quotes: `port = 8080` (TOML quotes make a string)"
