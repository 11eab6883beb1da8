"""Several `fwbuild serve` processes on loopback sharing one state, behind a real nginx
HTTP entrypoint with its boot image cache (tests/server/test_server_shared.py, bench/scale.py).

Each instance has its own config, state directory (RevokedKeys file, rendered EEPROM
cache) and ports, and the same keys, artifact set and `server.database` (a PostgreSQL
URL, or None: SQLite in its state directory, then one instance only). nginx runs the
configuration `fwbuild entrypoint http --nginx` prints, wrapped in a private nginx.conf.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from fwbuild.errors import ToolError

ROOT = Path(__file__).resolve().parents[2]
HOST_KEY_LINE = ("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9"
                 "GKJl")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes], what: str, log: Path | None = None,
              timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-1500:] if log and log.exists() else ""
            raise ToolError(f"{what} exited with {proc.returncode}: {tail}", what)
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2):
                return
        except OSError:
            time.sleep(0.1)
    raise ToolError(f"{what} did not listen on 127.0.0.1:{port}", what)


@dataclass
class Instance:
    name: str
    proc: subprocess.Popen[bytes]
    port: int
    admin_port: int
    config: Path
    state: Path
    log: Path

    @property
    def revoked_keys(self) -> Path:
        return self.state / "revoked_keys"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def write_config(path: Path, *, artifacts: Path, state: Path, keys: Path, port: int,
                 admin_port: int, database: str | None, node_addresses: Path,
                 subnets: tuple[str, ...] = ("127.0.0.0/9",), ssh: str = "vpn.example.org:2222",
                 host_keys: tuple[str, ...] = (HOST_KEY_LINE,),
                 trusted: tuple[str, ...] = ("127.0.0.1",)) -> Path:
    db_line = f'database = "{database}"\n' if database else ""
    path.write_text(f"""[server]
listen = "127.0.0.1"
port = {port}
hostname = "walt-server"
artifacts = "{artifacts}"
state_dir = "{state}"
keys_dir = "{keys}"
enrollment_subnets = {json.dumps(list(subnets))}
node_root = "/var/lib/walt/nodes/{{mac12}}/fs"
node_addresses = "{node_addresses}"
{db_line}
[entrypoints]
http = "boot.example.org"
ssh = "{ssh}"
ssh_host_keys = {json.dumps(list(host_keys))}
http_trusted = {json.dumps(list(trusted))}

[admin]
listen = "127.0.0.1"
port = {admin_port}
""")
    return path


def start_instance(work: Path, name: str, *, artifacts: Path, keys: Path,
                   database: str | None, node_addresses: Path, log_level: str = "info",
                   **config: object) -> Instance:
    """`fwbuild serve` as its own process (so a test can kill -9 it)."""
    directory = work / name
    directory.mkdir(parents=True, exist_ok=True)
    port, admin_port = free_port(), free_port()
    path = write_config(directory / "server.toml", artifacts=artifacts, state=directory / "state",
                        keys=keys, port=port, admin_port=admin_port, database=database,
                        node_addresses=node_addresses, **config)  # type: ignore[arg-type]
    log = directory / "server.log"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    with open(log, "wb") as handle:  # the child keeps its own copy
        proc = subprocess.Popen(
            [sys.executable, "-c", "from fwbuild.cli import main; main()", "serve", "--config",
             str(path), "--log-level", log_level],
            stdout=handle, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    instance = Instance(name, proc, port, admin_port, path, directory / "state", log)
    try:
        wait_port(port, proc, f"fwbuild serve ({name})", log)
        wait_port(admin_port, proc, f"fwbuild serve ({name}, admin)", log)
    except BaseException:
        instance.stop()
        raise
    return instance


def nginx_binary() -> str | None:
    found = shutil.which("nginx")
    return found or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)


@dataclass
class Nginx:
    proc: subprocess.Popen[bytes]
    port: int
    prefix: Path

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)  # graceful
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def start_nginx(work: Path, site_config: str, port: int, workers: int = 2) -> Nginx:
    """nginx (foreground, private prefix) running `site_config` in its http context."""
    binary = nginx_binary()
    if binary is None:
        raise ToolError("nginx is not installed", "nginx", "apt-get install nginx-light")
    prefix = work / "nginx"
    (prefix / "tmp").mkdir(parents=True, exist_ok=True)
    (prefix / "site.conf").write_text(site_config)
    user = "user root;\n" if os.geteuid() == 0 else ""
    conf = prefix / "nginx.conf"
    conf.write_text(f"""{user}worker_processes {workers};
daemon off;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    log_format fw '$remote_addr "$request" $status $body_bytes_sent '
                  'up=$upstream_bytes_received cache=$upstream_cache_status';
    access_log {prefix}/access.log fw;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 100000;
    client_body_temp_path {prefix}/tmp/body;
    proxy_temp_path {prefix}/tmp/proxy;
    fastcgi_temp_path {prefix}/tmp/fastcgi;
    uwsgi_temp_path {prefix}/tmp/uwsgi;
    scgi_temp_path {prefix}/tmp/scgi;
    default_type application/octet-stream;
    include {prefix}/site.conf;
}}
""")
    check = subprocess.run([binary, "-t", "-p", str(prefix), "-c", str(conf)],
                           capture_output=True, text=True, check=False)
    if check.returncode != 0:
        raise ToolError(f"nginx -t refused the entrypoint config: {check.stderr.strip()}",
                        str(prefix / "site.conf"))
    proc = subprocess.Popen([binary, "-p", str(prefix), "-c", str(conf)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    server = Nginx(proc, port, prefix)
    try:
        wait_port(port, proc, "nginx", prefix / "error.log")
    except BaseException:
        server.stop()
        raise
    return server
