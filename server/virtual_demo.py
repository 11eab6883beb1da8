"""A virtual node's whole life, as `fwbuild virtual-node demo` shows it and the tests check it.

recovery card -> first boot on the virtual walt-net (the recovery EEPROM HTTP-boots the
VPN initramfs from the server) -> the node enrolls itself and flashes its own EEPROM ->
distant boot through the SSH entrypoint -> `fwbuild nodes set-mode` (the admin) -> the node
re-flashes itself at its next boot -> boot in the new mode.

The harness only powers the board on (and off once it reached its root), inserts and
removes the recovery card, and runs the admin's command. What each power-on did is read
from the node's console and the flash's content: a flash's reason is what changed in the
EEPROM config the node wrote (credentials appeared: enrollment; WALT_VPN_BOOT_MODE: boot
mode; WALT_VPN_ENTRYPOINT: entrypoint; otherwise the credentials: keys or certificate).
"""

from __future__ import annotations

import re
import tarfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fwbuild.eeprom.bootconf import parse_bootconf
from fwbuild.eeprom.image import parse_image
from fwbuild.errors import FwbuildError
from fwbuild.layout import RECOVERY_KIT
from fwbuild.virtual.bootloader import running_image
from fwbuild.virtual.node import NodeResult

from .virtual_site import SiteOptions, VirtualNode, VirtualSite

FLASHED = "walt-vpn: flash: EEPROM written and verified by read-back"
_AUTH = re.compile(r"walt-vpn: ssh: authenticated to (\S+) as")
_MODE = re.compile(r"walt-vpn: starting: entrypoint \S+, mode (\w+)")


def flash_config(flash: bytes) -> dict[str, str]:
    """The bootconf the board would run from this flash content ({} when none)."""
    try:
        image = parse_image(running_image(flash))
        return parse_bootconf(image.read_file("bootconf.txt").decode("ascii", "replace"))
    except FwbuildError:
        return {}


def flash_reason(before: dict[str, str], after: dict[str, str]) -> str:
    if "WALT_VPN_CREDS" not in before:
        return "enrollment"
    if before.get("WALT_VPN_BOOT_MODE") != after.get("WALT_VPN_BOOT_MODE"):
        return "boot mode"
    if before.get("WALT_VPN_ENTRYPOINT") != after.get("WALT_VPN_ENTRYPOINT"):
        return "entrypoint"
    if before.get("WALT_VPN_CREDS") != after.get("WALT_VPN_CREDS"):
        return "credentials"
    return "image"


@dataclass
class Life:
    """What the node did, power-on by power-on."""

    flashes: list[dict[str, str]] = field(default_factory=list)
    boots: list[dict[str, Any]] = field(default_factory=list)
    results: list[NodeResult] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {"enrolled_by": "node", "flashes": self.flashes, "boots": self.boots}


def power_until_root(site: VirtualSite, node: VirtualNode, life: Life, *, max_power_ons: int = 4,
                     timeout: float = 400.0, log: Callable[[str], None] = lambda line: None) -> NodeResult:
    """Power the node on again and again (as after each of its reboots) until it reaches its root."""
    result: NodeResult | None = None
    for _ in range(max_power_ons):
        before = node.flash.read_bytes()
        result = site.power_on(node, timeout=timeout)
        life.results.append(result)
        after = node.flash.read_bytes()
        if FLASHED in result.console and after != before:
            old, new = flash_config(before), flash_config(after)
            entry = {"reason": flash_reason(old, new), "mode": new.get("WALT_VPN_BOOT_MODE", "?")}
            life.flashes.append(entry)
            log(f"the node flashed its EEPROM ({entry['reason']}, mode {entry['mode']}) and rebooted")
            continue
        if result.ok:
            auth = _AUTH.search(result.console)
            mode = _MODE.search(result.console)
            boot = {"via": f"ssh entrypoint {auth.group(1)}" if auth else "?",
                    "mode": mode.group(1) if mode else "?", "reached": True}
            life.boots.append(boot)
            log(f"the node reached its root through the {boot['via']} in {boot['mode']} mode")
            return result
        log(f"power-on ended without the root: {result.reason}")
        if result.exit_status != 0:
            return result
    assert result is not None
    return result


def insert_recovery_card(artifacts: Path, card: Path) -> Path:
    """The admin writes rpi-5-sd-recovery.tar.gz to an SD card (a directory here)."""
    card.mkdir(parents=True, exist_ok=True)
    with tarfile.open(RECOVERY_KIT.path(artifacts)) as tar:
        for member in tar.getmembers():
            extracted = tar.extractfile(member)
            if member.isfile() and extracted is not None and "/" not in member.name:
                (card / member.name).write_bytes(extracted.read())
    return card


def set_mode(site: VirtualSite, mac: str, mode: str) -> None:
    """`fwbuild nodes set-mode MAC MODE --config server.toml`, as the admin types it."""
    from fwbuild.cli import main

    try:
        main.main(["nodes", "set-mode", mac, mode, "--config", str(site.config_path)],
                  standalone_mode=False)
    except SystemExit as exc:
        if exc.code not in (0, None):
            raise FwbuildError(f"fwbuild nodes set-mode failed (exit {exc.code})") from None


def live(site: VirtualSite, mac: str, *, new_mode: str = "permissive", timeout: float = 400.0,
         log: Callable[[str], None] = lambda line: None) -> Life:
    """The whole life of one node on `site` (see the module docstring)."""
    life = Life()
    node = site.add_node(mac)
    card = insert_recovery_card(site.options.artifacts, site.options.work / "recovery-card")
    log("power on with the recovery card: the ROM runs recovery.bin, which flashes the recovery EEPROM")
    result = site.power_on(node, sd=card, name=f"{node.mac12}-recovery")
    life.results.append(result)
    if result.mode != "recovery":
        raise FwbuildError(f"the recovery card did not reset the EEPROM: {result.reason}")
    log("card removed; power on: first boot on walt-net")
    result = power_until_root(site, node, life, timeout=timeout, log=log)
    if not result.ok:
        return life
    log(f"admin: fwbuild nodes set-mode {mac} {new_mode}")
    set_mode(site, mac, new_mode)
    power_until_root(site, node, life, timeout=timeout, log=log)
    return life


@dataclass(frozen=True)
class DemoReport:
    out_dir: Path
    node_eeprom: Path
    life: Life
    console_log: Path
    config: Path
    events: list[dict[str, Any]]

    @property
    def ok(self) -> bool:
        return len(self.life.boots) == 2 and len(self.life.flashes) == 2


def run_demo(recipe_path: Path, *, out_root: Path, keys_dir: Path, work: Path, mac: str,
             timeout: float, log: Callable[[str], None]) -> DemoReport:
    """Build the virtual recipe, verify it, start a site and let one node live its life."""
    from fwbuild.build import build
    from fwbuild.keys import KeyPaths, init_keys
    from fwbuild.recipe import load_recipe
    from fwbuild.verify import verify_output

    recipe = load_recipe(recipe_path)
    if not KeyPaths(keys_dir).boot_key.exists():
        init_keys(keys_dir)
        log(f"created site keys in {keys_dir}")
    log(f"building {recipe_path} into {out_root}/{recipe.name} (cached steps are reused)")
    built = build(recipe, out_root=out_root, keys_dir=keys_dir)
    for line in verify_output(built.out_dir).checked:
        log(f"verify: {line}")
    with VirtualSite(SiteOptions(built.out_dir, keys_dir, work), log=log) as site:
        life = live(site, mac, timeout=timeout, log=log)
        node = site.add_node(mac)
        assert site.server is not None
        described = site.server.service.describe(site.server.service.node(mac), events=50)
    console = work.resolve() / "runs" / f"{node.mac12}-{len(node.power_ons)}" / "console.log"
    return DemoReport(built.out_dir, node.flash, life, console, site.config_path,
                      list(reversed(described.get("events", []))))
