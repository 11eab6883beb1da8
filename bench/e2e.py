#!/usr/bin/env python3
"""End-to-end figures of the virtual Pi 5: cold build, warm build, boot to the root's marker.

    python3 bench/e2e.py [--keep-cache DIR]

Cold build: an empty cache (FWBUILD_CACHE in a temp dir, unless --keep-cache names one
that is already filled): apt lists, ~60 MB of arm64 packages, every step. Warm build:
the same recipe again (step cache and staged packages reused). Boot: a site on loopback
(server + sshd), one enrolled node, time from the bootloader's first HTTP request to the
tiny root's marker on the serial console, split into HTTP boot (fetch + verify) and Linux
(QEMU start -> VPN -> sshfs -> switch_root -> marker). First boot to VPN-ready: a node
whose flash holds the recovery EEPROM powers on, HTTP-boots from walt-net, enrolls itself,
flashes its own EEPROM and reboots (power-on 1), then boots through the VPN to its root
(power-on 2). Needs root (sshd). Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fwbuild.build import build
from fwbuild.cache import Cache
from fwbuild.keys import init_keys
from fwbuild.layout import BOOT_IMG, EEPROM_IMAGE, INITRAMFS
from fwbuild.recipe import load_recipe
from server.virtual_demo import FLASHED
from server.virtual_site import SiteOptions, VirtualSite


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep-cache", type=Path, help="use (and keep) this cache directory")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fwbuild-bench-e2e-"))
    cache = Cache(args.keep_cache or work / "cache")
    os.environ["FWBUILD_CACHE"] = str(cache.root)
    keys = init_keys(work / "keys").directory
    recipe = load_recipe(ROOT / "recipes" / "virtual.toml")

    start = time.perf_counter()
    first = build(recipe, out_root=work / "out", keys_dir=keys, cache=cache)
    cold = time.perf_counter() - start
    start = time.perf_counter()
    second = build(recipe, out_root=work / "out", keys_dir=keys, cache=cache)
    warm = time.perf_counter() - start
    same = first.manifest == second.manifest

    stamps: dict[str, float] = {}

    def log(line: str) -> None:
        now = time.perf_counter()
        if line.startswith("BOOT_ORDER"):
            stamps.setdefault("bootloader", now)  # the first boot only (later power-ons follow)
        elif line.startswith("Starting Linux"):
            stamps.setdefault("linux", now)

    with VirtualSite(SiteOptions(first.out_dir, keys, work / "site", cache=cache), log=log) as site:
        eeprom = site.enroll("dc:a6:32:00:be:ec")
        result = site.boot(eeprom, timeout=600, name="bench")
        done = time.perf_counter()
        recovery = EEPROM_IMAGE("recovery").path(first.out_dir).read_bytes()
        node = site.add_node("dc:a6:32:00:be:ed", flash=recovery)
        start = time.perf_counter()
        first_boot = site.power_on(node, timeout=600)
        flashed = time.perf_counter()
        vpn_boot = site.power_on(node, timeout=600)
        ready = time.perf_counter()
    sizes = {rel: entry["size"] for rel, entry in first.manifest["artifacts"].items()}

    print("virtual Pi 5, end to end (recipes/virtual.toml)")
    print(f"  cold build (empty cache, downloads)   {cold:8.1f} s")
    print(f"  warm build (same inputs)              {warm:8.1f} s   identical manifest: {same}")
    print(f"    cached steps: {', '.join(second.cached_steps) or 'none'}")
    print(f"  boot.img {sizes[BOOT_IMG.rel] / 1e6:.1f} MB, initramfs "
          f"{sizes[INITRAMFS.rel] / 1e6:.2f} MB")
    if result.ok and "bootloader" in stamps and "linux" in stamps:
        print(f"  boot to marker                        {done - stamps['bootloader']:8.1f} s")
        print(f"    HTTP boot (fetch + sha256 + RSA)    {stamps['linux'] - stamps['bootloader']:8.2f} s")
        print(f"    Linux -> VPN -> sshfs root -> marker {done - stamps['linux']:7.1f} s (QEMU TCG, no KVM)")
    else:
        print(f"  boot FAILED: {result.reason}")
    if FLASHED in first_boot.console and vpn_boot.ok:
        print(f"  first boot to VPN-ready               {ready - start:8.1f} s")
        print(f"    HTTP boot, enroll, check, flash, reboot {flashed - start:5.1f} s")
        print(f"    VPN boot to the root's marker       {ready - flashed:8.1f} s")
    else:
        print(f"  first boot FAILED: {first_boot.reason} / {vpn_boot.reason}")


if __name__ == "__main__":
    main()
