"""The route table: every HTTP route of both listeners, declared once with its access class.

Node listener (WalT-compatible, under `/walt-vpn/`):
- public: `server`, `revoked-keys`, `node-conf/` site values, the site's boot image
  `boot/boot.img|boot.sig` (recovery first boot) and each node's `node/<mac>/boot.img|boot.sig`
  and WalT's `per-ip/<a-b-c-d>/boot.img|boot.sig` (the HTTP-boot paths; a full boot.img
  fetched by the bound node itself sets its last boot); `node-conf/boot-mode` (the bound
  node's mode, the site default for anyone else);
- node (the bound node only): `enroll`, `node-conf/creds|ssh-pubkey-cert|vpn-mac|http-path`,
  `node/<mac>/pieeprom.bin|pieeprom.sig|eeprom-digest`.
`node-conf/*` answers byte for byte as WalT's httpd (bare values, no trailing newline where
WalT has none; `vpn-mac`/`ssh-pubkey-cert` empty while the node is not enrolled, 400
`Invalid request.` for an address bound to no node); `?mac=` keeps working and must name
the bound node.
Admin listener (loopback): the status page and `/api/...` (server.admin).
`/healthz` is public on the node listener (counts only, no secret).
Artifacts by content (public, immutable): `by-digest/<sha256>/boot.img|boot.sig`; and
`entrypoint-auth`, the HTTP entrypoint's authorization sub-request for a per-node boot
path (nginx `auth_request`; X-Real-IP believed only from `[entrypoints] http_trusted`).
"""

from __future__ import annotations

import email.parser
import email.policy
import ipaddress
import os
import urllib.parse
from collections.abc import Callable
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from fwbuild.errors import UsageError

from . import admin
from .artifacts import BOOT_IMG, ArtifactMissing, FileInfo
from .db import NodeRow
from .errors import Forbidden, HttpError, NotFound
from .identity import NodeBinder, check_claim, plain_address
from .macs import colon_mac
from .nodeimg import http_path
from .service import Service
from .web import PROXY_HEADERS, Request, Response, Route, split_path

SECRET_HEADERS = {"Cache-Control": "no-store"}
IMMUTABLE = {"Cache-Control": "public, max-age=31536000, immutable"}
BOOT_FILES = ("boot.img", "boot.sig")
SHA256_HEX = frozenset("0123456789abcdef")
REVALIDATE = {"Cache-Control": "no-cache"}
FORM_FIELDS = ("mac", "ssh-pubkey")
GET = ("GET", "HEAD")


def parse_form(request: Request) -> dict[str, str]:
    """Fields of an urlencoded or multipart/form-data body (WalT's curl -F or --data)."""
    ctype = request.header("content-type", "application/x-www-form-urlencoded").lower()
    fields: dict[str, str] = {}
    if ctype.startswith("multipart/form-data"):
        head = f"Content-Type: {request.header('content-type')}\r\n\r\n".encode("latin-1")
        message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
            head + request.body)
        if not message.is_multipart():
            if b"content-disposition" not in request.body.lower():
                return {}  # no part at all (`curl -F` with nothing, a bare closing boundary)
            raise UsageError("malformed multipart body", "body")
        for part in message.iter_parts():
            name = part.get_param("name", header="content-disposition")
            payload = part.get_payload(decode=True)
            if not isinstance(name, str) or not isinstance(payload, bytes):
                raise UsageError("malformed multipart field", "body")
            fields[name] = _ascii(payload, name)
    elif ctype.startswith("application/x-www-form-urlencoded"):
        try:
            pairs = urllib.parse.parse_qsl(request.body.decode("ascii"), keep_blank_values=True,
                                           strict_parsing=bool(request.body),
                                           max_num_fields=8)
        except (ValueError, UnicodeDecodeError):
            raise UsageError("malformed form body", "body",
                             "send mac=...&ssh-pubkey=... urlencoded") from None
        for name, value in pairs:
            if name in fields:
                raise UsageError(f"repeated form field {name[:32]!r}", "body")
            fields[name] = value
    else:
        raise HttpError(415, f"unsupported content type {ctype[:40]!r}",
                        "use application/x-www-form-urlencoded or multipart/form-data")
    for name in fields:
        if name not in FORM_FIELDS:
            raise UsageError(f"unknown form field {name[:32]!r}", "body",
                             f"known fields: {', '.join(FORM_FIELDS)}")
    return fields


def _ascii(payload: bytes, name: str) -> str:
    try:
        return payload.decode("ascii")
    except UnicodeDecodeError:
        raise UsageError(f"field {name!r} is not ASCII", "body") from None


class NodeRoutes:
    """Handlers of the node listener."""

    def __init__(self, service: Service, binder: NodeBinder) -> None:
        self.service = service
        self.config = service.config
        self.binder = binder
        self._public_pem = service.boot_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)

    # -- helpers ------------------------------------------------------------------------
    def _node(self, request: Request) -> NodeRow:
        assert request.bound_mac is not None, "node-class route without a bound MAC"
        return self.service.booting_node(request.bound_mac)

    def _recorder(self, request: Request, node: NodeRow, artifact: str,
                  boot: bool = False, digest: str | None = None) -> Callable[[int, bool], None]:
        client = request.client

        def after(status: int, whole: bool) -> None:
            fetched = digest if whole and status == 200 else None
            self.service.record(node, artifact, str(status), client, boot=boot and whole,
                                fetched=fetched)
        return after

    def _bound_by_address(self, request: Request, mac12: str) -> bool:
        """A public request made by the node itself, straight from its bound address."""
        if any(request.has_header(h) for h in PROXY_HEADERS):
            return False
        if not self.config.in_enrollment_subnets(request.client):
            return False
        return self.binder.lookup(request.client, request.local) == mac12

    # -- public -------------------------------------------------------------------------
    def server(self, request: Request) -> Response:
        return Response.text(self.config.hostname + "\n")

    def revoked_keys(self, request: Request) -> Response:
        try:
            text = self.config.revoked_keys_file.read_text("ascii")
        except FileNotFoundError:
            text = ""  # nothing revoked yet
        except (OSError, UnicodeDecodeError) as exc:
            raise ArtifactMissing(f"cannot read the RevokedKeys file: {exc}",
                                  str(self.config.revoked_keys_file)) from None
        return Response.text(text, headers=dict(REVALIDATE))

    # WalT's property answers are bare values, no trailing newline (entrypoints: host, or
    # host:port for a non-standard port).
    def ssh_entrypoint(self, request: Request) -> Response:
        return Response.text(self.config.ssh_entrypoint.render(22))

    def http_entrypoint(self, request: Request) -> Response:
        return Response.text(self.config.http_entrypoint.render(80))

    def public_pem(self, request: Request) -> Response:
        return Response(body=self._public_pem, content_type="application/x-pem-file")

    def host_keys(self, request: Request) -> Response:
        return Response.text(self.service.hashed_known_hosts)

    def ssh_ca_pub(self, request: Request) -> Response:
        line = self.service.ca.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        return Response(body=line + b" fwbuild-ssh-ca\n")

    def site_boot_img(self, request: Request) -> Response:
        fd, info = self.service.artifacts.open(BOOT_IMG)
        return Response(file=(fd, info), content_type="application/octet-stream",
                        headers=dict(REVALIDATE))

    def site_boot_sig(self, request: Request) -> Response:
        info = self.service.artifacts.info(BOOT_IMG)
        return Response(body=self.service.artifacts.boot_sig(info), etag=f'"{info.sha256}.sig"',
                        last_modified=info.mtime, headers=dict(REVALIDATE))

    def node_boot_img(self, request: Request) -> Response:
        node = self.service.booting_node(request.params["mac"])
        response = self.site_boot_img(request)
        if request.method == "GET" and self._bound_by_address(request, node.mac):
            response.after = self._recorder(request, node, "boot.img", boot=True)
        return response

    def node_boot_sig(self, request: Request) -> Response:
        self.service.booting_node(request.params["mac"])
        return self.site_boot_sig(request)

    def _per_ip_mac(self, request: Request) -> str:
        """mac12 bound to the `<a-b-c-d>` of a per-ip path (WalT's HTTP_PATH); 404 otherwise."""
        text = request.params["ip"]
        parts = text.split("-")
        if len(parts) != 4 or not all(p.isascii() and p.isdigit() and len(p) <= 3
                                      and int(p) <= 255 for p in parts):
            raise NotFound(f"bad per-ip path {text[:40]!r}", hint="walt-vpn/per-ip/<a-b-c-d>/...")
        address = ".".join(str(int(p)) for p in parts)
        mac12 = self.binder.lookup(address, request.local)
        if mac12 is None:
            raise NotFound(f"no node is bound to address {address} in {self.binder.source()}")
        return mac12

    def per_ip_boot_img(self, request: Request) -> Response:
        request.params["mac"] = self._per_ip_mac(request)
        return self.node_boot_img(request)

    def per_ip_boot_sig(self, request: Request) -> Response:
        request.params["mac"] = self._per_ip_mac(request)
        return self.node_boot_sig(request)

    def boot_mode(self, request: Request) -> Response:
        """This node's mode (its override or the site default), bare as WalT; anyone else
        (not a node, not enrolled yet) gets the site default, as WalT's global value.
        `?mac=` must name the node bound to the address (403)."""
        mac12: str | None
        if "mac" in request.query:
            mac12 = self.binder.bind_request(request)
        else:
            mac12 = self.binder.lookup(request.client, request.local) \
                if self.config.in_enrollment_subnets(request.client) and not any(
                    request.has_header(h) for h in PROXY_HEADERS) else None
        node = self._known(mac12) if mac12 is not None else None
        mode = self.service.mode_of(node) if node is not None else self.config.default_boot_mode
        return Response.text(mode, headers=dict(REVALIDATE))

    # -- by digest, and the HTTP entrypoint's authorization sub-request ----------------
    def _by_digest(self, request: Request) -> FileInfo:
        """The boot.img whose sha256 the path names; 404 when it is not the served one."""
        digest = request.params["digest"]
        info = self.service.artifacts.info(BOOT_IMG)
        if len(digest) != 64 or not set(digest) <= SHA256_HEX or digest != info.sha256:
            raise NotFound(f"no boot.img with digest {digest[:64]!r}",
                           hint="the served boot.img changed: ask its per-node path again")
        return info

    def digest_boot_img(self, request: Request) -> Response:
        """The boot.img by content: never changes, so caches keep it (immutable)."""
        self._by_digest(request)
        fd, info = self.service.artifacts.open(BOOT_IMG)
        if info.sha256 != request.params["digest"]:
            os.close(fd)
            raise NotFound("boot.img changed while opening it", hint="ask again")
        return Response(file=(fd, info), content_type="application/octet-stream",
                        headers=dict(IMMUTABLE))

    def digest_boot_sig(self, request: Request) -> Response:
        info = self._by_digest(request)
        return Response(body=self.service.artifacts.boot_sig(info), etag=f'"{info.sha256}.sig"',
                        last_modified=info.mtime, headers=dict(IMMUTABLE))

    def _entrypoint_client(self, request: Request) -> str | None:
        """The node's address an HTTP entrypoint reports (X-Real-IP), trusted only when the
        request comes from a configured entrypoint address (entrypoints.http_trusted)."""
        if plain_address(request.client) not in self.config.http_trusted:
            return None
        values = request.header_all("x-real-ip")
        if len(values) != 1:
            return None
        try:
            return plain_address(values[0].strip())
        except ValueError:
            return None

    def entrypoint_auth(self, request: Request) -> Response:
        """nginx `auth_request`: may the per-node boot path in X-Original-URI be served?
        200 with `X-Fwbuild-Object: <sha256>/boot.img|sig` (the entrypoint answers it from
        its cache by digest), 403 for a revoked node, 404 unknown. A boot.img asked by the
        bound node itself (its real address, from a trusted entrypoint) is an event."""
        uri = request.header("x-original-uri")
        if not uri:
            raise UsageError("the authorization sub-request has no X-Original-URI",
                             "X-Original-URI",
                             "nginx: proxy_set_header X-Original-URI $request_uri")
        segments, _ = split_path(uri)
        if len(segments) != 4 or segments[:2] not in (("walt-vpn", "node"),
                                                      ("walt-vpn", "per-ip")) \
                or segments[3] not in BOOT_FILES:
            raise NotFound("not a per-node boot path",
                           hint="walt-vpn/node/<mac>/boot.img|sig or walt-vpn/per-ip/<ip>/...")
        if segments[1] == "per-ip":
            request.params["ip"] = segments[2]
            mac = self._per_ip_mac(request)
        else:
            mac = segments[2]
        node = self.service.booting_node(mac)
        info = self.service.artifacts.info(BOOT_IMG)
        real = self._entrypoint_client(request)
        if (segments[3] == "boot.img" and request.method == "GET" and real is not None
                and self.config.in_enrollment_subnets(real)
                and self.binder.lookup(real, request.local) == node.mac):
            self.service.record(node, "boot.img", "entrypoint", real)
        headers = dict(REVALIDATE)  # a decision of now: never reused from a cache
        headers["X-Fwbuild-Object"] = f"{info.sha256}/{segments[3]}"
        return Response(headers=headers)

    # -- node (bound) -------------------------------------------------------------------
    def enroll(self, request: Request) -> Response:
        """WalT's client (multipart, `ssh-pubkey` only, no JSON asked): `OK\\n`; ours
        (a `mac` field, or `Accept: application/json`): the enrollment as JSON."""
        assert request.bound_mac is not None
        form = parse_form(request)
        walt = "mac" not in form and request.header("content-type").lower().startswith(
            "multipart/form-data") and "application/json" not in request.header("accept")
        if "mac" in form:
            check_claim(request.bound_mac, form["mac"], "the form field `mac`")
        if walt and not form.get("ssh-pubkey", "").strip():
            raise HttpError(400, "Public key not provided.")
        result = self.service.enroll(request.bound_mac, form.get("ssh-pubkey"), request.client)
        if walt:
            return Response.text("OK\n", headers=dict(SECRET_HEADERS))
        return Response.json(result.as_json(), 200 if result.re_enrolled else 201,
                             headers=dict(SECRET_HEADERS))

    def creds(self, request: Request) -> Response:
        node = self._node(request)
        return Response.text(self.service.creds(node) + "\n", headers=dict(SECRET_HEADERS))

    def _known(self, mac12: str) -> NodeRow | None:
        """The bound node, None when not enrolled yet (WalT: empty answer), 403 revoked."""
        try:
            node = self.service.node(mac12)
        except NotFound:
            return None
        if node.state != "enrolled":
            raise Forbidden(f"node {colon_mac(node.mac)} is revoked")
        return node

    def cert(self, request: Request) -> Response:
        """The node's certificate line (as ssh-keygen writes it); empty when not enrolled."""
        assert request.bound_mac is not None
        node = self._known(request.bound_mac)
        text = self.service.current_cert(node).certificate + "\n" if node is not None else ""
        return Response.text(text, headers=dict(SECRET_HEADERS))

    def vpn_mac(self, request: Request) -> Response:
        """Bare VPN MAC; empty 200 when not enrolled (WalT)."""
        assert request.bound_mac is not None
        node = self._known(request.bound_mac)
        return Response.text(node.vpn_mac if node is not None else "",
                             headers=dict(REVALIDATE))

    def http_path(self, request: Request) -> Response:
        """WalT's `walt-vpn/per-ip/<a-b-c-d>` of the node's IPv4 address (bare); an IPv6
        node gets its `walt-vpn/node/<mac12>` path."""
        assert request.bound_mac is not None
        address = ipaddress.ip_address(plain_address(request.client))
        if isinstance(address, ipaddress.IPv4Address):
            return Response.text("walt-vpn/per-ip/" + str(address).replace(".", "-"))
        return Response.text(http_path(request.bound_mac))

    def pieeprom_bin(self, request: Request) -> Response:
        node = self._node(request)
        image = self.service.node_image(node)
        return Response(body=image.image, content_type="application/octet-stream",
                        etag=f'"{image.sha256}"', last_modified=float(image.eeprom_ts),
                        headers=dict(SECRET_HEADERS),
                        after=self._recorder(request, node, "pieeprom.bin",
                                             digest=image.sha256))

    def pieeprom_sig(self, request: Request) -> Response:
        node = self._node(request)
        image = self.service.node_image(node)
        return Response(body=image.sig, etag=f'"{image.sha256}.sig"',
                        last_modified=float(image.eeprom_ts), headers=dict(REVALIDATE))

    def eeprom_digest(self, request: Request) -> Response:
        node = self._node(request)
        image = self.service.node_image(node)
        return Response.text(image.sha256 + "\n", headers=dict(SECRET_HEADERS),
                             after=self._recorder(request, node, "eeprom-digest"))


def _p(path: str) -> tuple[str, ...]:
    return tuple(Path(path).parts[1:])


def build_routes(service: Service, binder: NodeBinder) -> list[Route]:
    """The one route table of the server (both listeners)."""
    n = NodeRoutes(service, binder)
    a = admin.AdminRoutes(service)
    conf = "/walt-vpn/node-conf/"
    node_file = "/walt-vpn/node/{mac}/"
    per_ip = "/walt-vpn/per-ip/{ip}/"
    table = [
        # public: anyone; never a secret, never a state write by an unbound client
        Route(GET, _p("/walt-vpn/server"), "public", n.server),
        Route(GET, _p("/walt-vpn/revoked-keys"), "public", n.revoked_keys),
        Route(GET, _p(conf + "ssh-entrypoint"), "public", n.ssh_entrypoint),
        Route(GET, _p(conf + "http-entrypoint"), "public", n.http_entrypoint),
        Route(GET, _p(conf + "public.pem"), "public", n.public_pem),
        Route(GET, _p(conf + "ssh-entrypoint-host-keys"), "public", n.host_keys),
        Route(GET, _p(conf + "ssh-ca.pub"), "public", n.ssh_ca_pub),
        Route(GET, _p("/walt-vpn/boot/boot.img"), "public", n.site_boot_img),
        Route(GET, _p("/walt-vpn/boot/boot.sig"), "public", n.site_boot_sig),
        Route(GET, _p(node_file + "boot.img"), "public", n.node_boot_img),
        Route(GET, _p(node_file + "boot.sig"), "public", n.node_boot_sig),
        Route(GET, _p(per_ip + "boot.img"), "public", n.per_ip_boot_img),
        Route(GET, _p(per_ip + "boot.sig"), "public", n.per_ip_boot_sig),
        Route(GET, _p(conf + "boot-mode"), "public", n.boot_mode),
        Route(GET, _p("/walt-vpn/by-digest/{digest}/boot.img"), "public", n.digest_boot_img),
        Route(GET, _p("/walt-vpn/by-digest/{digest}/boot.sig"), "public", n.digest_boot_sig),
        Route(GET, _p("/walt-vpn/entrypoint-auth"), "public", n.entrypoint_auth),
        Route(GET, ("healthz",), "public", a.healthz),
        # node: the bound node only
        Route(("POST",), _p("/walt-vpn/enroll"), "node", n.enroll),
        Route(GET, _p(conf + "creds"), "node", n.creds),
        # (WalT's per-node properties: an unbound address on walt-net gets 400)
        Route(GET, _p(conf + "ssh-pubkey-cert"), "node", n.cert, walt_unbound=True),
        Route(GET, _p(conf + "vpn-mac"), "node", n.vpn_mac, walt_unbound=True),
        Route(GET, _p(conf + "http-path"), "node", n.http_path, walt_unbound=True),
        Route(GET, _p(node_file + "pieeprom.bin"), "node", n.pieeprom_bin),
        Route(GET, _p(node_file + "pieeprom.sig"), "node", n.pieeprom_sig),
        Route(GET, _p(node_file + "eeprom-digest"), "node", n.eeprom_digest),
        # admin: loopback listener
        Route(GET, (), "admin", a.status, "admin"),
        Route(GET, ("status",), "admin", a.status, "admin"),
        Route(GET, ("nodes", "{mac}"), "admin", a.node_page, "admin"),
        Route(GET, ("api",), "admin", a.index, "admin"),
        Route(GET, ("api", "status"), "admin", a.status_json, "admin"),
        Route(GET, ("api", "nodes"), "admin", a.nodes, "admin"),
        Route(GET, ("api", "artifacts"), "admin", a.artifacts, "admin"),
        Route(GET, ("api", "walt-net"), "admin", a.walt_net, "admin"),
        Route(GET, ("api", "nodes", "{mac}"), "admin", a.node, "admin"),
        Route(GET, ("api", "nodes", "{mac}", "pieeprom.bin"), "admin", a.pieeprom_bin, "admin"),
        Route(GET, ("api", "nodes", "{mac}", "eeprom-digest"), "admin", a.eeprom_digest, "admin"),
        Route(("POST",), ("api", "nodes", "{mac}", "mode"), "admin", a.set_mode, "admin"),
        Route(("POST",), ("api", "nodes", "{mac}", "revoke"), "admin", a.revoke, "admin"),
        Route(("POST",), ("api", "nodes", "{mac}", "forget"), "admin", a.forget, "admin"),
    ]
    a.routes = table
    return table
