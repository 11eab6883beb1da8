"""The admin JSON API and the HTML status page, on a loopback-only listener.

Every request must come from a loopback address and name a loopback Host (no DNS
rebinding); writes must be `POST` with a JSON body (a browser cannot send that
cross-origin without a preflight, so a web page cannot drive the API).

  GET  /                       HTML status page (no JavaScript)
  GET  /api/nodes              all nodes
  GET  /api/nodes/<mac>        one node, with its certificates and recent events
  POST /api/nodes/<mac>/mode   {"mode": "enforced" | "permissive" | null}
  POST /api/nodes/<mac>/revoke {}
  POST /api/nodes/<mac>/forget {}
  GET  /api/artifacts          artifact digests and sizes
  GET  /api/nodes/<mac>/pieeprom.bin   the node's expected EEPROM image (for the SSH gate)
  GET  /api/nodes/<mac>/eeprom-digest  its sha256 hex + "\n" (for the SSH gate)
"""

from __future__ import annotations

import json
from typing import Any

from fwbuild.errors import UsageError

from .config import is_loopback
from .errors import Forbidden, HttpError, NotFound
from .http import Request, Response
from .service import Service
from .status import render_status


def _host_is_loopback(host: str) -> bool:
    name = host.strip()
    if name.startswith("["):
        name = name[1:].partition("]")[0]
    elif name.count(":") == 1:
        name = name.partition(":")[0]
    return name == "localhost" or is_loopback(name)


class AdminApp:
    def __init__(self, service: Service) -> None:
        self.service = service

    def dispatch(self, request: Request) -> Response:
        if not is_loopback(request.client):
            raise Forbidden("the admin API answers loopback clients only")
        if not _host_is_loopback(request.header("Host", "localhost")):
            raise Forbidden("the admin API answers Host: localhost only")
        seg = request.segments
        if seg in ((), ("status",)):
            self._get(request)
            page = render_status(self.service)
            return Response(body=page.encode("utf-8"), content_type="text/html; charset=utf-8",
                            headers={"Cache-Control": "no-store"})
        if not seg or seg[0] != "api":
            raise NotFound("no such admin resource")
        rest = seg[1:]
        if rest == ("nodes",):
            self._get(request)
            return Response.json([self.service.describe(n) for n in self.service.nodes()])
        if rest == ("artifacts",):
            self._get(request)
            return Response.json(self.service.artifacts.versions())
        if len(rest) == 2 and rest[0] == "nodes":
            self._get(request)
            return Response.json(self.service.describe(self.service.node(rest[1]), events=50))
        if len(rest) == 3 and rest[0] == "nodes" and rest[2] in ("pieeprom.bin", "eeprom-digest"):
            self._get(request)
            node = self.service.booting_node(rest[1])
            image = self.service.node_image(node)
            if rest[2] == "eeprom-digest":
                return Response.text(image.sha256 + "\n", headers={"Cache-Control": "no-store"})
            if request.method == "GET":
                self.service.record(node, "pieeprom.bin", "200", "ssh-gate")
            return Response(body=image.image, content_type="application/octet-stream",
                            headers={"Cache-Control": "no-store"})
        if len(rest) == 3 and rest[0] == "nodes":
            body = self._post_json(request)
            node_mac = rest[1]
            if rest[2] == "mode":
                mode = body.get("mode")
                if mode is not None and not isinstance(mode, str):
                    raise UsageError("`mode` must be a string or null", "body")
                node = self.service.set_mode(node_mac, None if mode == "default" else mode)
            elif rest[2] == "revoke":
                node = self.service.revoke(node_mac)
            elif rest[2] == "forget":
                self.service.forget(node_mac)
                return Response.json({"forgotten": node_mac})
            else:
                raise NotFound("no such node action", hint="mode, revoke or forget")
            return Response.json(self.service.describe(node))
        raise NotFound("no such admin resource")

    @staticmethod
    def _get(request: Request) -> None:
        if request.method not in ("GET", "HEAD"):
            raise HttpError(405, f"{request.method} not allowed here", headers={"Allow": "GET"})

    @staticmethod
    def _post_json(request: Request) -> dict[str, Any]:
        if request.method != "POST":
            raise HttpError(405, f"{request.method} not allowed here", headers={"Allow": "POST"})
        if not request.header("Content-Type").lower().startswith("application/json"):
            raise HttpError(415, "admin writes need Content-Type: application/json")
        try:
            value = json.loads(request.body or b"{}")
        except (ValueError, UnicodeDecodeError):
            raise UsageError("body is not JSON", "body") from None
        if not isinstance(value, dict):
            raise UsageError("body must be a JSON object", "body")
        return value
