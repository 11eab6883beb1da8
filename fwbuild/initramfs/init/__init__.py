"""The inits shipped with fwbuild (`builtin:<name>` = the directory `<name>/` here).

Each is plain sh, no template: `<name>/init` becomes `/init`, `<name>/lib/*.sh` the
library in `/lib/fwbuild-init/`, `<name>/bin/*` helper programs in `/bin/`. What a
build decides (settings, module load order, kernel version) goes in as data:
`/etc/fwbuild-init.conf` (`settings.config_text`), which the init sources.
`default` boots to a shell (tests, bring-up); `vpn` is the VPN boot client.
"""

from __future__ import annotations

from collections.abc import Sequence
from importlib import resources
from importlib.abc import Traversable
from pathlib import Path

from ...errors import BuildError
from .settings import CONFIG_PATH, InitSettings, config_text

LIBRARY_DIR = "lib/fwbuild-init"
HELPER_DIR = "bin"


def builtin_names() -> list[str]:
    root = resources.files(__name__)
    return sorted(p.name for p in root.iterdir() if p.is_dir() and p.joinpath("init").is_file())


def _builtin_dir(name: str) -> Traversable:
    if name not in builtin_names():
        raise BuildError(f"no built-in init {name!r}", "initramfs.init",
                         f"use one of {', '.join('builtin:' + n for n in builtin_names())} "
                         "or a path to a .j2 template")
    return resources.files(__name__).joinpath(name)


def init_files(name: str, settings: InitSettings, *, modules: Sequence[str] = (),
               builtin_modules: Sequence[str] = (), kernel_version: str = ""
               ) -> dict[str, tuple[bytes, int]]:
    """Initramfs path (no leading /) -> (content, mode) of the built-in init `name`."""
    base = _builtin_dir(name)
    files: dict[str, tuple[bytes, int]] = {"init": (base.joinpath("init").read_bytes(), 0o755)}
    for sub, dest, mode in (("lib", LIBRARY_DIR, 0o644), ("bin", HELPER_DIR, 0o755)):
        folder = base.joinpath(sub)
        if folder.is_dir():
            for item in sorted(folder.iterdir(), key=lambda p: p.name):
                if item.is_file() and not item.name.startswith("."):
                    files[f"{dest}/{item.name}"] = (item.read_bytes(), mode)
    files[CONFIG_PATH] = (config_text(settings, modules=modules, builtin_modules=builtin_modules,
                                      kernel_version=kernel_version), 0o644)
    return files


def write_init_tree(dest: Path, name: str, settings: InitSettings, *,
                    modules: Sequence[str] = ()) -> Path:
    """The init's files under `dest` as in the initramfs (host tests source `dest/init`
    with FWBUILD_INIT_ROOT=`dest`); returns the path of `init`."""
    for path, (data, mode) in init_files(name, settings, modules=modules).items():
        target = dest / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        target.chmod(mode)
    return dest / "init"
