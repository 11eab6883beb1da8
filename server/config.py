"""Server configuration: `server.toml` -> frozen dataclasses.

`parse_config(mapping, base_dir)` is pure: it rejects unknown keys (naming the key path and
suggesting a near miss), checks every value and resolves relative paths against `base_dir`
(the directory of the config file). `load_config(path)` only reads and decodes the file.

```toml
[server]
listen = "0.0.0.0"              # address of the node-facing listener
port = 8080
hostname = "walt-server"        # GET /walt-vpn/server (default: this host's name)
artifacts = "out/walt-vpn"      # a build output (bootimg/, eeprom/<variant>/, manifest.json)
state_dir = "state"             # SQLite database, rendered EEPROM cache, RevokedKeys file
keys_dir = "keys"               # boot-signing.pem + ssh-ca (`fwbuild keys init`)
default_boot_mode = "enforced"  # or "permissive"; nodes may override it
enrollment_subnets = ["192.168.152.0/22"]
node_root = "/var/lib/walt/nodes/{mac12}/fs" # WALT_VPN_ROOT ({mac12}: 12 hex digits)
cert_validity_days = 3650
revoked_keys_file = "state/revoked_keys"     # default: <state_dir>/revoked_keys
node_addresses = "nodes.txt"    # optional `MAC IP` lines binding walt-net addresses to nodes
                                # (default: the kernel neighbour table of the interface)
events_max_age_days = 365       # events older than this are pruned
events_max_count = 100000       # and at most this many are kept
database = "postgresql://fwbuild@/fwbuild"   # optional: state in PostgreSQL, shared by
                                # several servers (default: SQLite in state_dir)

[entrypoints]
http = "vpn.example.org"        # host[:port] the nodes fetch boot.img from (HTTP_HOST/HTTP_PORT)
ssh = "vpn.example.org:2222"    # host[:port] of the SSH entrypoint (WALT_VPN_ENTRYPOINT)
ssh_host_keys_file = "entrypoint.keys"       # `ssh-keyscan` output or `keytype base64` lines
ssh_host_keys = ["ssh-ed25519 AAAA..."]      # and/or inline
proxy_jump = "user@jump:22"     # optional WALT_VPN_PROXY_JUMP
http_proxy = "proxy:3128"       # optional WALT_VPN_HTTP_PROXY
http_trusted = ["10.0.0.5"]     # HTTP entrypoints (nginx) whose X-Real-IP the boot-path
                                # authorization trusts (never a client's own header)
http_cache_dir = "/var/cache/nginx/fwbuild"  # the entrypoint's boot image cache
http_cache_max_size = "20g"     # (nginx sizes: k, m, g)

[admin]
listen = "127.0.0.1"            # loopback only
port = 8081
```
"""

from __future__ import annotations

import base64
import difflib
import ipaddress
import os
import re
import socket
import stat
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from fwbuild.errors import RecipeError, UsageError

from . import BOOT_MODES
from .macs import normalise_mac

SSH_KEY_TYPES = (
    "ssh-ed25519", "ssh-rsa", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521", "sk-ssh-ed25519@openssh.com", "sk-ecdsa-sha2-nistp256@openssh.com",
)
_HOST_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?$")
_NODE_ROOT_FIELDS = ("mac12",)  # the bootloader-safe form: WALT_VPN_ROOT allows no `:`


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int

    def render(self, default_port: int) -> str:
        """`host` when on the default port, else `host:port` (IPv6 in brackets)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == default_port else f"{host}:{self.port}"


@dataclass(frozen=True)
class HostKey:
    keytype: str
    blob: str  # base64

    def line(self) -> str:
        return f"{self.keytype} {self.blob}"


@dataclass(frozen=True)
class AdminConfig:
    listen: str
    port: int


@dataclass(frozen=True)
class ServerConfig:
    listen: str
    port: int
    hostname: str
    artifacts: Path
    state_dir: Path
    keys_dir: Path
    default_boot_mode: str
    enrollment_subnets: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
    node_root: str
    cert_validity_days: int
    revoked_keys_file: Path
    http_entrypoint: Endpoint
    ssh_entrypoint: Endpoint
    ssh_host_keys: tuple[HostKey, ...]
    proxy_jump: str | None
    http_proxy: str | None
    admin: AdminConfig
    node_addresses: dict[str, str] | None = None  # IP -> mac12 (None: neighbour table)
    node_addresses_file: Path | None = None
    events_max_age_days: int = 365
    events_max_count: int = 100_000
    database_url: str | None = None  # PostgreSQL conninfo URL (None: SQLite in state_dir)
    http_trusted: tuple[str, ...] = ()  # entrypoint addresses whose X-Real-IP is trusted
    http_cache_dir: str = "/var/cache/nginx/fwbuild"
    http_cache_max_size: str = "20g"

    @property
    def database(self) -> Path:
        return self.state_dir / "fwbuild-server.sqlite3"

    def in_enrollment_subnets(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip.version == net.version and ip in net for net in self.enrollment_subnets)


# section -> key -> required?
_SCHEMA: dict[str, dict[str, bool]] = {
    "server": {
        "listen": False, "port": False, "hostname": False, "artifacts": True, "state_dir": True,
        "keys_dir": True, "default_boot_mode": False, "enrollment_subnets": True,
        "node_root": True, "cert_validity_days": False, "revoked_keys_file": False,
        "node_addresses": False, "events_max_age_days": False, "events_max_count": False,
        "database": False,
    },
    "entrypoints": {
        "http": True, "ssh": True, "ssh_host_keys_file": False, "ssh_host_keys": False,
        "proxy_jump": False, "http_proxy": False, "http_trusted": False,
        "http_cache_dir": False, "http_cache_max_size": False,
    },
    "admin": {"listen": False, "port": False},
}


def _near(name: str, choices: list[str]) -> str | None:
    match = difflib.get_close_matches(name, choices, n=1, cutoff=0.6)
    return f"did you mean `{match[0]}`?" if match else None


def _check_keys(table: Mapping[str, Any], allowed: list[str], where: str) -> None:
    for key in table:
        if key not in allowed:
            hint = _near(key, allowed) or f"known keys: {', '.join(allowed)}"
            raise RecipeError(f"unknown key `{key}`", f"{where}{key}", hint)


def _get(table: Mapping[str, Any], key: str, kind: type, where: str, default: Any = None) -> Any:
    if key not in table:
        return default
    value = table[key]
    if kind is int and isinstance(value, bool):
        raise RecipeError("expected an integer, got a boolean", f"{where}{key}")
    if not isinstance(value, kind):
        raise RecipeError(f"expected {kind.__name__}, got {type(value).__name__}", f"{where}{key}")
    return value


def _port(value: int, where: str, allow_zero: bool = True) -> int:
    if not (0 if allow_zero else 1) <= value <= 65535:
        raise RecipeError(f"port {value} out of range", where, "use 1..65535 (0: any free port)")
    return value


def parse_endpoint(text: str, default_port: int, where: str) -> Endpoint:
    """`host`, `host:port`, `[v6]` or `[v6]:port`."""
    host, port = text, default_port
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise RecipeError(f"unbalanced `[` in {text!r}", where)
        host, rest = text[1:end], text[end + 1:]
        if rest:
            if not rest.startswith(":"):
                raise RecipeError(f"bad endpoint {text!r}", where, "use [v6addr]:port")
            port = _parse_port_text(rest[1:], where)
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise RecipeError(f"{host!r} is not an IPv6 address", where) from None
        return Endpoint(host, port)
    if text.count(":") == 1:
        host, port_text = text.split(":")
        port = _parse_port_text(port_text, where)
    if not _HOST_RE.match(host):
        raise RecipeError(f"bad host name {host!r}", where, "use host or host:port")
    return Endpoint(host, port)


def _parse_port_text(text: str, where: str) -> int:
    if not (text.isascii() and text.isdigit()):
        raise RecipeError(f"port {text!r} is not a number", where)
    return _port(int(text), where, allow_zero=False)


def parse_host_keys(text: str, where: str) -> list[HostKey]:
    """Host keys from `ssh-keyscan` output, known_hosts lines or `keytype base64 [comment]` lines."""
    keys: list[HostKey] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split()
        index = next((i for i, f in enumerate(fields) if f in SSH_KEY_TYPES), None)
        if index is None or index + 1 >= len(fields) or index > 1:
            raise RecipeError("not an SSH public host key line", f"{where}:{number}",
                              "expected `keytype base64` (e.g. `ssh-keyscan -p PORT HOST` output)")
        blob = fields[index + 1]
        try:
            decoded = base64.b64decode(blob, validate=True)
        except ValueError:
            raise RecipeError("host key is not valid base64", f"{where}:{number}") from None
        if fields[index].encode() not in decoded[:64]:
            raise RecipeError("host key blob does not match its key type", f"{where}:{number}")
        try:
            serialization.load_ssh_public_key(f"{fields[index]} {blob}".encode())
        except (ValueError, UnsupportedAlgorithm):
            raise RecipeError("host key is not a complete SSH public key", f"{where}:{number}",
                              "copy the whole line `ssh-keyscan` prints") from None
        key = HostKey(fields[index], blob)
        if key not in keys:
            keys.append(key)
    return keys


MAX_CONFIG_FILE = 1 << 20  # host keys and node address files are small text files


def read_config_file(path: Path, where: str, hint: str) -> str:
    """A small text file named by the config: regular, <= 1 MiB, ASCII; RecipeError otherwise."""
    if "\x00" in str(path):
        raise RecipeError("a path cannot contain a NUL byte", where, hint)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise RecipeError(f"cannot read {path}: {exc.strerror}", where, hint) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise RecipeError(f"{path} is not a regular file", where, hint)
        if st.st_size > MAX_CONFIG_FILE:
            raise RecipeError(f"{path} is larger than {MAX_CONFIG_FILE} bytes", where, hint)
        data = os.read(fd, MAX_CONFIG_FILE + 1)
    except OSError as exc:
        raise RecipeError(f"cannot read {path}: {exc.strerror}", where, hint) from None
    finally:
        os.close(fd)
    try:
        return data.decode("ascii")
    except UnicodeDecodeError:
        raise RecipeError(f"{path} is not ASCII text", where, hint) from None


def parse_node_addresses(text: str, where: str) -> dict[str, str]:
    """`MAC IP` lines (`#` comments) -> {IP: mac12}; RecipeError naming file:line."""
    table: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        fields = line.split()
        if len(fields) != 2:
            raise RecipeError("expected `MAC IP`", f"{where}:{number}",
                              "one node per line, e.g. `dc:a6:32:01:02:03 192.168.152.10`")
        try:
            mac12 = normalise_mac(fields[0], f"{where}:{number}")
        except UsageError as exc:
            raise RecipeError(exc.what, f"{where}:{number}", exc.hint) from None
        try:
            ip = ipaddress.ip_address(fields[1])
        except ValueError:
            raise RecipeError(f"{fields[1][:40]!r} is not an IP address", f"{where}:{number}",
                              "use a plain IPv4 or IPv6 address") from None
        key = str(ip)
        if key in table and table[key] != mac12:
            raise RecipeError(f"address {key} is bound to two MACs", f"{where}:{number}",
                              "one address identifies one node")
        table[key] = mac12
    return table


def _subnets(value: Any, where: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise RecipeError("expected a list of CIDR strings", where, 'e.g. ["192.168.152.0/22"]')
    nets = []
    for i, text in enumerate(value):
        try:
            nets.append(ipaddress.ip_network(text, strict=True))
        except ValueError as exc:
            raise RecipeError(f"bad subnet {text!r}: {exc}", f"{where}[{i}]",
                              "use network/prefix with host bits zero, e.g. 10.0.0.0/8") from None
    return tuple(nets)


def _node_root(text: str, where: str) -> str:
    if not text.startswith("/"):
        raise RecipeError(f"node_root must be an absolute path, got {text!r}", where)
    fields = re.findall(r"\{([^{}]*)\}", text)
    for field in fields:
        if field not in _NODE_ROOT_FIELDS:
            raise RecipeError(f"unknown placeholder {{{field}}}", where,
                              _near(field, list(_NODE_ROOT_FIELDS))
                              or f"known: {', '.join('{' + f + '}' for f in _NODE_ROOT_FIELDS)}")
    literal = re.sub(r"\{mac12\}", "", text)
    if not re.fullmatch(r"/[A-Za-z0-9._/-]*", literal) or "/../" in literal + "/":
        raise RecipeError(f"node_root {text!r} is not a clean absolute path", where,
                          "letters, digits, `.`, `_`, `-`, `/` and {mac12}; no `:` or `..`")
    return text


def _single_line(value: str | None, where: str) -> str | None:
    if value is not None and (not value.isascii() or not value.isprintable() or " " in value):
        raise RecipeError("value must be printable ASCII without spaces", where)
    return value


def is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address.split("%", 1)[0]).is_loopback
    except ValueError:
        return address == "localhost"


def parse_config(data: Mapping[str, Any], base_dir: Path) -> ServerConfig:
    """Validate a decoded `server.toml` mapping (pure; nothing is read but the host key file)."""
    _check_keys(data, list(_SCHEMA), "")
    for section, schema in _SCHEMA.items():
        table = data.get(section, {})
        if not isinstance(table, Mapping):
            raise RecipeError(f"`{section}` must be a table", section, f"write [{section}]")
        _check_keys(table, list(schema), f"{section}.")
        for key, required in schema.items():
            if required and key not in table:
                raise RecipeError(f"missing required key `{key}`", f"{section}.{key}")
    srv: Mapping[str, Any] = data.get("server", {})
    ent: Mapping[str, Any] = data.get("entrypoints", {})
    adm: Mapping[str, Any] = data.get("admin", {})

    def path(key: str) -> Path:
        text = _get(srv, key, str, "server.")
        if "\x00" in text:
            raise RecipeError("a path cannot contain a NUL byte", f"server.{key}")
        p = Path(text)
        return p if p.is_absolute() else base_dir / p

    mode = _get(srv, "default_boot_mode", str, "server.", "enforced")
    if mode not in BOOT_MODES:
        raise RecipeError(f"unknown boot mode {mode!r}", "server.default_boot_mode",
                          _near(mode, list(BOOT_MODES)) or "use enforced or permissive")
    validity = _get(srv, "cert_validity_days", int, "server.", 3650)
    if not 1 <= validity <= 36500:
        raise RecipeError(f"cert_validity_days {validity} out of range", "server.cert_validity_days",
                          "use 1..36500")
    listen = _get(srv, "listen", str, "server.", "0.0.0.0")
    _ip_or_name(listen, "server.listen")
    admin_listen = _get(adm, "listen", str, "admin.", "127.0.0.1")
    if not is_loopback(admin_listen):
        raise RecipeError(f"the admin API must listen on loopback, not {admin_listen!r}",
                          "admin.listen", "use 127.0.0.1 or ::1 (reach it through SSH if remote)")
    keys: list[HostKey] = []
    if "ssh_host_keys_file" in ent:
        kf_text = _get(ent, "ssh_host_keys_file", str, "entrypoints.")
        if "\x00" in kf_text:
            raise RecipeError("a path cannot contain a NUL byte", "entrypoints.ssh_host_keys_file")
        kf = Path(kf_text)
        kf = kf if kf.is_absolute() else base_dir / kf
        text = read_config_file(kf, "entrypoints.ssh_host_keys_file",
                                "write it with `ssh-keyscan -p PORT HOST > FILE`")
        keys += parse_host_keys(text, str(kf))
    inline = _get(ent, "ssh_host_keys", list, "entrypoints.", [])
    if not all(isinstance(v, str) for v in inline):
        raise RecipeError("expected a list of strings", "entrypoints.ssh_host_keys")
    keys += [k for k in parse_host_keys("\n".join(inline), "entrypoints.ssh_host_keys")
             if k not in keys]
    if not keys:
        raise RecipeError("no SSH entrypoint host key configured", "entrypoints.ssh_host_keys",
                          "nodes pin them: set ssh_host_keys_file (ssh-keyscan output) or ssh_host_keys")
    state_dir = path("state_dir")
    addresses: dict[str, str] | None = None
    addresses_file: Path | None = None
    if "node_addresses" in srv:
        addresses_file = path("node_addresses")
        addresses = parse_node_addresses(read_config_file(
            addresses_file, "server.node_addresses", "a file of `MAC IP` lines"),
            str(addresses_file))
    max_age = _get(srv, "events_max_age_days", int, "server.", 365)
    max_count = _get(srv, "events_max_count", int, "server.", 100_000)
    if not 1 <= max_age <= 36500:
        raise RecipeError(f"events_max_age_days {max_age} out of range",
                          "server.events_max_age_days", "use 1..36500")
    if not 100 <= max_count <= 100_000_000:
        raise RecipeError(f"events_max_count {max_count} out of range",
                          "server.events_max_count", "use 100..100000000")
    server_port = _port(_get(srv, "port", int, "server.", 8080), "server.port")
    admin_port = _port(_get(adm, "port", int, "admin.", 8081), "admin.port")
    if admin_port == server_port != 0:
        raise RecipeError(f"admin.port {admin_port} is also server.port", "admin.port",
                          "the admin listener needs its own port: e.g. admin.port = "
                          f"{server_port + 1 if server_port < 65535 else server_port - 1}")
    revoked = path("revoked_keys_file") if "revoked_keys_file" in srv else state_dir / "revoked_keys"
    return ServerConfig(
        listen=listen,
        port=server_port,
        hostname=_get(srv, "hostname", str, "server.", None) or socket.gethostname(),
        artifacts=path("artifacts"),
        state_dir=state_dir,
        keys_dir=path("keys_dir"),
        default_boot_mode=mode,
        enrollment_subnets=_subnets(srv["enrollment_subnets"], "server.enrollment_subnets"),
        node_root=_node_root(_get(srv, "node_root", str, "server."), "server.node_root"),
        cert_validity_days=validity,
        revoked_keys_file=revoked,
        http_entrypoint=_http_entrypoint(_get(ent, "http", str, "entrypoints.")),
        ssh_entrypoint=parse_endpoint(_get(ent, "ssh", str, "entrypoints."), 22, "entrypoints.ssh"),
        ssh_host_keys=tuple(keys),
        proxy_jump=_single_line(_get(ent, "proxy_jump", str, "entrypoints."), "entrypoints.proxy_jump"),
        http_proxy=_single_line(_get(ent, "http_proxy", str, "entrypoints."), "entrypoints.http_proxy"),
        admin=AdminConfig(admin_listen, admin_port),
        node_addresses=addresses,
        node_addresses_file=addresses_file,
        events_max_age_days=max_age,
        events_max_count=max_count,
        database_url=_database_url(srv),
        http_trusted=_trusted(ent),
        http_cache_dir=clean_path(_get(ent, "http_cache_dir", str, "entrypoints.",
                                   "/var/cache/nginx/fwbuild"), "entrypoints.http_cache_dir"),
        http_cache_max_size=nginx_size(_get(ent, "http_cache_max_size", str, "entrypoints.",
                                            "20g")),
    )


def _database_url(srv: Mapping[str, Any]) -> str | None:
    url = _get(srv, "database", str, "server.")
    if url is None:
        return None
    if not url.startswith(("postgresql://", "postgres://")) or any(
            c in url for c in "\x00\n\r"):
        raise RecipeError("server.database must be a PostgreSQL URL", "server.database",
                          "e.g. postgresql://fwbuild@db.example.org/fwbuild (leave it out for "
                          "the embedded SQLite database in state_dir)")
    return str(url)


def _trusted(ent: Mapping[str, Any]) -> tuple[str, ...]:
    value = _get(ent, "http_trusted", list, "entrypoints.", [])
    out = []
    for i, text in enumerate(value):
        try:
            out.append(str(ipaddress.ip_address(text)))
        except ValueError:
            raise RecipeError(f"{str(text)[:40]!r} is not an IP address",
                              f"entrypoints.http_trusted[{i}]",
                              "list the addresses the HTTP entrypoints connect from") from None
    return tuple(out)


def clean_path(text: str, where: str) -> str:
    if not re.fullmatch(r"/[A-Za-z0-9._/-]*", text) or "/../" in text + "/":
        raise RecipeError(f"{text[:60]!r} is not a clean absolute path", where,
                          "letters, digits, `.`, `_`, `-` and `/`")
    return text


def nginx_size(text: str, where: str = "entrypoints.http_cache_max_size") -> str:
    if not re.fullmatch(r"[1-9][0-9]{0,8}[kmg]?", text):
        raise RecipeError(f"bad cache size {text[:20]!r}", where,
                          "a number with k, m or g (nginx sizes), e.g. 20g")
    return text


def _http_entrypoint(text: str) -> Endpoint:
    endpoint = parse_endpoint(text, 80, "entrypoints.http")
    if ":" in endpoint.host or endpoint.host != endpoint.host.lower():
        raise RecipeError(f"HTTP entrypoint host {endpoint.host!r} cannot go in HTTP_HOST",
                          "entrypoints.http",
                          "the Pi 5 bootloader takes a lowercase host name or IPv4 address")
    return endpoint


def _ip_or_name(text: str, where: str) -> None:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        if not _HOST_RE.match(text):
            raise RecipeError(f"bad listen address {text!r}", where, "e.g. 0.0.0.0 or ::") from None


def load_config(path: Path) -> ServerConfig:
    """Read and validate a `server.toml`."""
    if "\x00" in str(path):
        raise RecipeError("a path cannot contain a NUL byte", repr(str(path)))
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise RecipeError("server config is not a regular file", str(path))
            if st.st_size > MAX_CONFIG_FILE:
                raise RecipeError(f"server config is larger than {MAX_CONFIG_FILE} bytes", str(path))
            raw = os.read(fd, MAX_CONFIG_FILE + 1)
        finally:
            os.close(fd)
    except FileNotFoundError:
        raise RecipeError("server config not found", str(path),
                          "copy server/server.example.toml (in the fwbuild source tree) to "
                          f"{path} and edit it, or pass --config PATH (or set "
                          "FWBUILD_SERVER_CONFIG)") from None
    except OSError as exc:
        raise RecipeError(f"cannot read server config: {exc.strerror}", str(path)) from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError, RecursionError) as exc:
        raise RecipeError(f"not valid TOML: {exc}", str(path)) from None
    return parse_config(data, path.resolve().parent)
