"""`fwbuild initramfs build`'s options, from the field table of the recipe's [initramfs].

Every field of `recipe.Initramfs` declared with an `Option` is an option of the command
(`option_settings()`; the CLI generates its click options from it) and is merged here
onto the spec the recipe (or the defaults) gave: lists add (each item once, recipe items
first), tables merge (`--file DEST=HOSTPATH`, the option wins), scalars replace, and
values with structure are parsed by the field's own parser (`--init` as a reference).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ..configmodel import Setting, check_choice, settings
from ..errors import UsageError
from ..recipe import Initramfs

if TYPE_CHECKING:
    from .builder import InitramfsSpec

# recipe field -> InitramfsSpec field, where the names differ
_SPEC_FIELD = {"binaries": "paths"}


def option_settings() -> list[Setting]:
    """The [initramfs] fields that `initramfs build` also takes as options, in field order."""
    return [s for s in settings(Initramfs) if s.option is not None]


def _file_items(items: tuple[str, ...], flag: str) -> dict[str, str]:
    extra: dict[str, str] = {}
    for item in items:
        dest, sep, host = item.partition("=")
        if not sep or not dest or not host:
            raise UsageError(f"bad {flag} {item!r}", hint=f"use {flag} /etc/motd=./motd")
        extra[dest] = host
    return extra


def apply_options(spec: InitramfsSpec, values: Mapping[str, Any]) -> InitramfsSpec:
    """`spec` with the options given (`values`: field name -> the option's value, None/() unset)."""
    changes: dict[str, Any] = {}
    for row in option_settings():
        value = values.get(row.name)
        if value is None or value == () or value == "":
            continue
        assert row.option is not None
        target = _SPEC_FIELD.get(row.name, row.name)
        current = getattr(spec, target)
        if isinstance(current, Mapping):
            changes[target] = {**current, **_file_items(tuple(value), row.option.flag)}
        elif isinstance(current, tuple):
            changes[target] = tuple(dict.fromkeys((*current, *value)))
        else:
            if row.choices:
                check_choice(value, row.choices, row.name, row.option.flag)
            changes[target] = str(row.parse(value, row.option.flag)) if row.parse else value
    return dataclasses.replace(spec, **changes)
