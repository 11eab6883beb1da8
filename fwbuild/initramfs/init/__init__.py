"""Init templates shipped with fwbuild (`builtin:<name>` = `<name>.sh.j2` in this directory).

`default.sh.j2` boots to a shell (tests, bring-up); `vpn.sh.j2` is the VPN boot
client. Templates are rendered with jinja2 (StrictUndefined) by
`fwbuild.initramfs.builder.render_init`, with `modules` (load order, dependencies
first), `builtin_modules` and `kernel_version` provided by the builder.
"""

from __future__ import annotations

from importlib import resources

# Values a built-in template needs that the builder does not provide. The shipped
# templates spell their own defaults with jinja2's `default()` filter, so this is
# empty for them; a recipe's `initramfs.variables` override whatever is here.
_DEFAULTS: dict[str, dict[str, object]] = {
    "default": {},
    "vpn": {},
}


def builtin_names() -> list[str]:
    return sorted(p.name[: -len(".sh.j2")] for p in resources.files(__name__).iterdir()
                  if p.name.endswith(".sh.j2"))


def defaults_for(init: str) -> dict[str, object]:
    """Template variables to start from for `init` ("builtin:<name>" or a template path)."""
    if init.startswith("builtin:"):
        return dict(_DEFAULTS.get(init[len("builtin:"):], {}))
    return {}
