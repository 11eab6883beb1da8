"""The admin JSON API and the HTML status page (admin class: the loopback listener).

Every request must come from a loopback address, name one loopback Host (no DNS
rebinding) and carry no forwarding header (`server.web` enforces it for the class);
writes must be `POST` with a JSON body (a browser cannot send that cross-origin without
a preflight, so a web page cannot drive the API).

  GET  /  (and /status)               HTML status page (refreshes itself by polling /api/status)
  GET  /nodes/<mac>                   HTML page of one node
  GET  /api                           every route of both listeners with its access class
  GET  /api/status                    the status page's model as JSON
(`/healthz`, public on the node listener: {"status": "ok"} or 503 "degraded", counts only.)
  GET  /api/nodes                     all nodes
  GET  /api/nodes/<mac>               one node, with its certificates and recent events
  GET  /api/nodes/<mac>/pieeprom.bin  the node's rendered EEPROM image (for the SSH gate)
  GET  /api/nodes/<mac>/eeprom-digest sha256 hex + "\\n" of exactly that image
  POST /api/nodes/<mac>/mode          {"mode": "enforced" | "permissive" | null}
  POST /api/nodes/<mac>/revoke        {}
  POST /api/nodes/<mac>/forget        {}
  GET  /api/artifacts                 artifact digests and sizes
"""

from __future__ import annotations

import ipaddress
import json
from typing import Any

from fwbuild import __version__
from fwbuild.errors import FwbuildError, UsageError

from . import BOOT_MODES
from .errors import Conflict, HttpError
from .service import Service
from .status import render_node, render_status, status_model
from .web import Request, Response, Route, host_is_loopback

MAX_JSON_DEPTH = 32
_host_is_loopback = host_is_loopback  # kept for callers of the old name


def _json_depth_ok(body: bytes) -> bool:
    """False when brackets nest deeper than MAX_JSON_DEPTH (checked before json.loads)."""
    depth = 0
    in_string = escaped = False
    for byte in body:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:
                escaped = True
            elif byte == 0x22:
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):
            depth += 1
            if depth > MAX_JSON_DEPTH:
                return False
        elif byte in (0x5D, 0x7D):
            depth -= 1
    return True


def post_json(request: Request) -> dict[str, Any]:
    if not request.header("content-type").lower().startswith("application/json"):
        raise HttpError(415, "admin writes need Content-Type: application/json")
    if not _json_depth_ok(request.body):
        raise UsageError(f"JSON nested deeper than {MAX_JSON_DEPTH}", "body")
    try:
        value = json.loads(request.body or b"{}")
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise UsageError("body is not JSON", "body") from None
    if not isinstance(value, dict):
        raise UsageError("body must be a JSON object", "body")
    return value


NO_STORE = {"Cache-Control": "no-store"}
# The page's own script and styles only (inline, in the templates): no third-party origin.
PAGE_HEADERS = {**NO_STORE, "X-Content-Type-Options": "nosniff", "X-Frame-Options": "DENY",
                "Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; "
                "style-src 'unsafe-inline'; connect-src 'self'; img-src 'self'; "
                "frame-ancestors 'none'; base-uri 'none'; form-action 'none'"}


def health(service: Service) -> Response:
    """`{"status": "ok"}`, or 503 `degraded` when the artifact set cannot be served or the
    state database does not answer. Counts only: no path, MAC or digest (it is public)."""
    problems = len(service.artifacts.check(BOOT_MODES))
    try:
        nodes = len(service.nodes())
        database = "ok"
    except FwbuildError:
        nodes, database = 0, "unavailable"
    ok = problems == 0 and database == "ok"
    return Response.json({"status": "ok" if ok else "degraded", "artifact_problems": problems,
                          "database": database, "nodes": nodes, "version": __version__},
                         200 if ok else 503, headers={"Cache-Control": "no-cache"})


class AdminRoutes:
    def __init__(self, service: Service) -> None:
        self.service = service
        self.routes: list[Route] = []  # the whole table, set by server.routes.build_routes

    def status(self, request: Request) -> Response:
        """HTML status page (refreshes itself from /api/status)."""
        page = render_status(self.service)
        return Response(body=page.encode("utf-8"), content_type="text/html; charset=utf-8",
                        headers=dict(PAGE_HEADERS))

    def node_page(self, request: Request) -> Response:
        """HTML page of one node."""
        page = render_node(self.service, request.params["mac"])
        return Response(body=page.encode("utf-8"), content_type="text/html; charset=utf-8",
                        headers=dict(PAGE_HEADERS))

    def status_json(self, request: Request) -> Response:
        """The status page's model: nodes, events, artifact set, problems."""
        return Response.json(status_model(self.service), headers=dict(NO_STORE))

    def walt_net(self, request: Request) -> Response:
        """Is `?ip=` inside walt-net (the enrollment subnets)? The SSH gate's
        `check-in-walt-net` asks it with the node's SSH client address. Without `ip`: the
        subnets only."""
        subnets = [str(n) for n in self.service.config.enrollment_subnets]
        if "ip" not in request.query:
            return Response.json({"subnets": subnets}, headers=dict(NO_STORE))
        text = request.query["ip"]
        try:
            address = str(ipaddress.ip_address(text.split("%", 1)[0]))
        except ValueError:
            raise UsageError(f"not an IP address: {text[:45]!r}", "ip",
                             "GET /api/walt-net?ip=192.168.152.7") from None
        return Response.json({"address": address,
                              "inside": self.service.config.in_enrollment_subnets(address),
                              "subnets": subnets},
                             headers=dict(NO_STORE))

    def healthz(self, request: Request) -> Response:
        """Health: 200 ok, 503 degraded (counts only, no secret)."""
        return health(self.service)

    def index(self, request: Request) -> Response:
        """Every route of both listeners with its methods and access class."""
        return Response.json([
            {"path": route.path, "methods": list(route.methods), "access": route.access,
             "listener": route.listener,
             "summary": (route.handler.__doc__ or "").strip().split("\n")[0]}
            for route in self.routes])

    def nodes(self, request: Request) -> Response:
        """All nodes."""
        return Response.json([self.service.describe(n) for n in self.service.nodes()])

    def artifacts(self, request: Request) -> Response:
        """Artifact digests, sizes and times."""
        return Response.json(self.service.artifacts.versions())

    def node(self, request: Request) -> Response:
        """One node, with its certificates and recent events."""
        return Response.json(self.service.describe(self.service.node(request.params["mac"]),
                                                   events=50))

    def pieeprom_bin(self, request: Request) -> Response:
        """The node's rendered EEPROM image (for the SSH gate)."""
        node = self.service.booting_node(request.params["mac"])
        image = self.service.node_image(node)
        if request.method == "GET":  # the gate fetches it for its certificate's own node
            self.service.record(node, "pieeprom.bin", "200", "ssh-gate", fetched=image.sha256)
        return Response(body=image.image, content_type="application/octet-stream",
                        headers={"Cache-Control": "no-store"})

    def eeprom_digest(self, request: Request) -> Response:
        """sha256 of exactly that image. The gate asks it once per boot for the node its
        certificate names: the event is how a distant node (whose HTTP boot comes through an
        entrypoint, unattributable) shows up as seen."""
        node = self.service.booting_node(request.params["mac"])
        try:
            image = self.service.node_image(node)
        except Conflict:  # its own client writes its EEPROM (WalT's): still seen, then 409
            if request.method == "GET":
                self.service.record(node, "eeprom-digest", "409", "ssh-gate")
            raise
        if request.method == "GET":
            self.service.record(node, "eeprom-digest", "200", "ssh-gate")
        return Response.text(image.sha256 + "\n", headers={"Cache-Control": "no-store"})

    def set_mode(self, request: Request) -> Response:
        """Set the boot mode: {"mode": "enforced" | "permissive" | null}."""
        mode = post_json(request).get("mode")
        if mode is not None and not isinstance(mode, str):
            raise UsageError("`mode` must be a string or null", "body")
        node = self.service.set_mode(request.params["mac"], None if mode == "default" else mode)
        return Response.json(self.service.describe(node))

    def revoke(self, request: Request) -> Response:
        """Revoke the node (RevokedKeys, its boot paths answer 403)."""
        post_json(request)
        return Response.json(self.service.describe(self.service.revoke(request.params["mac"])))

    def forget(self, request: Request) -> Response:
        """Remove the node (its certificates stay revoked)."""
        post_json(request)
        self.service.forget(request.params["mac"])
        return Response.json({"forgotten": request.params["mac"]})
