"""Recipes: TOML -> frozen dataclasses, validated before anything is downloaded.

`parse_recipe(mapping, where)` is pure: it rejects unknown keys (naming the key
path and suggesting the near miss), wrong types, malformed sha256 pins, references
to undeclared sources and invalid bootloader values. `load_recipe(path, overrides)`
reads the file and applies `--set key=value` overrides first (later wins).
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import re
import tomllib
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import BuildError, RecipeError

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
    target: str = "pi5"
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
    """`base` is `synthetic:ab`, `synthetic:non-ab` or `source:<name>`."""

    base: str = "synthetic:ab"
    variants: tuple[str, ...] = VARIANTS
    templates: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Initramfs:
    packages: tuple[str, ...] = ()
    binaries: tuple[str, ...] = ()
    modules: tuple[str, ...] = ()
    kernel_package: str = ""
    init: str = "builtin:default"
    compression: str = "zstd"
    files: Mapping[str, str] = field(default_factory=dict)
    variables: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Bootimg:
    kernel: str = "package"
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

    recovery_bin: str = "fake"
    variant: str = "recovery"


@dataclass(frozen=True)
class Recipe:
    recipe: RecipeInfo
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
        return self.recipe.name


# --- generic table -> dataclass conversion -------------------------------------------------

def _near_miss(key: str, allowed: Sequence[str]) -> str | None:
    match = difflib.get_close_matches(key, list(allowed), n=1, cutoff=0.6)
    return f"did you mean `{match[0]}`?" if match else None


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is tuple:
        return f"a list of {_type_name(typing.get_args(tp)[0])}s"
    if origin in (Mapping, dict) or tp is dict:
        return "a table"
    return {str: "a string", int: "an integer", bool: "a boolean"}.get(tp, getattr(tp, "__name__", str(tp)))


_INT = re.compile(r"^[+-]?[0-9]+$")


def _unquote_hint(path: str, value: str) -> str:
    return f"remove the quotes: `{path.rsplit('.', 1)[-1]} = {value}` (TOML quotes make a string)"


def _convert(value: Any, tp: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    if origin is tuple:
        (item_type, _ellipsis) = typing.get_args(tp)
        if not isinstance(value, list):
            raise RecipeError(f"expected {_type_name(tp)}, got {type(value).__name__}", path)
        return tuple(_convert(item, item_type, f"{path}[{i}]") for i, item in enumerate(value))
    if origin in (Mapping, dict):
        if not isinstance(value, dict):
            raise RecipeError(f"expected a table, got {type(value).__name__}", path)
        _key_type, item_type = typing.get_args(tp)
        return {str(k): _convert(v, item_type, f"{path}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if not isinstance(value, dict):
            raise RecipeError(f"expected a table, got {type(value).__name__}", path)
        return _table(tp, value, path)
    if tp is bool:
        if not isinstance(value, bool):
            hint = _unquote_hint(path, value) if value in ("true", "false") else "use true or false"
            raise RecipeError(f"expected a boolean, got {value!r}", path, hint)
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            hint = (_unquote_hint(path, value.strip()) if isinstance(value, str) and _INT.match(value.strip())
                    else "give a whole number, e.g. 8080")
            raise RecipeError(f"expected an integer, got {value!r}", path, hint)
        return value
    if tp is str:
        if not isinstance(value, str):
            raise RecipeError(f"expected a string, got {value!r}", path)
        return value
    raise RecipeError(f"unsupported value {value!r}", path)  # pragma: no cover - schema bug


def _table(cls: type, mapping: Mapping[str, Any], path: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name not in ("directory", "digest")}
    kwargs: dict[str, Any] = {}
    for key, value in mapping.items():
        key_path = f"{path}.{key}" if path else key
        if key not in fields:
            raise RecipeError(f"unknown key `{key}`", key_path, _near_miss(key, list(fields)))
        kwargs[key] = _convert(value, hints[key], key_path)
    for name, f in fields.items():
        if name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise RecipeError(f"missing required key `{name}`", f"{path}.{name}" if path else name)
    return cls(**kwargs)


# --- semantic checks ---------------------------------------------------------------------

def _check_site(site: Site) -> None:
    """The site's HTTP values, checked by the same rules as the EEPROM's bootconf.txt (facts §3)."""
    from .eeprom.bootconf import validate_bootconf
    from .errors import ConfigError

    lines = {"http_host": f"HTTP_HOST={site.http_host}", "http_port": f"HTTP_PORT={site.http_port}",
             "http_path": f"HTTP_PATH={site.http_path}"}
    if not site.http_host:
        raise RecipeError("HTTP host is empty", "site.http_host",
                          "give a bare host name or IP address, e.g. `boot.example.org`")
    for key, line in lines.items():
        try:
            validate_bootconf(line + "\n", f"site.{key}")
        except ConfigError as exc:
            raise RecipeError(exc.what, f"site.{key}", exc.hint) from None


def _check_source_ref(ref: str, recipe: Recipe, where: str, extra: Sequence[str]) -> None:
    if ref in extra:
        return
    if ref.startswith("source:"):
        name = ref[len("source:"):]
        if name not in recipe.sources:
            raise RecipeError(f"source `{name}` is not declared", where,
                              _near_miss(name, list(recipe.sources)) or f"add a [sources.{name}] table")
        return
    raise RecipeError(f"invalid reference {ref!r}", where,
                      f"use one of {', '.join(f'`{e}`' for e in extra)} or `source:<name>`")


def _check(recipe: Recipe) -> None:
    info = recipe.recipe
    if not _NAME.match(info.name):
        raise RecipeError(f"invalid recipe name {info.name!r}", "recipe.name",
                          "lowercase letters, digits, `-` and `_` (it names the out/ directory)")
    if info.target not in ("pi5", "virtual"):
        raise RecipeError(f"unknown target {info.target!r}", "recipe.target", "use `pi5` or `virtual`")
    if info.source_date_epoch < 0:
        raise RecipeError("source_date_epoch must be >= 0", "recipe.source_date_epoch")
    for name, source in recipe.sources.items():
        where = f"sources.{name}"
        if not _NAME.match(name):
            raise RecipeError(f"invalid source name {name!r}", where)
        if not _SHA256.match(source.sha256):
            raise RecipeError(f"malformed sha256 {source.sha256!r}", f"{where}.sha256",
                              "64 lowercase hex digits, as printed by `sha256sum`")
        if bool(source.url) == bool(source.path):
            raise RecipeError("a source needs exactly one of `url` or `path`", where)
        if source.url and not re.match(r"^https?://[^\s/]+/\S*$", source.url):
            raise RecipeError(f"invalid URL {source.url!r}", f"{where}.url", "use http:// or https://")
        if source.size < 0:
            raise RecipeError("size must be >= 0", f"{where}.size")
    _check_site(recipe.site)
    _check_source_ref(recipe.eeprom.base, recipe, "eeprom.base", ("synthetic:ab", "synthetic:non-ab"))
    for i, variant in enumerate(recipe.eeprom.variants):
        if variant not in VARIANTS:
            raise RecipeError(f"unknown EEPROM variant {variant!r}", f"eeprom.variants[{i}]",
                              _near_miss(variant, VARIANTS) or f"use {', '.join(VARIANTS)}")
    if len(set(recipe.eeprom.variants)) != len(recipe.eeprom.variants):
        raise RecipeError("an EEPROM variant is listed twice", "eeprom.variants")
    for variant in recipe.eeprom.templates:
        if variant not in recipe.eeprom.variants:
            raise RecipeError(f"template for a variant that is not built: {variant!r}",
                              f"eeprom.templates.{variant}", _near_miss(variant, recipe.eeprom.variants))
    if recipe.initramfs.compression not in ("zstd", "xz", "gzip", "none"):
        raise RecipeError(f"unknown compression {recipe.initramfs.compression!r}",
                          "initramfs.compression", "use `zstd`, `xz`, `gzip` or `none`")
    init = recipe.initramfs.init
    if not (init.startswith("builtin:") or init.endswith(".j2")):
        raise RecipeError(f"invalid init {init!r}", "initramfs.init",
                          "use `builtin:default`, `builtin:vpn` or a path to a `.j2` template")
    if init.startswith("builtin:"):   # its variables are InitSettings: checked here, before any download
        from .initramfs.init.settings import InitSettings

        try:
            InitSettings.from_variables(recipe.initramfs.variables)
        except BuildError as exc:
            raise RecipeError(exc.what, exc.where, exc.hint) from None
    for dest in recipe.initramfs.files:
        if not dest.startswith("/") or ".." in dest.split("/"):
            raise RecipeError(f"invalid destination {dest!r}", f"initramfs.files.{dest}",
                              "use an absolute path inside the initramfs, e.g. `/etc/motd`")
    if recipe.bootimg.kernel != "package":
        _check_source_ref(recipe.bootimg.kernel, recipe, "bootimg.kernel", ("package",))
    elif not recipe.initramfs.kernel_package:
        raise RecipeError("bootimg.kernel = \"package\" but no kernel package is named",
                          "initramfs.kernel_package",
                          "name it (e.g. linux-image-cloud-arm64), or pin a kernel source and use "
                          "bootimg.kernel = \"source:<name>\"")
    if "\n" in recipe.bootimg.cmdline:
        raise RecipeError("cmdline must be one line", "bootimg.cmdline")
    if recipe.recovery.variant not in recipe.eeprom.variants:
        raise RecipeError(f"recovery variant {recipe.recovery.variant!r} is not built",
                          "recovery.variant", "add it to eeprom.variants")
    _check_source_ref(recipe.recovery.recovery_bin, recipe, "recovery.recovery_bin", ("fake",))
    if recipe.recovery.recovery_bin == "fake" and info.target != "virtual":
        raise RecipeError("a fake recovery.bin only suits virtual recipes", "recovery.recovery_bin",
                          "pin the real recovery.bin as a source and use `source:<name>`")
    if info.target != "virtual" and recipe.eeprom.base.startswith("synthetic:"):
        raise RecipeError("a synthetic EEPROM only suits virtual recipes", "eeprom.base",
                          "pin a Raspberry Pi pieeprom.bin as a source and use `source:<name>`")


_TOP_LEVEL = ("recipe", "keys", "site", "sources", "apt", "eeprom", "initramfs", "bootimg", "recovery")


def parse_recipe(mapping: Mapping[str, Any], directory: str = ".", digest: str = "", path: str = "") -> Recipe:
    """Validate a recipe mapping (as tomllib returns it) into a frozen Recipe."""
    for key in mapping:
        if key not in _TOP_LEVEL:
            raise RecipeError(f"unknown table `{key}`", key, _near_miss(key, _TOP_LEVEL))
    if "recipe" not in mapping:
        raise RecipeError("missing [recipe] table", "recipe", "add [recipe] with at least `name`")
    kwargs: dict[str, Any] = {}
    for key, cls in (("recipe", RecipeInfo), ("keys", Keys), ("site", Site), ("eeprom", Eeprom),
                     ("initramfs", Initramfs), ("bootimg", Bootimg), ("recovery", Recovery)):
        if key in mapping:
            kwargs[key] = _convert(mapping[key], cls, key)
    sources = mapping.get("sources", {})
    if not isinstance(sources, dict):
        raise RecipeError("expected a table of sources", "sources")
    kwargs["sources"] = {name: _convert(value, Source, f"sources.{name}") for name, value in sources.items()}
    apt = mapping.get("apt", {})
    if not isinstance(apt, dict):
        raise RecipeError("expected a table", "apt")
    for key in apt:
        if key != "repositories":
            raise RecipeError(f"unknown key `{key}`", f"apt.{key}", _near_miss(key, ["repositories"]))
    kwargs["apt_repositories"] = _convert(apt.get("repositories", []), tuple[AptRepository, ...],
                                          "apt.repositories")
    recipe = Recipe(directory=directory, digest=digest, path=path, **kwargs)
    _check(recipe)
    return recipe


def apply_override(mapping: dict[str, Any], assignment: str) -> None:
    """Apply one `--set key.path=value` (value parsed as TOML when it can be, else a string)."""
    key, sep, raw = assignment.partition("=")
    if not sep or not key.strip():
        raise RecipeError(f"bad --set {assignment!r}", "--set", "use --set key.path=value, e.g. site.http_port=8080")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    parts = key.strip().split(".")
    node = mapping
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise RecipeError("cannot set inside a non-table value", f"--set {key}")
        node = child
    node[parts[-1]] = value


def load_recipe(path: Path, overrides: Sequence[str] = ()) -> Recipe:
    """Read a TOML recipe file, apply overrides, parse. Touches no network."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise RecipeError("recipe file not found", str(path), "see recipes/ for examples") from None
    except OSError as exc:
        raise RecipeError(f"cannot read recipe: {exc.strerror}", str(path)) from None
    try:
        mapping = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise RecipeError("recipe is not UTF-8 text", str(path)) from None
    except tomllib.TOMLDecodeError as exc:
        raise RecipeError(f"invalid TOML: {exc}", str(path)) from None
    for assignment in overrides:
        apply_override(mapping, assignment)
    digest = hashlib.sha256(raw + b"\0" + "\0".join(overrides).encode()).hexdigest()
    try:
        return parse_recipe(mapping, str(path.parent.resolve()), digest, str(path))
    except RecipeError as exc:
        blamed = _override_for(exc.where, overrides)
        if blamed is not None:
            raise RecipeError(exc.what, f"--set {blamed}",
                              (exc.hint + "; " if exc.hint else "")
                              + f"the value comes from --set, not from {path}") from None
        raise RecipeError(exc.what, f"{path}: {exc.where}" if exc.where else str(path), exc.hint) from None


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
