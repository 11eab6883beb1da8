"""A read-only SFTP v3 server confined to one node's root (run by the SSH gate).

Protocol: draft-ietf-secsh-filexfer-02 (SFTP version 3, what OpenSSH and sshfs speak).
Served: INIT, OPEN (read only), CLOSE, READ, LSTAT, FSTAT, STAT, OPENDIR, READDIR,
REALPATH, READLINK. Every write (WRITE, SETSTAT, REMOVE, MKDIR, RENAME, SYMLINK, an OPEN
asking for write/create/truncate...) answers PERMISSION_DENIED; other extensions answer
OP_UNSUPPORTED.

Paths are the server's own paths (the node asks for its `WALT_VPN_ROOT`); relative paths,
and the start directory (`.`, what sshfs `host:` mounts), start at the node's root: the root
directory, or an image root's directory listing only that image (a node whose EEPROM names
no WALT_VPN_ROOT finds its root there). A path is resolved like the kernel would (`..`,
symlinks, also inside the root's tree) and served only when the result lies inside the
node's area:
- a directory root: the directory and everything under it;
- an image root (a file): that file, and its parent directory listing only that file.
Opened files and directories are checked again through /proc/self/fd, so a path that
changes between the check and the open cannot escape either.

`log`: one line per packet, "C <type> <length> [path]" (client requests; the path for
the request types that name one, spaces as \\x20) and "S <type> <length>" (answers) -
the format fwbuild.virtual.sshd.parse_sftp_log reads.
"""

from __future__ import annotations

import os
import stat
import struct
import time
from dataclasses import dataclass
from typing import BinaryIO

VERSION = 3
MAX_PACKET = 256 * 1024  # as OpenSSH's: its clients refuse longer answers
MAX_READ = MAX_PACKET - 1024
MAX_HANDLES = 256
FLUSH_AT = 1 << 20  # answers queued before they are written (a burst of READs stays bounded)
READDIR_BATCH = 100

# packet types
INIT, VERSION_PKT, OPEN, CLOSE, READ, WRITE, LSTAT, FSTAT, SETSTAT, FSETSTAT = range(1, 11)
OPENDIR, READDIR, REMOVE, MKDIR, RMDIR, REALPATH, STAT, RENAME, READLINK, SYMLINK = range(11, 21)
STATUS, HANDLE, DATA, NAME, ATTRS = 101, 102, 103, 104, 105
EXTENDED, EXTENDED_REPLY = 200, 201
LIMITS = b"limits@openssh.com"  # lets OpenSSH's sftp read MAX_READ at a time (else 32 KiB)
WRITES = {WRITE, SETSTAT, FSETSTAT, REMOVE, MKDIR, RMDIR, RENAME, SYMLINK}
PATH_TYPES = {OPEN, LSTAT, OPENDIR, REALPATH, STAT, READLINK}

# status codes
OK, EOF, NO_SUCH_FILE, PERMISSION_DENIED, FAILURE, BAD_MESSAGE, OP_UNSUPPORTED = 0, 1, 2, 3, 4, 5, 8

# OPEN flags
FXF_READ = 0x01

# ATTRS flags
A_SIZE, A_UIDGID, A_PERMISSIONS, A_ACMODTIME = 0x1, 0x2, 0x4, 0x8


class SftpError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


class BadMessage(Exception):
    """The client sent a malformed packet: the session ends."""


def _attrs(st: os.stat_result) -> bytes:
    return struct.pack(">IQIIIII", A_SIZE | A_UIDGID | A_PERMISSIONS | A_ACMODTIME, st.st_size,
                       st.st_uid, st.st_gid, st.st_mode, int(st.st_atime) & 0xFFFFFFFF,
                       int(st.st_mtime) & 0xFFFFFFFF)


def _string(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


def _longname(name: bytes, st: os.stat_result) -> bytes:
    when = time.strftime("%b %d %H:%M", time.gmtime(st.st_mtime))
    return (f"{stat.filemode(st.st_mode)} {st.st_nlink:4d} {st.st_uid:<8d} {st.st_gid:<8d} "
            f"{st.st_size:12d} {when} ").encode() + name


class Reader:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def u32(self) -> int:
        if self.pos + 4 > len(self.data):
            raise BadMessage("truncated packet")
        value: int = struct.unpack_from(">I", self.data, self.pos)[0]
        self.pos += 4
        return value

    def u64(self) -> int:
        if self.pos + 8 > len(self.data):
            raise BadMessage("truncated packet")
        value: int = struct.unpack_from(">Q", self.data, self.pos)[0]
        self.pos += 8
        return value

    def string(self) -> bytes:
        size = self.u32()
        if self.pos + size > len(self.data):
            raise BadMessage("truncated string")
        value = self.data[self.pos:self.pos + size]
        self.pos += size
        return value


@dataclass
class _Dir:
    path: bytes
    names: list[bytes]


class Area:
    """What one node may read: a directory tree, or one image file with its boot working set
    `<image>.prefetch` (and their parent's listing, showing only them)."""

    def __init__(self, root: str) -> None:
        real = os.path.realpath(root)
        if not os.path.exists(real):
            raise FileNotFoundError(root)
        self.is_image = not os.path.isdir(real)
        self.root = os.fsencode(real)
        self.top = os.path.dirname(self.root) if self.is_image else self.root
        self.files = (self.root, self.root + b".prefetch") if self.is_image else ()

    def allows(self, real: bytes) -> bool:
        if self.is_image:
            return real in self.files or real == self.top
        return real == self.root or real.startswith(self.root.rstrip(b"/") + b"/")

    def listed(self, directory: bytes, name: bytes) -> bool:
        if not self.is_image:
            return True
        return directory != self.top or os.path.join(directory, name) in self.files

    def resolve(self, path: bytes, follow: bool = True) -> bytes:
        """The real path of `path` (relative to the area's top), refused outside the area.
        With follow=False a final symlink is not followed (LSTAT, READLINK)."""
        if b"\0" in path:
            raise SftpError(BAD_MESSAGE, "NUL in path")
        joined = os.path.join(self.top, path) if path else self.top
        head, tail = os.path.split(joined)
        if follow or tail in (b"", b".", b".."):
            real = os.path.realpath(joined)
        else:
            real = os.path.join(os.path.realpath(head), tail)
        if not self.allows(real):
            raise SftpError(PERMISSION_DENIED, "outside this node's root")
        return real

    def check_fd(self, fd: int) -> None:
        real = os.fsencode(os.readlink(f"/proc/self/fd/{fd}"))
        if not self.allows(real):
            raise SftpError(PERMISSION_DENIED, "outside this node's root")


class SftpServer:
    def __init__(self, area: Area, log: BinaryIO | None = None) -> None:
        self.area = area
        self.log = log
        self.handles: dict[bytes, int | _Dir] = {}
        self.opened: dict[int, bytes] = {}  # fd -> the path the client opened (for the log)
        self.counter = 0
        self.out: list[bytes] = []
        self.out_size = 0
        self.wfd = 1

    # -- framing -------------------------------------------------------------------------
    def serve(self, rfd: int = 0, wfd: int = 1) -> None:
        self.wfd = wfd
        buf = b""
        try:
            while True:
                chunk = os.read(rfd, 262144)
                if not chunk:
                    return
                buf += chunk
                pos = 0
                while len(buf) - pos >= 4:
                    length = struct.unpack_from(">I", buf, pos)[0]
                    if length < 1 or length > MAX_PACKET:
                        raise BadMessage(f"packet length {length}")
                    if len(buf) - pos < 4 + length:
                        break
                    packet = buf[pos + 4:pos + 4 + length]
                    pos += 4 + length
                    self._log_request(packet)
                    self._handle(packet)
                    if self.out_size >= FLUSH_AT:
                        self._flush()
                buf = buf[pos:]
                self._flush()
        except BadMessage:
            self._flush()
        finally:
            for handle in list(self.handles.values()):
                if isinstance(handle, int):
                    os.close(handle)
            if self.log is not None:
                self.log.flush()

    def _flush(self) -> None:
        if not self.out:
            return
        view = memoryview(b"".join(self.out))
        self.out.clear()
        self.out_size = 0
        while view:
            view = view[os.write(self.wfd, view):]
        if self.log is not None:
            self.log.flush()

    def _log_request(self, packet: bytes) -> None:
        if self.log is None:
            return
        kind = packet[0]
        path = b""
        if kind in PATH_TYPES and len(packet) >= 9:
            size = struct.unpack_from(">I", packet, 5)[0]
            path = b" " + _log_path(packet[9:9 + size])
        self.log.write(f"C {kind} {len(packet) + 4}".encode() + path + b"\n")

    def _send(self, kind: int, payload: bytes) -> None:
        packet = struct.pack(">IB", len(payload) + 1, kind) + payload
        self.out.append(packet)
        self.out_size += len(packet)
        if self.log is not None:
            self.log.write(f"S {kind} {len(packet)}\n".encode())

    def _status(self, rid: int, code: int, message: str) -> None:
        self._send(STATUS, struct.pack(">II", rid, code) + _string(message.encode()) + _string(b""))

    # -- requests ------------------------------------------------------------------------
    def _handle(self, packet: bytes) -> None:
        kind = packet[0]
        reader = Reader(packet[1:])
        if kind == INIT:
            reader.u32()
            self._send(VERSION_PKT, struct.pack(">I", VERSION) + _string(LIMITS) + _string(b"1"))
            return
        rid = reader.u32()
        try:
            self._request(kind, rid, reader)
        except SftpError as err:
            self._status(rid, err.code, str(err))
        except FileNotFoundError:
            self._status(rid, NO_SUCH_FILE, "no such file")
        except PermissionError:
            self._status(rid, PERMISSION_DENIED, "permission denied")
        except OSError as err:
            self._status(rid, FAILURE, err.strerror or "failure")

    def _request(self, kind: int, rid: int, r: Reader) -> None:
        if kind in WRITES:
            raise SftpError(PERMISSION_DENIED, "read-only: this node's root cannot be changed")
        if kind == READ:
            fd = self._file(r.string())
            offset, size = r.u64(), min(r.u32(), MAX_READ)
            if self.log is not None:  # "R offset length path": the boot working set's source
                self.log.write(f"R {offset} {size} ".encode() + self.opened.get(fd, b"?") + b"\n")
            data = os.pread(fd, size, offset)
            if not data:
                raise SftpError(EOF, "end of file")
            self._send(DATA, struct.pack(">I", rid) + _string(data))
        elif kind == OPEN:
            path, flags = r.string(), r.u32()
            if flags & ~FXF_READ or not flags & FXF_READ:
                raise SftpError(PERMISSION_DENIED, "read-only: open for reading only")
            real = self.area.resolve(path)
            fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
            try:
                self.area.check_fd(fd)
                if stat.S_ISDIR(os.fstat(fd).st_mode):
                    raise SftpError(FAILURE, "is a directory")
            except BaseException:
                os.close(fd)
                raise
            if self.log is not None:
                self.opened[fd] = _log_path(path)
            self._new_handle(rid, fd)
        elif kind == CLOSE:
            handle = r.string()
            value = self.handles.pop(handle, None)
            if value is None:
                raise SftpError(FAILURE, "no such handle")
            if isinstance(value, int):
                os.close(value)
            self._status(rid, OK, "")
        elif kind in (LSTAT, STAT):
            real = self.area.resolve(r.string(), follow=kind == STAT)
            st = os.stat(real) if kind == STAT else os.lstat(real)
            self._send(ATTRS, struct.pack(">I", rid) + _attrs(st))
        elif kind == FSTAT:
            self._send(ATTRS, struct.pack(">I", rid) + _attrs(os.fstat(self._file(r.string()))))
        elif kind == OPENDIR:
            real = self.area.resolve(r.string())
            fd = os.open(real, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                self.area.check_fd(fd)
                names = [n for n in os.listdir(fd) if self.area.listed(real, os.fsencode(n))]
            finally:
                os.close(fd)
            self._new_handle(rid, _Dir(real, [b".", b".."] + [os.fsencode(n) for n in names]))
        elif kind == READDIR:
            value = self.handles.get(r.string())
            if not isinstance(value, _Dir):
                raise SftpError(FAILURE, "no such directory handle")
            batch, value.names = value.names[:READDIR_BATCH], value.names[READDIR_BATCH:]
            if not batch:
                raise SftpError(EOF, "end of directory")
            entries = []
            for name in batch:
                try:
                    st = os.lstat(os.path.join(value.path, name))
                except OSError:
                    continue
                entries.append(_string(name) + _string(_longname(name, st)) + _attrs(st))
            self._send(NAME, struct.pack(">II", rid, len(entries)) + b"".join(entries))
        elif kind == REALPATH:
            real = self.area.resolve(r.string())
            self._send(NAME, struct.pack(">II", rid, 1) + _string(real) + _string(real)
                       + struct.pack(">I", 0))
        elif kind == READLINK:
            real = self.area.resolve(r.string(), follow=False)
            target = os.readlink(real)
            self._send(NAME, struct.pack(">II", rid, 1) + _string(target) + _string(target)
                       + struct.pack(">I", 0))
        elif kind == EXTENDED and r.string() == LIMITS:
            self._send(EXTENDED_REPLY, struct.pack(">IQQQQ", rid, MAX_PACKET, MAX_READ, 0,
                                                   MAX_HANDLES))
        else:
            raise SftpError(OP_UNSUPPORTED, f"request type {kind} not supported")

    def _file(self, handle: bytes) -> int:
        value = self.handles.get(handle)
        if not isinstance(value, int):
            raise SftpError(FAILURE, "no such file handle")
        return value

    def _new_handle(self, rid: int, value: int | _Dir) -> None:
        if len(self.handles) >= MAX_HANDLES:
            if isinstance(value, int):
                os.close(value)
            raise SftpError(FAILURE, f"too many open handles (max {MAX_HANDLES})")
        self.counter += 1
        handle = str(self.counter).encode()
        self.handles[handle] = value
        self._send(HANDLE, struct.pack(">I", rid) + _string(handle))


def _log_path(raw: bytes) -> bytes:
    """A path as one log word (spaces as \\x20, newlines as \\n)."""
    text = raw.decode("utf-8", "backslashreplace")
    return text.replace("\n", "\\n").replace(" ", "\\x20").encode("utf-8", "replace")
