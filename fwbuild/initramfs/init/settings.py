"""The settings of the shipped inits, in one place: defaults, validation, rendering.

`InitSettings` holds every value the build gives the VPN init (the bring-up init
reads only the builder's part). A recipe's `initramfs.variables` become settings
through `InitSettings.from_variables` (unknown or invalid keys: one `BuildError`
naming `initramfs.variables.<key>`); the virtual node builds them directly.
`config_text` renders the settings and the builder's data (module load order,
built-in modules, kernel version) as the initramfs's `/etc/fwbuild-init.conf`:
`NAME=value` lines, shell-quoted, that the init sources. The shell names are the
field names in upper case.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from ...errors import BuildError

CONFIG_PATH = "etc/fwbuild-init.conf"
_FW_CFG_NAME_RE = re.compile(r"[A-Za-z0-9_./-]+")
_ROOT_RE = re.compile(r"/[A-Za-z0-9_./{}-]*")
_MODULE_RE = re.compile(r"[A-Za-z0-9_.-]+")


@dataclass(frozen=True)
class InitSettings:
    """The VPN init's settings (seconds unless said otherwise)."""

    retries: int = 6                 # failed steps before the mode's fallback
    backoff_first: int = 2
    backoff_max: int = 60
    connect_timeout: int = 10        # ssh ConnectTimeout
    server_alive_interval: int = 30
    server_alive_count: int = 4
    cache_timeout: int = 157680000   # FUSE entry/attr/negative + sshfs dcache (the root is read-only)
    min_session: int = 60            # a shorter VPN session means a broken setup: reboot
    tap_wait: int = 5                # how long to wait for the tunnel's tap device
    eeprom_retries: int = 3          # failed EEPROM checks before booting with the current one
    prefetch_streams: int = 32       # parallel working-set streams (walt_vpn.prefetch_streams=)
    prefetch_wait: int = 1           # 1: the boot waits for the prefetch; 0: runs alongside
    # 1: SSH compression (zlib) on the node's connection (root reads, tunnel): the root's
    # blocks cross a slow link about 3x smaller (walt_vpn.compression=)
    ssh_compression: int = 1
    # The root's FUSE connection: requests in flight (the kernel's default, 12, caps a
    # 200 ms path at about 4 MB/s), and its files' readahead (KiB) while the prefetch runs
    fuse_background: int = 64
    fuse_readahead_kb: int = 1024
    fw_cfg_name: str = "opt/fwbuild/bootconf"               # QEMU fw_cfg file of the config
    # root without WALT_VPN_ROOT: "" = the root the SSH gate gives the node's certificate
    # (no site path in the EEPROM); or a path, {mac12}/{mac} = the node's Ethernet MAC
    vpn_root_default: str = ""

    def __post_init__(self) -> None:
        for item in fields(self):
            value = getattr(self, item.name)
            if item.type == "int":
                if isinstance(value, bool) or not isinstance(value, int):
                    raise BuildError(f"init setting {item.name} must be an integer",
                                     f"initramfs.variables.{item.name}")
                least = _MINIMUM.get(item.name, 0)
                if value < least:
                    raise BuildError(f"init setting {item.name} must be at least {least}",
                                     f"initramfs.variables.{item.name}")
            elif not isinstance(value, str):
                raise BuildError(f"init setting {item.name} must be a string",
                                 f"initramfs.variables.{item.name}")
        for name in ("prefetch_wait", "ssh_compression"):
            if getattr(self, name) not in (0, 1):
                raise BuildError(f"init setting {name} must be 0 or 1", f"initramfs.variables.{name}")
        if not _FW_CFG_NAME_RE.fullmatch(self.fw_cfg_name):
            raise BuildError("fw_cfg name has unexpected characters", "initramfs.variables.fw_cfg_name",
                             "use letters, digits and _ . / -")
        if self.vpn_root_default and not _ROOT_RE.fullmatch(self.vpn_root_default):
            raise BuildError("vpn_root_default must be an absolute path",
                             "initramfs.variables.vpn_root_default",
                             "e.g. /var/lib/walt/nodes/{mac12}/fs ({mac12}, {mac}: the node's MAC), "
                             "or leave it out: the root the SSH gate gives the node")

    @classmethod
    def from_variables(cls, variables: Mapping[str, Any]) -> InitSettings:
        """Settings from a recipe's `initramfs.variables` (strings or TOML integers)."""
        known = {item.name: item for item in fields(cls)}
        values: dict[str, Any] = {}
        for name, raw in variables.items():
            where = f"initramfs.variables.{name}"
            item = known.get(name)
            if item is None:
                from difflib import get_close_matches

                close = get_close_matches(name, list(known), n=1)
                raise BuildError(f"unknown init setting {name!r}", where,
                                 f"did you mean {close[0]}?" if close else
                                 f"known: {', '.join(known)}")
            if item.type == "int" and isinstance(raw, str):
                if not re.fullmatch(r"[0-9]+", raw.strip()):
                    raise BuildError(f"init setting {name} must be a non-negative integer, not {raw!r}",
                                     where)
                raw = int(raw)
            values[name] = raw
        return replace(cls(), **values)

    def variables(self) -> dict[str, Any]:
        """The settings as `initramfs.variables` (what `from_variables` reads back)."""
        return asdict(self)


_MINIMUM = {"retries": 1, "eeprom_retries": 1, "prefetch_streams": 1, "fuse_background": 1,
            "fuse_readahead_kb": 4}


def config_text(settings: InitSettings, *, modules: Sequence[str] = (),
                builtin_modules: Sequence[str] = (), kernel_version: str = "") -> bytes:
    """`/etc/fwbuild-init.conf`: the settings and the builder's data, as shell assignments."""
    for module in (*modules, *builtin_modules):
        if not _MODULE_RE.fullmatch(module):
            raise BuildError(f"bad kernel module name {module!r}", "initramfs.modules")
    values: dict[str, object] = {
        **{name.upper(): value for name, value in asdict(settings).items()},
        "MODULES": " ".join(modules),
        "BUILTIN_MODULES": " ".join(builtin_modules),
        "KERNEL_VERSION": kernel_version,
    }
    lines = ["# fwbuild init settings (fwbuild.initramfs.init.settings); sourced by /init"]
    lines += [f"{name}={shlex.quote(str(value))}" for name, value in values.items()]
    return ("\n".join(lines) + "\n").encode()
