"""200 concurrent enrollments against a real `fwbuild serve` process, and a SIGKILL in the
middle of the load: the restarted server finds a consistent database."""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from server.certs import load_certificate
from tests.server_support import (
    Reply,
    copy_keys,
    enroll,
    make_artifacts,
    node_ip,
    request,
    write_config,
)

pytestmark = pytest.mark.slow
COUNT = 200


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServerProcess:
    def __init__(self, config: Path, port: int, log: Path) -> None:
        self.port = port
        self._log = open(log, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from fwbuild.cli import main; main()", "serve", "--config",
             str(config), "--log-level", "warning"], stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, log.read_text()
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    return
            except OSError:
                time.sleep(0.1)
        raise AssertionError("server did not start")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        code = self.proc.wait(60)
        self._log.close()
        return code


@pytest.fixture
def env(tmp_path: Path, session_keys: Path) -> Iterator[dict[str, Any]]:
    port = _free_port()
    config = write_config(tmp_path / "server.toml", artifacts=make_artifacts(tmp_path / "out", 8192),
                          state=tmp_path / "state", keys=copy_keys(session_keys, tmp_path / "keys"),
                          port=port, admin_port=_free_port())
    yield {"config": config, "port": port, "db": tmp_path / "state" / "fwbuild-server.sqlite3",
           "log": tmp_path / "server.log", "ca": session_keys / "ssh-ca.pub"}


def _mac(i: int) -> str:
    return f"dc:a6:32:{(i >> 16) & 0xff:02x}:{(i >> 8) & 0xff:02x}:{i & 0xff:02x}"


def _storm(port: int, count: int, offset: int = 0) -> dict[str, Reply | Exception]:
    """`count` enrollments released at once; outcome per MAC."""
    barrier = threading.Barrier(count)
    results: dict[str, Reply | Exception] = {}
    lock = threading.Lock()

    def one(i: int) -> None:
        mac = _mac(offset + i)
        barrier.wait()
        try:
            outcome: Reply | Exception = enroll(port, mac)
        except Exception as exc:  # noqa: BLE001 - recorded: the server may be killed
            outcome = exc
        with lock:
            results[mac] = outcome

    threads = [threading.Thread(target=one, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    return results


def _ca_public_key(path: Path) -> Any:
    from cryptography.hazmat.primitives.serialization import load_ssh_public_key

    return load_ssh_public_key(path.read_bytes())


def _check_consistent(db: Path) -> dict[str, tuple[str, int]]:
    """Integrity and invariants; returns mac -> (vpn_mac, cert serial)."""
    conn = sqlite3.connect(db)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert conn.execute("PRAGMA foreign_key_check").fetchall() == []
        nodes = conn.execute("SELECT mac, vpn_mac, cert_serial FROM nodes").fetchall()
        assert len({n[1] for n in nodes}) == len(nodes)
        counters = dict(conn.execute("SELECT name, value FROM counters").fetchall())
        serials = [r[0] for r in conn.execute("SELECT serial FROM certificates")]
        if nodes:
            assert counters["cert_serial"] >= max(serials)
            assert counters["vpn_mac"] >= len(nodes)
        for mac, _vpn, serial in nodes:
            owner = conn.execute("SELECT node_mac FROM certificates WHERE serial = ?",
                                 (serial,)).fetchone()
            assert owner == (mac,)
        events = conn.execute("SELECT count(*) FROM events WHERE artifact = 'enroll'").fetchone()
        assert events[0] == len(nodes)  # the event is written in the enrollment transaction
        return {n[0]: (n[1], n[2]) for n in nodes}
    finally:
        conn.close()


def test_200_concurrent_enrollments(env: dict[str, Any]) -> None:
    server = ServerProcess(env["config"], env["port"], env["log"])
    try:
        results = _storm(env["port"], COUNT)
    finally:
        assert server.stop() == 0  # graceful SIGTERM exit
    failures = {m: r for m, r in results.items() if not (isinstance(r, Reply) and r.status == 201)}
    assert not failures, list(failures.items())[:3]
    infos = [r.json() for r in results.values() if isinstance(r, Reply)]
    assert len({i["vpn_mac"] for i in infos}) == COUNT
    assert len({i["serial"] for i in infos}) == COUNT
    ca = _ca_public_key(env["ca"])
    for info in infos:
        cert = load_certificate(info["certificate"])
        cert.verify_cert_signature()
        assert cert.signature_key().public_bytes(*_openssh()) == ca.public_bytes(*_openssh())
        assert cert.key_id == f"vpn_{info['mac'].replace(':', '')}".encode()
        assert cert.serial == info["serial"] and cert.valid_principals == [b"walt-vpn"]
        first = int(info["vpn_mac"].split(":")[0], 16)
        assert first & 0x02 and not first & 0x01  # locally administered unicast
    stored = _check_consistent(env["db"])
    assert len(stored) == COUNT  # no lost write
    for info in infos:
        assert stored[info["mac"].replace(":", "")] == (info["vpn_mac"], info["serial"])


def _openssh() -> tuple[Any, Any]:
    from cryptography.hazmat.primitives import serialization

    return serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH


def test_sigkill_during_load_restarts_consistent(env: dict[str, Any]) -> None:
    server = ServerProcess(env["config"], env["port"], env["log"])
    killer_done = threading.Event()

    def kill_when_busy() -> None:
        # Kill once some enrollments are committed and others are in flight.
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                conn = sqlite3.connect(env["db"], timeout=5)
                done = conn.execute("SELECT count(*) FROM nodes").fetchone()[0]
                conn.close()
            except sqlite3.Error:
                done = 0
            if done >= 40:
                break
            time.sleep(0.02)
        server.proc.send_signal(signal.SIGKILL)
        killer_done.set()

    killer = threading.Thread(target=kill_when_busy)
    killer.start()
    results = _storm(env["port"], COUNT)
    killer.join()
    assert server.stop() == -signal.SIGKILL
    acknowledged = {m.replace(":", ""): r.json() for m, r in results.items()
                    if isinstance(r, Reply) and r.status == 201}
    assert 0 < len(acknowledged) < COUNT
    assert all(isinstance(r, Exception) or r.status in (201,) for r in results.values())

    restarted = ServerProcess(env["config"], env["port"], env["log"])
    try:
        stored = _check_consistent(env["db"])
        for mac12, info in acknowledged.items():  # every acknowledged enrollment survived
            assert stored[mac12] == (info["vpn_mac"], info["serial"])
        # Nodes committed without an answer (killed mid-response) are still complete.
        for mac12 in stored:
            digest = request(env["port"], "GET", f"/walt-vpn/node/{mac12}/eeprom-digest",
                             source=node_ip(mac12))
            assert digest.status == 200 and len(digest.text.strip()) == 64
        # The restarted server goes on allocating fresh VPN MACs and serials.
        more = _storm(env["port"], 20, offset=1000)
        infos = [r.json() for r in more.values() if isinstance(r, Reply) and r.status == 201]
        assert len(infos) == 20
        assert not {i["vpn_mac"] for i in infos} & {v for v, _ in stored.values()}
        assert min(i["serial"] for i in infos) > max(s for _, s in stored.values())
    finally:
        assert restarted.stop() == 0
    assert os.path.exists(env["db"])
    _check_consistent(env["db"])
