#!/usr/bin/env python3
"""Benchmark: the fwbuild server vs nginx serving the same boot.img on loopback.

Makes a ~30 MB boot.img, starts `fwbuild serve` (a real process, per-node path
`/walt-vpn/node/<mac>/boot.img`, so each request is also recorded in its database) and
nginx (`nginx-light`, installed with apt-get when missing; private prefix and config,
127.0.0.1 only), then fetches the file with 1, 16 and 64 concurrent keep-alive clients
(a bounded number of requests each; the client runs in several processes and discards
the bytes with recv_into). Prints requests/s and MB/s for both and the ratio.

    python3 bench/serve.py [--size-mb 30] [--requests-per-client 6] [--levels 1,16,64]
"""

from __future__ import annotations

import argparse
import hashlib
import multiprocessing
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
MAC12 = "dca632b3e4c5"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"{what} exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    sys.exit(f"{what} did not start")


def ensure_nginx() -> str:
    found = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists()
                                      else None)
    if found:
        return found
    print("nginx not found: installing nginx-light with apt-get", file=sys.stderr)
    subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", "nginx-light"],
                   check=True, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    return shutil.which("nginx") or "/usr/sbin/nginx"


def make_boot_img(path: Path, size: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    block = hashlib.sha512(b"bench").digest() * (1 << 14)  # 1 MiB
    with open(path, "wb") as handle:
        left = size
        while left:
            handle.write(block[:min(left, len(block))])
            left -= min(left, len(block))


def start_fwbuild(work: Path, artifacts: Path) -> tuple[subprocess.Popen[bytes], int]:
    sys.path.insert(0, str(ROOT))
    from fwbuild.keys import init_keys

    init_keys(work / "keys")
    port, admin = free_port(), free_port()
    config = work / "server.toml"
    config.write_text(f"""
[server]
listen = "127.0.0.1"
port = {port}
hostname = "bench"
artifacts = "{artifacts}"
state_dir = "{work / 'state'}"
keys_dir = "{work / 'keys'}"
enrollment_subnets = ["127.0.0.0/8"]
node_root = "/srv/nodes/{{mac12}}"

[entrypoints]
http = "boot.example.org"
ssh = "vpn.example.org"
ssh_host_keys = ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl"]

[admin]
port = {admin}
""")
    with open(work / "fwbuild-server.log", "wb") as log:  # the child keeps its own copy
        proc = subprocess.Popen([sys.executable, "-c", "from fwbuild.cli import main; main()",
                                 "serve", "--config", str(config)], stdout=log,
                                stderr=subprocess.STDOUT, cwd=ROOT)
    wait_port(port, proc, "fwbuild serve")
    body = f"mac={MAC12}".encode()
    urllib.request.urlopen(urllib.request.Request(
        f"http://127.0.0.1:{port}/walt-vpn/enroll", data=body, method="POST"), timeout=60).read()
    return proc, port


def start_nginx(work: Path, artifacts: Path) -> tuple[subprocess.Popen[bytes], int]:
    binary = ensure_nginx()
    port = free_port()
    prefix = work / "nginx"
    (prefix / "tmp").mkdir(parents=True)
    www = prefix / "www" / "walt-vpn" / "node" / MAC12
    www.mkdir(parents=True)
    os.link(artifacts / "bootimg" / "boot.img", www / "boot.img")
    conf = prefix / "nginx.conf"
    conf.write_text(f"""
user root;
worker_processes auto;
daemon off;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log {prefix}/access.log;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 100000;
    client_body_temp_path {prefix}/tmp/body;
    proxy_temp_path {prefix}/tmp/proxy;
    fastcgi_temp_path {prefix}/tmp/fastcgi;
    uwsgi_temp_path {prefix}/tmp/uwsgi;
    scgi_temp_path {prefix}/tmp/scgi;
    default_type application/octet-stream;
    server {{
        listen 127.0.0.1:{port};
        root {prefix}/www;
        location / {{ }}
    }}
}}
""")
    proc = subprocess.Popen([binary, "-p", str(prefix), "-c", str(conf)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    wait_port(port, proc, "nginx")
    return proc, port


def _client(port: int, path: str, threads: int, count: int, barrier: Any, out: Any) -> None:
    """One client process: `threads` keep-alive connections, `count` requests each."""
    import threading

    request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()
    totals = [0, 0]
    errors: list[str] = []
    lock = threading.Lock()

    def run() -> None:
        buf = bytearray(1 << 20)
        view = memoryview(buf)
        done = nbytes = 0
        try:
            with socket.create_connection(("127.0.0.1", port)) as sock:
                for _ in range(count):
                    sock.sendall(request)
                    head = b""
                    while b"\r\n\r\n" not in head:
                        chunk = sock.recv(4096)
                        if not chunk:
                            raise RuntimeError("connection closed")
                        head += chunk
                    header, _, rest = head.partition(b"\r\n\r\n")
                    if not header.startswith(b"HTTP/1.1 200"):
                        raise RuntimeError(header.split(b"\r\n")[0].decode())
                    length = next(int(line.split(b":")[1]) for line in header.split(b"\r\n")
                                  if line.lower().startswith(b"content-length:"))
                    left = length - len(rest)
                    while left > 0:
                        got = sock.recv_into(view[:min(left, len(buf))])
                        if not got:
                            raise RuntimeError("short body")
                        left -= got
                    done += 1
                    nbytes += length
        except (OSError, RuntimeError) as exc:
            with lock:
                errors.append(str(exc))
        with lock:
            totals[0] += done
            totals[1] += nbytes

    workers = [threading.Thread(target=run) for _ in range(threads)]
    barrier.wait()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    out.put((totals[0], totals[1], errors))


def measure(port: int, path: str, clients: int, per_client: int) -> tuple[float, float]:
    nprocs = min(clients, 4)
    split = [clients // nprocs + (1 if i < clients % nprocs else 0) for i in range(nprocs)]
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(nprocs + 1)
    out = ctx.Queue()
    procs = [ctx.Process(target=_client, args=(port, path, n, per_client, barrier, out))
             for n in split]
    for proc in procs:
        proc.start()
    barrier.wait()
    start = time.perf_counter()
    results = [out.get(timeout=600) for _ in procs]
    elapsed = time.perf_counter() - start
    for proc in procs:
        proc.join()
    errors = [e for r in results for e in r[2]]
    if errors:
        sys.exit(f"client errors: {errors[:3]}")
    requests = sum(r[0] for r in results)
    nbytes = sum(r[1] for r in results)
    return requests / elapsed, nbytes / elapsed / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=float, default=30)
    parser.add_argument("--requests-per-client", type=int, default=0,
                        help="default: about 2 GB of transfer per level, at least 2 each")
    parser.add_argument("--levels", default="1,16,64")
    args = parser.parse_args()
    size = int(args.size_mb * 1024 * 1024)
    levels = [int(x) for x in args.levels.split(",")]
    with tempfile.TemporaryDirectory(prefix="fwbuild-bench-") as tmp:
        work = Path(tmp)
        artifacts = work / "out"
        make_boot_img(artifacts / "bootimg" / "boot.img", size)
        fw_proc, fw_port = start_fwbuild(work, artifacts)
        ng_proc, ng_port = start_nginx(work, artifacts)
        servers = {"fwbuild": (fw_port, fw_proc), "nginx": (ng_port, ng_proc)}
        path = f"/walt-vpn/node/{MAC12}/boot.img"
        print(f"boot.img {size / 1e6:.1f} MB, loopback, {os.cpu_count()} CPUs "
              f"(client and servers share them)")
        print(f"{'clients':>7} {'server':>8} {'req/s':>9} {'MB/s':>9}   ratio fwbuild/nginx")
        try:
            for clients in levels:
                per_client = args.requests_per_client or max(
                    2, int(2e9 / size / clients))
                figures = {}
                for name, (port, _) in servers.items():
                    measure(port, path, clients, 1)  # warm-up (page cache, digest cache)
                    figures[name] = measure(port, path, clients, per_client)
                for name, (rps, mbs) in figures.items():
                    print(f"{clients:>7} {name:>8} {rps:>9.1f} {mbs:>9.1f}", flush=True)
                ratio = figures["fwbuild"][1] / figures["nginx"][1]
                print(f"{clients:>7} {'':>8} {'':>9} {'':>9}   {ratio:.2f}", flush=True)
        finally:
            for _, proc in servers.values():
                proc.send_signal(signal.SIGTERM)
                proc.wait(60)


if __name__ == "__main__":
    main()
