"""Recipes: TOML -> frozen dataclasses, validated before anything is downloaded.

`parse_recipe(mapping, where)` is pure: it rejects unknown keys (naming the key
path and suggesting the near miss), wrong types, malformed sha256 pins, references
to undeclared sources and invalid bootloader values. `load_recipe(path, overrides)`
reads the file and applies `--set key=value` overrides first (later wins).
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import tomllib
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .configmodel import Option, convert, in_file, near_miss, setting, settings
from .errors import BootconfError, BuildError, ConfigError
from .refs import BUILTIN, FAKE, PACKAGE, SOURCE, SYNTHETIC, TEMPLATE, Ref, ref_parser

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]*$")
VARIANTS = ("recovery", "permissive", "enforced")


@dataclass(frozen=True)
class Source:
    """A pinned input: a URL (fetched, cached by sha256) or a local path, with its sha256."""

    sha256: str
    url: str = ""
    path: str = ""
    size: int = 0


@dataclass(frozen=True)
class AptRepository:
    """A Debian repository added to the host's apt sources for arm64 packages."""

    uri: str
    suite: str
    keyring: str
    components: tuple[str, ...] = ("main",)


@dataclass(frozen=True)
class RecipeInfo:
    name: str
    description: str = ""
    target: str = setting("pi5", choices=("pi5", "virtual"))
    source_date_epoch: int = 0


@dataclass(frozen=True)
class Keys:
    """Where `fwbuild keys init` put the boot-signing key and the SSH CA."""

    dir: str = "keys"


@dataclass(frozen=True)
class Site:
    """Public values every node of the site gets (no secrets)."""

    http_host: str = ""
    http_port: int = 80
    http_path: str = "walt-vpn/boot"


@dataclass(frozen=True)
class Eeprom:
    """`base` is `synthetic:ab`, `synthetic:non-ab` or `source:<name>` (fwbuild/refs.py)."""

    base: Ref = setting(Ref(SYNTHETIC, "ab"), parse=ref_parser(SYNTHETIC, SOURCE))
    variants: tuple[str, ...] = VARIANTS
    templates: Mapping[str, str] = field(default_factory=dict)


COMPRESSIONS = ("zstd", "xz", "gzip", "none")


@dataclass(frozen=True)
class Initramfs:
    """The [initramfs] table; the fields with an Option are also `fwbuild initramfs build` options."""

    packages: tuple[str, ...] = setting((), option=Option("--package", "Debian arm64 package (repeatable)."))
    binaries: tuple[str, ...] = setting((), option=Option(
        "--binary", "Path from the packages to include with its ELF closure (repeatable)."))
    modules: tuple[str, ...] = setting((), option=Option("--module", "Kernel module name (repeatable)."))
    kernel_package: str = setting("", option=Option(
        "--kernel-package", "linux-image-* package the modules come from."))
    init: Ref = setting(Ref(BUILTIN, "default"), parse=ref_parser(BUILTIN, TEMPLATE), option=Option(
        "--init", "Init template: builtin:NAME or a path to a jinja2 template."))
    compression: str = setting("zstd", choices=COMPRESSIONS, option=Option("--compression", "Default: zstd."))
    files: Mapping[str, str] = setting(factory=dict, option=Option(
        "--file", "Extra file (repeatable).", metavar="DEST=HOSTPATH"))
    stub_libraries: tuple[str, ...] = setting((), option=Option(
        "--stub-library", "Library (soname) replaced by a generated stub whose calls all fail, e.g. "
        "libgssapi_krb5.so.2 (repeatable)."))
    variables: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Bootimg:
    kernel: Ref = setting(Ref(PACKAGE), parse=ref_parser(PACKAGE, SOURCE))
    kernel_name: str = "kernel_2712.img"
    dtbs: tuple[str, ...] = ()
    cmdline: str = "console=serial0,115200 console=tty1"
    config: tuple[str, ...] = ()
    # gzip the kernel when the package ships an uncompressed Image: the Pi firmware and
    # QEMU both recognise gzip by its magic, and boot.img crosses the link at every boot.
    compress_kernel: bool = True


@dataclass(frozen=True)
class Recovery:
    """`recovery_bin` is `source:<name>` or `fake` (virtual recipes only)."""

    recovery_bin: Ref = setting(Ref(FAKE), parse=ref_parser(FAKE, SOURCE))
    variant: str = "recovery"


@dataclass(frozen=True)
class Recipe:
    info: RecipeInfo  # the [recipe] table
    keys: Keys = field(default_factory=Keys)
    site: Site = field(default_factory=Site)
    sources: Mapping[str, Source] = field(default_factory=dict)
    apt_repositories: tuple[AptRepository, ...] = ()
    eeprom: Eeprom = field(default_factory=Eeprom)
    initramfs: Initramfs = field(default_factory=Initramfs)
    bootimg: Bootimg = field(default_factory=Bootimg)
    recovery: Recovery = field(default_factory=Recovery)
    directory: str = "."
    digest: str = ""
    path: str = ""  # the recipe file as the user named it (for hints); "" when parsed from a mapping

    @property
    def name(self) -> str:
        return self.info.name


# --- semantic checks ---------------------------------------------------------------------

def _check_site(site: Site) -> None:
    """The site's HTTP values, checked by the same rules as the EEPROM's bootconf.txt (facts §3)."""
    from .eeprom.bootconf import validate_bootconf

    lines = {"http_host": f"HTTP_HOST={site.http_host}", "http_port": f"HTTP_PORT={site.http_port}",
             "http_path": f"HTTP_PATH={site.http_path}"}
    if not site.http_host:
        raise ConfigError("HTTP host is empty", "site.http_host",
                          "give a bare host name or IP address, e.g. `boot.example.org`")
    for key, line in lines.items():
        try:
            validate_bootconf(line + "\n", f"site.{key}")
        except BootconfError as exc:
            raise ConfigError(exc.what, f"site.{key}", exc.hint) from None


def _check_source_ref(ref: Ref, recipe: Recipe, where: str) -> None:
    if ref.kind == SOURCE and ref.name not in recipe.sources:
        raise ConfigError(f"source `{ref.name}` is not declared", where,
                          near_miss(ref.name, list(recipe.sources)) or f"add a [sources.{ref.name}] table")


def _check(recipe: Recipe) -> None:
    info = recipe.info
    if not _NAME.match(info.name):
        raise ConfigError(f"invalid recipe name {info.name!r}", "recipe.name",
                          "lowercase letters, digits, `-` and `_` (it names the out/ directory)")
    if info.source_date_epoch < 0:
        raise ConfigError("source_date_epoch must be >= 0", "recipe.source_date_epoch")
    for name, source in recipe.sources.items():
        where = f"sources.{name}"
        if not _NAME.match(name):
            raise ConfigError(f"invalid source name {name!r}", where)
        if not _SHA256.match(source.sha256):
            raise ConfigError(f"malformed sha256 {source.sha256!r}", f"{where}.sha256",
                              "64 lowercase hex digits, as printed by `sha256sum`")
        if bool(source.url) == bool(source.path):
            raise ConfigError("a source needs exactly one of `url` or `path`", where)
        if source.url and not re.match(r"^https?://[^\s/]+/\S*$", source.url):
            raise ConfigError(f"invalid URL {source.url!r}", f"{where}.url", "use http:// or https://")
        if source.size < 0:
            raise ConfigError("size must be >= 0", f"{where}.size")
    _check_site(recipe.site)
    _check_source_ref(recipe.eeprom.base, recipe, "eeprom.base")
    for i, variant in enumerate(recipe.eeprom.variants):
        if variant not in VARIANTS:
            raise ConfigError(f"unknown EEPROM variant {variant!r}", f"eeprom.variants[{i}]",
                              near_miss(variant, VARIANTS) or f"use {', '.join(VARIANTS)}")
    if len(set(recipe.eeprom.variants)) != len(recipe.eeprom.variants):
        raise ConfigError("an EEPROM variant is listed twice", "eeprom.variants")
    for variant in recipe.eeprom.templates:
        if variant not in recipe.eeprom.variants:
            raise ConfigError(f"template for a variant that is not built: {variant!r}",
                              f"eeprom.templates.{variant}", near_miss(variant, recipe.eeprom.variants))
    if recipe.initramfs.init.kind == BUILTIN:  # its variables are InitSettings: checked here, before any download
        from .initramfs.init.settings import InitSettings

        try:
            InitSettings.from_variables(recipe.initramfs.variables)
        except BuildError as exc:
            raise ConfigError(exc.what, exc.where, exc.hint) from None
    for i, soname in enumerate(recipe.initramfs.stub_libraries):
        from .initramfs.stub import STUBBABLE

        if soname not in STUBBABLE:
            raise ConfigError(f"no stub is known for {soname!r}", f"initramfs.stub_libraries[{i}]",
                              near_miss(soname, STUBBABLE) or f"stubs exist for {', '.join(STUBBABLE)}")
    for dest in recipe.initramfs.files:
        if not dest.startswith("/") or ".." in dest.split("/"):
            raise ConfigError(f"invalid destination {dest!r}", f"initramfs.files.{dest}",
                              "use an absolute path inside the initramfs, e.g. `/etc/motd`")
    if recipe.bootimg.kernel.kind != PACKAGE:
        _check_source_ref(recipe.bootimg.kernel, recipe, "bootimg.kernel")
    elif not recipe.initramfs.kernel_package:
        raise ConfigError("bootimg.kernel = \"package\" but no kernel package is named",
                          "initramfs.kernel_package",
                          "name it (e.g. linux-image-cloud-arm64), or pin a kernel source and use "
                          "bootimg.kernel = \"source:<name>\"")
    if "\n" in recipe.bootimg.cmdline:
        raise ConfigError("cmdline must be one line", "bootimg.cmdline")
    if recipe.recovery.variant not in recipe.eeprom.variants:
        raise ConfigError(f"recovery variant {recipe.recovery.variant!r} is not built",
                          "recovery.variant", "add it to eeprom.variants")
    _check_source_ref(recipe.recovery.recovery_bin, recipe, "recovery.recovery_bin")
    if recipe.recovery.recovery_bin.kind == FAKE and info.target != "virtual":
        raise ConfigError("a fake recovery.bin only suits virtual recipes", "recovery.recovery_bin",
                          "pin the real recovery.bin as a source and use `source:<name>`")
    if info.target != "virtual" and recipe.eeprom.base.kind == SYNTHETIC:
        raise ConfigError("a synthetic EEPROM only suits virtual recipes", "eeprom.base",
                          "pin a Raspberry Pi pieeprom.bin as a source and use `source:<name>`")


_TOP_LEVEL = ("recipe", "keys", "site", "sources", "apt", "eeprom", "initramfs", "bootimg", "recovery")


def parse_recipe(mapping: Mapping[str, Any], directory: str = ".", digest: str = "", path: str = "") -> Recipe:
    """Validate a recipe mapping (as tomllib returns it) into a frozen Recipe."""
    for key in mapping:
        if key not in _TOP_LEVEL:
            raise ConfigError(f"unknown table `{key}`", key, near_miss(key, _TOP_LEVEL))
    if "recipe" not in mapping:
        raise ConfigError("missing [recipe] table", "recipe", "add [recipe] with at least `name`")
    kwargs: dict[str, Any] = {}
    for key, cls in (("recipe", RecipeInfo), ("keys", Keys), ("site", Site), ("eeprom", Eeprom),
                     ("initramfs", Initramfs), ("bootimg", Bootimg), ("recovery", Recovery)):
        if key in mapping:
            kwargs["info" if key == "recipe" else key] = convert(mapping[key], cls, key)
    sources = mapping.get("sources", {})
    if not isinstance(sources, dict):
        raise ConfigError("expected a table of sources", "sources")
    kwargs["sources"] = {name: convert(value, Source, f"sources.{name}") for name, value in sources.items()}
    apt = mapping.get("apt", {})
    if not isinstance(apt, dict):
        raise ConfigError("expected a table", "apt")
    for key in apt:
        if key != "repositories":
            raise ConfigError(f"unknown key `{key}`", f"apt.{key}", near_miss(key, ["repositories"]))
    kwargs["apt_repositories"] = convert(apt.get("repositories", []), tuple[AptRepository, ...],
                                          "apt.repositories")
    recipe = Recipe(directory=directory, digest=digest, path=path, **kwargs)
    _check(recipe)
    return recipe


_TABLES: dict[str, type] = {"recipe": RecipeInfo, "keys": Keys, "site": Site, "eeprom": Eeprom,
                             "initramfs": Initramfs, "bootimg": Bootimg, "recovery": Recovery}


def setting_type(key_path: Sequence[str]) -> Any:
    """The field-table type of a recipe key path (`site.http_port` -> int), None when unknown."""
    tp: Any = {"sources": Mapping[str, Source], "apt": None}.get(key_path[0], _TABLES.get(key_path[0]))
    for part in key_path[1:]:
        if tp is None:
            return None
        if typing.get_origin(tp) in (Mapping, dict):
            tp = typing.get_args(tp)[1]
        elif dataclasses.is_dataclass(tp):
            rows = {row.name: row for row in settings(tp)}  # type: ignore[arg-type]
            row = rows.get(part)
            tp = None if row is None else (str if row.parse else row.type)
        else:
            return None
    return tp


def apply_override(mapping: dict[str, Any], assignment: str) -> None:
    """Apply one `--set key.path=value`. The value is read as the recipe's field table types the
    key: a string field takes the text as is (`--set recipe.name=2024` is a name); other fields
    read it as a TOML value (`8080`, `true`, `["a", "b"]`), and unknown keys too (then refused
    by the same checks as the file, blamed on the --set)."""
    key, sep, raw = assignment.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"bad --set {assignment!r}", "--set", "use --set key.path=value, e.g. site.http_port=8080")
    parts = key.strip().split(".")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    if setting_type(parts) is str and not isinstance(value, str):
        value = raw
    node = mapping
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError("cannot set inside a non-table value", f"--set {key}")
        node = child
    node[parts[-1]] = value


def load_recipe(path: Path, overrides: Sequence[str] = ()) -> Recipe:
    """Read a TOML recipe file, apply overrides, parse. Touches no network."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError("recipe file not found", str(path), "see recipes/ for examples") from None
    except OSError as exc:
        raise ConfigError(f"cannot read recipe: {exc.strerror}", str(path)) from None
    try:
        mapping = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError("recipe is not UTF-8 text", str(path)) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"invalid TOML: {exc}", str(path)) from None
    for assignment in overrides:
        apply_override(mapping, assignment)
    digest = hashlib.sha256(raw + b"\0" + "\0".join(overrides).encode()).hexdigest()
    try:
        return parse_recipe(mapping, str(path.parent.resolve()), digest, str(path))
    except ConfigError as exc:
        blamed = _override_for(exc.where, overrides)
        if blamed is not None:
            raise ConfigError(exc.what, f"--set {blamed}",
                              (exc.hint + "; " if exc.hint else "")
                              + f"the value comes from --set, not from {path}") from None
        raise in_file(exc, str(path)) from None


def _override_for(where: str | None, overrides: Sequence[str]) -> str | None:
    """The --set assignment (the last one wins) that set the key path `where`, if any."""
    if not where:
        return None
    for assignment in reversed(overrides):
        key = assignment.partition("=")[0].strip()
        if (where == key or where.startswith((key + ".", key + "["))
                or key.startswith(where + ".")):
            return assignment
    return None


def resolve_path(recipe: Recipe, relative: str) -> Path:
    """A path from the recipe, relative to the recipe's directory."""
    return (Path(recipe.directory) / relative).resolve()


def resolved_repositories(recipe: Recipe) -> tuple[AptRepository, ...]:
    """The recipe's apt repositories with their keyring paths made absolute."""
    return tuple(dataclasses.replace(repo, keyring=str(resolve_path(recipe, repo.keyring)))
                 for repo in recipe.apt_repositories)
