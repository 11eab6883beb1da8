"""Benchmark the distant boot of a real Debian root: HTTP boot, VPN, multi-user.target, prefetch.

Builds `recipes/virtual.toml` (boot.img, boot.sig, the VPN initramfs) and the Debian
node root (`fwbuild rootfs build`: bookworm arm64 minbase + systemd + openssh-server),
then for each network profile (`lan` 0 ms / 1 Gbit/s, `50ms` 50 ms / 1 Gbit/s,
`distant` 200 ms / 20 Mbit/s, modelled by `fwbuild.virtual.netmodel.NetRelay` on the
path between the node and the entrypoints):

- HTTP boot: boot.sig then boot.img over ONE keep-alive TCP connection through the
  path, then sha256 + RSA verification with the build's key (what the bootloader does);
- VPN boot of the root image in QEMU (the sshd opens the node's Ethernet tunnel, as the
  server's entrypoints do): time to the root's init (systemd's first line),
  time to multi-user.target (the root's marker unit), SFTP requests and bytes, bytes
  the path delivered to the node;

without and with the boot working set (recorded by the first LAN boot, published next
to the image as `root.img.prefetch`), and a second boot of the distant node with
prefetch (the node keeps nothing across power cycles: its cache is RAM).

Needs root, qemu-system-aarch64, and the Debian archive the first time (cached in
FWBUILD_CACHE). Prints figures; asserts nothing. `--json` prints one object.

    python3 bench/vpnboot.py [--profiles lan,50ms,distant] [--repeat N] [--json]

`--repeat N` boots each row N times (the table shows every boot); the summary's times are
the medians, since one boot on a shared 2-core host varies by several seconds.
"""

from __future__ import annotations

import argparse
import hashlib
import http.server
import json
import os
import re
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fwbuild.build import build
from fwbuild.cache import Cache
from fwbuild.initramfs.builder import stage_kernel
from fwbuild.keys import BOOT_PUB_NAME, init_keys, load_public_key
from fwbuild.layout import BOOT_IMG, INITRAMFS
from fwbuild.recipe import load_recipe
from fwbuild.rootfs.debian import MARKER, ROOT_INIT_LINE, build_debian_root
from fwbuild.sign import parse_sig, verify_sig
from fwbuild.virtual.netmodel import NetRelay, Profile, parse_profile
from fwbuild.virtual.refboot import BootRun, boot_image
from fwbuild.virtual.workingset import (
    publish_working_set,
    remove_working_set,
    working_set_from_reads,
)

KERNEL_PACKAGE = "linux-image-cloud-arm64"


class _Quiet(http.server.SimpleHTTPRequestHandler):
    protocol_version = "HTTP/1.1"   # keep-alive: the bootloader's one connection

    def log_message(self, format: str, *args: object) -> None:
        pass


def http_boot(bootdir: Path, keys: Path, profile: Profile) -> tuple[float, int, int]:
    """(seconds, bytes, connections): boot.sig + boot.img through the path, then verify."""
    handler = lambda *a: _Quiet(*a, directory=str(bootdir))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with NetRelay(("127.0.0.1", server.server_address[1]), profile) as relay:
            start = time.monotonic()
            with requests.Session() as session:
                base = f"http://127.0.0.1:{relay.port}"
                sig = session.get(f"{base}/boot.sig", timeout=(5, 300)).content
                image = session.get(f"{base}/boot.img", timeout=(5, 300)).content
            parsed = parse_sig(sig)
            if hashlib.sha256(image).hexdigest() != parsed.sha256:
                raise SystemExit("boot.img does not match boot.sig")
            verify_sig(image, parsed, load_public_key(keys / BOOT_PUB_NAME), require_rsa=True)
            return time.monotonic() - start, relay.bytes_down, relay.connections
    finally:
        server.shutdown()
        server.server_close()


def _done_s(console: Path) -> float | None:
    """The init's "prefetch: done in X s" figure, if this boot prefetched."""
    match = re.search(r"walt-vpn: prefetch: done in ([0-9.]+) s", console.read_text(errors="replace"))
    return float(match.group(1)) if match else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profiles", default="lan,50ms,distant")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--repeat", type=int, default=1, metavar="N",
                        help="boot each row N times; the summary takes the medians (default 1)")
    args = parser.parse_args()
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    say = (lambda *a: print(*a, file=sys.stderr, flush=True)) if args.json else \
        (lambda *a: print(*a, flush=True))
    profiles = [parse_profile(name) for name in args.profiles.split(",")]
    load_start = round(os.getloadavg()[0], 1)
    cache = Cache.default()
    work = Path(tempfile.mkdtemp(prefix="fwbuild-bench-vpnboot-"))
    os.chmod(work, 0o755)
    say("building recipes/virtual.toml and the Debian root ...")
    keys = init_keys(work / "keys").directory
    built = build(load_recipe(ROOT / "recipes" / "virtual.toml"), out_root=work / "out",
                  keys_dir=keys, cache=cache)
    boot_img = BOOT_IMG.path(built.out_dir)
    bootdir = boot_img.parent  # served as the HTTP boot directory (boot.img, boot.sig)
    initrd = INITRAMFS.path(built.out_dir)
    kernel = stage_kernel(KERNEL_PACKAGE, cache).image
    root = build_debian_root(cache)
    export = work / "export"
    export.mkdir(mode=0o755)
    image = export / "root.img"
    os.link(root.image, image)
    sizes = {"boot_img": boot_img.stat().st_size, "initramfs": initrd.stat().st_size,
             "root_img": image.stat().st_size}
    say(f"boot.img {sizes['boot_img']} B, initramfs {sizes['initramfs']} B, root image "
        f"{sizes['root_img']} B ({len(root.packages)} packages, sha256 {root.sha256[:16]})")

    rows: list[dict[str, object]] = []
    count = 0

    def run(profile: Profile, prefetch: bool, label: str) -> BootRun:
        nonlocal count
        count += 1
        http_s, http_bytes, conns = http_boot(bootdir, keys, profile)
        r = boot_image(work / f"run-{count}", image, kernel, initrd, profile,
                       marker=MARKER, init_line=ROOT_INIT_LINE)
        row = {"profile": profile.name, "rtt_ms": profile.rtt_ms, "rate_mbit": profile.rate_bps / 1e6,
               "prefetch": prefetch, "boot": label, "http_boot_s": round(http_s, 2),
               "http_bytes": http_bytes, "http_connections": conns,
               "to_root_init_s": round(r.to_init_s, 1), "to_multi_user_s": round(r.to_marker_s, 1),
               "qemu_cpu_s": round(r.cpu_s, 1),
               "sftp_requests": r.sftp.total_requests, "sftp_bytes": r.sftp.total_bytes,
               "image_reads": len(r.reads), "path_bytes_down": r.relay_down,
               "prefetch_line": r.prefetch_line, "prefetch_s": _done_s(r.console),
               "load_1min": round(os.getloadavg()[0], 1)}
        rows.append(row)
        pf = row["prefetch_s"]
        say(f"{profile.name:>8} {'yes' if prefetch else 'no':>8} {label:>6} | {http_s:>6.2f}s | "
            f"{r.to_init_s:>7.1f}s {r.to_marker_s:>8.1f}s {r.cpu_s:>6.1f}s {pf if pf is not None else '-':>8} | "
            f"{r.sftp.total_requests:>7} {len(r.reads):>7} {r.sftp.total_bytes / 1e6:>8.1f} "
            f"{r.relay_down / 1e6:>8.1f} | {row['load_1min']:>5}")
        return r

    header = (f"{'path':>8} {'prefetch':>8} {'boot':>6} | {'HTTP':>7} | {'to init':>8} "
              f"{'to m-u.t':>9} {'CPU':>7} {'fetch s':>8} | {'SFTP req':>7} {'reads':>7} {'SFTP MB':>8} "
              f"{'path MB':>8} | {'load':>5}")
    say(header)
    say("-" * len(header))
    remove_working_set(image)
    reference = None
    for profile in profiles:
        remove_working_set(image)
        for _ in range(args.repeat):
            r = run(profile, False, "first")
        if reference is None:
            # The reference boot: the first one (LAN by default) records the working set.
            reference = working_set_from_reads(r.reads, image)
            say(f"   working set: {len(reference.ranges)} ranges, {reference.blocks * 4096 / 1e6:.1f} MB "
                f"(recorded by the {profile.name} boot)")
        publish_working_set(reference, image)
        for _ in range(args.repeat):
            run(profile, True, "first")
    last = profiles[-1]
    run(last, True, "second")
    say("HTTP: boot.sig + boot.img over one connection + sha256 + RSA; to init: QEMU start -> "
        "systemd's first line; to m-u.t: -> multi-user.target (marker unit)")
    say("CPU: CPU time the QEMU process got up to the marker (what the node computed; the rest "
        "of the wall time it waited for the network or for a host core)")
    say("fetch s: the init's prefetch (all ranges, before the root is mounted); load: the "
        "host's 1-minute load average at the end of the boot (2 cores, shared)")
    say("SFTP req: all SFTP requests; reads: READs of the image; path MB: bytes the modelled "
        "path delivered to the node (SSH, encrypted)")

    def pick(name: str, prefetch: bool) -> float | None:
        """The median time to multi-user.target of that row's first boots."""
        times = [float(row["to_multi_user_s"]) for row in rows  # type: ignore[arg-type]
                 if row["profile"] == name and row["prefetch"] == prefetch and row["boot"] == "first"]
        return round(statistics.median(times), 1) if times else None

    lan, distant, distant_pf = pick("lan", False), pick("distant", False), pick("distant", True)
    lan_pf = pick("lan", True)
    summary = {
        "lan_s": lan, "lan_prefetch_s": lan_pf, "distant_s": distant,
        "distant_prefetch_s": distant_pf,
        "ratio": round(distant / lan, 2) if lan and distant else None,
        "ratio_prefetch": round(distant_pf / lan, 2) if lan and distant_pf else None,
        # The stricter ratio: against the faster LAN boot (with the set, LAN is faster too).
        "ratio_prefetch_best_lan": round(distant_pf / min(lan, lan_pf), 2)
        if lan and lan_pf and distant_pf else None,
        "working_set_bytes": reference.blocks * 4096 if reference else None,
        "working_set_ranges": len(reference.ranges) if reference else None,
        "repeat": args.repeat, "cpus": os.cpu_count(), "load_1min_start": load_start, "load_1min_end": round(os.getloadavg()[0], 1),
        "sizes": sizes, "rows": rows,
    }
    if args.json:
        print(json.dumps(summary, indent=1))
    else:
        print(f"ratio distant/lan: {summary['ratio']}  with prefetch: {summary['ratio_prefetch']} "
              f"(against LAN with prefetch: {summary['ratio_prefetch_best_lan']}; times to "
              "multi-user.target)")


if __name__ == "__main__":
    main()
