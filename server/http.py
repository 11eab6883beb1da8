"""HTTP plumbing: a threaded stdlib server with sendfile, ETag/Last-Modified, conditional
GET, single ranges, HEAD, typed errors, one log line per response and graceful shutdown.

Applications implement `App.dispatch(Request) -> Response`; they never see sockets.
Paths are split into percent-decoded segments here and anything that smells of
traversal (`.`/`..`, encoded or raw slashes and backslashes, NUL, control characters,
double encoding, empty segments) is refused with 400 before any routing.
"""

from __future__ import annotations

import email.utils
import json
import logging
import os
import socket
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol

from fwbuild.errors import FwbuildError

from .artifacts import FileInfo
from .errors import HttpError, http_status

log = logging.getLogger("fwbuild.server.http")

MAX_BODY = 64 * 1024
METHODS = ("GET", "HEAD", "POST")


def _digits(text: str) -> bool:
    """ASCII digits only (str.isdigit accepts '²', which int() refuses)."""
    return text.isascii() and text.isdigit()


@dataclass(frozen=True)
class Request:
    method: str
    segments: tuple[str, ...]
    query: dict[str, str]
    headers: Any  # email.message.Message (case-insensitive)
    client: str
    body: bytes

    def header(self, name: str, default: str = "") -> str:
        value = self.headers.get(name)
        return default if value is None else str(value)


@dataclass
class Response:
    status: int = 200
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"
    headers: dict[str, str] = field(default_factory=dict)
    file: tuple[int, FileInfo] | None = None  # (open fd, info): sent with sendfile, then closed
    etag: str | None = None
    last_modified: float | None = None
    after: Callable[[int], None] | None = None  # called with the status actually sent

    @classmethod
    def text(cls, text: str, status: int = 200, **kw: Any) -> Response:
        return cls(status, text.encode("utf-8"), **kw)

    @classmethod
    def json(cls, value: Any, status: int = 200, **kw: Any) -> Response:
        body = (json.dumps(value, indent=2, sort_keys=True) + "\n").encode("utf-8")
        return cls(status, body, "application/json", **kw)


class App(Protocol):
    def dispatch(self, request: Request) -> Response: ...


def prefers_text(headers: Any) -> bool:
    """`Prefer: errors=text-only` (WalT) asks for plain-text errors; JSON otherwise."""
    if headers is None:
        return False
    for value in headers.get_all("Prefer") or []:
        for token in str(value).split(","):
            if token.strip().lower().replace(" ", "") in ("errors=text-only", "errors=text"):
                return True
    return False


def error_response(status: int, what: str, hint: str | None, text: bool) -> Response:
    if text:
        return Response.text(f"{what}\n" + (f"Hint: {hint}\n" if hint else ""), status)
    error: dict[str, Any] = {"status": status, "error": what}
    if hint:
        error["hint"] = hint
    return Response.json(error, status)


def split_path(target: str) -> tuple[tuple[str, ...], dict[str, str]]:
    """Decoded path segments and query of a request target; HttpError(400) on anything odd."""
    def bad(why: str) -> HttpError:
        return HttpError(400, f"bad request path: {why}")

    if not target.startswith("/") or "#" in target:
        raise bad("must be an absolute path")
    raw_path, _, raw_query = target.partition("?")
    segments: list[str] = []
    parts = raw_path.split("/")[1:]
    for index, raw in enumerate(parts):
        if raw == "":
            if index == len(parts) - 1:
                continue  # trailing slash
            raise bad("empty segment")
        try:
            seg = urllib.parse.unquote(raw, encoding="utf-8", errors="strict")
        except UnicodeDecodeError:
            raise bad("invalid percent-encoding") from None
        if seg in (".", "..") or any(c in seg for c in "/\\%\x00") or not seg.isprintable():
            raise bad("forbidden segment")
        segments.append(seg)
    try:
        pairs = urllib.parse.parse_qsl(raw_query, keep_blank_values=True, max_num_fields=16,
                                       encoding="utf-8", errors="strict")
    except (ValueError, UnicodeDecodeError):
        raise bad("malformed query") from None
    query = {}
    for key, value in pairs:
        if key in query:
            raise bad(f"repeated query parameter {key!r}")
        query[key] = value
    return tuple(segments), query


def _etag_match(header: str, etag: str) -> bool:
    if header.strip() == "*":
        return True
    tags = [t.strip().removeprefix("W/") for t in header.split(",")]
    return etag in tags


def _parse_http_date(value: str) -> float | None:
    try:
        parsed = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    return parsed.timestamp() if parsed is not None else None


def parse_range(header: str, size: int) -> tuple[int, int] | None | str:
    """(start, end inclusive) of a single `bytes=` range; None: ignore; "416": unsatisfiable."""
    unit, _, spec = header.partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None  # other units and multiple ranges: serve the whole representation
    first, dash, last = spec.strip().partition("-")
    if not dash or not (_digits(first) or _digits(last)) or not all(
            _digits(p) or p == "" for p in (first, last)) or max(len(first), len(last)) > 18:
        return None
    if first == "":
        length = int(last)
        if length == 0 or size == 0:
            return "416"
        return max(0, size - length), size - 1
    start = int(first)
    end = size - 1 if last == "" else min(int(last), size - 1)
    if last != "" and int(last) < start:
        return None  # invalid: ignored per RFC 9110
    if start >= size:
        return "416"
    return start, end


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "fwbuild-server"
    sys_version = ""
    timeout = 30
    server: FwbuildHTTPServer

    def setup(self) -> None:
        super().setup()
        self.idle = True
        self.server.track(self, True)

    def finish(self) -> None:
        self.server.track(self, False)
        try:
            super().finish()
        except OSError:
            pass

    # -- request loop --------------------------------------------------------------------
    def handle_one_request(self) -> None:
        self._t0 = time.monotonic()
        self._sent = 0
        self.command = ""
        self.requestline = ""
        try:
            self.idle = True
            if self.server.draining:
                self.close_connection = True
                return
            self.raw_requestline = self.rfile.readline(8193)
            self.idle = False
            self._t0 = time.monotonic()
            if len(self.raw_requestline) > 8192:
                self.request_version = ""
                self.send_error(HTTPStatus.REQUEST_URI_TOO_LONG)
                return
            if not self.raw_requestline:
                self.close_connection = True
                return
            if not self.parse_request():
                return
            self._dispatch()
            self.wfile.flush()
            if self.server.draining:
                self.close_connection = True
        except TimeoutError:
            self.close_connection = True
        except (ConnectionError, OSError) as exc:
            log.debug("connection from %s dropped: %s", self.client_address[0], exc)
            self.close_connection = True

    def _dispatch(self) -> None:
        prefer_text = prefers_text(self.headers)
        try:
            request = self._read_request()
            response = self.server.app.dispatch(request)
        except FwbuildError as exc:
            status = http_status(exc)
            if status >= 500:
                log.error("%s %s: %s", self.command, self._log_path(), exc)
            response = error_response(status, exc.what, exc.hint, prefer_text)
            if isinstance(exc, HttpError):
                response.headers.update(exc.headers)
        except Exception:
            log.exception("internal error on %s %s", self.command, self._log_path())
            response = error_response(500, "internal server error", None, prefer_text)
            self.close_connection = True
        self._send(response)

    def _read_request(self) -> Request:
        method = self.command
        if method not in METHODS:
            self.close_connection = True
            raise HttpError(405, f"method {method[:16]!r} not allowed",
                            headers={"Allow": ", ".join(METHODS)})
        segments, query = split_path(self.path)
        body = b""
        chunked = "chunked" in self.headers.get("Transfer-Encoding", "").lower()
        length_text = self.headers.get("Content-Length")
        if chunked:
            self.close_connection = True
            raise HttpError(411, "chunked request bodies are not accepted",
                            "send a Content-Length")
        if length_text is not None:
            if not _digits(length_text.strip()) or len(self.headers.get_all(
                    "Content-Length") or []) > 1:
                self.close_connection = True
                raise HttpError(400, "bad Content-Length")
            length = int(length_text)
            if length > MAX_BODY:
                self.close_connection = True
                raise HttpError(413, f"request body over {MAX_BODY} bytes")
            if method != "POST" and length:
                self.close_connection = True  # unread body: do not reuse the connection
            elif length:
                body = self.rfile.read(length)
                if len(body) != length:
                    self.close_connection = True
                    raise HttpError(400, "request body shorter than its Content-Length")
        elif method == "POST":
            raise HttpError(411, "POST needs a Content-Length")
        return Request(method, segments, query, self.headers, self.client_address[0], body)

    # -- responses -----------------------------------------------------------------------
    def _send(self, response: Response) -> None:
        fd: int | None = None
        status = response.status
        try:
            if response.file is not None:
                fd, info = response.file
                response.etag = response.etag or info.etag
                response.last_modified = response.last_modified or info.mtime
                size = info.size
            else:
                size = len(response.body)
            span: tuple[int, int] | None = None
            if status == 200 and response.etag is not None:
                status, span = self._conditional(response, size)
            headers = dict(response.headers)
            if response.etag is not None:
                headers["ETag"] = response.etag
                headers.setdefault("Accept-Ranges", "bytes")
            if response.last_modified is not None:
                headers["Last-Modified"] = email.utils.formatdate(response.last_modified,
                                                                  usegmt=True)
            body = response.body
            if status == 304:
                length = 0
            elif status == 416:
                headers["Content-Range"] = f"bytes */{size}"
                body = b""
                length = 0
            else:
                start, end = span if span else (0, size - 1)
                length = end - start + 1
                if span is not None:
                    headers["Content-Range"] = f"bytes {start}-{end}/{size}"
                headers["Content-Type"] = response.content_type
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            if status != 304:
                self.send_header("Content-Length", str(length))
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            if self.command != "HEAD" and status not in (304, 416) and length > 0:
                if fd is not None:
                    with os.fdopen(fd, "rb", closefd=False) as handle:
                        self._sent = self.connection.sendfile(
                            handle, span[0] if span else 0, length)
                else:
                    data = body[span[0]:span[1] + 1] if span else body
                    self.wfile.write(data)
                    self._sent = len(data)
        finally:
            if fd is not None:
                os.close(fd)
            self._log_response(status)
        if response.after is not None:
            try:
                response.after(status)
            except Exception:
                log.exception("recording %s %s failed", self.command, self._log_path())

    def _conditional(self, response: Response, size: int) -> tuple[int, tuple[int, int] | None]:
        assert response.etag is not None
        inm = self.headers.get("If-None-Match")
        if inm is not None:
            if _etag_match(inm, response.etag):
                return 304, None
        elif response.last_modified is not None:
            ims = self.headers.get("If-Modified-Since")
            since = _parse_http_date(ims) if ims else None
            if since is not None and int(response.last_modified) <= since:
                return 304, None
        range_header = self.headers.get("Range")
        if range_header is None or self.command != "GET":
            return 200, None
        if_range = self.headers.get("If-Range")
        if if_range is not None:
            if if_range.strip().startswith(('"', "W/")):
                if if_range.strip() != response.etag:
                    return 200, None
            elif (response.last_modified is None
                  or _parse_http_date(if_range) != float(int(response.last_modified))):
                return 200, None
        parsed = parse_range(range_header, size)
        if parsed is None:
            return 200, None
        if parsed == "416":
            return 416, None
        assert isinstance(parsed, tuple)
        return 206, parsed

    def send_error(self, code: int, message: str | None = None,
                   explain: str | None = None) -> None:
        """Errors raised by the stdlib request parser, in our format."""
        self.close_connection = True
        if getattr(self, "request_version", "HTTP/0.9") in ("HTTP/0.9", ""):
            self.request_version = "HTTP/1.0"  # unparsable request line: still send a status line
        try:
            text = prefers_text(getattr(self, "headers", None))
        except Exception:  # noqa: BLE001 - headers may be half-parsed
            text = False
        what = message or HTTPStatus(code).phrase
        self._send(error_response(code, what, None, text))

    # -- logging: one line per response, never bodies or secrets ------------------------
    def _log_path(self) -> str:
        path = getattr(self, "path", "") or ""
        return repr(path[:200])[1:-1]

    def _log_response(self, status: int) -> None:
        ms = (time.monotonic() - self._t0) * 1000
        log.info('%s "%s %s" %d %d %.1fms', self.client_address[0], (self.command or "-")[:16],
                 self._log_path() or "-", status, self._sent, ms)

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        pass  # _log_response does it, with the body size

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.client_address[0], format % args)


class FwbuildHTTPServer(ThreadingHTTPServer):
    daemon_threads = False
    block_on_close = True
    request_queue_size = 512
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], app: App) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.app = app
        self.draining = False
        self._handlers: set[Handler] = set()
        self._handlers_lock = threading.Lock()
        super().__init__(address, Handler)

    def track(self, handler: Handler, alive: bool) -> None:
        with self._handlers_lock:
            (self._handlers.add if alive else self._handlers.discard)(handler)

    def drain(self) -> None:
        """Stop accepting, let in-flight responses finish, close idle keep-alive connections."""
        self.draining = True
        self.shutdown()
        with self._handlers_lock:
            handlers = list(self._handlers)
        for handler in handlers:
            if handler.idle:
                try:
                    handler.connection.shutdown(socket.SHUT_RD)
                except OSError:
                    pass
        self.server_close()  # joins the handler threads

    @property
    def port(self) -> int:
        return int(self.server_address[1])
