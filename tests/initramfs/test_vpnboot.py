"""The VPN boot client on the host: init files and settings, shell logic (host busybox), credentials,
and the ssh options against a real sshd (host OpenSSH client). QEMU runs are in
test_vpnboot_qemu.py."""

from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from fwbuild.errors import ConfigError, FormatError
from fwbuild.keys import load_ssh_ca
from fwbuild.virtual.sshd import TestSshd, parse_sftp_log, sftp_stats_between
from fwbuild.virtual.vpnboot import (
    NodeCredentials,
    VpnInitSettings,
    issue_node_credentials,
    pack_credentials,
    unpack_credentials,
    vpn_config_text,
    write_vpn_init,
)

BUSYBOX = shutil.which("busybox")
needs_busybox = pytest.mark.skipif(BUSYBOX is None, reason="host busybox not installed")


def run_init_functions(tmp_path: Path, body: str, *, env: dict[str, str] | None = None,
                       stdin: str = "") -> subprocess.CompletedProcess[str]:
    """Source the init in host busybox sh (PID != 1: functions only), run `body`."""
    root = tmp_path / "initroot"
    init = write_vpn_init(root, VpnInitSettings(retries=3, backoff_first=0, backoff_max=0))
    assert BUSYBOX is not None
    script = f"FWBUILD_INIT_ROOT={root}\n. {init}\n{body}\n"
    return subprocess.run([BUSYBOX, "sh", "-c", script], input=stdin, capture_output=True,
                          text=True, env={**os.environ, **(env or {})}, timeout=60, check=False)


def sample_credentials(session_keys: Path, known_hosts: str = "[10.0.2.2]:22 ssh-ed25519 AAAA\n",
                       key_id: str = "vpn_525400000001") -> NodeCredentials:
    ca = load_ssh_ca(session_keys / "ssh-ca")
    return issue_node_credentials(ca, key_id, known_hosts)


# ---- the init's files and settings ---------------------------------------------------------

def test_builtin_init_files_and_default_settings() -> None:
    from fwbuild.initramfs.builder import InitramfsSpec, init_tree_files

    files = init_tree_files(InitramfsSpec(init="builtin:vpn"), None)
    assert files["init"][1] == 0o755
    for helper in ("vpn-udhcpc", "vpn-http-connect", "vpn-supervisor", "vpn-eeprom", "vpn-prefetch"):
        assert files[f"bin/{helper}"][1] == 0o755
    assert files["lib/fwbuild-init/config.sh"][1] == 0o644
    config = files["etc/fwbuild-init.conf"][0].decode().splitlines()
    assert "RETRIES=6" in config and "CACHE_TIMEOUT=157680000" in config
    assert "VPN_ROOT_DEFAULT=''" in config  # no WALT_VPN_ROOT: the SSH gate's root
    for path, (data, _) in files.items():
        assert b"{{" not in data and b"{%" not in data, path   # no template left
        if BUSYBOX and not path.endswith(".conf"):
            check = subprocess.run([BUSYBOX, "sh", "-n", "-c", data.decode()], capture_output=True,
                                   text=True, check=False)
            assert check.returncode == 0, (path, check.stderr)


def test_settings_are_data_the_init_sources(tmp_path: Path) -> None:
    root = tmp_path / "initroot"
    write_vpn_init(root, VpnInitSettings(retries=2, connect_timeout=7), modules=["fuse", "tun"])
    config = (root / "etc" / "fwbuild-init.conf").read_text().splitlines()
    assert "RETRIES=2" in config and "CONNECT_TIMEOUT=7" in config
    assert "MODULES='fuse tun'" in config
    if BUSYBOX:
        result = subprocess.run([BUSYBOX, "sh", "-c", (f'FWBUILD_INIT_ROOT={root}; . {root}/init; '
                                 'echo "$RETRIES $CONNECT_TIMEOUT $MODULES $FW_CFG_CONFIG"')],
                                capture_output=True, text=True, check=False)
        assert result.stdout.strip() == (
            "2 7 fuse tun /sys/firmware/qemu_fw_cfg/by_name/opt/fwbuild/bootconf/raw"), result.stderr


def test_recipe_variables_become_settings() -> None:
    from fwbuild.errors import BuildError
    from fwbuild.initramfs.init.settings import InitSettings

    settings = InitSettings.from_variables({"retries": "3", "tap_wait": 9, "fw_cfg_name": "opt/x"})
    assert (settings.retries, settings.tap_wait, settings.fw_cfg_name) == (3, 9, "opt/x")
    assert InitSettings.from_variables(settings.variables()) == settings
    for variables, where, message in (
            ({"retires": "3"}, "initramfs.variables.retires", "did you mean retries"),
            ({"retries": "many"}, "initramfs.variables.retries", "must be a non-negative integer"),
            ({"retries": "0"}, "initramfs.variables.retries", "at least 1"),
            ({"prefetch_wait": "2"}, "initramfs.variables.prefetch_wait", "0 or 1"),
            ({"ssh_compression": 2}, "initramfs.variables.ssh_compression", "0 or 1"),
            ({"fuse_background": "0"}, "initramfs.variables.fuse_background", "at least 1"),
            ({"fuse_readahead_kb": "2"}, "initramfs.variables.fuse_readahead_kb", "at least 4"),
            ({"fw_cfg_name": "a b"}, "initramfs.variables.fw_cfg_name", "unexpected characters"),
            ({"vpn_root_default": "relative"}, "initramfs.variables.vpn_root_default", "absolute")):
        with pytest.raises(BuildError) as info:
            InitSettings.from_variables(variables)
        assert info.value.where == where, variables
        assert message in f"{info.value} {info.value.hint}", variables


# ---- config parsing ---------------------------------------------------------------------

@needs_busybox
def test_one_parser_for_bootconf_text(tmp_path: Path) -> None:
    text = ("[all]\r\nBOOT_UART=1\r\n# WALT_VPN_MAC=00:00:00:00:00:00\n[gpio8=0]\n"
            "WALT_VPN_MAC=52:54:00:aa:bb:cc\nWALT_VPN_ROOT=/a b/c=d\nbad key=1\nnot a pair\n"
            "WALT_VPN_USER=first\nWALT_VPN_USER=last\nX=$(touch " + str(tmp_path / "pwned") + ")\n"
            "WALT_VPN_ENTRYPOINT=vpn.example.org:2222")  # no final newline
    result = run_init_functions(tmp_path, 'parse_config; echo "mac=$CFG_WALT_VPN_MAC";'
                                'echo "root=$CFG_WALT_VPN_ROOT"; echo "user=$CFG_WALT_VPN_USER";'
                                'echo "entry=$CFG_WALT_VPN_ENTRYPOINT"; echo "uart=$CFG_BOOT_UART";'
                                'echo "x=$CFG_X"', stdin=text)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "mac=52:54:00:aa:bb:cc" in lines
    assert "root=/a b/c=d" in lines
    assert "user=last" in lines
    assert "entry=vpn.example.org:2222" in lines
    assert "uart=1" in lines
    assert f"x=$(touch {tmp_path / 'pwned'})" in lines  # stored, never evaluated
    assert not (tmp_path / "pwned").exists()


@needs_busybox
def test_config_from_the_blconfig_nvmem(tmp_path: Path) -> None:
    """Pi 5 (facts §3): the nvmem device whose of_node is the node named by the alias."""
    sys_root = tmp_path / "sys"
    base = sys_root / "firmware" / "devicetree" / "base"
    (base / "aliases").mkdir(parents=True)
    (base / "aliases" / "blconfig").write_bytes(b"/reserved-memory/nvram@0\0")
    for name in ("nvram@0", "nvram@1"):
        (base / "reserved-memory" / name).mkdir(parents=True)
    devices = sys_root / "bus" / "nvmem" / "devices"
    for dev, node, text in (("rmem0", "nvram@1", b"WALT_VPN_MAC=wrong\n"),
                            ("rmem1", "nvram@0", b"[all]\nWALT_VPN_MAC=52:54:00:00:00:07\n")):
        (devices / dev).mkdir(parents=True)
        (devices / dev / "of_node").symlink_to(base / "reserved-memory" / node)
        (devices / dev / "nvmem").write_bytes(text + b"\0" * 64)  # the nvmem is padded
    result = run_init_functions(tmp_path, f"SYS={sys_root}; FW_CFG_CONFIG=/nonexistent; "
                                'config=$(read_config_text) || exit 9; '
                                'parse_config <<EOF\n$config\nEOF\n' 'echo "mac=$CFG_WALT_VPN_MAC"')
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["mac=52:54:00:00:00:07"]


@needs_busybox
def test_config_from_fw_cfg_wins(tmp_path: Path) -> None:
    fw_cfg = tmp_path / "raw"
    fw_cfg.write_text("[all]\nWALT_VPN_ROOT=/srv/node\n")
    result = run_init_functions(tmp_path, f"SYS={tmp_path}/nosys; FW_CFG_CONFIG={fw_cfg}; "
                                'config=$(read_config_text) || exit 9; '
                                'parse_config <<EOF\n$config\nEOF\n' 'echo "root=$CFG_WALT_VPN_ROOT"')
    assert result.stdout.splitlines() == ["root=/srv/node"], result.stderr
    missing = run_init_functions(tmp_path, f"SYS={tmp_path}/nosys; FW_CFG_CONFIG=/nonexistent; "
                                 "read_config_text")
    assert missing.returncode == 1


@needs_busybox
@pytest.mark.parametrize(("key", "value", "message"), [
    ("WALT_VPN_MAC", "52:54:00:AA:BB:CC", "WALT_VPN_MAC is not a lowercase MAC address"),
    ("WALT_VPN_ROOT", "relative/path", "WALT_VPN_ROOT must be an absolute path"),
    ("WALT_VPN_BOOT_MODE", "lenient", "WALT_VPN_BOOT_MODE must be enforced or permissive"),
    ("WALT_VPN_ENTRYPOINT", "host:ssh", "WALT_VPN_ENTRYPOINT port is not a number"),
    ("WALT_VPN_CREDS", "", "WALT_VPN_CREDS is missing"),
    # Values that would reach ssh's ProxyCommand/ProxyJump (run through a shell).
    ("WALT_VPN_HTTP_PROXY", "x;sh</dev/console;#:1", "WALT_VPN_HTTP_PROXY host has unexpected characters"),
    ("WALT_VPN_HTTP_PROXY", "proxy.example.org", "WALT_VPN_HTTP_PROXY must be host:port"),
    ("WALT_VPN_HTTP_PROXY", "proxy:80;id", "WALT_VPN_HTTP_PROXY port is not a number"),
    ("WALT_VPN_PROXY_JUMP", "u@h$(id):22", "WALT_VPN_PROXY_JUMP is not [user@]host[:port]"),
    ("WALT_VPN_PROXY_JUMP", "u@h:2x", "WALT_VPN_PROXY_JUMP port is not a number"),
])
def test_bad_config_is_one_fatal_line(tmp_path: Path, key: str, value: str, message: str) -> None:
    good = {"WALT_VPN_MAC": "52:54:00:aa:bb:cc", "WALT_VPN_ENTRYPOINT": "10.0.2.2:22",
            "WALT_VPN_ROOT": "/srv/root", "WALT_VPN_CREDS": "eA==",
            "WALT_VPN_BOOT_MODE": "enforced", key: value}
    text = "\n".join(f"{k}={v}" for k, v in good.items()) + "\n"
    result = run_init_functions(tmp_path, 'fallback() { echo FALLBACK; exit 0; }\n'
                                'parse_config; check_config; echo CONFIG-OK', stdin=text)
    assert result.stdout.splitlines() == [f"walt-vpn: config: {message}: rebooting (enforced mode)",
                                          "FALLBACK"]


@needs_busybox
@pytest.mark.parametrize(("mode", "fallback"), [
    ("enforced", "rebooting (enforced mode)"),
    ("permissive", "dropping to a rescue shell (permissive mode)"),
])
def test_failures_back_off_then_fall_back(tmp_path: Path, mode: str, fallback: str) -> None:
    result = run_init_functions(tmp_path, f'MODE={mode}; fallback() {{ echo FALLBACK; exit 0; }}\n'
                                'while :; do fail "network: no DHCP lease on eth0"; done')
    assert result.stdout.splitlines() == [
        "walt-vpn: network: no DHCP lease on eth0; retrying in 0s (attempt 1/3)",
        "walt-vpn: network: no DHCP lease on eth0; retrying in 0s (attempt 2/3)",
        f"walt-vpn: network: no DHCP lease on eth0; giving up after 3 attempts: {fallback}",
        "FALLBACK",
    ]


@needs_busybox
@pytest.mark.parametrize(("stderr", "line"), [
    ("Host key verification failed.", "presented a host key that is not pinned (refused)"),
    ("walt-vpn@10.0.2.2: Permission denied (publickey).",
     "refused the node certificate (revoked, expired or wrong principal)"),
    ("ssh: connect to host 10.0.2.2 port 22: Connection refused", "unreachable (Connection refused)"),
    ("ssh: connect to host 10.0.2.2 port 22: Connection timed out", "unreachable (timed out)"),
    (("walt-vpn: HTTP proxy p:3128 refused CONNECT to h:22 (HTTP/1.1 403 Forbidden)\n"
      "kex_exchange_identification: Connection closed by remote host"),
     "HTTP proxy p:3128 refused CONNECT to h:22 (HTTP/1.1 403 Forbidden)"),
])
def test_ssh_errors_become_one_line(tmp_path: Path, stderr: str, line: str) -> None:
    (tmp_path / "err").write_text(stderr + "\n")
    result = run_init_functions(tmp_path, f"ENTRY_HOST=10.0.2.2 ENTRY_PORT=22; "
                                f"describe_ssh_error {tmp_path / 'err'}")
    assert result.stdout.splitlines() == [line] or result.stdout.strip().endswith(line)
    assert len(result.stdout.splitlines()) == 1


# ---- credentials ------------------------------------------------------------------------

def test_credentials_round_trip_and_are_reproducible(session_keys: Path) -> None:
    creds = sample_credentials(session_keys)
    packed = pack_credentials(creds)
    assert "\n" not in packed and packed.isascii()
    assert pack_credentials(creds) == packed
    assert unpack_credentials(packed) == creds
    assert b"PRIVATE KEY" not in repr(creds).encode()
    assert creds.certificate.startswith(b"ssh-ed25519-cert-v01@openssh.com ")


@pytest.mark.parametrize("bad", ["not base64!", "aGVsbG8=", ""])
def test_bad_credentials_raise_format_error(bad: str) -> None:
    with pytest.raises(FormatError):
        unpack_credentials(bad)


def test_config_text_rejects_multiline_and_bad_keys() -> None:
    assert vpn_config_text({"WALT_VPN_MAC": "52:54:00:00:00:01"}) == "[all]\nWALT_VPN_MAC=52:54:00:00:00:01\n"
    with pytest.raises(ConfigError):
        vpn_config_text({"WALT_VPN_ROOT": "/a\n/b"})
    with pytest.raises(ConfigError):
        vpn_config_text({"walt vpn": "x"})


@needs_busybox
def test_shell_unpacks_credentials_private_and_silently(tmp_path: Path, session_keys: Path) -> None:
    creds = sample_credentials(session_keys)
    packed = pack_credentials(creds)
    vpn = tmp_path / "vpn"
    vpn.mkdir()
    result = run_init_functions(tmp_path, f'VPN={vpn}; CFG_WALT_VPN_CREDS="$SECRET"; '
                                'unpack_credentials; echo "left=${CFG_WALT_VPN_CREDS:-}"',
                                env={"SECRET": packed})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "left="
    assert packed not in result.stdout + result.stderr
    assert stat.S_IMODE((vpn / "creds").stat().st_mode) == 0o700
    for name, content in (("id_ed25519", creds.private_key), ("known_hosts", creds.known_hosts)):
        path = vpn / "creds" / name
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert path.read_bytes() == content


# ---- against a real sshd (host OpenSSH client, same options as the guest) ------------------

def _ssh_setup(tmp_path: Path, session_keys: Path, sshd: TestSshd, *, known_hosts: str | None = None,
               key_id: str = "vpn_525400000001", extra_env: dict[str, str] | None = None,
               jump: str = "") -> Path:
    """Write creds + the init's ssh_config into a mini-root-like dir; return the config."""
    vpn = tmp_path / "vpn"
    (vpn / "etc" / "ssh").mkdir(parents=True)
    creds = sample_credentials(session_keys, known_hosts or sshd.known_hosts_line("127.0.0.1"),
                               key_id)
    env = {"SECRET": pack_credentials(creds), **(extra_env or {})}
    body = (f'VPN={vpn}; CFG_WALT_VPN_CREDS="$SECRET"; CTL={tmp_path}/ctl; '
            f'ENTRY_HOST=127.0.0.1; ENTRY_PORT={sshd.port}; USER=walt-vpn; '
            f'CFG_WALT_VPN_PROXY_JUMP={jump}; '
            'CFG_WALT_VPN_HTTP_PROXY=${PROXY:-}; unpack_credentials; write_ssh_config')
    result = run_init_functions(tmp_path, body, env=env)
    assert result.returncode == 0, result.stderr
    config = vpn / "etc" / "ssh" / "ssh_config"
    text = config.read_text().replace("/creds/", f"{vpn}/creds/").replace(
        "/bin/vpn-http-connect", f"{BUSYBOX} sh {tmp_path}/initroot/bin/vpn-http-connect")
    config.write_text(text)
    return config


# The gate (the test sshd's forced command) answers an SFTP INIT with VERSION 3: proof that
# the certificate was accepted and the session reached the gate, with no server needed.
SFTP_INIT = "\x00\x00\x00\x05\x01\x00\x00\x00\x03"
SFTP_VERSION = "\x02\x00\x00\x00\x03"  # after the length: VERSION, 3


def _ssh(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ssh", "-F", str(config), *args, "walt-vpn-entrypoint",
                           "/usr/lib/openssh/sftp-server"], input=SFTP_INIT,
                          capture_output=True, text=True, encoding="latin-1", timeout=60,
                          check=False)


@pytest.fixture
def sshd(tmp_path: Path, session_keys: Path) -> Iterator[TestSshd]:
    if os.geteuid() != 0:
        pytest.skip("the test sshd needs root")
    server = TestSshd(tmp_path / "sshd", ca_public_key=(session_keys / "ssh-ca.pub").read_text())
    with server:
        yield server


@pytest.mark.slow
def test_certificate_login_with_pinned_host_key(tmp_path: Path, session_keys: Path,
                                                sshd: TestSshd) -> None:
    config = _ssh_setup(tmp_path, session_keys, sshd)
    result = _ssh(config)
    assert result.returncode == 0, result.stderr
    assert result.stdout[4:9] == SFTP_VERSION


@pytest.mark.slow
def test_connection_is_compressed_unless_switched_off(tmp_path: Path, session_keys: Path,
                                                      sshd: TestSshd) -> None:
    # The root's blocks cross the path zlib-compressed (ssh_compression=1, the default):
    # the real sshd agrees to it in the key exchange, both ways.
    config = _ssh_setup(tmp_path, session_keys, sshd)
    result = _ssh(config, "-v")
    assert result.returncode == 0, result.stderr
    assert result.stdout[4:9] == SFTP_VERSION
    kex = [line for line in result.stderr.splitlines() if "debug1: kex: " in line and "cipher:" in line]
    assert len(kex) == 2 and all("compression: zlib@openssh.com" in line for line in kex), kex
    # walt_vpn.compression=0 (or ssh_compression = 0 in the recipe): no Compression line.
    off = tmp_path / "off"
    (off / "vpn" / "etc" / "ssh").mkdir(parents=True)
    creds = pack_credentials(sample_credentials(session_keys))
    result = run_init_functions(off, f'VPN={off}/vpn; CFG_WALT_VPN_CREDS="$SECRET"; CTL=/x; '
                                'ENTRY_HOST=h; ENTRY_PORT=22; USER=walt-vpn; SSH_COMPRESSION=0; '
                                'unpack_credentials; write_ssh_config', env={"SECRET": creds})
    assert result.returncode == 0, result.stderr
    assert "Compression" not in (off / "vpn" / "etc" / "ssh" / "ssh_config").read_text()
    assert "  Compression yes\n" in config.read_text()
    # On walt-net (DHCP domain walt) the master connection turns it off; elsewhere not.
    for domain, expected in (("walt", True), ("example.org", False), ("", False)):
        result = run_init_functions(off, f'CTL=/x; WANT_TUNNEL=1; DOMAIN={domain}; ssh_master_args')
        assert ("-o Compression=no" in result.stdout) is expected, (domain, result.stdout)


@pytest.mark.slow
def test_wrong_host_key_is_refused(tmp_path: Path, session_keys: Path, sshd: TestSshd) -> None:
    other = TestSshd(tmp_path / "other", ca_public_key="x")
    config = _ssh_setup(tmp_path, session_keys, sshd,
                        known_hosts=other.known_hosts_line("127.0.0.1", sshd.port))
    result = _ssh(config)
    assert result.returncode == 255
    assert "Host key verification failed" in result.stderr


@pytest.mark.slow
def test_revoked_certificate_is_refused(tmp_path: Path, session_keys: Path, sshd: TestSshd) -> None:
    config = _ssh_setup(tmp_path, session_keys, sshd, key_id="vpn_525400000099")
    assert _ssh(config).returncode == 0
    sshd.revoke_key_ids(["vpn_525400000099"])
    result = _ssh(config)
    assert result.returncode == 255
    assert "Permission denied" in result.stderr


class ConnectProxy:
    """A minimal HTTP CONNECT proxy on 127.0.0.1 (allows only `allowed_port`)."""

    def __init__(self, allowed_port: int) -> None:
        self.allowed_port = allowed_port
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.requests: list[str] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(client,), daemon=True).start()

    def _handle(self, client: socket.socket) -> None:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = client.recv(1)
            if not chunk:
                return
            data += chunk
        request = data.split(b"\r\n")[0].decode()
        self.requests.append(request)
        target = request.split()[1]
        _, port = target.rsplit(":", 1)
        if int(port) != self.allowed_port:
            client.sendall(b"HTTP/1.1 403 Forbidden\r\nX-Why: policy\r\n\r\n")
            client.close()
            return
        upstream = socket.create_connection(("127.0.0.1", int(port)))
        client.sendall(b"HTTP/1.1 200 Connection established\r\nProxy-Agent: test\r\n\r\n")

        def pump(a: socket.socket, b: socket.socket) -> None:
            try:
                while chunk := a.recv(65536):
                    b.sendall(chunk)
            except OSError:
                pass
            finally:
                b.close()
        threading.Thread(target=pump, args=(client, upstream), daemon=True).start()
        pump(upstream, client)

    def close(self) -> None:
        self.sock.close()


@pytest.mark.slow
@needs_busybox
def test_http_connect_proxy_helper(tmp_path: Path, session_keys: Path, sshd: TestSshd) -> None:
    proxy = ConnectProxy(sshd.port)
    try:
        config = _ssh_setup(tmp_path, session_keys, sshd,
                            extra_env={"PROXY": f"127.0.0.1:{proxy.port}"})
        assert f"ProxyCommand {BUSYBOX} sh" in config.read_text()
        result = _ssh(config)
        assert result.returncode == 0, result.stderr
        assert result.stdout[4:9] == SFTP_VERSION
        assert proxy.requests == [f"CONNECT 127.0.0.1:{sshd.port} HTTP/1.1"]
        proxy.allowed_port = 1  # now the proxy refuses: one clear line from the helper
        result = _ssh(config)
        assert result.returncode == 255
        assert (f"walt-vpn: HTTP proxy 127.0.0.1:{proxy.port} refused CONNECT to "
                f"127.0.0.1:{sshd.port} (HTTP/1.1 403 Forbidden)") in result.stderr
    finally:
        proxy.close()


@pytest.mark.slow
def test_sftp_requests_are_counted(tmp_path: Path, session_keys: Path, sshd: TestSshd) -> None:
    export = tmp_path / "export"
    export.mkdir()
    (export / "a.txt").write_text("A" * 5000)
    config = _ssh_setup(tmp_path, session_keys, sshd)
    batch = tmp_path / "batch"
    batch.write_text(f"-ls {export}/.sentinel-1\nget {export}/a.txt {tmp_path}/copy\n"
                     f"-ls {export}/.sentinel-2\n")
    result = subprocess.run(["sftp", "-F", str(config), "-b", str(batch), "walt-vpn-entrypoint"],
                            capture_output=True, text=True, timeout=60, check=False)
    assert (tmp_path / "copy").read_text() == "A" * 5000, result.stderr
    text = sshd.sftp_log.read_text()
    between = sftp_stats_between(text, "/.sentinel-1", "/.sentinel-2")
    assert between.requests["OPEN"] == 1 and between.requests["READ"] >= 1
    assert between.bytes_out > 5000
    assert parse_sftp_log(text).requests["INIT"] == 1
    with pytest.raises(subprocess.CalledProcessError):  # read-only export (the gate's SFTP)
        batch.write_text(f"put {batch} {export}/new\n")
        subprocess.run(["sftp", "-F", str(config), "-b", str(batch), "walt-vpn-entrypoint"],
                       capture_output=True, timeout=60, check=True)
    assert not (export / "new").exists()


@pytest.mark.slow
def test_proxy_jump_through_the_entrypoint(tmp_path: Path, session_keys: Path, sshd: TestSshd) -> None:
    ca_pub = (session_keys / "ssh-ca.pub").read_text()
    with TestSshd(tmp_path / "jump", ca_public_key=ca_pub,
                  forward_to=f"127.0.0.1:{sshd.port}") as jump:
        pinned = sshd.known_hosts_line("127.0.0.1") + jump.known_hosts_line("127.0.0.1")
        config = _ssh_setup(tmp_path, session_keys, sshd, known_hosts=pinned,
                            jump=f"walt-vpn@127.0.0.1:{jump.port}")
        assert "ProxyJump walt-vpn-jump" in config.read_text()
        result = _ssh(config)
        assert result.returncode == 0, result.stderr
        assert result.stdout[4:9] == SFTP_VERSION
        assert "Accepted publickey for walt-vpn" in jump.log_text()
        # The jump host's key is pinned too: an unpinned jump host is refused.
        (tmp_path / "vpn" / "creds" / "known_hosts").write_text(sshd.known_hosts_line("127.0.0.1"))
        refused = _ssh(config)
        assert refused.returncode == 255
        assert "Host key verification failed" in refused.stderr
