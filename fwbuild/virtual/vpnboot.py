"""The VPN boot client's build inputs: init settings, initramfs spec, node credentials.

- `VpnInitSettings` is `fwbuild.initramfs.init.settings.InitSettings`, the settings of
  the VPN init (`initramfs/init/vpn/`, plain sh; the settings go in as data);
  `write_vpn_init` lays its files out in a directory (host tests source them) and
  `vpn_initramfs_spec` describes the whole initramfs for `build_initramfs`.
- `NodeCredentials` is what `WALT_VPN_CREDS` carries: a deterministic gzip'ed tar
  (`id_ed25519`, `id_ed25519-cert.pub`, `known_hosts`), base64 without newline.
  `issue_node_credentials` makes a key pair and a CA-signed user certificate
  (`cryptography`'s SSHCertificateBuilder).
- `vpn_config_text` renders the `KEY=value` text the init parses (the same text the
  EEPROM's bootconf.txt carries; fw_cfg `opt/fwbuild/bootconf` on the virtual Pi 5).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from ..errors import ConfigError, FormatError
from ..initramfs.init import write_init_tree
from ..initramfs.init.settings import InitSettings
from ..keys import SshCaKey
from ..nodecreds import (
    CERTIFICATE,
    CREDENTIAL_FILES,
    KNOWN_HOSTS,
    PRIVATE_KEY,
    pack_credential_files,
    unpack_credential_files,
)

# What the VPN client needs from Debian (arm64): busybox for everything shell,
# OpenSSH's client (certificates; dropbear has none) and sshfs (FUSE, SFTP).
VPN_PACKAGES = ("busybox", "openssh-client", "sshfs")
VPN_PATHS = ("/bin/busybox", "/usr/bin/ssh", "/usr/bin/sshfs")
# Kernel modules for the virtual Pi 5 (Debian's cloud arm64 kernel; ext4 and
# af_packet are built in there). A Pi 5 recipe lists its own (nvmem, macb, ...).
VIRTUAL_MODULES = ("qemu_fw_cfg", "virtio_pci", "virtio_net", "virtio_blk", "fuse", "overlay", "tun", "loop")
FW_CFG_NAME = InitSettings.fw_cfg_name
_KEY_RE = re.compile(r"^[A-Z][A-Z0-9_]*$")


VpnInitSettings = InitSettings


def write_vpn_init(dest: Path, settings: InitSettings | None = None,
                   modules: Sequence[str] = VIRTUAL_MODULES) -> Path:
    """The VPN init's files under `dest`, laid out as in the initramfs; returns `dest/init`.

    Source it in a shell with FWBUILD_INIT_ROOT=`dest` (not as PID 1: functions only).
    """
    return write_init_tree(dest, "vpn", settings or InitSettings(), modules=modules)


def vpn_initramfs_spec(kernel_package: str, *, modules: Sequence[str] = VIRTUAL_MODULES,
                       settings: InitSettings | None = None,
                       compression: str = "xz", epoch: int = 0) -> Any:
    """An `InitramfsSpec` for the VPN client (typed Any: the builder is imported lazily)."""
    from ..initramfs.builder import InitramfsSpec

    return InitramfsSpec(
        packages=VPN_PACKAGES, paths=VPN_PATHS, kernel_package=kernel_package,
        modules=tuple(modules), init="builtin:vpn", stub_libraries=("libgssapi_krb5.so.2",),
        variables=(settings or InitSettings()).variables(), compression=compression, epoch=epoch)


# ---- credentials -----------------------------------------------------------------------

@dataclass(frozen=True)
class NodeCredentials:
    private_key: bytes   # OpenSSH private key (unencrypted)
    certificate: bytes   # one line: ssh-ed25519-cert-v01@openssh.com ...
    known_hosts: bytes   # pinned entrypoint host keys, "[host]:port keytype base64"

    def __repr__(self) -> str:  # never show the private key
        return f"NodeCredentials(certificate={self.certificate[:40]!r}..., private_key=<hidden>)"


def pack_credentials(creds: NodeCredentials) -> str:
    """WALT_VPN_CREDS: base64 (one line) of a reproducible tar.gz of the three files."""
    return pack_credential_files({PRIVATE_KEY: creds.private_key, CERTIFICATE: creds.certificate,
                                  KNOWN_HOSTS: creds.known_hosts})


def unpack_credentials(text: str, where: str = "WALT_VPN_CREDS") -> NodeCredentials:
    files = unpack_credential_files(text, where)
    missing = [name for name in CREDENTIAL_FILES if name not in files]
    if missing:
        raise FormatError(f"node credentials lack {', '.join(missing)}", where)
    return NodeCredentials(files[PRIVATE_KEY], files[CERTIFICATE], files[KNOWN_HOSTS])


def issue_node_credentials(ca: SshCaKey, key_id: str, known_hosts: str, *,
                           principal: str = "walt-vpn", serial: int = 1,
                           valid_after: int = 0, valid_before: int = 2**64 - 1) -> NodeCredentials:
    """A new ed25519 node key and its user certificate signed by the site CA."""
    node = ed25519.Ed25519PrivateKey.generate()
    cert = (
        serialization.SSHCertificateBuilder()
        .public_key(node.public_key())
        .serial(serial)
        .type(serialization.SSHCertificateType.USER)
        .key_id(key_id.encode())
        .valid_principals([principal.encode()])
        .valid_after(valid_after)
        .valid_before(valid_before)
        # ProxyJump through the entrypoint is a port forward (ssh -W): sshd refuses it
        # to a certificate without this extension.
        .add_extension(b"permit-port-forwarding", b"")
        .sign(ca)
    )
    private = node.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                 serialization.NoEncryption())
    return NodeCredentials(private, cert.public_bytes() + f" {key_id}\n".encode(),
                           known_hosts.encode())


def vpn_config_text(values: Mapping[str, str], *, section: str = "all") -> str:
    """`[all]` then `KEY=value` lines, in the given order (single-line ASCII values only)."""
    lines = [f"[{section}]"]
    for key, value in values.items():
        if not _KEY_RE.match(key):
            raise ConfigError(f"bad config key {key!r}", key, "use upper case, digits and _")
        if not value.isascii() or "\n" in value or "\r" in value:
            raise ConfigError("config values must be single-line ASCII", key)
        lines.append(f"{key}={value}")
    return "\n".join(lines) + "\n"
