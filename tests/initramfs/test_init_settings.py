"""The shipped inits' files and settings as data (fwbuild.initramfs.init), on the host."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from fwbuild.errors import BuildError
from fwbuild.initramfs.builder import InitramfsSpec, init_tree_files
from fwbuild.initramfs.init import builtin_names, init_files
from fwbuild.initramfs.init.settings import InitSettings, config_text

BUSYBOX = shutil.which("busybox")


def test_builtin_inits_are_directories() -> None:
    assert builtin_names() == ["default", "vpn"]
    files = init_files("default", InitSettings(), modules=["fuse"])
    assert set(files) == {"init", "etc/fwbuild-init.conf"}
    assert b"MODULES=fuse\n" in files["etc/fwbuild-init.conf"][0]


def test_unknown_builtin_is_one_error() -> None:
    with pytest.raises(BuildError) as info:
        init_tree_files(InitramfsSpec(init="builtin:vnp"), None)
    assert info.value.where == "initramfs.init" and "builtin:vpn" in (info.value.hint or "")


def test_user_template_is_still_rendered(tmp_path: Path) -> None:
    template = tmp_path / "init.j2"
    template.write_text("#!/bin/sh\necho {{ greeting }} {{ modules | length }}\n")
    files = init_tree_files(InitramfsSpec(init=str(template), variables={"greeting": "hi"}), None)
    assert files == {"init": (b"#!/bin/sh\necho hi 0\n", 0o755)}
    with pytest.raises(BuildError, match="init template error"):
        init_tree_files(InitramfsSpec(init=str(template)), None)


@pytest.mark.skipif(BUSYBOX is None, reason="host busybox not installed")
def test_config_values_read_back_exactly(tmp_path: Path) -> None:
    """Shell quoting: what the init sources is the value, whatever its characters."""
    root = "/srv/it's $(here)/{mac12} `x`"
    with pytest.raises(BuildError):      # such a root is refused as a setting ...
        InitSettings(vpn_root_default=root)
    # ... and the quoting still holds for any value the file carries.
    conf = tmp_path / "conf"
    conf.write_bytes(config_text(InitSettings(vpn_root_default="/var/lib/walt/nodes/{mac12}/fs"),
                                 kernel_version=root))
    assert BUSYBOX is not None
    result = subprocess.run([BUSYBOX, "sh", "-c", (f'. {conf}; printf "%s|%s|%s" "$KERNEL_VERSION" '
                             '"$VPN_ROOT_DEFAULT" "$RETRIES"')], capture_output=True, text=True,
                            check=False)
    assert result.stdout == f"{root}|/var/lib/walt/nodes/{{mac12}}/fs|6", result.stderr


def test_module_names_are_checked() -> None:
    with pytest.raises(BuildError, match="bad kernel module name"):
        config_text(InitSettings(), modules=["fuse; reboot"])
