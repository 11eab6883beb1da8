"""A real OpenSSH server for tests and demos of the VPN boot client.

`TestSshd` starts `/usr/sbin/sshd` with its own configuration, host key, port,
`RevokedKeys` file and the `walt-vpn` user's authorized_keys line that
`fwbuild entrypoint ssh` generates (fwbuild.sshgate, one place): node certificates of
the site's SSH CA get their tunnel and the SSH gate (server.gate) as forced command, with
`ExposeAuthInfo yes`. Or, with `forward_to`, the line of a separate entrypoint host that
only relays to the server's sshd (ProxyJump). It runs in a
private mount namespace where `/etc/passwd`, `/etc/group` and `/etc/shadow` are
bind-mounted copies that add the VPN user, so nothing on the host changes.
Optionally it runs inside a network namespace the caller created (latency
benchmarks, server-side tap devices): a forwarder then relays connections from
a port on the host's 127.0.0.1 into the namespace's loopback (`python3 -m
fwbuild.virtual.forwarder`, a program of its own).

SFTP is the gate's own read-only server confined to `gate_root`; it writes one line
per SFTP packet to `sftp.log`, so tests can count requests and bytes. sshd's other
settings stay at stock values (TCP forwarding allowed): the authorized_keys line is
what closes the other doors.

Needs root (sshd, mount namespaces); `ToolError` otherwise.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from ..errors import ToolError
from ..fsutil import atomic_write
from ..sshgate import forwarder_line, gate_command, gate_line

# The directory holding the `server` package (the gate runs as `python3 -m server.gate`).
SOURCE_ROOT = Path(__file__).resolve().parents[2]
NO_ADMIN = "http://127.0.0.1:9"  # discard port: eeprom-* answer "server unreachable"

SSHD = "/usr/sbin/sshd"
SFTP_SERVER_CANDIDATES = ("/usr/lib/openssh/sftp-server", "/usr/libexec/openssh/sftp-server",
                          "/usr/libexec/sftp-server")

# SFTP packet types (draft-ietf-secsh-filexfer-02), for readable statistics (server/sftp.py logs).
SFTP_TYPES = {
    1: "INIT", 2: "VERSION", 3: "OPEN", 4: "CLOSE", 5: "READ", 6: "WRITE", 7: "LSTAT",
    8: "FSTAT", 9: "SETSTAT", 10: "FSETSTAT", 11: "OPENDIR", 12: "READDIR", 13: "REMOVE",
    14: "MKDIR", 15: "RMDIR", 16: "REALPATH", 17: "STAT", 18: "RENAME", 19: "READLINK",
    20: "SYMLINK", 101: "STATUS", 102: "HANDLE", 103: "DATA", 104: "NAME", 105: "ATTRS",
    200: "EXTENDED", 201: "EXTENDED_REPLY",
}


@dataclass(frozen=True)
class SftpStats:
    """SFTP traffic seen by the server: requests by type, bytes each way."""

    requests: Counter[str]
    bytes_in: int  # client -> server (packets, framing included)
    bytes_out: int  # server -> client

    @property
    def total_requests(self) -> int:
        return sum(self.requests.values())

    @property
    def total_bytes(self) -> int:
        return self.bytes_in + self.bytes_out


def parse_sftp_log(text: str) -> SftpStats:
    """Statistics from the relay's log lines (incomplete trailing lines are ignored)."""
    requests: Counter[str] = Counter()
    bytes_in = bytes_out = 0
    for line in text.splitlines():
        parts = line.split()
        if len(parts) not in (3, 4) or parts[0] not in ("C", "S"):
            continue
        kind, length = int(parts[1]), int(parts[2])
        if parts[0] == "C":
            requests[SFTP_TYPES.get(kind, str(kind))] += 1
            bytes_in += length
        else:
            bytes_out += length
    return SftpStats(requests, bytes_in, bytes_out)


def sftp_stats_between(text: str, first: str, second: str | None = None) -> SftpStats:
    """Statistics of the log lines after the request naming path `first` and before the
    one naming `second` (end of log when None): what a guest did between two sentinels."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.endswith(first)), None)
    if start is None:
        raise ToolError(f"sentinel {first} not found in the SFTP log")
    end = len(lines)
    if second is not None:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].endswith(second)),
                   None) or len(lines)
    return parse_sftp_log("\n".join(lines[start + 1:end]))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _find_sftp_server() -> str:
    for candidate in SFTP_SERVER_CANDIDATES:
        if os.access(candidate, os.X_OK):
            return candidate
    raise ToolError("sftp-server not found", ", ".join(SFTP_SERVER_CANDIDATES),
                    "install openssh-server (scripts/apt-packages.txt)")


def _passwd_with(path: str, line: str) -> str:
    text = Path(path).read_text() if Path(path).exists() else ""
    name = line.split(":", 1)[0] + ":"
    kept = [entry for entry in text.splitlines() if not entry.startswith(name)]
    return "\n".join([*kept, line]) + "\n"


class TestSshd:
    """A running sshd; use as a context manager (stops and cleans up on exit)."""

    __test__ = False  # not a pytest test class

    def __init__(self, workdir: Path, *, ca_public_key: str, user: str = "walt-vpn",
                 permit_tunnel: bool = False, netns: bool = False, added_rtt_ms: int = 0,
                 port: int | None = None, gate_root: str = "/", gate_admin: str = NO_ADMIN,
                 forward_to: str | None = None) -> None:
        """`gate_root`: the node_root template the gate confines SFTP to ({mac12});
        `gate_admin`: the server's admin API (eeprom-digest, eeprom-image);
        `forward_to` ("host:port"): be a separate entrypoint host relaying to that sshd.
        `netns`: run sshd in a network namespace of its own (created and deleted
        here), reached through a forwarder on the host's 127.0.0.1:`port`; needed for
        `added_rtt_ms` (netem on the namespace's loopback, or the forwarder's delay
        line when the kernel has no netem) and keeps server-side tap devices off the host.
        """
        if added_rtt_ms and not netns:
            raise ToolError("added latency needs the sshd in its own network namespace",
                            hint="pass netns=True")
        self.workdir = workdir
        self.user = user
        self.ca_public_key = ca_public_key.strip()
        self.permit_tunnel = permit_tunnel
        self.gate_root = gate_root
        self.gate_admin = gate_admin
        self.forward_to = forward_to
        self.netns = f"fwbuild-sshd-{os.getpid()}-{free_port()}" if netns else None
        self.added_rtt_ms = added_rtt_ms
        self.latency_method = "none"
        self._auto_port = port is None and not netns  # another port if this one is taken
        self.port = port or free_port()  # on the host's 127.0.0.1
        self.inner_port = 22 if netns else self.port
        self.sftp_log = workdir / "sftp.log"
        self.sshd_log = workdir / "sshd.log"
        self.revoked = workdir / "revoked_keys"
        self.authorized_keys = workdir / "authorized_keys"
        self._procs: list[subprocess.Popen[bytes]] = []
        host_key = ed25519.Ed25519PrivateKey.generate()
        self._host_key_pem = host_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption())
        self.host_public_key = host_key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()

    # -- files ---------------------------------------------------------------------------
    def known_hosts_line(self, host: str, port: int | None = None) -> str:
        """The pinned host key line, `[host]:port keytype base64` (port 22: bare host)."""
        port = self.port if port is None else port
        name = host if port == 22 else f"[{host}]:{port}"
        return f"{name} {self.host_public_key}\n"

    def _write_files(self) -> Path:
        w = self.workdir
        w.mkdir(parents=True, exist_ok=True)
        os.chmod(w, 0o755)
        home = w / "home"
        home.mkdir(exist_ok=True)
        atomic_write(w / "ssh_host_ed25519_key", self._host_key_pem, 0o600)
        atomic_write(w / "ca.pub", (self.ca_public_key + "\n").encode())
        if not self.revoked.exists():
            atomic_write(self.revoked, b"")
        self.write_authorized_keys()
        # uid 0: the server side of a tap tunnel needs CAP_NET_ADMIN, and pytest's
        # temporary directories (0700) must stay readable; the gate's SFTP is read-only.
        uid = 0
        atomic_write(w / "passwd", _passwd_with(
            "/etc/passwd", f"{self.user}:x:{uid}:{uid}:fwbuild vpn:{home}:/bin/sh").encode())
        # Only the VPN user: sshd needs no other shadow entry, and host hashes stay put.
        atomic_write(w / "shadow", f"{self.user}:*:19000:0:99999:7:::\n".encode(), 0o640)
        config = "\n".join([
            f"Port {self.inner_port}",
            "ListenAddress 127.0.0.1",
            f"HostKey {w / 'ssh_host_ed25519_key'}",
            f"PidFile {w / 'sshd.pid'}",
            f"RevokedKeys {self.revoked}",
            f"AuthorizedKeysFile {self.authorized_keys}",
            "StrictModes no",  # the file lives in a test directory, not ~/.ssh
            "ExposeAuthInfo yes",
            "PubkeyAuthentication yes",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "UsePAM no",
            "PermitRootLogin prohibit-password",
            f"AllowUsers {self.user}",
            f"PermitTunnel {'ethernet' if self.permit_tunnel else 'no'}",
            "AllowTcpForwarding yes",  # stock default: authorized_keys decides
            "X11Forwarding no",
            "MaxStartups 100",
            "LogLevel VERBOSE",
            # Stock subsystem line: with a forced command sshd only passes it to the gate
            # as SSH_ORIGINAL_COMMAND.
            f"Subsystem sftp {_find_sftp_server()}",
            "",
        ])
        atomic_write(w / "sshd_config", config.encode())
        return w / "sshd_config"

    def write_authorized_keys(self) -> None:
        """(Re)write the walt-vpn line from the gate settings; sshd rereads it per login."""
        if self.forward_to:
            host, _, port = self.forward_to.rpartition(":")
            line = forwarder_line(self.ca_public_key, host.strip("[]"), int(port))
        else:
            line = gate_line(self.ca_public_key, gate_command(
                sys.executable, self.gate_admin, self.gate_root, pythonpath=str(SOURCE_ROOT),
                sftp_log=str(self.sftp_log)))
        atomic_write(self.authorized_keys, line.encode())

    def set_gate(self, *, root: str | None = None, admin: str | None = None) -> None:
        """Change what the gate confines to / asks (e.g. once the server's port is known)."""
        self.gate_root = root if root is not None else self.gate_root
        self.gate_admin = admin if admin is not None else self.gate_admin
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.write_authorized_keys()

    # -- lifecycle -----------------------------------------------------------------------
    def _sshd_argv(self, config: Path) -> list[str]:
        w = self.workdir
        script = (
            # A private /run (sshd's privilege separation directory) and passwd/shadow
            # with the VPN user: visible to this sshd only.
            "set -e; mount -t tmpfs -o mode=0755 fwbuild-sshd /run; mkdir -m 0755 /run/sshd; "
            f"mount --bind {w / 'passwd'} /etc/passwd; "
            f"mount --bind {w / 'shadow'} /etc/shadow; "
            f"{SSHD} -t -f {config}; exec {SSHD} -D -e -f {config}"
        )
        argv = ["unshare", "--mount", "--propagation", "private", "sh", "-c", script]
        return ["ip", "netns", "exec", self.netns, *argv] if self.netns else argv

    def start(self) -> Self:
        if os.geteuid() != 0:
            raise ToolError("the test sshd needs root", hint="run the VPN boot tests as root")
        for attempt in range(5):
            try:
                self._start()
                return self
            except ToolError:
                self.stop()
                taken = "Address already in use" in self.log_text()
                if not (taken and self._auto_port and attempt < 4):
                    raise
                # free_port() raced with another process: pick another one.
                self.port = self.inner_port = free_port()
                self.sshd_log.write_bytes(b"")
            except BaseException:
                self.stop()
                raise
        return self

    def _start(self) -> None:
        config = self._write_files()
        forwarder_delay_ms = 0
        if self.netns:
            self._run(["ip", "netns", "add", self.netns])
            self._run(["ip", "netns", "exec", self.netns, "ip", "link", "set", "lo", "up"])
            if self.added_rtt_ms:
                # netem on lo delays both directions: half the added round trip each.
                netem = subprocess.run(
                    ["ip", "netns", "exec", self.netns, "tc", "qdisc", "add", "dev", "lo",
                     "root", "netem", "delay", f"{self.added_rtt_ms / 2}ms"],
                    check=False, capture_output=True)
                if netem.returncode == 0:
                    self.latency_method = "netem"
                else:
                    self.latency_method = "forwarder delay line (no netem in this kernel)"
                    forwarder_delay_ms = self.added_rtt_ms // 2
        with open(self.sshd_log, "ab") as log:
            self._procs.append(subprocess.Popen(self._sshd_argv(config), stdout=log, stderr=log,
                                                stdin=subprocess.DEVNULL))
        if self.netns:
            listener = socket.socket()
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(("127.0.0.1", self.port))
            listener.listen(64)
            # fwbuild.virtual.forwarder, from this source tree (SOURCE_ROOT first on the path).
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(
                p for p in (str(SOURCE_ROOT), os.environ.get("PYTHONPATH", "")) if p)}
            fwd = subprocess.Popen(
                ["ip", "netns", "exec", self.netns, sys.executable, "-m", "fwbuild.virtual.forwarder",
                 str(listener.fileno()), str(self.inner_port), str(forwarder_delay_ms)],
                pass_fds=[listener.fileno()], stdin=subprocess.DEVNULL, env=env)
            listener.close()
            self._procs.append(fwd)
        self._wait_ready()

    def _wait_ready(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._procs[0].poll() is not None:
                raise ToolError("sshd exited at start", str(self.sshd_log),
                                self.sshd_log.read_text(errors="replace")[-500:])
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                    sock.settimeout(2)
                    if sock.recv(4).startswith(b"SSH-"):
                        return
            except OSError:
                pass
            time.sleep(0.1)
        raise ToolError("sshd did not answer in time", str(self.sshd_log))

    def stop(self) -> None:
        for proc in reversed(self._procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self._procs.clear()
        if self.netns:
            subprocess.run(["ip", "netns", "del", self.netns], check=False, capture_output=True)

    @staticmethod
    def _run(argv: list[str]) -> None:
        result = subprocess.run(argv, check=False, capture_output=True, text=True)
        if result.returncode != 0:
            raise ToolError(f"{' '.join(argv)} failed: {result.stderr.strip()}",
                            hint="network namespaces need root and iproute2")

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    # -- revocation and statistics -----------------------------------------------------
    def revoke_key_ids(self, key_ids: list[str]) -> None:
        """Write a KRL revoking these certificate key ids and make sshd reread it."""
        spec = self.workdir / "krl.spec"
        atomic_write(spec, "".join(f"id: {k}\n" for k in key_ids).encode())
        keygen = shutil.which("ssh-keygen") or "ssh-keygen"
        tmp = self.workdir / "revoked_keys.new"
        result = subprocess.run([keygen, "-k", "-f", tmp, "-s", self.workdir / "ca.pub", spec],
                                check=False, capture_output=True, text=True)
        if result.returncode != 0:
            raise ToolError(f"ssh-keygen -k failed: {result.stderr.strip()}", str(spec))
        os.replace(tmp, self.revoked)
        # sshd reads RevokedKeys at each authentication; no reload needed.

    def run_in_netns(self, argv: list[str]) -> subprocess.CompletedProcess[str]:
        """Run a command in sshd's network namespace (e.g. configure a tunnel's tap)."""
        if not self.netns:
            raise ToolError("this sshd has no network namespace of its own", hint="pass netns=True")
        return subprocess.run(["ip", "netns", "exec", self.netns, *argv], check=False,
                              capture_output=True, text=True)

    def drop_sessions(self) -> list[int]:
        """Kill this sshd's per-connection processes (its children, by pid): clients see
        their sessions drop while the listener keeps accepting. Returns the pids."""
        if not self._procs:
            return []
        parent = self._procs[0].pid  # unshare, sh and ip-netns exec all exec: this is sshd
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == parent:
                pids.append(int(entry.name))
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return pids

    def sftp_stats(self) -> SftpStats:
        text = self.sftp_log.read_text() if self.sftp_log.exists() else ""
        return parse_sftp_log(text)

    def log_text(self) -> str:
        return self.sshd_log.read_text(errors="replace") if self.sshd_log.exists() else ""
