"""A client replaying WalT's node enrollment (walt-images `walt-vpn-auto-enroll`, spec
"The wire protocol, exactly") byte for byte against `fwbuild serve`, with no `mac`
anywhere: compare the running EEPROM with the server's answers; when they differ, make
an ecdsa-384 key, enroll, fetch certificate, host keys, public.pem, http-path, vpn-mac,
pack WALT_VPN_CREDS, build the EEPROM WalT's way (stock image + bootconf + public.pem,
here `fwbuild eeprom edit`). Our initramfs accepts that EEPROM's config and credentials;
the node's per-ip HTTP-boot files verify with its public.pem; a second run changes
nothing; `fwbuild nodes set-mode` changes its boot-mode answer (and the next run re-flashes
with the same credentials, as WalT's client does). WalT's client also appends
`ssh-keyscan -H server.walt` to known_hosts: `keyscan_server_walt` replays it against a
real sshd (test_walt_gate, test_walt_boot_qemu); here (no sshd) the step is left out.

The virtual node booting that EEPROM (QEMU) through per-ip/... to its root:
test_walt_boot_qemu.py."""

from __future__ import annotations

import base64
import hashlib
import hmac
import io
import subprocess
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from click.testing import CliRunner

from fwbuild.cli import main
from fwbuild.eeprom.bootconf import parse_bootconf
from fwbuild.eeprom.image import parse_image
from fwbuild.eeprom.synthetic import synthetic_image
from fwbuild.sign import parse_sig, verify_sig
from tests.initramfs.test_vpnboot import needs_busybox, run_init_functions
from tests.server.test_walt_protocol import walt_enroll
from tests.server_support import (  # noqa: F401 - fixtures
    node_ip,
    request,
    running_fixture,
    server_env_fixture,
)

MAC = "dc:a6:32:aa:bb:cc"
NODE = node_ip("dca632aabbcc")
CONF = "/walt-vpn/node-conf/"


class WaltClient:
    """The node side of WalT's protocol, as walt-vpn-auto-enroll runs it on every boot."""

    def __init__(self, port: int, work: Path, flash: Path, source: str = NODE,
                 keyscan: Callable[[], bytes] | None = None) -> None:
        """`source`: the node's walt-net address; `keyscan`: WalT's `ssh-keyscan -H server.walt`
        (its output is appended to known_hosts; None: the step is left out)."""
        self.port, self.work, self.flash, self.source = port, work, flash, source
        self.keyscan = keyscan
        self.paths: list[str] = []

    def get(self, path: str) -> bytes:
        self.paths.append(path)
        reply = request(self.port, "GET", path, source=self.source)
        assert reply.status == 200, (path, reply.status, reply.body[:200])
        return reply.body

    def running_values(self) -> dict[str, str]:
        conf = parse_bootconf(parse_image(self.flash.read_bytes()).read_file("bootconf.txt")
                              .decode())
        return {k: str(conf.get(k, "")) for k in ("WALT_VPN_ENTRYPOINT", "HTTP_HOST",
                                                  "WALT_VPN_BOOT_MODE", "WALT_VPN_MAC")}

    def server_values(self) -> dict[str, str]:
        return {"WALT_VPN_ENTRYPOINT": self.get(CONF + "ssh-entrypoint").decode(),
                "HTTP_HOST": self.get(CONF + "http-entrypoint").decode(),
                "WALT_VPN_BOOT_MODE": self.get(CONF + "boot-mode").decode(),
                "WALT_VPN_MAC": self.get(CONF + "vpn-mac").decode()}

    def run(self, number: int) -> bool:
        """One boot of the node OS (walt-vpn-auto-enroll's steps); True when it re-flashed."""
        current, values = self.running_values(), self.server_values()
        if current == values:
            return False  # "Already up-to-date."
        if current["WALT_VPN_MAC"] and current["WALT_VPN_MAC"] != values["WALT_VPN_MAC"]:
            current = dict.fromkeys(current, "")  # another platform: start again
        if current["WALT_VPN_ENTRYPOINT"] != values["WALT_VPN_ENTRYPOINT"]:
            if current["WALT_VPN_ENTRYPOINT"] == "":  # a new node: enroll
                key = self.work / f"id_walt_vpn-{number}"
                subprocess.run(["ssh-keygen", "-q", "-t", "ecdsa", "-b", "384", "-N", "", "-f",
                                str(key)], check=True)
                self.paths.append("/walt-vpn/enroll")
                enrolled = walt_enroll(self.port, Path(str(key) + ".pub").read_text(),
                                       source=self.source, headers={"Prefer": "errors=text-only"})
                assert (enrolled.status, enrolled.body) == (200, b"OK\n")
                files = {"id_walt_vpn": key.read_bytes(),
                         "id_walt_vpn-cert.pub": self.get(CONF + "ssh-pubkey-cert")}
            else:  # only the entrypoint changed: the credentials in the EEPROM stay
                files = read_creds_tar(self.running_creds())
            files["known_hosts"] = self.get(CONF + "ssh-entrypoint-host-keys")
            if self.keyscan is not None:  # "for booting inside the walt network"
                files["known_hosts"] += self.keyscan()
            raw = io.BytesIO()
            with tarfile.open(fileobj=raw, mode="w:gz") as tar:
                for name in ("id_walt_vpn", "id_walt_vpn-cert.pub", "known_hosts"):
                    info = tarfile.TarInfo(name)
                    info.size, info.mode = len(files[name]), 0o600
                    tar.addfile(info, io.BytesIO(files[name]))
            creds = base64.b64encode(raw.getvalue()).decode()
        else:
            creds = self.running_creds()
        (self.work / "public.pem").write_bytes(self.get(CONF + "public.pem"))
        http_path = self.get(CONF + "http-path").decode()
        vpn_mac = self.get(CONF + "vpn-mac").decode()
        mode = values["WALT_VPN_BOOT_MODE"]
        bootconf = "\n".join([
            "[all]", "BOOT_UART=1", f"BOOT_ORDER={'0xf7' if mode == 'enforced' else '0xf127'}",
            "NET_INSTALL_ENABLED=0", f"ENABLE_SELF_UPDATE={'0' if mode == 'enforced' else '1'}",
            f"HTTP_HOST={values['HTTP_HOST']}", f"HTTP_PATH={http_path}", "DHCP_REQ_TIMEOUT=500",
            f"WALT_VPN_MAC={vpn_mac}", f"WALT_VPN_ENTRYPOINT={values['WALT_VPN_ENTRYPOINT']}",
            f"WALT_VPN_BOOT_MODE={mode}", f"WALT_VPN_CREDS={creds}", ""])
        (self.work / "bootconf.txt").write_text(bootconf)
        stock = self.work / "pieeprom-stock.bin"
        stock.write_bytes(synthetic_image())
        result = CliRunner().invoke(main, [
            "eeprom", "edit", str(stock), "--config", str(self.work / "bootconf.txt"),
            "--pubkey", str(self.work / "public.pem"), "--out", str(self.flash)])
        assert result.exit_code == 0, result.output
        return True

    def running_creds(self) -> str:
        conf = parse_bootconf(parse_image(self.flash.read_bytes()).read_file("bootconf.txt")
                              .decode())
        return str(conf["WALT_VPN_CREDS"])


def read_creds_tar(creds: str) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(base64.b64decode(creds)), mode="r:gz") as tar:
        out = {}
        for member in tar.getmembers():
            handle = tar.extractfile(member)
            assert handle is not None
            out[member.name] = handle.read()
        return out


def keyscan_server_walt(port: int, work: Path) -> bytes:
    """`ssh-keyscan -H server.walt` against the site's sshd: the name resolves to 127.0.0.1
    only for this process (its own mount namespace with an /etc/hosts bound over the real one)."""
    hosts = work / "hosts"
    hosts.write_text("127.0.0.1 localhost\n127.0.0.1 server.walt\n")
    result = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c",
         'mount --bind "$1" /etc/hosts && exec ssh-keyscan -H -p "$2" server.walt',
         "keyscan", str(hosts), str(port)],
        capture_output=True, timeout=120, check=False)
    assert result.returncode == 0 and result.stdout, result.stderr.decode(errors="replace")
    return result.stdout


def hashed_lines(text: bytes) -> list[tuple[bytes, bytes, str]]:
    """(salt, hmac, "keytype blob") of each `ssh-keyscan -H` line."""
    out = []
    for line in text.decode().splitlines():
        if not line or line.startswith("#"):
            continue
        name, keytype, blob = line.split()[:3]
        assert name.startswith("|1|"), line
        _, _, salt, digest = name.split("|")
        out.append((base64.b64decode(salt), base64.b64decode(digest), f"{keytype} {blob}"))
    return out


def names(host: str, entry: tuple[bytes, bytes, str]) -> bool:
    salt, digest, _ = entry
    return hmac.compare_digest(hmac.new(salt, host.encode(), hashlib.sha1).digest(), digest)


def check_keyscan(client: WaltClient, scanned: bytes, sshd_port: int) -> None:
    """WalT's `ssh-keyscan -H server.walt` lines carry exactly the keys of node-conf's
    `ssh-entrypoint-host-keys` answer; each line hashes its own host name."""
    served = hashed_lines(client.get(CONF + "ssh-entrypoint-host-keys"))
    keyscanned = hashed_lines(scanned)
    assert served and keyscanned
    assert {key for _, _, key in keyscanned} == {key for _, _, key in served}
    assert all(names(f"[server.walt]:{sshd_port}", entry) for entry in keyscanned)
    entry = client.get(CONF + "ssh-entrypoint").decode()
    host = entry if ":" not in entry else "[{}]:{}".format(*entry.rsplit(":", 1))
    assert all(names(host, entry_line) for entry_line in served)



@needs_busybox
def test_walt_client_replay(running: Any, server_env: dict[str, Path], tmp_path: Path) -> None:
    flash = tmp_path / "spi-flash.bin"
    flash.write_bytes(synthetic_image())  # factory EEPROM: no WALT_VPN_* values
    client = WaltClient(running.port, tmp_path, flash)
    assert client.run(1) is True
    # no `mac` anywhere: no query, no MAC in a path, no form field but ssh-pubkey
    assert not any("?" in p or "/node/" in p or "dca632" in p for p in client.paths)
    image = parse_image(flash.read_bytes())
    conf = parse_bootconf(image.read_file("bootconf.txt").decode())
    node = running.service.node(MAC)
    assert conf["WALT_VPN_MAC"] == node.vpn_mac
    assert conf["HTTP_PATH"] == "walt-vpn/per-ip/" + NODE.replace(".", "-")
    # Our initramfs takes WalT's config: defaults for the absent keys, WalT's credential names.
    vpn = tmp_path / "vpn"
    (vpn / "etc" / "ssh").mkdir(parents=True)
    text = image.read_file("bootconf.txt").decode()
    init = run_init_functions(tmp_path, 'first_interface() { echo lo; }\nparse_config; '
                              f'check_config; VPN={vpn}; CTL=/x; unpack_credentials; '
                              'write_ssh_config; echo "INIT-OK $MODE $ENTRY_HOST:$ENTRY_PORT"',
                              stdin=text)
    assert init.returncode == 0, init.stderr
    assert init.stdout.splitlines()[-1] == "INIT-OK enforced vpn.example.org:2222"
    assert (vpn / "creds" / "id_walt_vpn").read_bytes() == (tmp_path / "id_walt_vpn-1").read_bytes()
    # The bootloader's fetches: HTTP_PATH/boot.sig and boot.img, verified with public.pem.
    from cryptography.hazmat.primitives import serialization

    public = serialization.load_pem_public_key((tmp_path / "public.pem").read_bytes())
    sig = request(running.port, "GET", f"/{conf['HTTP_PATH']}/boot.sig", source=NODE)
    img = request(running.port, "GET", f"/{conf['HTTP_PATH']}/boot.img", source=NODE)
    assert sig.status == img.status == 200
    verify_sig(img.body, parse_sig(sig.body), public, require_rsa=True)  # type: ignore[arg-type]
    # A second boot of the node OS: every value matches, nothing to change.
    before = flash.read_bytes()
    assert client.run(2) is False and flash.read_bytes() == before
    # The admin changes the node's mode: its boot-mode answer changes, the next run re-flashes.
    result = CliRunner().invoke(main, ["nodes", "set-mode", MAC, "permissive", "--config",
                                       str(server_env["config"])])
    assert result.exit_code == 0, result.output
    assert client.get(CONF + "boot-mode") == b"permissive"
    creds = client.running_creds()
    assert client.run(3) is True
    conf = parse_bootconf(parse_image(flash.read_bytes()).read_file("bootconf.txt").decode())
    assert conf["WALT_VPN_BOOT_MODE"] == "permissive" and conf["BOOT_ORDER"] == "0xf127"
    assert conf["WALT_VPN_MAC"] == node.vpn_mac
    assert conf["WALT_VPN_CREDS"] == creds  # WalT keeps its key: no second enrollment
    assert client.paths.count("/walt-vpn/enroll") == 1
    assert client.run(4) is False
