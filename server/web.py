"""The ASGI side: requests, responses, the route table and its access classes.

Every route is declared once, in `server.routes.ROUTES`, with its access class:

- `public`: anyone, through the HTTP entrypoint; never a secret, never a state write;
- `node`: the bound node only: the request comes straight from the enrollment subnets
  (no forwarding header) and its source address maps to a MAC (`server.identity`); a MAC
  the client names (`<mac>` in the path, `?mac=`, a form field) must be that one (403);
- `admin`: loopback client, one loopback `Host`, no forwarding header.

`WebApp` is a plain ASGI application: it validates the request (HTTP version, one Host,
no request Transfer-Encoding, bounded body), splits and checks the path, finds the route,
enforces its access class, runs the handler in a thread pool (SQLite, RSA signing) and
sends the response: ETag/Last-Modified, conditional GET, single ranges, HEAD, zero-copy
files. One log line per response, never a body or a secret.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import os
import time
import urllib.parse
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from fwbuild.errors import FwbuildError

from .artifacts import FileInfo
from .config import is_loopback
from .errors import Forbidden, HttpError, NotFound, Unbound, http_status

log = logging.getLogger("fwbuild.server.http")

MAX_BODY = 64 * 1024
ACCESS_CLASSES = ("public", "node", "admin")
PROXY_HEADERS = ("forwarded", "x-forwarded-for", "x-forwarded-host", "x-forwarded-proto",
                 "x-real-ip", "via", "client-ip", "true-client-ip")


def _digits(text: str) -> bool:
    """ASCII digits only (str.isdigit accepts '²', which int() refuses)."""
    return text.isascii() and text.isdigit()


@dataclass
class Request:
    method: str
    segments: tuple[str, ...]
    query: dict[str, str]
    headers: list[tuple[str, str]]  # lower-case names, latin-1 values, in order
    client: str
    local: str
    body: bytes = b""
    params: dict[str, str] = field(default_factory=dict)
    bound_mac: str | None = None  # node class: the MAC the source address is bound to

    def header(self, name: str, default: str = "") -> str:
        name = name.lower()
        return next((v for n, v in self.headers if n == name), default)

    def header_all(self, name: str) -> list[str]:
        name = name.lower()
        return [v for n, v in self.headers if n == name]

    def has_header(self, name: str) -> bool:
        return any(n == name.lower() for n, _ in self.headers)


@dataclass
class Response:
    status: int = 200
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"
    headers: dict[str, str] = field(default_factory=dict)
    file: tuple[int, FileInfo] | None = None  # (open fd, info): sent with sendfile, then closed
    etag: str | None = None
    last_modified: float | None = None
    after: Callable[[int, bool], None] | None = None  # (status, whole body sent)

    @classmethod
    def text(cls, text: str, status: int = 200, **kw: Any) -> Response:
        return cls(status, text.encode("utf-8"), **kw)

    @classmethod
    def json(cls, value: Any, status: int = 200, **kw: Any) -> Response:
        body = (json.dumps(value, indent=2, sort_keys=True) + "\n").encode("utf-8")
        return cls(status, body, "application/json", **kw)


Handler = Callable[[Request], Response]


@dataclass(frozen=True)
class Route:
    """One route: methods, a path pattern (`{name}` segments are parameters), access class."""

    methods: tuple[str, ...]
    pattern: tuple[str, ...]
    access: str
    handler: Handler
    listener: str = "node"  # which listener serves it: "node" or "admin"
    # node class, WalT's property routes: an address on the enrollment subnets bound to no
    # node gets WalT's 400 `Invalid request.` (not 403) unless it claims a `?mac=`
    walt_unbound: bool = False

    def __post_init__(self) -> None:
        if self.access not in ACCESS_CLASSES:
            raise ValueError(f"route /{'/'.join(self.pattern)}: access class {self.access!r} "
                             f"is not one of {ACCESS_CLASSES}")
        if (self.access == "admin") != (self.listener == "admin"):
            raise ValueError(f"route /{'/'.join(self.pattern)}: admin routes (only) live on "
                             "the admin listener")
        if self.access == "public" and set(self.methods) - {"GET", "HEAD"}:
            raise ValueError(f"route /{'/'.join(self.pattern)}: public routes are GET/HEAD only")

    @property
    def path(self) -> str:
        return "/" + "/".join(self.pattern)

    def match(self, segments: tuple[str, ...]) -> dict[str, str] | None:
        if len(segments) != len(self.pattern):
            return None
        params: dict[str, str] = {}
        for want, got in zip(self.pattern, segments):
            if want.startswith("{") and want.endswith("}"):
                params[want[1:-1]] = got
            elif want != got:
                return None
        return params


def prefers_text(headers: list[tuple[str, str]]) -> bool:
    """`Prefer: errors=text-only` (WalT) asks for plain-text errors; JSON otherwise."""
    for name, value in headers:
        if name == "prefer":
            for token in value.split(","):
                if token.strip().lower().replace(" ", "") in ("errors=text-only", "errors=text"):
                    return True
    return False


def error_response(status: int, what: str, hint: str | None, text: bool) -> Response:
    if text:
        return Response.text(f"{what}\n" + (f"Hint: {hint}\n" if hint else ""), status)
    # `status_code` is WalT's key (`Prefer: errors=json`), `status` the historical one.
    error: dict[str, Any] = {"status": status, "status_code": status, "error": what}
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


def _etag_match(header: str, etag: str) -> bool:
    if header.strip() == "*":
        return True
    return etag in [t.strip().removeprefix("W/") for t in header.split(",")]


def _http_date(value: str) -> float | None:
    try:
        parsed = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    return parsed.timestamp() if parsed is not None else None


def conditional(request: Request, response: Response,
                size: int) -> tuple[int, tuple[int, int] | None]:
    """Status (200, 206, 304, 416) and range of a 200 response with an ETag."""
    assert response.etag is not None
    inm = request.header_all("if-none-match")
    if inm:
        if _etag_match(",".join(inm), response.etag):
            return 304, None
    elif response.last_modified is not None:
        ims = request.header("if-modified-since")
        since = _http_date(ims) if ims else None
        if since is not None and int(response.last_modified) <= since:
            return 304, None
    ranges = request.header_all("range")
    if len(ranges) != 1 or request.method != "GET":
        return 200, None
    if_range = request.header_all("if-range")
    if if_range:
        value = if_range[0].strip()
        if value.startswith(('"', "W/")):
            if value != response.etag:
                return 200, None
        elif (response.last_modified is None
              or _http_date(value) != float(int(response.last_modified))):
            return 200, None
    parsed = parse_range(ranges[0], size)
    if parsed is None:
        return 200, None
    if parsed == "416":
        return 416, None
    assert isinstance(parsed, tuple)
    return 206, parsed


def host_is_loopback(host: str) -> bool:
    name = host.strip()
    if name.startswith("["):
        name = name[1:].partition("]")[0]
    elif name.count(":") == 1:
        name = name.partition(":")[0]
    return name == "localhost" or is_loopback(name)


class WebApp:
    """The ASGI application of one listener ("node" or "admin") over the route table."""

    def __init__(self, routes: list[Route], listener: str, binder: Callable[[Request], str],
                 executor: ThreadPoolExecutor) -> None:
        self.routes = [r for r in routes if r.listener == listener]
        self.listener = listener
        self.binder = binder  # node class: the bound MAC of a request, or Forbidden
        self.executor = executor

    async def __call__(self, scope: dict[str, Any], receive: Callable[[], Any],
                       send: Callable[[dict[str, Any]], Any]) -> None:
        if scope["type"] != "http":
            return
        t0 = time.monotonic()
        headers = [(n.decode("latin-1").lower(), v.decode("latin-1")) for n, v in scope["headers"]]
        client = (scope.get("client") or ("?", 0))[0]
        local = (scope.get("server") or ("?", 0))[0]
        target = scope.get("extensions", {}).get("fwbuild.target", b"").decode("latin-1")
        method = str(scope["method"])
        request = Request(method, (), {}, headers, client, local)
        close = False
        try:
            close = self._check_protocol(scope, request)
            request.segments, request.query = split_path(target)
            request.body = await self._read_body(request, receive)
            route = self._route(request)
            loop = asyncio.get_running_loop()
            # Access check and handler in the pool: binding may read the neighbour table.
            response = await loop.run_in_executor(self.executor, self._handle, route, request)
        except _Disconnected:
            return
        except FwbuildError as exc:
            status = http_status(exc)
            if status >= 500 and not isinstance(exc, HttpError):
                log.error("%s %s: %s", method[:16], _printable(target), exc)
            response = error_response(status, exc.what, exc.hint, prefers_text(headers))
            if isinstance(exc, HttpError):
                response.headers.update(exc.headers)
                close = close or exc.close
        except Exception:
            log.exception("internal error on %s %s", method[:16], _printable(target))
            response = error_response(500, "internal server error", None, prefers_text(headers))
            close = True
        if close:
            response.headers["Connection"] = "close"
        status, sent, whole = await self._send(request, response, send)
        log.info('%s "%s %s" %d %d %.1fms', client, _printable(method[:16]),
                 _printable(target[:200]) or "-", status, sent,
                 (time.monotonic() - t0) * 1000)
        if response.after is not None:
            try:
                await asyncio.get_running_loop().run_in_executor(
                    self.executor, response.after, status, whole)
            except Exception:
                log.exception("recording %s %s failed", method[:16], _printable(target))

    # -- request checks -----------------------------------------------------------------
    @staticmethod
    def _check_protocol(scope: dict[str, Any], request: Request) -> bool:
        """Protocol rules the parser leaves to the app; True: close after the answer."""
        version = str(scope.get("http_version", ""))
        if version not in ("1.0", "1.1"):
            raise HttpError(505, f"HTTP version {version[:8]!r} not supported", "use HTTP/1.1",
                            close=True)
        if not (request.method.isascii() and request.method.isalpha()
                and request.method.isupper()):
            raise HttpError(400, "malformed method", close=True)
        hosts = request.header_all("host")
        if len(hosts) > 1 or (version == "1.1" and not hosts):
            raise HttpError(400, "an HTTP/1.1 request needs exactly one Host header", close=True)
        if request.has_header("transfer-encoding"):
            raise HttpError(411, "request bodies with Transfer-Encoding are not accepted",
                            "send a Content-Length", close=True)
        return False

    async def _read_body(self, request: Request, receive: Callable[[], Any]) -> bytes:
        lengths = request.header_all("content-length")
        if lengths:
            text = lengths[0].strip()
            if len(lengths) > 1 or not _digits(text) or len(text) > 12:
                raise HttpError(400, "bad Content-Length", close=True)
            if int(text) > MAX_BODY:
                raise HttpError(413, f"request body over {MAX_BODY} bytes", close=True)
        elif request.method == "POST":
            raise HttpError(411, "POST needs a Content-Length", close=True)
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _Disconnected()
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > MAX_BODY:
                raise HttpError(413, f"request body over {MAX_BODY} bytes", close=True)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks) if request.method == "POST" else b""

    def _route(self, request: Request) -> Route:
        allowed: list[str] = []
        for route in self.routes:
            params = route.match(request.segments)
            if params is None:
                continue
            if request.method in route.methods:
                request.params = params
                return route
            allowed += [m for m in route.methods if m not in allowed]
        if allowed:
            raise HttpError(405, f"{request.method[:16]} not allowed here",
                            headers={"Allow": ", ".join(allowed)})
        if request.method not in ("GET", "HEAD", "POST"):
            raise HttpError(405, f"method {request.method[:16]!r} not allowed",
                            headers={"Allow": "GET, HEAD, POST"})
        raise NotFound("no such resource",
                       hint="node routes live under /walt-vpn/" if self.listener == "node"
                       else "admin routes: /, /nodes/<mac>, /api (lists them all)")

    def _handle(self, route: Route, request: Request) -> Response:
        self._check_access(route, request)
        return route.handler(request)

    def _check_access(self, route: Route, request: Request) -> None:
        proxied = [h for h in PROXY_HEADERS if request.has_header(h)]
        if route.access == "admin":
            if proxied:
                raise Forbidden("the admin API refuses forwarded requests "
                                f"(the request carries {proxied[0]})")
            if not is_loopback(request.client):
                raise Forbidden("the admin API answers loopback clients only")
            if not host_is_loopback(request.header("host")):
                raise Forbidden("the admin API answers Host: localhost only")
        elif route.access == "node":
            if proxied:
                raise Forbidden(f"node secrets are not served through a proxy (the request "
                                f"carries {proxied[0]})",
                                hint="connect directly from the platform network (walt-net)")
            try:
                request.bound_mac = self.binder(request)
            except Unbound:
                if route.walt_unbound and "mac" not in request.query:
                    raise HttpError(400, "Invalid request.") from None
                raise

    # -- responses ----------------------------------------------------------------------
    async def _send(self, request: Request, response: Response,
                    send: Callable[[dict[str, Any]], Any]) -> tuple[int, int, bool]:
        """Send `response`; (status sent, body bytes sent, whole representation sent)."""
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
                status, span = conditional(request, response, size)
            headers = dict(response.headers)
            if response.etag is not None:
                headers["ETag"] = response.etag
                headers.setdefault("Accept-Ranges", "bytes")
            if response.last_modified is not None:
                headers["Last-Modified"] = email.utils.formatdate(response.last_modified,
                                                                  usegmt=True)
            start, end = span if span else (0, size - 1)
            length = 0 if status in (304, 416) else end - start + 1
            if status == 416:
                headers["Content-Range"] = f"bytes */{size}"
            elif status != 304:
                if span is not None:
                    headers["Content-Range"] = f"bytes {start}-{end}/{size}"
                headers["Content-Type"] = response.content_type
            if status != 304:
                headers["Content-Length"] = str(length)
            await send({"type": "http.response.start", "status": status,
                        "headers": [(k.lower().encode("latin-1"), v.encode("latin-1"))
                                    for k, v in headers.items()]})
            head = request.method == "HEAD"
            if fd is not None and length and not head:
                with os.fdopen(fd, "rb", closefd=False) as handle:
                    message: dict[str, Any] = {"type": "http.response.zerocopysend", "file": handle,
                               "offset": start, "count": length}
                    await send(message)
                sent = int(message.get("sent", 0))
            else:
                data = b"" if head or not length else response.body[start:end + 1]
                await send({"type": "http.response.body", "body": data})
                sent = len(data)
            return status, sent, status == 200 and not head and sent == size
        finally:
            if fd is not None:
                os.close(fd)


class _Disconnected(Exception):
    """The client went away before its request body arrived."""


def _printable(text: str) -> str:
    """Log-safe text: control and non-ASCII characters escaped."""
    return text.encode("ascii", "backslashreplace").decode("ascii").translate(
        {c: f"\\x{c:02x}" for c in (*range(32), 127)})
