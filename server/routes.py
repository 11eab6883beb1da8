"""Node-facing routes (WalT-compatible, under `/walt-vpn/`).

Public (anyone, e.g. through the HTTP entrypoint): `server`, `node-conf/*` public values,
`revoked-keys`, per-node `boot.img`, `boot.sig`, `pieeprom.sig`, `eeprom-digest`.
Secrets (enrollment subnets only): `enroll`, `node-conf/ssh-pubkey-cert`, `node-conf/creds`,
per-node `pieeprom.bin` (it embeds the node's private key).
Public first-boot path: `boot/boot.img`, `boot/boot.sig` (the recovery EEPROM's HTTP_PATH).

Node identity (minimal version of the issue-11 contract, active when server.toml names a
`node_addresses` file): the request's source address is looked up in the file's `MAC IP`
lines; `enroll` uses that MAC (a `mac` field that disagrees gets 403) and a node's
`pieeprom.bin` and `eeprom-digest` go to that node only.
"""

from __future__ import annotations

import email.parser
import email.policy
import urllib.parse
from collections.abc import Callable
from typing import Any

from cryptography.hazmat.primitives import serialization

from fwbuild.errors import UsageError

from .artifacts import BOOT_IMG, ArtifactMissing
from .errors import Forbidden, HttpError, NotFound
from .http import Request, Response
from .macs import normalise_mac
from .nodeimg import http_path
from .service import Service

SECRET_HEADERS = {"Cache-Control": "no-store"}
REVALIDATE = {"Cache-Control": "no-cache"}
FORM_FIELDS = ("mac", "ssh-pubkey")


def parse_form(request: Request) -> dict[str, str]:
    """Fields of an urlencoded or multipart/form-data body (WalT's curl -F or --data)."""
    ctype = request.header("Content-Type", "application/x-www-form-urlencoded").lower()
    fields: dict[str, str] = {}
    if ctype.startswith("multipart/form-data"):
        head = f"Content-Type: {request.header('Content-Type')}\r\n\r\n".encode("latin-1")
        message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
            head + request.body)
        if not message.is_multipart():
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


PROXY_HEADERS = ("Forwarded", "X-Forwarded-For", "X-Real-IP", "Via")


class NodeApp:
    """Dispatches `/walt-vpn/...` requests to the service."""

    def __init__(self, service: Service) -> None:
        self.service = service
        self.config = service.config
        self._public_pem = service.boot_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        self._conf: dict[str, Callable[[Request], Response]] = {
            "ssh-entrypoint": lambda r: Response.text(self.config.ssh_entrypoint.render(22) + "\n"),
            "http-entrypoint": lambda r: Response.text(
                self.config.http_entrypoint.render(80) + "\n"),
            "boot-mode": self._boot_mode,
            "vpn-mac": lambda r: Response.text(self._query_node(r).vpn_mac + "\n"),
            "http-path": lambda r: Response.text(http_path(self._query_node(r).mac) + "\n"),
            "public.pem": lambda r: Response(body=self._public_pem,
                                             content_type="application/x-pem-file"),
            "ssh-entrypoint-host-keys": lambda r: Response.text(service.known_hosts),
            "ssh-ca.pub": self._ssh_ca_pub,
            "ssh-pubkey-cert": self._cert,
            "creds": self._creds,
        }

    def dispatch(self, request: Request) -> Response:
        seg = request.segments
        if not seg or seg[0] != "walt-vpn":
            raise NotFound("no such resource", hint="node routes live under /walt-vpn/")
        rest = seg[1:]
        if len(rest) == 2 and rest[0] == "boot" and rest[1] in ("boot.img", "boot.sig"):
            self._method(request, "GET", "HEAD")
            return self._public_boot(rest[1])
        if rest == ("enroll",):
            self._method(request, "POST")
            return self._enroll(request)
        self._method(request, "GET", "HEAD")
        if rest == ("server",):
            return Response.text(self.config.hostname + "\n")
        if rest == ("revoked-keys",):
            try:
                text = self.config.revoked_keys_file.read_text("ascii")
            except FileNotFoundError:
                text = ""  # nothing revoked yet
            except (OSError, UnicodeDecodeError) as exc:
                raise ArtifactMissing(f"cannot read the RevokedKeys file: {exc}",
                                      str(self.config.revoked_keys_file)) from None
            return Response.text(text, headers=dict(REVALIDATE))
        if len(rest) == 2 and rest[0] == "node-conf" and rest[1] in self._conf:
            return self._conf[rest[1]](request)
        if len(rest) == 3 and rest[0] == "node":
            return self._node_file(request, rest[1], rest[2])
        raise NotFound("no such resource")

    @staticmethod
    def _method(request: Request, *allowed: str) -> None:
        if request.method not in allowed:
            raise HttpError(405, f"{request.method} not allowed here",
                            headers={"Allow": ", ".join(allowed)})

    def _require_enrollment_subnet(self, request: Request, what: str) -> None:
        # A request that came through a reverse proxy (the HTTP entrypoint adds one of these
        # headers) may come from anywhere, whatever the proxy's own address is.
        if any(request.headers.get(h) is not None for h in PROXY_HEADERS):
            raise Forbidden(f"{what} is not served through a proxy (the request carries a "
                            "forwarding header)", hint="connect directly from the platform network (walt-net)")
        if not self.config.in_enrollment_subnets(request.client):
            raise Forbidden(f"{what} is only served to the enrollment subnets",
                            hint="connect from the platform network (walt-net)")

    def _query_node(self, request: Request) -> Any:
        mac = request.query.get("mac")
        if mac is None:
            raise UsageError("missing query parameter `mac`", "query", "add ?mac=<node MAC>")
        return self.service.node(mac)

    def _boot_mode(self, request: Request) -> Response:
        if "mac" not in request.query:
            return Response.text(self.config.default_boot_mode + "\n")
        return Response.text(self.service.mode_of(self._query_node(request)) + "\n")

    def _ssh_ca_pub(self, request: Request) -> Response:
        line = self.service.ca.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        return Response(body=line + b" fwbuild-ssh-ca\n")

    def _cert(self, request: Request) -> Response:
        self._require_enrollment_subnet(request, "the node certificate")
        node = self.service.booting_node(self._query_node(request).mac)
        return Response.text(self.service.current_cert(node).certificate + "\n",
                             headers=dict(SECRET_HEADERS))

    def _creds(self, request: Request) -> Response:
        self._require_enrollment_subnet(request, "node credentials")
        node = self.service.booting_node(self._query_node(request).mac)
        return Response.text(self.service.creds(node) + "\n", headers=dict(SECRET_HEADERS))

    def _bound_mac(self, request: Request) -> str | None:
        """The MAC bound to the request's source address (None: no `node_addresses` file)."""
        path = self.config.node_addresses
        if path is None:
            return None
        try:
            lines = path.read_text("ascii").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise ArtifactMissing(f"cannot read the node addresses file: {exc}", str(path)) from None
        for line in lines:
            words = line.split("#", 1)[0].split()
            if len(words) == 2 and words[1] == request.client:
                return normalise_mac(words[0], str(path))
        raise Forbidden(f"no node is bound to address {request.client}",
                        hint="node secrets go to the node itself, identified by its walt-net address")

    def _check_bound(self, request: Request, mac_text: str, what: str) -> None:
        bound = self._bound_mac(request)
        if bound is not None and normalise_mac(mac_text) != bound:
            raise Forbidden(f"{what} of another node: address {request.client} is node {bound}",
                            hint="a node gets its own secrets only")

    def _public_boot(self, name: str) -> Response:
        info = self.service.artifacts.info(BOOT_IMG)
        if name == "boot.sig":
            sig = self.service.artifacts.boot_sig(info)
            return Response(body=sig, etag=f'"{info.sha256}.sig"', last_modified=info.mtime,
                            headers=dict(REVALIDATE))
        fd, info = self.service.artifacts.open(BOOT_IMG)
        return Response(file=(fd, info), content_type="application/octet-stream",
                        headers=dict(REVALIDATE))

    def _enroll(self, request: Request) -> Response:
        self._require_enrollment_subnet(request, "enrollment")
        form = parse_form(request)
        bound = self._bound_mac(request)
        if bound is not None:
            if "mac" in form and normalise_mac(form["mac"], "mac") != bound:
                raise Forbidden(f"enrollment names {form['mac'][:20]!r} but address {request.client} "
                                f"is node {bound}", hint="a node enrolls itself only")
            form["mac"] = bound
        if "mac" not in form:
            raise UsageError("missing form field `mac`", "body", "send mac=<node MAC>")
        result = self.service.enroll(form["mac"], form.get("ssh-pubkey"), request.client)
        return Response.json(result.as_json(), 200 if result.re_enrolled else 201,
                             headers=dict(SECRET_HEADERS))

    def _node_file(self, request: Request, mac_text: str, name: str) -> Response:
        files = ("boot.img", "boot.sig", "pieeprom.bin", "pieeprom.sig", "eeprom-digest")
        if name not in files:
            raise NotFound("no such node file", hint=f"known: {', '.join(files)}")
        normalise_mac(mac_text, "node MAC in the path")  # 400 before any lookup
        if name == "pieeprom.bin":
            self._require_enrollment_subnet(request, "pieeprom.bin (it embeds node secrets)")
        if name in ("pieeprom.bin", "eeprom-digest"):
            self._check_bound(request, mac_text, name)
        node = self.service.booting_node(mac_text)
        record = request.method == "GET"
        client = request.client

        def after(status: int) -> None:
            if record:
                self.service.record(node, name, str(status), client,
                                    boot=name == "boot.img" and status in (200, 206))

        if name == "boot.img":
            fd, info = self.service.artifacts.open(BOOT_IMG)
            return Response(file=(fd, info), content_type="application/octet-stream",
                            headers=dict(REVALIDATE), after=after)
        if name == "boot.sig":
            info = self.service.artifacts.info(BOOT_IMG)
            sig = self.service.artifacts.boot_sig(info)
            return Response(body=sig, etag=f'"{info.sha256}.sig"', last_modified=info.mtime,
                            headers=dict(REVALIDATE), after=after)
        image = self.service.node_image(node)
        if name == "eeprom-digest":
            return Response.text(image.sha256 + "\n", headers=dict(REVALIDATE), after=after)
        if name == "pieeprom.sig":
            return Response(body=image.sig, etag=f'"{image.sha256}.sig"',
                            last_modified=float(image.eeprom_ts), headers=dict(REVALIDATE),
                            after=after)
        return Response(body=image.image, content_type="application/octet-stream",
                        etag=f'"{image.sha256}"', last_modified=float(image.eeprom_ts),
                        headers=dict(SECRET_HEADERS), after=after)
