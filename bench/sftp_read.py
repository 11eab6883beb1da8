"""SFTP read throughput of the test sshd's SFTP door (what a node's root image is read over).

Starts TestSshd on loopback, issues a node certificate, and reads one file of SIZE MiB with
OpenSSH's `sftp` client (`get FILE /dev/null`) RUNS times; prints MB/s per run and the
median, plus the SFTP requests the server logged. Also runs against an older tree whose
TestSshd has no SSH gate (`sftp-server -R` behind the logging relay) for a before/after.

Usage (as root): python3 bench/sftp_read.py [--size-mib 256] [--runs 5] [--work DIR]
"""

from __future__ import annotations

import argparse
import inspect
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from fwbuild.keys import init_keys, load_ssh_ca
from fwbuild.virtual.sshd import TestSshd, parse_sftp_log
from fwbuild.virtual.vpnboot import issue_node_credentials


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--work", type=Path)
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="fwbuild-sftp-bench-"))
    keys = work / "keys"
    if not (keys / "ssh-ca").exists():
        init_keys(keys)
    export = work / "export"
    export.mkdir(parents=True, exist_ok=True)
    data = export / "root.img"
    if not data.exists() or data.stat().st_size != args.size_mib << 20:
        with open(data, "wb") as out:
            out.writelines(os.urandom(1 << 20) for _ in range(args.size_mib))
    (work / "sshd" / "sftp.log").unlink(missing_ok=True)  # count this run's requests only
    kwargs: dict[str, object] = {}
    gated = "gate_root" in inspect.signature(TestSshd.__init__).parameters
    if gated:
        kwargs["gate_root"] = str(data)
    with TestSshd(work / "sshd", ca_public_key=(keys / "ssh-ca.pub").read_text(), **kwargs) as sshd:  # type: ignore[arg-type]
        creds = issue_node_credentials(load_ssh_ca(keys / "ssh-ca"), "vpn_52540000be0c",
                                       sshd.known_hosts_line("127.0.0.1"))
        node = work / "node"
        node.mkdir(exist_ok=True)
        for name, blob in (("id", creds.private_key), ("id-cert.pub", creds.certificate),
                           ("known_hosts", creds.known_hosts)):
            (node / name).write_bytes(blob)
            (node / name).chmod(0o600)
        batch = node / "batch"
        batch.write_text(f"get {data} /dev/null\n")
        argv = ["sftp", "-F", "/dev/null", "-i", str(node / "id"),
                "-o", f"CertificateFile={node / 'id-cert.pub'}", "-o", "IdentitiesOnly=yes",
                "-o", f"UserKnownHostsFile={node / 'known_hosts'}", "-o", "BatchMode=yes",
                "-P", str(sshd.port), "-b", str(batch), "walt-vpn@127.0.0.1"]
        rates = []
        for run in range(args.runs):
            start = time.monotonic()
            subprocess.run(argv, check=True, capture_output=True)
            elapsed = time.monotonic() - start
            rates.append(args.size_mib * 1.048576 / elapsed)
            print(f"run {run + 1}: {elapsed:.2f} s, {rates[-1]:.0f} MB/s", flush=True)
        stats = parse_sftp_log(sshd.sftp_log.read_text())
    print(f"{'gate (server/sftp.py)' if gated else 'sftp-server -R + relay'}: "
          f"median {statistics.median(rates):.0f} MB/s over {args.runs} reads of "
          f"{args.size_mib} MiB; READ requests {stats.requests['READ']}, "
          f"bytes out {stats.bytes_out}")


if __name__ == "__main__":
    main()
