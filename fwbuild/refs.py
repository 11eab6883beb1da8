"""References in recipes, parsed once into a tagged type.

A recipe names some of its inputs by reference rather than by value:

    eeprom.base           `synthetic:ab`, `synthetic:non-ab` or `source:<name>`
    bootimg.kernel        `package` (the kernel of initramfs.kernel_package) or `source:<name>`
    recovery.recovery_bin `fake` (virtual recipes) or `source:<name>`
    initramfs.init        `builtin:<name>` or a path to a `.j2` template

`parse_ref` turns the text into a `Ref` (its `kind` and `name`) when the recipe is
loaded; consumers test `ref.kind` and read `ref.name`, never slice strings. `str(ref)`
is the text as written (manifests, cache keys and messages keep the recipe's spelling).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from .errors import ConfigError

SOURCE, SYNTHETIC, BUILTIN, TEMPLATE, PACKAGE, FAKE = (
    "source", "synthetic", "builtin", "template", "package", "fake")
SYNTHETIC_LAYOUTS = ("ab", "non-ab")

# how each kind is written, for hints
_FORMS = {SOURCE: "`source:<name>`", SYNTHETIC: "`synthetic:ab`, `synthetic:non-ab`",
          BUILTIN: "`builtin:default`, `builtin:vpn`", TEMPLATE: "a path to a `.j2` template",
          PACKAGE: "`package`", FAKE: "`fake`"}


class Ref:
    """A parsed reference (immutable): `kind` is one of the module's kinds, `name` its argument
    (the source name, the synthetic layout, the built-in name or the template path)."""

    __slots__ = ("_kind", "_name")
    _kind: str
    _name: str

    def __init__(self, kind: str, name: str = "") -> None:
        object.__setattr__(self, "_kind", kind)
        object.__setattr__(self, "_name", name)

    def __setattr__(self, key: str, value: Any) -> None:
        raise AttributeError("a Ref is immutable")

    @property
    def kind(self) -> str:
        return self._kind

    @property
    def name(self) -> str:
        return self._name

    def __str__(self) -> str:
        if self.kind in (SOURCE, SYNTHETIC, BUILTIN):
            return f"{self.kind}:{self.name}"
        return self.name if self.kind == TEMPLATE else self.kind

    def __repr__(self) -> str:
        return f"Ref({self.kind!r}, {self.name!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Ref) and (self.kind, self.name) == (other.kind, other.name)

    def __hash__(self) -> int:
        return hash((self.kind, self.name))

    def __deepcopy__(self, memo: dict[int, Any]) -> Ref:
        return self

    def __reduce__(self) -> tuple[Any, ...]:
        return (Ref, (self.kind, self.name))


def parse_ref(text: str, where: str, kinds: Sequence[str]) -> Ref:
    """`text` as one of `kinds`; ConfigError (what, key path, the accepted forms) otherwise."""
    prefix, sep, rest = text.partition(":")
    ref: Ref | None = None
    if sep and prefix in (SOURCE, BUILTIN) and rest:
        ref = Ref(prefix, rest)
    elif sep and prefix == SYNTHETIC and rest in SYNTHETIC_LAYOUTS:
        ref = Ref(SYNTHETIC, rest)
    elif text in (PACKAGE, FAKE):
        ref = Ref(text)
    elif text.endswith(".j2") and TEMPLATE in kinds:
        ref = Ref(TEMPLATE, text)
    if ref is None or ref.kind not in kinds:
        forms = [_FORMS[k] for k in kinds]
        what = "init" if TEMPLATE in kinds else "reference"
        raise ConfigError(f"invalid {what} {text!r}", where,
                          f"use {', '.join(forms[:-1])} or {forms[-1]}" if len(forms) > 1
                          else f"use {forms[0]}")
    return ref


def ref_parser(*kinds: str) -> Callable[[str, str], Ref]:
    """A `parse` for the config model's field table: the TOML string as a Ref of `kinds`."""
    def parse(text: str, where: str) -> Ref:
        return parse_ref(text, where, kinds)
    return parse
