"""The VPN boot client's build inputs: init settings, initramfs spec, node credentials.

- `VpnInitSettings` are the template variables of `initramfs/init/vpn.sh.j2`;
  `render_vpn_init` renders it (jinja2, StrictUndefined) and
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
from dataclasses import asdict, dataclass
from importlib import resources
from typing import Any

import jinja2
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from ..errors import BuildError, ConfigError, FormatError
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
FW_CFG_NAME = "opt/fwbuild/bootconf"
_KEY_RE = re.compile(r"^[A-Z][A-Z0-9_]*$")


@dataclass(frozen=True)
class VpnInitSettings:
    """Variables of vpn.sh.j2 (seconds unless said otherwise)."""

    retries: int = 6                 # failed steps before the mode's fallback
    backoff_first: int = 2
    backoff_max: int = 60
    connect_timeout: int = 10        # ssh ConnectTimeout
    server_alive_interval: int = 30
    server_alive_count: int = 4
    cache_timeout: int = 157680000   # FUSE entry/attr/negative + sshfs dcache (the root is read-only)
    min_session: int = 60            # a shorter VPN session means a broken setup: reboot
    tap_wait: int = 5                # how long to wait for the tunnel's tap device
    fw_cfg_name: str = FW_CFG_NAME

    def variables(self) -> dict[str, Any]:
        values = asdict(self)
        for name, value in values.items():
            if isinstance(value, int) and value < (1 if name == "retries" else 0):
                raise BuildError(f"VPN init setting {name} must be positive", f"initramfs.{name}")
        if not re.fullmatch(r"[A-Za-z0-9_./-]+", self.fw_cfg_name):
            raise BuildError("fw_cfg name has unexpected characters", "initramfs.fw_cfg_name")
        return values


def _template_text(name: str) -> str:
    # The helper scripts (udhcpc event script, HTTP CONNECT ProxyCommand, supervisor)
    # are embedded in the template: `builtin:vpn` is the only file the builder adds.
    return resources.files("fwbuild.initramfs").joinpath("init", name).read_text()


def render_vpn_init(settings: VpnInitSettings = VpnInitSettings(),
                    modules: Sequence[str] = VIRTUAL_MODULES) -> str:
    """The init script as the builder renders it (for inspection and host-side tests)."""
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True,
                             autoescape=False)
    return env.from_string(_template_text("vpn.sh.j2")).render(
        modules=list(modules), **settings.variables())


def vpn_initramfs_spec(kernel_package: str, *, modules: Sequence[str] = VIRTUAL_MODULES,
                       settings: VpnInitSettings = VpnInitSettings(),
                       compression: str = "xz", epoch: int = 0) -> Any:
    """An `InitramfsSpec` for the VPN client (typed Any: the builder is imported lazily)."""
    from ..initramfs.builder import InitramfsSpec

    return InitramfsSpec(
        packages=VPN_PACKAGES, paths=VPN_PATHS, kernel_package=kernel_package,
        modules=tuple(modules), init="builtin:vpn",
        variables=settings.variables(), compression=compression, epoch=epoch)


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
