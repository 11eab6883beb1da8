"""Benchmark: initramfs build time (cold / warm cache) and size per component.

    python3 bench/initramfs.py [--spec default|vpn] [--keep-cache DIR]

Cold: a fresh FWBUILD_CACHE (apt update, downloads, .deb staging, zstd).
Warm: the same build again (everything cached; the compression memo hits).
Warm, recompressed: the compression memo removed (zstd -19 runs again).
Sizes: uncompressed bytes of each component's files, and each component
compressed alone with the archive's zstd level (the parts do not add up exactly
to the archive: zstd shares context across files). Goals: warm <= 5 s,
compressed <= 6 MiB with the VPN client contents. Needs network (Debian mirror).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fwbuild.cache import Cache
from fwbuild.initramfs.builder import InitramfsResult, InitramfsSpec, build_initramfs
from fwbuild.initramfs.cpio import compress, decompress, read_cpio

KERNEL = "linux-image-cloud-arm64"
MODULES = ("qemu_fw_cfg", "virtio_pci", "virtio_net", "fuse", "overlay", "tun", "loop")
COMPONENTS = (
    ("busybox", lambda p: p == "/bin/busybox"),
    ("ssh", lambda p: p == "/usr/bin/ssh"),
    ("FS client (sshfs, fusermount3, libfuse3)",
     lambda p: p in ("/usr/bin/sshfs", "/bin/fusermount3") or "libfuse3" in p),
    ("libraries (libc, libcrypto, glib, krb5 ...)", lambda p: ".so" in p and "/lib/modules/" not in p),
    ("kernel modules", lambda p: p.startswith("/lib/modules/")),
    ("init and the rest", lambda p: True),
)


def spec(name: str) -> InitramfsSpec:
    if name == "vpn":
        from fwbuild.virtual.vpnboot import vpn_initramfs_spec

        result: InitramfsSpec = vpn_initramfs_spec(KERNEL, epoch=1700000000)
        return result
    return InitramfsSpec(packages=("busybox-static", "openssh-client", "sshfs"),
                         paths=("/bin/busybox", "/usr/bin/ssh", "/usr/bin/sshfs", "/bin/fusermount3"),
                         kernel_package=KERNEL, modules=MODULES, epoch=1700000000)


def timed(spec_: InitramfsSpec, cache: Cache) -> tuple[float, InitramfsResult]:
    start = time.perf_counter()
    result = build_initramfs(spec_, cache)
    return time.perf_counter() - start, result


def mib(size: int) -> str:
    return f"{size / 2**20:7.2f} MiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", choices=("default", "vpn"), default="default")
    parser.add_argument("--keep-cache", type=Path, help="use (and keep) this cache directory")
    args = parser.parse_args()
    root = args.keep_cache or Path(tempfile.mkdtemp(prefix="fwbuild-bench-"))
    cache = Cache(root)
    try:
        the_spec = spec(args.spec)
        cold, result = timed(the_spec, cache)
        warm, again = timed(the_spec, cache)
        assert again.data == result.data, "warm build differs from cold build"
        shutil.rmtree(cache.area("compressed"), ignore_errors=True)
        recompressed, _ = timed(the_spec, cache)
        print(f"initramfs ({args.spec} spec, {the_spec.compression}), "
              f"{len(result.packages)} packages pinned, {len(result.entries)} entries")
        print(f"  cold cache build:        {cold:6.2f} s   (apt update, downloads, staging, zstd)")
        print(f"  warm cache build:        {warm:6.2f} s   (goal <= 5 s)")
        print(f"  warm, zstd re-run:       {recompressed:6.2f} s")
        print(f"  compressed archive:      {mib(len(result.data))}   (goal <= 6 MiB)")
        print(f"  uncompressed archive:    {mib(result.uncompressed_size)}")
        entries = read_cpio(decompress(result.data))
        groups: dict[str, list[bytes]] = {name: [] for name, _ in COMPONENTS}
        for entry in entries:
            path = "/" + entry.name
            for name, match in COMPONENTS:
                if match(path):
                    groups[name].append(entry.data)
                    break
        print(f"  {'component':<45} {'files':>5} {'uncompressed':>12} {'zstd alone':>12}")
        for name, blobs in groups.items():
            joined = b"".join(blobs)
            print(f"  {name:<45} {len(blobs):>5} {mib(len(joined)):>12} "
                  f"{mib(len(compress(joined, the_spec.compression))):>12}")
    finally:
        if args.keep_cache is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
