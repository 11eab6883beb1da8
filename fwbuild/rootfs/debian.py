"""A Debian (bookworm, arm64) node root: minbase + systemd + openssh-server, as an ext4 image.

What `mmdebstrap --variant=minbase` would give, built without running any arm64
code (the host has no qemu-user/binfmt_misc): the packages of Priority `required`
plus the requested ones are resolved, downloaded and checked through the project's
private apt universe (`initramfs/apt.py`), their data members are unpacked in name
order over a merged-/usr skeleton, and the few things the maintainer scripts would
have done for booting are done here, by hand or with host tools that only read
configuration files:

- `/etc/passwd`, `/etc/group` from base-passwd's masters, locked `shadow`/`gshadow`,
  then `systemd-sysusers --root` for every `sysusers.d` entry (systemd's users,
  messagebus, and sshd from a snippet added here);
- `systemctl --root` enables the host-key unit and the marker unit (`ssh.service` is
  linked by hand: systemctl would run the arm64 `update-rc.d`) and sets `multi-user.target` as the default;
- an empty `/etc/machine-id` (each node gets its own at boot: the root is shared),
  `/etc/hostname`, `/etc/hosts`, an empty `/etc/fstab`, the `awk` alternative, and
  `/var/lib/dpkg/status` listing the installed packages;
- SSH host keys are made at first start (`ssh-keygen -A`), never baked into a shared root.

The unit `fwbuild-marker.service` prints `FWBUILD-DEBIAN-MULTIUSER uptime=<s>` on the
console once `multi-user.target` is reached. No `ldconfig` cache: Debian's loader
searches the multiarch directories by default.

The image (`mke2fs -d`, no journal, fixed UUID, hash seed and timestamps) is cached
content-addressed under `<cache>/rootfs/<key>/root.img`; the key covers the pinned
packages (sha256), the settings and the builder version, so an unchanged input gives
the cached image back without work.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tarfile
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..cache import Cache
from ..errors import BuildError, FormatError, ToolError
from ..fsutil import atomic_write
from ..initramfs.apt import AptSession, PinnedPackage
from ..initramfs.deb import _find, _open_tar, normalize_member, parse_ar, parse_control
from ..progress import Progress, report

BUILDER_VERSION = "4"
MARKER = "FWBUILD-DEBIAN-MULTIUSER"
ROOT_INIT_LINE = "running in system mode"   # systemd's first console line (from the kernel log)
DEFAULT_PACKAGES = ("systemd", "systemd-sysv", "udev", "dbus", "openssh-server", "iproute2",
                    "iputils-ping", "procps", "less", "kmod", "netbase")
MERGED_USR = ("bin", "sbin", "lib")

MARKER_UNIT = f"""[Unit]
Description=fwbuild: report that multi-user.target is reached
After=multi-user.target

[Service]
Type=oneshot
ExecStart=/bin/sh -c 'read up idle < /proc/uptime; echo "{MARKER} uptime=$up" > /dev/console'

[Install]
WantedBy=multi-user.target
"""

HOSTKEY_UNIT = """[Unit]
Description=fwbuild: SSH host keys of this node (made at boot, never shipped in a shared root)
Before=ssh.service
ConditionPathExists=!/etc/ssh/ssh_host_ed25519_key

[Service]
Type=oneshot
ExecStart=/usr/bin/ssh-keygen -A

[Install]
WantedBy=multi-user.target
"""

SSHD_SYSUSERS = "u sshd - \"sshd privilege separation\" /run/sshd /usr/sbin/nologin\n"


@dataclass(frozen=True)
class DebianRootSpec:
    packages: tuple[str, ...] = DEFAULT_PACKAGES
    hostname: str = "fwbuild-node"
    epoch: int = 0                      # every timestamp the builder sets (SOURCE_DATE_EPOCH)
    extra_mib: int = 64                 # free space in the image beyond the files


@dataclass(frozen=True)
class DebianRoot:
    image: Path
    sha256: str
    key: str
    packages: tuple[str, ...] = field(default=())   # name=version, sorted

    def describe(self) -> dict[str, object]:
        return {"image": str(self.image), "sha256": self.sha256, "key": self.key,
                "size": self.image.stat().st_size, "packages": list(self.packages)}


def required_packages(session: AptSession) -> list[str]:
    """Names of the packages of Priority `required` (minbase's set) in the session's lists."""
    session.update()
    out = session._run("apt-cache", ["dumpavail"])
    names: set[str] = set()
    for block in out.split("\n\n"):
        fields = parse_control(block)
        if fields.get("Priority") == "required" or fields.get("Essential") == "yes":
            names.add(fields["Package"])
    if not names:
        raise BuildError("the apt lists name no required packages", "apt-cache dumpavail",
                         "are the host's apt sources a Debian archive?")
    return sorted(names)


def _root_key(spec: DebianRootSpec, pins: Sequence[PinnedPackage]) -> str:
    document = {"builder": BUILDER_VERSION, "spec": asdict(spec),
                "packages": sorted(f"{p.name}={p.version}:{p.sha256}" for p in pins)}
    return hashlib.sha256(json.dumps(document, sort_keys=True).encode()).hexdigest()


def _extract(deb: Path, root: Path) -> dict[str, str]:
    """Unpack a .deb's data member over `root` (owners, modes, links kept); return its control."""
    where = deb.name
    data = deb.read_bytes()
    members = parse_ar(data, where)
    control_fields: dict[str, str] = {}
    with _open_tar(_find(members, "control.tar", where), where) as control:
        for info in control:
            if normalize_member(info.name, where) == "control" and info.isfile():
                handle = control.extractfile(info)
                if handle is not None:
                    control_fields = parse_control(handle.read().decode("utf-8", "replace"))
    with _open_tar(_find(members, "data.tar", where), where) as tar:
        for info in tar:
            name = normalize_member(info.name, where)
            if not name:
                continue
            if info.islnk():
                info.linkname = normalize_member(info.linkname, where)
            if info.isdev():
                raise FormatError(f"device node {name} in a package", where)
            info.name = name
            tar.extract(info, root, numeric_owner=True, filter="fully_trusted")
    return control_fields


def _run(argv: Sequence[str], where: str, env: dict[str, str] | None = None) -> None:
    tool = shutil.which(argv[0])
    if tool is None:
        raise ToolError(f"{argv[0]} not found", where, "install systemd and e2fsprogs on the build host")
    proc = subprocess.run([tool, *argv[1:]], capture_output=True, text=True, check=False,
                          env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        raise ToolError(f"{argv[0]} failed: {(proc.stderr or proc.stdout).strip()[-300:]}", where)


def _configure(root: Path, spec: DebianRootSpec, controls: list[dict[str, str]]) -> None:
    etc = root / "etc"
    masters = root / "usr" / "share" / "base-passwd"
    shutil.copyfile(masters / "passwd.master", etc / "passwd")
    shutil.copyfile(masters / "group.master", etc / "group")
    for name, source in (("shadow", "passwd"), ("gshadow", "group")):
        lines = [line.split(":")[0] for line in (etc / source).read_text().splitlines() if line]
        text = "".join(f"{user}:*:0:0:99999:7:::\n" if name == "shadow" else f"{user}:*::\n"
                       for user in lines)
        (etc / name).write_text(text)
        os.chmod(etc / name, 0o640)
        shadow_gid = next((int(line.split(":")[2]) for line in (etc / "group").read_text().splitlines()
                           if line.startswith("shadow:")), 0)
        os.chown(etc / name, 0, shadow_gid)
    (root / "usr" / "lib" / "sysusers.d").mkdir(parents=True, exist_ok=True)
    (root / "usr" / "lib" / "sysusers.d" / "fwbuild-sshd.conf").write_text(SSHD_SYSUSERS)
    _run(["systemd-sysusers", f"--root={root}"], "systemd-sysusers",
         {"SOURCE_DATE_EPOCH": str(spec.epoch)})
    _pin_shadow_dates(etc, spec.epoch)
    units = root / "etc" / "systemd" / "system"
    units.mkdir(parents=True, exist_ok=True)
    (units / "fwbuild-marker.service").write_text(MARKER_UNIT)
    (units / "fwbuild-ssh-keygen.service").write_text(HOSTKEY_UNIT)
    _run(["systemctl", f"--root={root}", "enable", "fwbuild-marker.service",
          "fwbuild-ssh-keygen.service"], "systemctl enable")
    # By hand: `systemctl enable ssh` would run the SysV helper (arm64 update-rc.d) in a chroot.
    (units / "multi-user.target.wants").mkdir(exist_ok=True)
    (units / "multi-user.target.wants" / "ssh.service").symlink_to("/lib/systemd/system/ssh.service")
    (units / "sshd.service").symlink_to("/lib/systemd/system/ssh.service")
    _run(["systemctl", f"--root={root}", "set-default", "multi-user.target"], "systemctl set-default")
    (etc / "machine-id").write_text("")
    (root / "var" / "lib" / "dbus").mkdir(parents=True, exist_ok=True)
    (root / "var" / "lib" / "dbus" / "machine-id").unlink(missing_ok=True)
    (root / "var" / "lib" / "dbus" / "machine-id").symlink_to("/etc/machine-id")
    (etc / "hostname").write_text(spec.hostname + "\n")
    (etc / "hosts").write_text(f"127.0.0.1\tlocalhost\n127.0.1.1\t{spec.hostname}\n"
                               "::1\tlocalhost ip6-localhost ip6-loopback\n")
    (etc / "fstab").write_text("# the root is mounted by the VPN initramfs (sshfs, overlay)\n")
    alternatives = etc / "alternatives"
    alternatives.mkdir(exist_ok=True)
    for link, target in (("awk", "/usr/bin/mawk"), ("pager", "/usr/bin/less")):
        if (root / target.lstrip("/")).exists():
            (alternatives / link).unlink(missing_ok=True)
            (alternatives / link).symlink_to(target)
            (root / "usr" / "bin" / link).unlink(missing_ok=True)
            (root / "usr" / "bin" / link).symlink_to(f"/etc/alternatives/{link}")
    dpkg = root / "var" / "lib" / "dpkg"
    dpkg.mkdir(parents=True, exist_ok=True)
    stanzas = []
    for fields in sorted(controls, key=lambda f: f.get("Package", "")):
        lines = [f"Package: {fields['Package']}", "Status: install ok installed"]
        lines += [f"{key}: {value}" for key, value in fields.items() if key != "Package"]
        stanzas.append("\n".join(lines) + "\n")
    (dpkg / "status").write_text("\n".join(stanzas))
    (dpkg / "arch").write_text("arm64\n")
    for name in ("available", "diversions", "statoverride"):
        (dpkg / name).touch()


def _pin_shadow_dates(etc: Path, epoch: int) -> None:
    """systemd-sysusers writes today's date as the last password change: the epoch's day."""
    for name in ("shadow",):
        path = etc / name
        lines = []
        for line in path.read_text().splitlines():
            fields = line.split(":")
            if len(fields) > 2 and fields[2]:
                fields[2] = str(epoch // 86400)
            lines.append(":".join(fields))
        stat = path.stat()
        path.write_text("\n".join(lines) + "\n")
        os.chown(path, stat.st_uid, stat.st_gid)


def _clamp_times(root: Path, epoch: int) -> None:
    """Every timestamp newer than `epoch` (made here, not by a package) becomes `epoch`."""
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            path = os.path.join(dirpath, name)
            if os.lstat(path).st_mtime > epoch:
                os.utime(path, (epoch, epoch), follow_symlinks=False)
    os.utime(root, (epoch, epoch))


def make_image(tree: Path, image: Path, *, key: str, epoch: int, extra_mib: int) -> None:
    """ext4 (no journal) of `tree` with a UUID and hash seed from `key`, written atomically."""
    used = 0
    count = 0
    for dirpath, dirnames, filenames in os.walk(tree):
        count += len(dirnames) + len(filenames)
        for name in filenames:
            st = os.lstat(os.path.join(dirpath, name))
            used += (st.st_size + 4095) // 4096 * 4096
    size_kib = (used * 12 // 10) // 1024 + extra_mib * 1024
    fs_uuid = str(uuid.UUID(key[:32]))
    tmp = image.with_name(image.name + ".tmp")
    tmp.unlink(missing_ok=True)
    mke2fs = shutil.which("mke2fs") or "/sbin/mke2fs"
    proc = subprocess.run(
        [mke2fs, "-q", "-F", "-t", "ext4", "-b", "4096", "-O", "^has_journal", "-L", "fwbuild-debian",
         "-U", fs_uuid, "-E", f"hash_seed={fs_uuid},root_owner=0:0", "-N", str(count + count // 5 + 1024),
         "-d", str(tree), str(tmp), f"{size_kib}k"],
        capture_output=True, text=True, check=False,
        # mke2fs ignores a fake time of 0 (it means "unset"): 1 s then.
        env={**os.environ, "E2FSPROGS_FAKE_TIME": str(max(epoch, 1)), "LC_ALL": "C"})
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise ToolError(f"mke2fs failed: {proc.stderr.strip()[-300:]}", str(image))
    # mke2fs copies atime/ctime from the host files (ctime cannot be set there): set them
    # (and the creation time) to the epoch in the image, with one debugfs session.
    commands = []
    for path in ["/", "/lost+found", *_image_paths(tree)]:
        for name in ("atime", "ctime", "crtime") + (("mtime",) if path in ("/", "/lost+found") else ()):
            commands.append(f'sif "{path}" {name} @{max(epoch, 1)}\n')
    script = image.with_name(image.name + ".debugfs")
    script.write_text("".join(commands))
    debugfs = shutil.which("debugfs") or "/sbin/debugfs"
    proc = subprocess.run([debugfs, "-w", "-f", str(script), str(tmp)], capture_output=True, text=True,
                          check=False, env={**os.environ, "E2FSPROGS_FAKE_TIME": str(max(epoch, 1))})
    script.unlink()
    failed = [line for line in proc.stderr.splitlines() if line and not line.startswith("debugfs ")]
    if proc.returncode != 0 or failed:
        tmp.unlink(missing_ok=True)
        raise ToolError(f"debugfs failed: {(failed or [proc.stderr.strip()])[0][:300]}", str(image))
    os.replace(tmp, image)


def _image_paths(tree: Path) -> list[str]:
    paths = []
    for dirpath, dirnames, filenames in os.walk(tree):
        for name in [*dirnames, *filenames]:
            path = "/" + os.path.relpath(os.path.join(dirpath, name), tree)
            if '"' in path or "\n" in path:
                raise BuildError("a path the image tools cannot name", path)
            paths.append(path)
    return sorted(paths)


def build_debian_root(cache: Cache, spec: DebianRootSpec = DebianRootSpec(), *,
                      progress: Progress | None = None, offline: bool = False) -> DebianRoot:
    """The root image for `spec` (from the cache when already built)."""
    if os.geteuid() != 0:
        raise BuildError("building a Debian root needs root (files keep their owners)",
                         "fwbuild rootfs build", "run it as root")
    session = AptSession(cache, offline=offline)
    wanted = sorted(set(required_packages(session)) | set(spec.packages))
    pins = session.resolve(wanted)
    key = _root_key(spec, pins)
    home = cache.rootfs_dir(key)
    image = home / "root.img"
    meta = home / "root.json"
    names = tuple(sorted(f"{p.name}={p.version}" for p in pins))
    if image.is_file() and meta.is_file():
        try:
            recorded = json.loads(meta.read_text())
            return DebianRoot(image, str(recorded["sha256"]), key, names)
        except (ValueError, KeyError):
            pass  # a damaged record: build again
    paths = session.download(pins, progress)
    home.mkdir(parents=True, exist_ok=True)
    tree = home / "tree.tmp"
    if tree.exists():
        shutil.rmtree(tree)
    (tree / "usr").mkdir(parents=True)
    for name in MERGED_USR:
        (tree / "usr" / name).mkdir()
        (tree / name).symlink_to(f"usr/{name}")
    controls = []
    try:
        for index, pin in enumerate(sorted(pins, key=lambda p: p.name)):
            report(progress, "unpack packages", index, len(pins))
            controls.append(_extract(paths[pin.name], tree))
        report(progress, "unpack packages", len(pins), len(pins))
        _configure(tree, spec, controls)
        _clamp_times(tree, spec.epoch)
        report(progress, "ext4 image", 0, 1)
        make_image(tree, image, key=key, epoch=spec.epoch, extra_mib=spec.extra_mib)
        report(progress, "ext4 image", 1, 1)
    except (tarfile.TarError, OSError) as exc:
        raise BuildError(f"cannot build the Debian root: {exc}", str(tree)) from None
    finally:
        shutil.rmtree(tree, ignore_errors=True)
    digest = hashlib.sha256()
    with image.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    root = DebianRoot(image, digest.hexdigest(), key, names)
    atomic_write(meta, json.dumps(root.describe(), indent=1, sort_keys=True).encode())
    return root
