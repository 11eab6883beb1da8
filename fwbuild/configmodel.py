"""The one typed config model: TOML tables -> frozen dataclasses (recipes and server.toml).

A config document is described by dataclasses whose annotations are the schema:
`str`, `int`, `bool`, `X | None` (absent: None), `tuple[X, ...]` (a TOML array),
`Mapping[str, X]` (a table of arbitrary keys) and nested dataclasses (a table of known
keys); a field whose metadata has `parse` (a callable(text, key_path)) takes a string
and stores what `parse` returns (fwbuild/refs.py's references). `setting(...)` declares a
field with its row of the field table (`settings(cls)`): allowed `choices`, `parse`, and
the command-line `Option` that sets it too (`fwbuild initramfs build --package ...` is
generated from the recipe's [initramfs] table). A field without a default is required; a missing table whose dataclass has
required fields is read as an empty table, so the error names the missing key inside it.

`from_table(cls, mapping, path)` converts and rejects, as one `ConfigError` naming the
key path (`site.http_port`, `eeprom.variants[2]`) with a hint: unknown keys (the near
miss, else the known keys), wrong types (a quoted number: "remove the quotes") and
missing required keys. Semantic checks (ranges, references, cross-field rules) stay with
each document's own module (fwbuild/recipe.py, server/config.py); `in_file` adds the
file to a key path when the error leaves the loader.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError

_INT = re.compile(r"^[+-]?[0-9]+$")
_KEY_PATH = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*([.\[]|$)")


def near_miss(key: str, allowed: Sequence[str]) -> str | None:
    """`did you mean `x`?` for the closest allowed name, or None."""
    match = difflib.get_close_matches(key, list(allowed), n=1, cutoff=0.6)
    return f"did you mean `{match[0]}`?" if match else None


def unknown_key_hint(key: str, allowed: Sequence[str]) -> str:
    return near_miss(key, allowed) or f"known keys: {', '.join(allowed)}"


def type_name(tp: Any) -> str:
    """How a schema type reads in a message: `a string`, `a list of integers`, `a table`."""
    origin = typing.get_origin(tp)
    if origin is tuple:
        return f"a list of {type_name(typing.get_args(tp)[0]).split(' ', 1)[-1]}s"
    if origin in (Mapping, dict) or tp is dict or dataclasses.is_dataclass(tp):
        return "a table"
    inner = _optional_of(tp)
    if inner is not None:
        return type_name(inner)
    return {str: "a string", int: "an integer", bool: "a boolean"}.get(tp, getattr(tp, "__name__", str(tp)))


def _optional_of(tp: Any) -> Any:
    """X for `X | None`, else None."""
    if typing.get_origin(tp) in (types.UnionType, typing.Union):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0]
    return None


def _unquote_hint(path: str, value: str) -> str:
    return f"remove the quotes: `{path.rsplit('.', 1)[-1]} = {value}` (TOML quotes make a string)"


def convert(value: Any, tp: Any, path: str) -> Any:
    """One TOML value checked against a schema type (see the module docstring)."""
    inner = _optional_of(tp)
    if inner is not None:
        return convert(value, inner, path)
    origin = typing.get_origin(tp)
    if origin is tuple:
        (item_type, _ellipsis) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"expected {type_name(tp)}, got {type(value).__name__}", path)
        return tuple(convert(item, item_type, f"{path}[{i}]") for i, item in enumerate(value))
    if origin in (Mapping, dict):
        if not isinstance(value, dict):
            raise ConfigError(f"expected a table, got {type(value).__name__}", path)
        _key_type, item_type = typing.get_args(tp)
        return {str(k): convert(v, item_type, f"{path}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if not isinstance(value, dict):
            raise ConfigError(f"expected a table, got {type(value).__name__}", path,
                              f"write it as a [{path}] table" if path else None)
        return from_table(tp, value, path)
    if tp is bool:
        if not isinstance(value, bool):
            hint = _unquote_hint(path, value) if value in ("true", "false") else "use true or false"
            raise ConfigError(f"expected a boolean, got {value!r}", path, hint)
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            hint = (_unquote_hint(path, value.strip()) if isinstance(value, str) and _INT.match(value.strip())
                    else "give a whole number, e.g. 8080")
            raise ConfigError(f"expected an integer, got {value!r}", path, hint)
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"expected a string, got {value!r}", path)
        return value
    raise ConfigError(f"unsupported value {value!r}", path)  # pragma: no cover - schema bug


@dataclass(frozen=True)
class Option:
    """The command-line option that also sets a field (see `setting`)."""

    flag: str  # e.g. "--package"
    help: str
    metavar: str | None = None


@dataclass(frozen=True)
class Setting:
    """One row of a document's field table: a field, its type and how it is set."""

    name: str
    type: Any
    option: Option | None
    choices: tuple[str, ...]
    parse: Callable[[str, str], Any] | None

    @property
    def repeatable(self) -> bool:
        """A list or a table: the option may be given several times (adding to the recipe's)."""
        return typing.get_origin(self.type) in (tuple, Mapping, dict)


def setting(default: Any = dataclasses.MISSING, *, factory: Any = dataclasses.MISSING,
            option: Option | None = None, choices: tuple[str, ...] = (),
            parse: Callable[[str, str], Any] | None = None) -> Any:
    """A dataclass field with its field-table row: the TOML key (the field name), a command-line
    `option` setting it too, the allowed `choices`, a `parse` for strings with structure."""
    metadata = {"option": option, "choices": choices, "parse": parse}
    if factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def settings(cls: type) -> list[Setting]:
    """The field table of a config dataclass, in field order."""
    hints = typing.get_type_hints(cls)
    return [Setting(f.name, hints[f.name], f.metadata.get("option"), f.metadata.get("choices", ()),
                    f.metadata.get("parse")) for f in toml_fields(cls).values()]


def check_choice(value: str, choices: Sequence[str], name: str, where: str) -> None:
    if value not in choices:
        forms = [f"`{c}`" for c in choices]
        raise ConfigError(f"unknown {name.replace('_', ' ')} {value!r}", where,
                          near_miss(value, choices) or f"use {', '.join(forms[:-1])} or {forms[-1]}")


def toml_fields(cls: type) -> dict[str, dataclasses.Field[Any]]:
    """The fields of `cls` a TOML table may set (init fields not marked `metadata={"toml": False}`)."""
    return {f.name: f for f in dataclasses.fields(cls)
            if f.init and f.metadata.get("toml", True)}


def _required(f: dataclasses.Field[Any]) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def from_table(cls: type, mapping: Mapping[str, Any], path: str = "", **extra: Any) -> Any:
    """A TOML table as an instance of the dataclass `cls`; `extra` sets non-TOML fields."""
    hints = typing.get_type_hints(cls)
    fields = toml_fields(cls)
    kwargs: dict[str, Any] = {}
    for key, value in mapping.items():
        key_path = f"{path}.{key}" if path else key
        if key not in fields:
            what = "table" if not path and isinstance(value, dict) else "key"
            raise ConfigError(f"unknown {what} `{key}`", key_path, unknown_key_hint(key, list(fields)))
        parse = fields[key].metadata.get("parse")
        kwargs[key] = (parse(convert(value, str, key_path), key_path) if parse is not None
                       else convert(value, hints[key], key_path))
        choices = fields[key].metadata.get("choices")
        if choices:
            check_choice(kwargs[key], choices, key, key_path)
    for name, f in fields.items():
        if name in kwargs or not _required(f):
            continue
        tp = hints[name]
        key_path = f"{path}.{name}" if path else name
        if dataclasses.is_dataclass(tp) and isinstance(tp, type):
            kwargs[name] = from_table(tp, {}, key_path)  # names the missing key inside it
        else:
            raise ConfigError(f"missing required key `{name}`", key_path)
    return cls(**kwargs, **extra)


def in_file(exc: ConfigError, file: str) -> ConfigError:
    """The same error with `file: ` before its key path (a file:line `where` is left alone)."""
    if exc.where and _KEY_PATH.match(exc.where):
        where = f"{file}: {exc.where}"
    else:
        where = exc.where or file
    return type(exc)(exc.what, where, exc.hint)
