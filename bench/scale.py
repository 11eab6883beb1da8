#!/usr/bin/env python3
"""Benchmark: N simulated nodes booting through one nginx HTTP entrypoint.

Each simulated node opens its own connection from its own loopback address (bound to its
MAC in the servers' node_addresses) and fetches its per-node `boot.sig` then `boot.img`
through nginx, as the Pi 5 bootloader does; C nodes at a time. Set-ups, each with
N = 100 and 1000 (a fresh, empty cache per run):

- `pg+2+cache`: PostgreSQL (a private cluster), two `fwbuild serve` instances, nginx with
  the config `fwbuild entrypoint http --nginx` prints (auth sub-request + cache by digest);
- `sqlite+1+cache`: SQLite and one instance, the same nginx config;
- `sqlite+1+proxy`: SQLite and one instance behind a plain streaming reverse proxy (no
  cache: every boot crosses the server's uplink), the comparison.

Printed per run: server egress (response body bytes the servers sent, summed from their
one-line-per-response logs, and in boot.img units), requests and requests/s at the
servers, requests/s and MB/s delivered by the entrypoint, wall time. Every node enrolls
first (over HTTP, spread over the instances; enrollments/s printed).

    python3 bench/scale.py [--nodes 100,1000] [--size-mb 15] [--concurrency 64]
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import shutil
import sys
import tempfile
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fwbuild.layout import BOOT_IMG, MANIFEST
from fwbuild.virtual.postgres import PrivateCluster
from fwbuild.virtual.sharedsite import (
    Instance,
    Nginx,
    free_port,
    start_instance,
    start_nginx,
)

MAX_NODES = 4096


def mac_of(i: int) -> str:
    return f"dca632{i:06x}"


def ip_of(i: int) -> str:
    return f"127.1.{(i >> 8) & 0xFF}.{i & 0xFF}"


def make_artifacts(directory: Path, size: int) -> Path:
    boot = BOOT_IMG.path(directory)
    boot.parent.mkdir(parents=True)
    block = hashlib.sha512(b"scale").digest() * (1 << 14)  # 1 MiB
    with open(boot, "wb") as handle:
        left = size
        while left:
            handle.write(block[:min(left, len(block))])
            left -= min(left, len(block))
    (directory / MANIFEST).write_text(json.dumps(
        {"source_date_epoch": 1700000000, "recipe": {"name": "scale", "target": "virtual"}}))
    return directory


def plain_proxy_config(instance: Instance, listen: str) -> str:
    """A streaming reverse proxy without cache (what an entrypoint was before)."""
    return f"""server {{
    listen {listen};
    location ^~ /walt-vpn/ {{
        proxy_pass http://127.0.0.1:{instance.port}/walt-vpn/;
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_set_header X-Real-IP $remote_addr;
        proxy_buffering off;
        proxy_read_timeout 300s;
    }}
}}
"""


def cache_config(instances: list[Instance], listen: str, cache_dir: Path) -> str:
    from server.config import Endpoint
    from server.entrypoints import HttpCache, http_entrypoint_config

    return http_entrypoint_config("nginx", tuple(Endpoint("127.0.0.1", i.port)
                                                 for i in instances),
                                  listen, HttpCache(str(cache_dir), "4g"))


def enroll_all(instances: list[Instance], count: int, concurrency: int) -> float:
    def one(i: int) -> None:
        port = instances[i % len(instances)].port
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300,
                                          source_address=(ip_of(i), 0))
        try:
            conn.request("POST", "/walt-vpn/enroll",
                         body=urllib.parse.urlencode({"mac": mac_of(i)}).encode(),
                         headers={"Content-Type": "application/x-www-form-urlencoded"})
            reply = conn.getresponse()
            reply.read()
            if reply.status not in (200, 201):
                raise SystemExit(f"enrollment of {mac_of(i)} failed: {reply.status}")
        finally:
            conn.close()

    t0 = time.monotonic()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, range(count)))
    return count / (time.monotonic() - t0)


def boot_node(port: int, i: int, buffer: bytearray) -> int:
    """One node's boot: boot.sig then boot.img on one connection; body bytes received."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600,
                                      source_address=(ip_of(i), 0))
    received = 0
    view = memoryview(buffer)
    try:
        for name in ("boot.sig", "boot.img"):
            conn.request("GET", f"/walt-vpn/node/{mac_of(i)}/{name}")
            reply = conn.getresponse()
            if reply.status != 200:
                raise SystemExit(f"{name} of node {i}: HTTP {reply.status}")
            while True:
                n = reply.readinto(view)
                if not n:
                    break
                received += n
    finally:
        conn.close()
    return received


def log_mark(instances: list[Instance]) -> list[int]:
    return [i.log.stat().st_size for i in instances]


def server_traffic(instances: list[Instance], marks: list[int]) -> tuple[int, int]:
    """(responses, body bytes) the instances logged since `marks`."""
    requests = sent = 0
    for instance, mark in zip(instances, marks):
        with open(instance.log, "rb") as handle:
            handle.seek(mark)
            for line in handle.read().decode(errors="replace").splitlines():
                if "fwbuild.server.http" not in line or '" ' not in line:
                    continue
                fields = line.rsplit('" ', 1)[1].split()
                if len(fields) >= 2 and fields[0].isdigit() and fields[1].isdigit():
                    requests += 1
                    sent += int(fields[1])
    return requests, sent


def wait_logged(instances: list[Instance], marks: list[int], least: int) -> None:
    deadline = time.monotonic() + 30  # the logs are written after each response
    while time.monotonic() < deadline and server_traffic(instances, marks)[0] < least:
        time.sleep(0.2)


def run(label: str, instances: list[Instance], nginx: Nginx, nodes: int, concurrency: int,
        size: int) -> dict[str, Any]:
    marks = log_mark(instances)
    local = threading.local()

    def one(i: int) -> int:
        if not hasattr(local, "buffer"):
            local.buffer = bytearray(1 << 20)
        return boot_node(nginx.port, i, local.buffer)

    t0 = time.monotonic()
    with ThreadPoolExecutor(concurrency) as pool:
        received = sum(pool.map(one, range(nodes)))
    wall = time.monotonic() - t0
    wait_logged(instances, marks, 1)
    time.sleep(1.0)
    requests, egress = server_traffic(instances, marks)
    result = {"setup": label, "nodes": nodes, "wall_s": round(wall, 2),
              "server_egress_bytes": egress, "server_egress_boot_imgs": round(egress / size, 2),
              "server_requests": requests, "server_req_per_s": round(requests / wall, 1),
              "entrypoint_req_per_s": round(2 * nodes / wall, 1),
              "entrypoint_MB_per_s": round(received / wall / 1e6, 1)}
    print(f"{label:<15} N={nodes:<5} wall {wall:7.2f} s  server egress {egress / 1e6:9.1f} MB "
          f"({result['server_egress_boot_imgs']:7.2f} boot.img)  server {requests:5d} req "
          f"({result['server_req_per_s']:7.1f}/s)  entrypoint {result['entrypoint_req_per_s']:7.1f}"
          f" req/s {result['entrypoint_MB_per_s']:8.1f} MB/s", flush=True)
    return result


def setup_runs(label: str, work: Path, instances: list[Instance], cached: bool,
               counts: list[int], concurrency: int, size: int) -> list[dict[str, Any]]:
    results = []
    for nodes in counts:
        port = free_port()
        run_dir = work / f"{label}-{nodes}"
        run_dir.mkdir()
        config = (cache_config(instances, f"127.0.0.1:{port}", run_dir / "cache") if cached
                  else plain_proxy_config(instances[0], f"127.0.0.1:{port}"))
        nginx = start_nginx(run_dir, config, port)
        try:
            results.append(run(label, instances, nginx, nodes, concurrency, size))
        finally:
            nginx.stop()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", default="100,1000", help="comma-separated node counts")
    parser.add_argument("--size-mb", type=float, default=15, help="boot.img size (MB)")
    parser.add_argument("--concurrency", type=int, default=64, help="nodes booting at once")
    parser.add_argument("--setups", default="pg+2+cache,sqlite+1+cache,sqlite+1+proxy")
    parser.add_argument("--json", action="store_true", help="print the results as JSON too")
    args = parser.parse_args()
    counts = [int(n) for n in args.nodes.split(",")]
    if max(counts) > MAX_NODES:
        raise SystemExit(f"at most {MAX_NODES} nodes")
    size = int(args.size_mb * 1e6)
    from fwbuild.keys import init_keys

    work = Path(tempfile.mkdtemp(prefix="fwbuild-scale-"))
    results: list[dict[str, Any]] = []
    cluster: PrivateCluster | None = None
    try:
        artifacts = make_artifacts(work / "out", size)
        keys = init_keys(work / "keys").directory
        addresses = work / "nodes.txt"
        addresses.write_text("".join(f"{mac_of(i)} {ip_of(i)}\n" for i in range(max(counts))))
        print(f"boot.img {size / 1e6:.1f} MB, {args.concurrency} nodes at a time", flush=True)
        for label in args.setups.split(","):
            database = None
            if label.startswith("pg"):
                cluster = cluster or PrivateCluster(work / "pg")
                database = cluster.create_database(label.replace("+", "_"))
            count = 2 if "+2+" in label else 1
            instances: list[Instance] = []
            try:
                for n in range(count):
                    instances.append(start_instance(
                        work / label, f"i{n}", artifacts=artifacts, keys=keys,
                        database=database, node_addresses=addresses,
                        subnets=("127.0.0.0/8",)))
                rate = enroll_all(instances, max(counts), 16)
                print(f"{label}: {max(counts)} nodes enrolled ({rate:.1f}/s)", flush=True)
                results += setup_runs(label, work, instances, label.endswith("cache"), counts,
                                      args.concurrency, size)
            finally:
                for instance in instances:
                    instance.stop()
        if args.json:
            print(json.dumps(results, indent=2))
    finally:
        if cluster is not None:
            cluster.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
