"""The HTTP listeners: uvicorn (httptools/llhttp parser) with what it lacks added here.

uvicorn parses strictly (llhttp refuses header lines without a colon, `Transfer-Encoding`
other than a final `chunked`, TE together with Content-Length, folded headers, bare LF),
stops gracefully and runs a plain ASGI app. This module adds, in a protocol subclass:

- a request deadline: the whole request (line, headers, body) must arrive within
  `REQUEST_DEADLINE` seconds of the connection (or of the previous response), else the
  connection is closed; a client trickling a byte every few seconds holds nothing for long;
- a connection cap below the file-descriptor limit: at the cap, the longest-idle connection
  (no request in progress) is closed to make room, so idle sockets can never lock out a
  real client; when every connection is busy, the new one gets a 503;
- zero-copy file bodies: the ASGI `http.response.zerocopysend` extension, sent with
  os.sendfile from a thread pool after the head (the GIL is released, so both CPUs send;
  asyncio's single-thread loop.sendfile reached 0.66-0.78x nginx at 16-64 clients);
- TCP_NODELAY on every connection (uvicorn writes head and body separately);
- a small accept batch (asyncio accepts `backlog` sockets before any callback runs: with
  1024 it ran into EMFILE before the cap could evict anything) but a deep kernel listen
  queue (256; with 64, 200 simultaneous connects on a loaded machine were reset);
- the raw request target in `scope["extensions"]["fwbuild.target"]` (the app refuses
  absolute-form and odd targets itself) and parser errors in the app's error format.

Both listeners run on one event loop in one background thread; `Listeners.stop()` is
graceful within `STOP_GRACE` seconds whatever the clients do.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import resource
import select
import socket
import threading
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httptools
import uvicorn
from uvicorn.protocols.http import httptools_impl

log = logging.getLogger("fwbuild.server.http")

REQUEST_DEADLINE = 10.0  # seconds for a whole request to arrive
KEEP_ALIVE = 5  # seconds an idle keep-alive connection stays open
STOP_GRACE = 5  # seconds in-flight responses get at shutdown
MAX_HEAD = 32 * 1024  # bytes of request line + headers
MAX_CONNECTIONS = 512  # per listener; lowered to fit RLIMIT_NOFILE
FD_RESERVE = 64  # descriptors kept free for files, the database, logs
ACCEPT_BATCH = 64  # connections asyncio accepts before running callbacks (its `backlog`)
LISTEN_BACKLOG = 256  # the kernel's queue (set again once asyncio has listened with the batch):
# deep enough for 200 simultaneous connects, short enough that a new client never waits
# behind more than 256 queued ones (an idle flood fills it)

Asgi = Callable[[dict[str, Any], Callable[[], Awaitable[Any]],
                 Callable[[dict[str, Any]], Awaitable[None]]], Awaitable[None]]


def connection_cap(configured: int = MAX_CONNECTIONS) -> int:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return configured
    # Two listeners; each may have ACCEPT_BATCH accepted sockets not yet counted (asyncio
    # accepts a batch before connection_made runs) or evicted but not yet closed.
    return max(16, min(configured, (soft - FD_RESERVE - 4 * ACCEPT_BATCH) // 2))


SENDFILE_THREADS = 64  # file bodies sent by blocking sendfile in threads (both CPUs)
STALL_TIMEOUT = 30.0  # a client that takes nothing for this long is dropped
_sendfile_pool = ThreadPoolExecutor(SENDFILE_THREADS, thread_name_prefix="fwbuild-sendfile")
_sendfile_busy = 0  # threads in use (event-loop thread only)


def _send_file(sock_fd: int, file_fd: int, offset: int, count: int,
               stop: threading.Event) -> int:
    """os.sendfile `count` bytes to a non-blocking socket, waiting with poll (in a thread:
    the GIL is released in both calls). The fds are dups owned here. Returns bytes sent."""
    sent = 0
    idle = 0.0
    poller = select.poll()
    poller.register(sock_fd, select.POLLOUT)
    try:
        while sent < count and not stop.is_set():
            try:
                n = os.sendfile(sock_fd, file_fd, offset + sent, count - sent)
            except BlockingIOError:
                if poller.poll(500):
                    idle = 0.0
                else:
                    idle += 0.5
                    if idle >= STALL_TIMEOUT:
                        break
                continue
            except OSError:
                break
            if n == 0:  # the file shrank under us
                break
            sent += n
            idle = 0.0
    finally:
        os.close(sock_fd)
        os.close(file_fd)
    return sent


class _Cycle(httptools_impl.RequestResponseCycle):
    """uvicorn's request/response cycle plus `http.response.zerocopysend`."""

    async def send(self, message: Any) -> None:
        if message.get("type") != "http.response.zerocopysend":
            await super().send(message)
            return
        if not self.response_started or self.response_complete:
            raise RuntimeError("zerocopysend before http.response.start or after the end")
        count = int(message["count"])
        sent = 0
        if self.scope["method"] != "HEAD" and not self.disconnected and count:
            if count > self.expected_content_length:
                raise RuntimeError("zerocopysend longer than Content-Length")
            try:
                sent = await self._sendfile(message["file"], int(message.get("offset", 0)), count)
            except (ConnectionError, OSError, RuntimeError) as exc:
                log.debug("sendfile to %s stopped: %s", self.scope.get("client"), exc)
            message["sent"] = sent  # the app learns whether the whole body left
            if sent != count:
                self.disconnected = True
                self.transport.close()
                return
            self.expected_content_length -= count
        await super().send({"type": "http.response.body", "body": b"",
                            "more_body": bool(message.get("more_body", False))})

    async def _sendfile(self, file: Any, offset: int, count: int) -> int:
        global _sendfile_busy
        loop = asyncio.get_running_loop()
        transport = self.transport
        sock = transport.get_extra_info("socket")
        if (sock is None or transport.get_write_buffer_size() or transport.is_closing()
                or _sendfile_busy >= SENDFILE_THREADS):
            # Head not flushed yet, or every thread busy: asyncio's own (single-thread) path.
            return int(await loop.sendfile(transport, file, offset, count))
        stop = threading.Event()
        transport.pause_reading()
        _sendfile_busy += 1
        sock_fd = os.dup(sock.fileno())  # survives a transport closed meanwhile
        try:
            file_fd = os.dup(file.fileno())
        except OSError:
            os.close(sock_fd)
            raise
        try:
            future = loop.run_in_executor(_sendfile_pool, _send_file, sock_fd, file_fd, offset,
                                          count, stop)
            try:
                return int(await asyncio.shield(future))
            except asyncio.CancelledError:  # graceful stop ran out of time: the thread ends
                stop.set()  # within its next poll (0.5 s) and closes its dups
                raise
        finally:
            _sendfile_busy -= 1
            if not transport.is_closing():
                transport.resume_reading()


class Protocol(httptools_impl.HttpToolsProtocol):
    """uvicorn's httptools protocol with a request deadline, a connection cap and sendfile."""

    cap = MAX_CONNECTIONS
    idle: dict[Protocol, None]  # per listener, oldest idle first (set by Listeners)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            # No Nagle: uvicorn writes the head and the body separately (46 ms per keep-alive
            # request with Nagle + delayed ACK). asyncio only sets it when proto is TCP.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._in_head = True  # reading a request line and headers
        self._head_bytes = 0
        self._deadline: asyncio.TimerHandle | None = None
        self._arm()
        if len(self.connections) > self.cap:
            oldest = next(iter(self.idle), None)  # O(1): the dict keeps idle order
            if oldest is not None:
                del self.idle[oldest]
                log.info("connection cap %d reached: closing the longest-idle connection from %s",
                         self.cap, oldest.client[0] if oldest.client else "?")
                oldest.transport.close()
                self.idle[self] = None
            else:
                log.warning("connection cap %d reached, every connection busy: 503", self.cap)
                self._refuse(503, "too many connections", "retry in a few seconds")
        else:
            self.idle[self] = None

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self.idle.pop(self, None)
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(REQUEST_DEADLINE, self._expired)

    def _disarm(self) -> None:
        if getattr(self, "_deadline", None) is not None:
            assert self._deadline is not None
            self._deadline.cancel()
            self._deadline = None

    def _expired(self) -> None:
        self._deadline = None
        if not self.transport.is_closing():
            log.info("%s: request not received within %.0f s: connection closed",
                     self.client[0] if self.client else "?", REQUEST_DEADLINE)
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        if self._in_head:
            self._head_bytes += len(data)
        super().data_received(data)
        # Still in the head after MAX_HEAD bytes: llhttp would buffer without bound.
        if self._in_head and self._head_bytes > MAX_HEAD and not self.transport.is_closing():
            self._refuse(431, "request line and headers too large",
                         f"keep them under {MAX_HEAD} bytes")

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.idle.pop(self, None)  # busy: never evicted
        self._in_head = True

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._head_bytes = 0
        size = len(self.url) + sum(len(n) + len(v) + 4 for n, v in self.headers)
        if size > MAX_HEAD:  # arrived in one piece: refuse before any routing
            self._too_large = True
            raise httptools.HttpParserError("request line and headers too large")
        super().on_headers_complete()
        cycle = self.cycle
        if cycle is not None and type(cycle) is httptools_impl.RequestResponseCycle:
            cycle.__class__ = _Cycle  # same state, plus the zerocopysend message
        scope: dict[str, Any] = self.scope  # type: ignore[assignment]
        extensions = scope.setdefault("extensions", {})
        extensions["fwbuild.target"] = bytes(self.url)
        extensions["http.response.zerocopysend"] = {}

    def on_message_complete(self) -> None:
        self._disarm()  # the whole request is in; the response has no deadline here
        super().on_message_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        pipelined = self.cycle is not None and not self.cycle.response_complete
        if not self.transport.is_closing() and not pipelined:
            self.idle[self] = None  # idle again, newest
            self._arm()  # the next request must arrive within the deadline

    def send_400_response(self, msg: str) -> None:
        if getattr(self, "_too_large", False):
            self._refuse(431, "request line and headers too large",
                         f"keep them under {MAX_HEAD} bytes")
            return
        self._refuse(400, "malformed HTTP request",
                     "send one HTTP/1.1 request: `Name: value` header lines, Host, "
                     "Content-Length (no Transfer-Encoding)")

    def _refuse(self, status: int, what: str, hint: str) -> None:
        body = (json.dumps({"status": status, "error": what, "hint": hint}, indent=2,
                           sort_keys=True) + "\n").encode()
        reason = {400: b"Bad Request", 431: b"Request Header Fields Too Large",
                  503: b"Service Unavailable"}[status]
        self.transport.write(
            b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
            b"connection: close\r\n\r\n" % (status, reason, len(body)) + body)
        self.transport.close()
        log.info("%s - - %d %d (%s)", self.client[0] if self.client else "?", status,
                 len(body), what)


def bind_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(LISTEN_BACKLOG)
    except BaseException:
        sock.close()
        raise
    sock.set_inheritable(False)
    return sock


class Listeners:
    """uvicorn servers for several (socket, ASGI app) pairs on one loop in one thread."""

    def __init__(self, apps: list[tuple[socket.socket, Asgi]], cap: int | None = None) -> None:
        self._sockets = [s for s, _ in apps]
        protocol = type("FwbuildProtocol", (Protocol,), {"cap": cap or connection_cap(),
                                                         "idle": {}})
        self._servers = [uvicorn.Server(uvicorn.Config(
            app, http=protocol, ws="none", lifespan="off", proxy_headers=False,
            server_header=False, date_header=True, access_log=False, log_config=None,
            timeout_keep_alive=KEEP_ALIVE, timeout_graceful_shutdown=STOP_GRACE,
            backlog=ACCEPT_BATCH)) for _, app in apps]
        self._loop: asyncio.AbstractEventLoop | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="fwbuild-http", daemon=True)

    @property
    def ports(self) -> list[int]:
        return [int(s.getsockname()[1]) for s in self._sockets]

    def start(self) -> None:
        self._thread.start()
        while not self._started.wait(0.1):
            if not self._thread.is_alive():
                break
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # noqa: BLE001 - reported by start()
            self._error = exc
            self._started.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        tasks = [asyncio.create_task(server.serve(sockets=[sock]))
                 for server, sock in zip(self._servers, self._sockets)]
        while not all(s.started for s in self._servers):
            if any(t.done() for t in tasks):
                break
            await asyncio.sleep(0.01)
        for sock in self._sockets:  # asyncio listened with ACCEPT_BATCH: a deeper kernel queue
            try:                    # (200 simultaneous connects were reset with 64)
                sock.listen(LISTEN_BACKLOG)
            except OSError:
                pass
        self._started.set()
        await asyncio.gather(*tasks)
        for server in self._servers:  # whatever outlived the grace period
            for connection in list(server.server_state.connections):
                transport = getattr(connection, "transport", None)
                if transport is not None:
                    transport.abort()

    def stop(self) -> None:
        """Stop accepting, close idle connections, give responses STOP_GRACE s, then close."""
        for server in self._servers:
            server.should_exit = True
        self._thread.join(STOP_GRACE + 5)
        for sock in self._sockets:
            sock.close()
