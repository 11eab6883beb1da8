"""Several servers sharing PostgreSQL state, behind a real nginx entrypoint with its cache.

A private PostgreSQL cluster (Debian's `postgresql`), two `fwbuild serve` processes on it
(their own state dirs: RevokedKeys files, EEPROM caches), a real sshd reading the second
instance's RevokedKeys, and nginx running `fwbuild entrypoint http --nginx`'s config.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization

from fwbuild.virtual.postgres import postgres_bindir
from fwbuild.virtual.sharedsite import Instance, free_port, start_instance, start_nginx
from tests.server_support import (
    OUTSIDE,
    bound_test_macs,
    copy_keys,
    enroll,
    make_artifacts,
    node_files,
    node_ip,
    node_ssh,
    request,
    write_ca_sshd_config,
    write_node_addresses,
)

try:
    import psycopg
except ImportError:  # pragma: no cover - the runtime dependency is declared
    psycopg = None  # type: ignore[assignment]

pytestmark = [
    pytest.mark.skipif(postgres_bindir() is None, reason="needs PostgreSQL (apt postgresql)"),
    pytest.mark.skipif(psycopg is None, reason="needs psycopg"),
]
SSHD = shutil.which("sshd") or "/usr/sbin/sshd"
ENROLLMENTS = 200


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from fwbuild.virtual.postgres import PrivateCluster

    with PrivateCluster(tmp_path_factory.mktemp("pg")) as pg:
        yield pg


@pytest.fixture
def site(tmp_path: Path, session_keys: Path, cluster: Any) -> Iterator[dict[str, Any]]:
    """Two instances on one fresh PostgreSQL database (started lazily by `start`)."""
    url = cluster.create_database(f"fw_{os.getpid()}_{time.monotonic_ns()}")
    keys = copy_keys(session_keys, tmp_path / "keys")
    artifacts = make_artifacts(tmp_path / "out", 1024 * 1024 + 5)
    addresses = write_node_addresses(tmp_path / "nodes.txt", bound_test_macs(ENROLLMENTS + 8))
    started: list[Instance] = []

    def start(name: str, **config: Any) -> Instance:
        instance = start_instance(tmp_path, name, artifacts=artifacts, keys=keys, database=url,
                                  node_addresses=addresses, **config)
        started.append(instance)
        return instance

    try:
        yield {"start": start, "url": url, "tmp": tmp_path, "keys": keys,
               "artifacts": artifacts}
    finally:
        for instance in started:
            instance.stop()


def _admin(instance: Instance, path: str, body: dict[str, Any]) -> Any:
    reply = request(instance.admin_port, "POST", path, body=json.dumps(body).encode(),
                    headers={"Content-Type": "application/json"})
    assert reply.status == 200, reply.text
    return reply.json()


def _rows(url: str, sql: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(url) as conn:
        return list(conn.execute(sql).fetchall())


def test_same_schema_and_migrations_as_sqlite(tmp_path: Path, cluster: Any) -> None:
    """One migration list: the same tables and columns in both stores; reopening (a second
    instance starting) migrates nothing twice."""
    import sqlite3

    from server.db import SCHEMA_VERSION, Database
    from server.pgstore import PgDatabase

    url = cluster.create_database("schema_check")
    first, second = PgDatabase(url), PgDatabase(url)
    assert first.schema_version() == second.schema_version() == SCHEMA_VERSION
    assert _rows(url, "SELECT count(*) FROM schema_version") == [(SCHEMA_VERSION,)]
    first.close()
    second.close()
    lite = Database(tmp_path / "s.sqlite3")
    lite.close()
    conn = sqlite3.connect(tmp_path / "s.sqlite3")
    tables = [r[0] for r in conn.execute(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'")]
    want = {t: [r[1] for r in conn.execute(f"PRAGMA table_info({t})")] for t in tables}
    conn.close()
    got: dict[str, list[str]] = {}
    for table, column in _rows(url, "SELECT table_name, column_name FROM "
                                    "information_schema.columns WHERE table_schema = 'public' "
                                    "ORDER BY table_name, ordinal_position"):
        got.setdefault(table, []).append(column)
    assert got == want


def test_bad_database_url_is_one_message(tmp_path: Path, session_keys: Path) -> None:
    from click.testing import CliRunner

    from fwbuild.cli import main
    from fwbuild.virtual.sharedsite import write_config

    config = write_config(tmp_path / "server.toml", artifacts=make_artifacts(tmp_path / "out"),
                          state=tmp_path / "state", keys=copy_keys(session_keys, tmp_path / "k"),
                          port=0, admin_port=0, node_addresses=write_node_addresses(
                              tmp_path / "n.txt", bound_test_macs(4)),
                          database=f"postgresql://nobody:secret@127.0.0.1:{free_port()}/x")
    result = CliRunner().invoke(main, ["serve", "--check", "--config", str(config)])
    assert result.exit_code != 0
    assert "cannot connect to the state database" in result.output
    assert "secret" not in result.output and "Traceback" not in result.output
    config.write_text(config.read_text().replace("postgresql://", "mysql://"))
    result = CliRunner().invoke(main, ["serve", "--check", "--config", str(config)])
    assert result.exit_code == 2 and "server.database" in result.output


def test_every_service_operation_on_postgresql(tmp_path: Path, session_keys: Path,
                                               cluster: Any) -> None:
    """The one SQL code path: what the server and `fwbuild nodes` do, on PostgreSQL."""
    from fwbuild.virtual.sharedsite import write_config
    from server.config import load_config
    from server.db import prune_events
    from server.errors import Conflict, Forbidden
    from server.service import Service

    url = cluster.create_database("operations")
    config = load_config(write_config(
        tmp_path / "server.toml", artifacts=make_artifacts(tmp_path / "out"),
        state=tmp_path / "state", keys=copy_keys(session_keys, tmp_path / "k"), port=0,
        admin_port=0, node_addresses=write_node_addresses(tmp_path / "n.txt",
                                                          bound_test_macs(4)), database=url))
    service = Service(config)
    try:
        first, second = bound_test_macs(2)[:2]
        assert service.enroll(first).serial == 1
        assert service.enroll(second).vpn_mac != service.node(first).vpn_mac
        again = service.enroll(first)  # re-enrollment: new certificate, the old one revoked
        assert again.re_enrolled and again.serial == 3
        assert "revoked" not in service.node(first).state
        service.set_label(first, "rack-1")
        assert service.find("rack-1").mac == first
        with pytest.raises(Conflict):
            service.set_label(second, "rack-1")
        node = service.set_mode(first, "permissive")
        assert node.boot_mode == "permissive" and node.eeprom_digest is not None
        service.revoke(second)
        with pytest.raises(Forbidden):
            service.booting_node(second)
        with pytest.raises(Forbidden):
            service.enroll(second)
        revoked = [line for line in config.revoked_keys_file.read_text().splitlines()
                   if line and not line.startswith("#")]
        assert len(revoked) == 2  # first's old certificate and second's
        service.forget(second)
        assert service.enroll(second).serial == 4
        described = service.describe(service.node(first), events=10)
        assert [c["serial"] for c in described["certificates"]] == [1, 3]
        with service.db.transaction() as conn:
            assert prune_events(conn, 2**40, 100) >= 1  # all older than "now" go
        assert service.db.integrity_check() == "ok"
    finally:
        service.close()


@pytest.mark.slow
def test_200_enrollments_over_two_instances(site: dict[str, Any]) -> None:
    from cryptography.hazmat.primitives.serialization import ssh

    a, b = site["start"]("a"), site["start"]("b")
    macs = bound_test_macs(ENROLLMENTS)

    def one(index: int) -> dict[str, Any]:
        instance = (a, b)[index % 2]
        reply = enroll(instance.port, macs[index])
        assert reply.status == 201, reply.text
        return dict(reply.json())

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(ENROLLMENTS)))
    assert len({r["serial"] for r in results}) == ENROLLMENTS
    assert len({r["vpn_mac"] for r in results}) == ENROLLMENTS
    ca = serialization.load_ssh_public_key((site["keys"] / "ssh-ca.pub").read_bytes())
    for result in results:
        cert = ssh.load_ssh_public_identity(result["certificate"].encode())
        assert isinstance(cert, ssh.SSHCertificate)
        cert.verify_cert_signature()
        assert cert.signature_key().public_bytes(  # type: ignore[union-attr]
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) == \
            ca.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        assert cert.serial == result["serial"]
        assert cert.key_id == f"vpn_{result['mac'].replace(':', '')}".encode()
    url = site["url"]
    assert _rows(url, "SELECT count(*), count(DISTINCT vpn_mac), count(DISTINCT cert_serial) "
                      "FROM nodes") == [(ENROLLMENTS,) * 3]
    assert _rows(url, "SELECT min(serial), max(serial), count(*) FROM certificates") == [
        (1, ENROLLMENTS, ENROLLMENTS)]
    # both instances read the same state
    for mac in (macs[0], macs[1]):
        assert request(a.admin_port, "GET", f"/api/nodes/{mac}").json()["vpn_mac"] == \
            request(b.admin_port, "GET", f"/api/nodes/{mac}").json()["vpn_mac"]




@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0 or not Path(SSHD).exists(),
                    reason="needs root and openssh-server")
def test_revoke_through_one_refused_by_the_others_sshd(site: dict[str, Any]) -> None:
    from fwbuild.virtual.sharedsite import wait_port

    tmp = site["tmp"]
    hostkey = tmp / "ssh_host_ed25519_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(hostkey)],
                   check=True)
    ssh_port = free_port()
    host_line = hostkey.with_suffix(".pub").read_text().split()
    config = {"ssh": f"127.0.0.1:{ssh_port}", "host_keys": (f"{host_line[0]} {host_line[1]}",)}
    a, b = site["start"]("a", **config), site["start"]("b", **config)
    sshd_config = write_ca_sshd_config(tmp, port=ssh_port, hostkey=hostkey,
                                       ca_pub=site["keys"] / "ssh-ca.pub", revoked_keys=b.revoked_keys)
    mac12 = bound_test_macs(1)[0]
    assert enroll(b.port, mac12).status == 201
    files = node_files(b.port, mac12, tmp / "node")
    assert (b.state / "eeprom" / mac12).is_dir()
    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
    with open(tmp / "sshd.log", "wb") as log:
        sshd = subprocess.Popen([SSHD, "-D", "-e", "-f", str(sshd_config)], stdout=log,
                                stderr=subprocess.STDOUT)
        try:
            wait_port(ssh_port, sshd, "sshd")  # type: ignore[arg-type]
            ok = node_ssh(files, ssh_port)
            assert ok.returncode == 0, ok.stderr
            def keys() -> list[str]:
                return [line for line in b.revoked_keys.read_text().splitlines()
                        if line.strip() and not line.startswith("#")]

            assert keys() == []  # nothing revoked yet
            _admin(a, f"/api/nodes/{mac12}/revoke", {})  # through the OTHER instance
            deadline = time.monotonic() + 5.0
            # b's follower rewrites its RevokedKeys on a's NOTIFY; sshd reads it per login
            while True:
                refused = node_ssh(files, ssh_port)
                if refused.returncode == 255:
                    break
                assert time.monotonic() < deadline, \
                    "b's sshd still accepts the node 5 s after the revoke through a"
                time.sleep(0.1)
            assert "Permission denied" in refused.stderr
            assert len(keys()) == 1
            # b's rendered image of the node (made when it fetched pieeprom.bin) goes too
            cached = b.state / "eeprom" / mac12
            while cached.exists():
                assert time.monotonic() < deadline + 25, "b keeps the revoked node's image"
                time.sleep(0.1)
        finally:
            sshd.terminate()
            sshd.wait(10)
    assert b"revoked" in (tmp / "sshd.log").read_bytes()
    # b serves the node's boot paths as revoked too
    assert request(b.port, "GET", f"/walt-vpn/node/{mac12}/boot.sig").status == 403


@pytest.mark.slow
def test_mode_change_through_one_served_by_the_other(site: dict[str, Any]) -> None:
    a, b = site["start"]("a"), site["start"]("b")
    mac12 = bound_test_macs(3)[2]
    assert enroll(a.port, mac12).status == 201
    before = request(b.port, "GET", f"/walt-vpn/node/{mac12}/eeprom-digest",
                     source=node_ip(mac12)).text.strip()
    assert request(b.port, "GET", "/walt-vpn/node-conf/boot-mode",
                   source=node_ip(mac12)).text == "enforced"
    _admin(a, f"/api/nodes/{mac12}/mode", {"mode": "permissive"})
    assert request(b.port, "GET", "/walt-vpn/node-conf/boot-mode",
                   source=node_ip(mac12)).text == "permissive"
    image = request(b.port, "GET", f"/walt-vpn/node/{mac12}/pieeprom.bin",
                    source=node_ip(mac12)).body
    digest = hashlib.sha256(image).hexdigest()
    assert digest != before
    assert digest == request(a.admin_port, "GET",
                             f"/api/nodes/{mac12}/eeprom-digest").text.strip()
    assert request(b.admin_port, "GET", f"/api/nodes/{mac12}").json()["boot_mode"] == \
        "permissive"


@pytest.mark.slow
def test_kill9_mid_enrollment_other_serves_nothing_half_written(site: dict[str, Any]) -> None:
    a, b = site["start"]("a"), site["start"]("b")
    macs = bound_test_macs(120)[40:120]
    url = site["url"]
    done: list[str] = []
    failed: list[str] = []
    lock = threading.Lock()

    def one(mac: str) -> None:
        try:
            reply = enroll(a.port, mac)
        except OSError:
            with lock:
                failed.append(mac)
            return
        with lock:
            (done if reply.status == 201 else failed).append(mac)

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(one, mac) for mac in macs]
        deadline = time.monotonic() + 120
        while _rows(url, "SELECT count(*) FROM nodes")[0][0] < 10:
            assert time.monotonic() < deadline, "no enrollment through a"
            time.sleep(0.05)
        os.kill(a.proc.pid, signal.SIGKILL)  # mid-enrollment: requests are in flight
        a.proc.wait(30)
        for future in futures:
            future.result()
    assert failed, "the kill interrupted no enrollment"
    # nothing half-written: every certificate belongs to a node row and the reverse,
    # serials are contiguous (an interrupted transaction consumed none)
    count = _rows(url, "SELECT count(*) FROM nodes")[0][0]
    assert _rows(url, "SELECT count(*) FROM certificates") == [(count,)]
    assert _rows(url, "SELECT count(*) FROM nodes n JOIN certificates c ON "
                      "c.serial = n.cert_serial AND c.node_mac = n.mac") == [(count,)]
    assert _rows(url, "SELECT min(serial), max(serial) FROM certificates") == [(1, count)]
    assert _rows(url, "SELECT value FROM counters WHERE name = 'cert_serial'") == [(count,)]
    # the other instance keeps serving, and the lock the killed one held is released
    assert request(b.port, "GET", "/healthz").status == 200
    for mac in failed:
        reply = enroll(b.port, mac)
        assert reply.status in (200, 201), reply.text  # 200: committed, answer lost
    assert _rows(url, "SELECT count(*), count(DISTINCT vpn_mac) FROM nodes") == [
        (len(macs), len(macs))]
    assert request(b.port, "GET", f"/walt-vpn/node/{failed[0]}/boot.sig").status == 200


def _nginx_config(instances: list[Instance], listen: str, cache_dir: Path) -> str:
    from server.config import Endpoint
    from server.entrypoints import HttpCache, http_entrypoint_config

    return http_entrypoint_config("nginx", tuple(Endpoint("127.0.0.1", i.port)
                                                 for i in instances),
                                  listen, HttpCache(str(cache_dir), "1g"))


def _server_fetches(instances: list[Instance], needle: str, least: int = 0) -> int:
    """Whole responses the servers logged for `needle` (a server logs just after the
    response went out: wait, with a generous ceiling, until at least `least`)."""
    deadline = time.monotonic() + 30
    while True:
        count = sum(line.count(needle) for i in instances
                    for line in i.log.read_text(errors="replace").splitlines()
                    if '" 200 ' in line)
        if count >= least or time.monotonic() > deadline:
            return count
        time.sleep(0.1)


@pytest.mark.slow
def test_nginx_entrypoint_serves_boot_paths_from_its_cache(site: dict[str, Any]) -> None:
    a, b = site["start"]("a"), site["start"]("b")
    macs = bound_test_macs(6)
    for i, mac in enumerate(macs):
        assert enroll((a, b)[i % 2].port, mac).status == 201
    port = free_port()
    nginx = start_nginx(site["tmp"], _nginx_config([a, b], f"127.0.0.1:{port}",
                                                   site["tmp"] / "cache"), port)
    try:
        boot = (site["artifacts"] / "bootimg" / "boot.img").read_bytes()
        digest = hashlib.sha256(boot).hexdigest()
        sig = request(a.port, "GET", "/walt-vpn/boot/boot.sig").body
        statuses = []
        for mac in macs[:5]:
            for path in (f"/walt-vpn/node/{mac}/boot.sig", f"/walt-vpn/node/{mac}/boot.img"):
                reply = request(port, "GET", path, source=node_ip(mac))
                assert reply.status == 200, reply.text
                assert reply.body == (sig if path.endswith(".sig") else boot)
                assert reply.headers["cache-control"] == "no-cache"
                statuses.append(reply.headers["x-cache-status"])
        ip = node_ip(macs[0]).replace(".", "-")
        per_ip = request(port, "GET", f"/walt-vpn/per-ip/{ip}/boot.img")
        assert per_ip.status == 200 and per_ip.body == boot
        assert per_ip.headers["x-cache-status"] == "HIT"
        # one boot.img and one boot.sig crossed from the servers, by digest
        assert _server_fetches([a, b], f"/walt-vpn/by-digest/{digest}/boot.img", 1) == 1
        assert _server_fetches([a, b], f"/walt-vpn/by-digest/{digest}/boot.sig", 1) == 1
        assert statuses.count("MISS") == 2
        # the digest URL is immutable at the server
        direct = request(b.port, "GET", f"/walt-vpn/by-digest/{digest}/boot.img")
        assert direct.status == 200 and "immutable" in direct.headers["cache-control"]
        assert request(b.port, "GET", f"/walt-vpn/by-digest/{'0' * 64}/boot.img").status == 404
        # a revoked node gets 403 although its content is cached; an unknown one 404
        _admin(b, f"/api/nodes/{macs[1]}/revoke", {})
        assert request(port, "GET", f"/walt-vpn/node/{macs[1]}/boot.img").status == 403
        assert request(port, "GET", f"/walt-vpn/node/{bound_test_macs(200)[150]}/boot.img"
                       ).status == 404
        # ranges and conditional requests are answered from the cache too
        fetched = _server_fetches([a, b], f"/walt-vpn/by-digest/{digest}/boot.img")
        path = f"/walt-vpn/node/{macs[2]}/boot.img"
        part = request(port, "GET", path, headers={"Range": "bytes=1000-1999"})
        assert part.status == 206 and part.body == boot[1000:2000]
        etag = per_ip.headers["etag"]
        assert etag == f'"{digest}"'
        assert request(port, "GET", path, headers={"If-None-Match": etag}).status == 304
        assert _server_fetches([a, b], f"/walt-vpn/by-digest/{digest}/boot.img") == fetched
        # other paths pass through unchanged
        assert request(port, "GET", "/walt-vpn/server").text == "walt-server\n"
        # boot events: only the node's real address, reported by the trusted entrypoint
        events = request(a.admin_port, "GET", f"/api/nodes/{macs[0]}").json()["events"]
        assert any(e["artifact"] == "boot.img" and e["client"] == node_ip(macs[0])
                   for e in events)
    finally:
        nginx.stop()


def test_x_real_ip_trusted_only_from_configured_entrypoints(site: dict[str, Any]) -> None:
    """A client cannot claim a node's address: X-Real-IP from an address not in
    entrypoints.http_trusted is ignored (no event for the node it names)."""
    a = site["start"]("a")
    mac = bound_test_macs(8)[7]
    assert enroll(a.port, mac).status == 201
    uri = f"/walt-vpn/node/{mac}/boot.img"
    spoof = request(a.port, "GET", "/walt-vpn/entrypoint-auth", source=OUTSIDE,
                    headers={"X-Original-URI": uri, "X-Real-IP": node_ip(mac)})
    assert spoof.status == 200 and spoof.headers["x-fwbuild-object"].endswith("/boot.img")
    events = request(a.admin_port, "GET", f"/api/nodes/{mac}").json()["events"]
    assert not [e for e in events if e["artifact"] == "boot.img"]
    trusted = request(a.port, "GET", "/walt-vpn/entrypoint-auth",
                      headers={"X-Original-URI": uri, "X-Real-IP": node_ip(mac)})
    assert trusted.status == 200
    events = request(a.admin_port, "GET", f"/api/nodes/{mac}").json()["events"]
    assert [e["client"] for e in events if e["artifact"] == "boot.img"] == [node_ip(mac)]
    bad = request(a.port, "GET", "/walt-vpn/entrypoint-auth",
                  headers={"X-Original-URI": "/walt-vpn/node-conf/creds"})
    assert bad.status == 404
    # the admin CLI works on the shared database too
    from click.testing import CliRunner

    from fwbuild.cli import main
    listed = CliRunner().invoke(main, ["nodes", "list", "--json", "--config", str(a.config)])
    assert listed.exit_code == 0, listed.output
    assert [n["mac"] for n in json.loads(listed.output)] == [
        ":".join(mac[i:i + 2] for i in range(0, 12, 2))]
    checked = CliRunner().invoke(main, ["serve", "--check", "--config", str(a.config)])
    assert checked.exit_code == 0, checked.output
    assert "(database postgresql://postgres@127.0.0.1:" in checked.output


def test_entrypoint_http_nginx_command_passes_nginx_t(tmp_path: Path,
                                                     session_keys: Path) -> None:
    """`fwbuild entrypoint http --nginx` prints a conf.d file nginx accepts; the cache
    settings come from the config (bad ones: one message, exit 2)."""
    from click.testing import CliRunner

    from fwbuild.cli import main
    from fwbuild.virtual.sharedsite import nginx_binary, write_config

    config = write_config(tmp_path / "server.toml", artifacts=make_artifacts(tmp_path / "out"),
                          state=tmp_path / "state", keys=copy_keys(session_keys, tmp_path / "k"),
                          port=0, admin_port=0, node_addresses=write_node_addresses(
                              tmp_path / "n.txt", bound_test_macs(4)), database=None)
    text = config.read_text().replace(
        "[entrypoints]\n", f'[entrypoints]\nhttp_cache_dir = "{tmp_path}/cache"\n'
                           'http_cache_max_size = "3g"\n')
    config.write_text(text)
    result = CliRunner().invoke(main, ["entrypoint", "http", "--nginx", "--server",
                                       "127.0.0.1:8080", "--server", "127.0.0.2:8080",
                                       "--config", str(config)])
    assert result.exit_code == 0, result.output
    out = result.output
    assert f"proxy_cache_path {tmp_path}/cache " in out and "max_size=3g" in out
    assert "proxy_cache_key $fwbuild_object;" in out and "auth_request /_fwbuild_auth;" in out
    assert "server 127.0.0.1:8080;" in out and "server 127.0.0.2:8080;" in out
    binary = nginx_binary()
    if binary is not None:
        prefix = tmp_path / "nginx"
        prefix.mkdir()
        (prefix / "site.conf").write_text(out)
        (prefix / "nginx.conf").write_text(
            f"pid {prefix}/pid;\nerror_log {prefix}/error.log;\nevents {{}}\n"
            f"http {{ include {prefix}/site.conf; }}\n")
        checked = subprocess.run([binary, "-t", "-p", str(prefix), "-c",
                                  str(prefix / "nginx.conf")], capture_output=True, text=True,
                                 check=False)
        assert checked.returncode == 0, checked.stderr
    config.write_text(text.replace('"3g"', '"3 gigabytes"'))
    bad = CliRunner().invoke(main, ["entrypoint", "http", "--nginx", "--config", str(config)])
    assert bad.exit_code == 2 and "http_cache_max_size" in bad.output
    config.write_text(text.replace("http_trusted = [", 'http_trusted = ["nginx.local", '))
    bad = CliRunner().invoke(main, ["entrypoint", "http", "--nginx", "--config", str(config)])
    assert bad.exit_code == 2 and "http_trusted[0]" in bad.output
