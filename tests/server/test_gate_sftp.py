"""The gate's read-only SFTP server (server/sftp.py) spoken to directly, packet by packet:
confinement of paths (directory and image roots), writes refused, protocol limits."""

from __future__ import annotations

import os
import socket
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from server import sftp


class Client:
    def __init__(self, area: sftp.Area, log: Path | None = None) -> None:
        self.sock, theirs = socket.socketpair()
        self.log = open(log, "ab") if log else None  # noqa: SIM115
        server = sftp.SftpServer(area, self.log)
        self.thread = threading.Thread(target=server.serve, args=(theirs.fileno(), theirs.fileno()),
                                       daemon=True)
        self._theirs = theirs
        self.thread.start()
        self.rid = 0
        self.sock.sendall(struct.pack(">IBI", 5, sftp.INIT, 3))
        kind, payload = self.recv()
        assert kind == sftp.VERSION_PKT and payload[:4] == struct.pack(">I", 3)

    def close(self) -> None:
        if self.sock.fileno() == -1:
            return
        self.sock.shutdown(socket.SHUT_WR)
        self.thread.join(60)
        self.sock.close()
        self._theirs.close()
        if self.log:
            self.log.close()

    def recv(self) -> tuple[int, bytes]:
        head = self._exact(4)
        body = self._exact(struct.unpack(">I", head)[0])
        return body[0], body[1:]

    def _exact(self, size: int) -> bytes:
        data = b""
        while len(data) < size:
            chunk = self.sock.recv(size - len(data))
            if not chunk:
                raise EOFError
            data += chunk
        return data

    def call(self, kind: int, *fields: bytes | int) -> tuple[int, bytes]:
        self.rid += 1
        body = struct.pack(">BI", kind, self.rid)
        for f in fields:
            body += struct.pack(">I", f) if isinstance(f, int) else struct.pack(">I", len(f)) + f
        self.sock.sendall(struct.pack(">I", len(body)) + body)
        kind_back, payload = self.recv()
        assert struct.unpack(">I", payload[:4])[0] == self.rid
        return kind_back, payload[4:]

    def status(self, kind: int, *fields: bytes | int) -> int:
        back, payload = self.call(kind, *fields)
        assert back == sftp.STATUS, (back, payload)
        code: int = struct.unpack(">I", payload[:4])[0]
        return code

    def read_file(self, path: bytes) -> bytes:
        back, payload = self.call(sftp.OPEN, path, sftp.FXF_READ, 0)
        assert back == sftp.HANDLE, payload
        handle = payload[4:]
        data = b""
        while True:
            self.rid += 1
            body = (struct.pack(">BI", sftp.READ, self.rid) + struct.pack(">I", len(handle)) + handle
                    + struct.pack(">QI", len(data), 1 << 20))
            self.sock.sendall(struct.pack(">I", len(body)) + body)
            kind, chunk = self.recv()
            if kind == sftp.STATUS:
                break
            size = struct.unpack(">I", chunk[4:8])[0]
            assert size <= sftp.MAX_READ
            data += chunk[8:8 + size]
        assert self.status(sftp.CLOSE, handle) == sftp.OK
        return data


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    for node in ("a", "b"):
        (tmp_path / node / "etc").mkdir(parents=True)
        (tmp_path / node / "etc" / "hostname").write_text(node)
    (tmp_path / "a" / "big").write_bytes(os.urandom(600_000))
    os.symlink("/etc", tmp_path / "a" / "etc-abs")
    os.symlink("../b", tmp_path / "a" / "to-b")
    os.symlink("etc", tmp_path / "a" / "etc-rel")
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.img").write_bytes(b"A" * 5000)
    (images / "b.img").write_bytes(b"B" * 5000)
    return tmp_path


@pytest.fixture
def client_a(tree: Path) -> Iterator[Client]:
    client = Client(sftp.Area(str(tree / "a")), tree / "sftp.log")
    yield client
    client.close()


def test_reads_inside_the_root(tree: Path, client_a: Client) -> None:
    root = str(tree / "a").encode()
    assert client_a.read_file(root + b"/etc/hostname") == b"a"
    assert client_a.read_file(b"etc/hostname") == b"a"  # relative to the root
    assert client_a.read_file(root + b"/etc-rel/hostname") == b"a"
    assert client_a.read_file(root + b"/big") == (tree / "a" / "big").read_bytes()
    kind, payload = client_a.call(sftp.REALPATH, b".")
    assert kind == sftp.NAME and root in payload
    kind, payload = client_a.call(sftp.READLINK, root + b"/etc-abs")
    assert kind == sftp.NAME and b"/etc" in payload  # the link's text, not what it points to
    kind, _ = client_a.call(sftp.LSTAT, root + b"/etc-abs")
    assert kind == sftp.ATTRS


@pytest.mark.parametrize("path", [b"/etc/hostname", b"..", b"../b/etc/hostname", b"etc/../../b",
                                  b"etc-abs/hostname", b"to-b/etc/hostname", b"/", b"etc-abs",
                                  b"/proc/self/environ"])
def test_escapes_are_refused(tree: Path, client_a: Client, path: bytes) -> None:
    for kind in (sftp.STAT, sftp.OPENDIR, sftp.REALPATH):
        assert client_a.status(kind, path) == sftp.PERMISSION_DENIED, (kind, path)
    assert client_a.status(sftp.OPEN, path, sftp.FXF_READ, 0) == sftp.PERMISSION_DENIED


def test_writes_are_refused(tree: Path, client_a: Client) -> None:
    root = str(tree / "a").encode()
    for flags in (0x02, 0x01 | 0x08, 0x01 | 0x10, 0x04):
        assert client_a.status(sftp.OPEN, root + b"/etc/hostname", flags, 0) == sftp.PERMISSION_DENIED
    assert client_a.status(sftp.REMOVE, root + b"/etc/hostname") == sftp.PERMISSION_DENIED
    assert client_a.status(sftp.MKDIR, root + b"/new", 0) == sftp.PERMISSION_DENIED
    assert client_a.status(sftp.RENAME, root + b"/etc", root + b"/etc2") == sftp.PERMISSION_DENIED
    assert client_a.status(sftp.SYMLINK, root + b"/l", b"/etc") == sftp.PERMISSION_DENIED
    assert client_a.status(sftp.SETSTAT, root + b"/big", 0) == sftp.PERMISSION_DENIED
    assert client_a.status(sftp.EXTENDED, b"posix-rename@openssh.com") == sftp.OP_UNSUPPORTED
    assert (tree / "a" / "etc" / "hostname").read_text() == "a"
    assert sorted(p.name for p in (tree / "a").iterdir()) == ["big", "etc", "etc-abs", "etc-rel", "to-b"]


def test_image_root_shows_only_its_file(tree: Path) -> None:
    client = Client(sftp.Area(str(tree / "images" / "a.img")))
    try:
        images = str(tree / "images").encode()
        assert client.read_file(images + b"/a.img") == b"A" * 5000
        assert client.status(sftp.OPEN, images + b"/b.img", sftp.FXF_READ, 0) == sftp.PERMISSION_DENIED
        assert client.status(sftp.STAT, images + b"/b.img") == sftp.PERMISSION_DENIED
        kind, payload = client.call(sftp.OPENDIR, images)
        assert kind == sftp.HANDLE
        kind, listing = client.call(sftp.READDIR, payload[4:])
        assert kind == sftp.NAME and b"a.img" in listing and b"b.img" not in listing
        assert client.status(sftp.OPENDIR, str(tree).encode()) == sftp.PERMISSION_DENIED
    finally:
        client.close()


def test_log_and_limits(tree: Path, client_a: Client) -> None:
    from fwbuild.virtual.sshd import parse_sftp_log

    kind, payload = client_a.call(sftp.EXTENDED, sftp.LIMITS)
    assert kind == sftp.EXTENDED_REPLY
    max_packet, max_read = struct.unpack(">QQ", payload[:16])
    assert max_packet == sftp.MAX_PACKET and max_read == sftp.MAX_READ
    client_a.read_file(str(tree / "a" / "big").encode())
    client_a.close()
    stats = parse_sftp_log((tree / "sftp.log").read_text())
    assert stats.requests["OPEN"] == 1 and stats.requests["INIT"] == 1
    assert stats.bytes_out > 600_000
    assert f"{tree}/a/big".replace(" ", "\\x20") in (tree / "sftp.log").read_text()


def test_oversized_packet_ends_the_session(tree: Path) -> None:
    client = Client(sftp.Area(str(tree / "a")))
    client.sock.sendall(struct.pack(">IB", sftp.MAX_PACKET + 1, sftp.READ))
    client.thread.join(60)  # serve() returned: the gate process exits, closing the channel
    assert not client.thread.is_alive()
    client._theirs.close()
    with pytest.raises(EOFError):
        client.recv()
    client.sock.close()
