#!/usr/bin/env python3
"""Benchmark: the fwbuild server (uvicorn + httptools, sendfile) vs nginx on loopback.

Makes a ~30 MB boot.img, starts `fwbuild serve` (a real process under RLIMIT_NOFILE 1024,
per-node path `/walt-vpn/node/<mac>/boot.img` fetched from the node's bound address, so
each whole fetch is also recorded in its database) and nginx (`nginx-light`, installed
with apt-get when missing; private prefix and config, 127.0.0.1 only), then:
- fetches the file with 1, 16 and 64 concurrent keep-alive clients (a bounded number of
  requests each; the client runs in several processes and discards the bytes with
  recv_into) and prints requests/s, MB/s and the ratio fwbuild/nginx;
- keep-alive latency: sequential small GETs on one connection (median and p99, ms);
- idle connections: opens 1000 idle sockets, then times a normal GET beside them.

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
sys.path.insert(0, str(ROOT))

from fwbuild.layout import BOOT_IMG, MANIFEST
from fwbuild.virtual.sharedsite import start_nginx as shared_nginx

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
    (work / "nodes.txt").write_text(f"{MAC12} 127.0.0.1\n")  # the bench client is the node
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
node_addresses = "{work / 'nodes.txt'}"
node_root = "/srv/nodes/{{mac12}}"

[entrypoints]
http = "boot.example.org"
ssh = "vpn.example.org"
ssh_host_keys = ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl"]

[admin]
port = {admin}
""")
    with open(work / "fwbuild-server.log", "wb") as log:  # the child keeps its own copy
        limit = "import resource; resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024)); "
        proc = subprocess.Popen([sys.executable, "-c", limit + "from fwbuild.cli import main; main()",
                                 "serve", "--config", str(config), "--log-level", "warning"],
                                stdout=log,
                                stderr=subprocess.STDOUT, cwd=ROOT)
    wait_port(port, proc, "fwbuild serve")
    body = f"mac={MAC12}".encode()
    urllib.request.urlopen(urllib.request.Request(
        f"http://127.0.0.1:{port}/walt-vpn/enroll", data=body, method="POST"), timeout=60).read()
    return proc, port


def start_nginx(work: Path, artifacts: Path) -> tuple[subprocess.Popen[bytes], int]:
    """nginx serving boot.img as a static file at the node's path (the reference to beat),
    with the entrypoint tests' nginx set-up (fwbuild.virtual.sharedsite.start_nginx)."""
    ensure_nginx()
    port = free_port()
    www = work / "www"
    node = www / "walt-vpn" / "node" / MAC12
    node.mkdir(parents=True)
    os.link(BOOT_IMG.path(artifacts), node / "boot.img")
    (node / "small").write_text("bench\n")
    site = f"server {{\n    listen 127.0.0.1:{port};\n    root {www};\n    location / {{ }}\n}}\n"
    server = shared_nginx(work, site, port, workers=os.cpu_count() or 1)
    return server.proc, port


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


def keepalive_latency(port: int, path: str, count: int = 2000) -> tuple[float, float]:
    """Median and p99 (ms) of sequential GETs of a small resource on one connection."""
    request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()
    times = []
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for _ in range(count):
            t0 = time.perf_counter()
            sock.sendall(request)
            data = b""
            while b"\r\n\r\n" not in data:
                data += sock.recv(65536)
            head, _, body = data.partition(b"\r\n\r\n")
            length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length:"))
            while len(body) < length:
                body += sock.recv(65536)
            times.append((time.perf_counter() - t0) * 1000)
    times.sort()
    return times[len(times) // 2], times[int(len(times) * 0.99)]


def idle_connections(port: int, count: int = 1000) -> tuple[float, int]:
    """(seconds for a GET beside `count` idle sockets, how many of them the server closed)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = count + 256
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(want, soft)), hard))
    idle = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(count)]
    try:
        t0 = time.perf_counter()
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            sock.sendall(b"GET /walt-vpn/server HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            reply = b""
            while chunk := sock.recv(4096):
                reply += chunk
        elapsed = time.perf_counter() - t0
        if not reply.startswith(b"HTTP/1.1 200"):
            sys.exit(f"GET beside idle sockets failed: {reply[:80]!r}")
        closed = 0
        for sock in idle:
            sock.setblocking(False)
            try:
                closed += sock.recv(1) == b""
            except BlockingIOError:
                pass
            except OSError:
                closed += 1
        return elapsed, closed
    finally:
        for sock in idle:
            sock.close()


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
        make_boot_img(BOOT_IMG.path(artifacts), size)
        # A made-up set: marked as built from a virtual recipe so the server accepts it
        # without EEPROM base images (it refuses such a set otherwise: no fake firmware).
        (artifacts / MANIFEST).write_text(
            '{"recipe": {"name": "bench", "target": "virtual"}, "source_date_epoch": 1700000000}\n')
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
            print("keep-alive latency, 2000 sequential GETs on one connection (ms):")
            for name, small in (("fwbuild", "/walt-vpn/server"),
                                ("nginx", f"/walt-vpn/node/{MAC12}/small")):
                median, p99 = keepalive_latency(servers[name][0], small)
                print(f"  {name:>8}: median {median:.3f}  p99 {p99:.3f}", flush=True)
            elapsed, closed = idle_connections(fw_port)
            print(f"idle connections: GET beside 1000 idle sockets (server RLIMIT_NOFILE 1024) "
                  f"answered in {elapsed * 1000:.1f} ms; {closed} idle sockets closed by the "
                  f"server to stay under its connection cap", flush=True)
        finally:
            for _, proc in servers.values():
                proc.send_signal(signal.SIGTERM)
                proc.wait(60)


if __name__ == "__main__":
    main()
