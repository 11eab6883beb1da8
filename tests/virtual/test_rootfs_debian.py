"""The Debian node root: built from the archive's packages, configured without running arm64
code, byte-identical when rebuilt. Slow (about 40 MB of packages on a fresh cache)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from fwbuild.cache import Cache
from fwbuild.rootfs.debian import MARKER, DebianRoot, DebianRootSpec, build_debian_root

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="building the root needs root (file owners)"),
    pytest.mark.skipif(shutil.which("debugfs") is None, reason="no debugfs (e2fsprogs)"),
]


def debugfs(image: Path, command: str) -> str:
    return subprocess.run(["debugfs", "-R", command, str(image)], capture_output=True, text=True,
                          check=True).stdout


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> DebianRoot:
    return build_debian_root(Cache(tmp_path_factory.getbasetemp() / "fwbuild-cache"))


def test_root_has_what_systemd_and_sshd_need(root: DebianRoot) -> None:
    names = {entry.split("=")[0] for entry in root.packages}
    assert {"systemd", "systemd-sysv", "openssh-server", "base-files", "dpkg", "iproute2"} <= names
    image = root.image
    passwd = debugfs(image, "cat /etc/passwd")
    for user in ("root:", "sshd:", "messagebus:", "systemd-network:"):
        assert any(line.startswith(user) for line in passwd.splitlines()), user
    assert debugfs(image, "cat /etc/machine-id") == ""          # each node makes its own
    assert "multi-user.target" in debugfs(image, "stat /etc/systemd/system/default.target")
    wants = debugfs(image, "ls /etc/systemd/system/multi-user.target.wants")
    assert "ssh.service" in wants and "fwbuild-marker.service" in wants
    assert MARKER in debugfs(image, "cat /etc/systemd/system/fwbuild-marker.service")
    assert "ssh_host_" not in debugfs(image, "ls /etc/ssh")          # made at first boot
    assert "04755" in debugfs(image, "stat /usr/bin/passwd")          # modes kept (setuid)
    assert "Package: systemd\nStatus: install ok installed" in debugfs(image, "cat /var/lib/dpkg/status")


def test_rebuild_is_byte_identical_and_cached(root: DebianRoot, tmp_path: Path) -> None:
    cache = Cache(root.image.parents[2])
    assert build_debian_root(cache).image == root.image                # cache hit: no work
    first = root.sha256
    shutil.rmtree(root.image.parent)
    again = build_debian_root(cache)
    assert again.sha256 == first and again.key == root.key
    other = build_debian_root(cache, DebianRootSpec(hostname="other-node"))
    assert other.key != root.key and other.sha256 != first
