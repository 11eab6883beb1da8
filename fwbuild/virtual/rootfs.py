"""A tiny arm64 root filesystem for VPN boot tests: busybox and a marker init.

`build_tiny_root(dest, cache)` stages Debian's arm64 `busybox-static` (through the
initramfs builder's private apt state) and writes a root whose `/sbin/init` prints
`FWBUILD-VPNROOT-BOOTED`, reports the `walt-vpn` interface when there is one,
optionally reads the whole tree twice (kernel command line `fwbuild.readtwice`:
two `find / -xdev -type f | xargs cat` passes separated by sentinel lookups the
SFTP log shows), prints `FWBUILD-VPNROOT-MARKER` and powers off.

`build_root_image(root, image)` packs such a root into an ext4 image (no journal)
with `mke2fs -d`, for the init's image mode (`WALT_VPN_ROOT=<dir>/<name>.img`,
loop-mounted through sshfs: one SFTP OPEN, block reads, and a second pass served
entirely from the guest's page cache).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from ..errors import BuildError, ToolError
from ..progress import Progress

BOOT_MARKER = "FWBUILD-VPNROOT-BOOTED"
MARKER = "FWBUILD-VPNROOT-MARKER"
PASS_DONE = "FWBUILD-VPNROOT-PASS{}-DONE"
TAP_LINE = "FWBUILD-VPNROOT-TAP"
HOLDING = "FWBUILD-VPNROOT-HOLDING"
TUNPING = "FWBUILD-VPNROOT-TUNPING"
LATE_READ = "FWBUILD-VPNROOT-LATE-READ"
LATE_CONTENT = "late-file-content-7f3a"
# Names looked up on the sshfs mount between the read passes: sentinels in the SFTP log.
SENTINEL = ".fwbuild-sentinel-{}"

TINY_INIT = f"""#!/bin/busybox sh
# Tiny test root: prove the switch_root happened, optionally read everything twice.
bb=/bin/busybox
$bb mount -t proc proc /proc 2>/dev/null
$bb mount -t sysfs sysfs /sys 2>/dev/null
$bb mount -t devtmpfs devtmpfs /dev 2>/dev/null
exec </dev/console >/dev/console 2>&1
echo "{BOOT_MARKER} root=$($bb cat /etc/fwbuild-root-id) pid=$$"
if [ -e /sys/class/net/walt-vpn ]; then
    echo "{TAP_LINE} mac=$($bb cat /sys/class/net/walt-vpn/address) state=$($bb cat /sys/class/net/walt-vpn/operstate)"
fi
for word in $($bb cat /proc/cmdline); do
    case "$word" in
        fwbuild.tunping=*)
            # fwbuild.tunping=LOCAL/PREFIX,PEER: Ethernet frames through the tunnel.
            spec=${{word#*=}}
            $bb ip addr add "${{spec%,*}}" dev walt-vpn
            $bb ip link set walt-vpn up
            if $bb ping -c 1 -w 40 "${{spec#*,}}" >/dev/null 2>&1; then
                echo "{TUNPING} ok ${{spec#*,}}"
            else
                echo "{TUNPING} failed ${{spec#*,}}"
            fi
            ;;
    esac
done
if $bb grep -qw fwbuild.readtwice /proc/cmdline; then
    $bb ls /run/walt-vpn/mnt/root/{SENTINEL.format(0)} >/dev/null 2>&1
    for pass in 1 2; do
        $bb find / -xdev -type f | $bb xargs $bb cat > /dev/null
        $bb find / -xdev | $bb wc -l > /tmp/entries.$pass
        # A lookup that must reach the server: marks the pass boundary in the SFTP log.
        $bb ls /run/walt-vpn/mnt/root/{SENTINEL.format('$pass')} >/dev/null 2>&1
        echo "{PASS_DONE.format('$pass')} entries=$($bb cat /tmp/entries.$pass)"
    done
fi
hold=
for word in $($bb cat /proc/cmdline); do
    case "$word" in fwbuild.hold=*) hold=${{word#*=}} ;; esac
done
if [ -n "$hold" ]; then
    # Stay up while the test breaks the VPN session, then read a file never read before.
    echo "{HOLDING}"
    $bb sleep "$hold"
    echo "{LATE_READ} $($bb cat /usr/share/fwbuild/late.txt)"
fi
echo "{MARKER}"
$bb sync
$bb poweroff -f
"""

DIRS = ("bin", "sbin", "etc", "proc", "sys", "dev", "run", "tmp", "mnt", "root", "usr/bin")


def build_tiny_root(dest: Path, cache: object, *, root_id: str = "tiny",
                    progress: Progress | None = None) -> Path:
    """Write the tiny root into `dest` (created; must not exist) and return it."""
    from ..cache import Cache
    from ..initramfs.apt import AptSession
    from ..initramfs.builder import stage_packages

    if not isinstance(cache, Cache):
        raise TypeError("cache must be a fwbuild.sources.Cache")
    if dest.exists():
        raise BuildError("the tiny root's directory already exists", str(dest),
                         "pass a new directory")
    staged, _ = stage_packages(AptSession(cache), cache, ["busybox-static"], progress,
                               keep=["busybox-static"])
    busybox = staged.host_path(staged.resolve("/bin/busybox")[0])
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for directory in DIRS:
        (tmp / directory).mkdir(parents=True, exist_ok=True)
    shutil.copyfile(busybox, tmp / "bin" / "busybox")
    os.chmod(tmp / "bin" / "busybox", 0o755)
    (tmp / "bin" / "sh").symlink_to("busybox")
    (tmp / "sbin" / "init").write_text(TINY_INIT)
    os.chmod(tmp / "sbin" / "init", 0o755)
    (tmp / "etc" / "fwbuild-root-id").write_text(root_id + "\n")
    (tmp / "etc" / "hostname").write_text("fwbuild-tiny\n")
    (tmp / "usr" / "share" / "fwbuild").mkdir(parents=True, exist_ok=True)
    (tmp / "usr" / "share" / "fwbuild" / "late.txt").write_text(LATE_CONTENT + "\n")
    for index in range(20):  # a little tree worth caching
        sub = tmp / "usr" / "share" / "fwbuild" / f"d{index // 5}"
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"f{index}.txt").write_bytes(bytes([index]) * (1000 * (index + 1)))
    os.chmod(tmp / "tmp", 0o1777)
    os.replace(tmp, dest)
    return dest


def build_root_image(root: Path, image: Path) -> Path:
    """An ext4 image (no journal, read-only use) of `root`, written atomically."""
    mke2fs = shutil.which("mke2fs") or ("/sbin/mke2fs" if os.path.exists("/sbin/mke2fs") else None)
    if mke2fs is None:
        raise ToolError("mke2fs not found", hint="install e2fsprogs")
    used = sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and not p.is_symlink())
    size_kib = max(8192, used * 2 // 1024 + 4096)
    tmp = image.with_name(image.name + ".tmp")
    tmp.unlink(missing_ok=True)
    result = subprocess.run(
        [mke2fs, "-q", "-F", "-t", "ext4", "-O", "^has_journal", "-L", "fwbuild-root",
         "-E", "root_owner=0:0", "-d", str(root), str(tmp), f"{size_kib}k"],
        check=False, capture_output=True, text=True)
    if result.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise ToolError(f"mke2fs failed: {result.stderr.strip()}", str(image))
    os.replace(tmp, image)
    return image
