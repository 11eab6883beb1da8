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
import ipaddress
import os
import re
import socket
import stat
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from fwbuild.configmodel import from_table, in_file, near_miss
from fwbuild.errors import ConfigError, UsageError

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


# The TOML model of server.toml (fwbuild/configmodel.py converts and rejects unknown keys,
# wrong types and missing required keys); parse_config checks the values and resolves them.
@dataclass(frozen=True)
class ServerTable:
    artifacts: str
    state_dir: str
    keys_dir: str
    enrollment_subnets: tuple[str, ...]
    node_root: str
    listen: str = "0.0.0.0"
    port: int = 8080
    hostname: str | None = None
    default_boot_mode: str = "enforced"
    cert_validity_days: int = 3650
    revoked_keys_file: str | None = None
    node_addresses: str | None = None
    events_max_age_days: int = 365
    events_max_count: int = 100_000
    database: str | None = None


@dataclass(frozen=True)
class EntrypointsTable:
    http: str
    ssh: str
    ssh_host_keys_file: str | None = None
    ssh_host_keys: tuple[str, ...] = ()
    proxy_jump: str | None = None
    http_proxy: str | None = None
    http_trusted: tuple[str, ...] = ()
    http_cache_dir: str = "/var/cache/nginx/fwbuild"
    http_cache_max_size: str = "20g"


@dataclass(frozen=True)
class AdminTable:
    listen: str = "127.0.0.1"
    port: int = 8081


@dataclass(frozen=True)
class ServerToml:
    server: ServerTable
    entrypoints: EntrypointsTable
    admin: AdminTable = field(default_factory=AdminTable)


def _port(value: int, where: str, allow_zero: bool = True) -> int:
    if not (0 if allow_zero else 1) <= value <= 65535:
        raise ConfigError(f"port {value} out of range", where, "use 1..65535 (0: any free port)")
    return value


def parse_endpoint(text: str, default_port: int, where: str) -> Endpoint:
    """`host`, `host:port`, `[v6]` or `[v6]:port`."""
    host, port = text, default_port
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ConfigError(f"unbalanced `[` in {text!r}", where)
        host, rest = text[1:end], text[end + 1:]
        if rest:
            if not rest.startswith(":"):
                raise ConfigError(f"bad endpoint {text!r}", where, "use [v6addr]:port")
            port = _parse_port_text(rest[1:], where)
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ConfigError(f"{host!r} is not an IPv6 address", where) from None
        return Endpoint(host, port)
    if text.count(":") == 1:
        host, port_text = text.split(":")
        port = _parse_port_text(port_text, where)
    if not _HOST_RE.match(host):
        raise ConfigError(f"bad host name {host!r}", where, "use host or host:port")
    return Endpoint(host, port)


def _parse_port_text(text: str, where: str) -> int:
    if not (text.isascii() and text.isdigit()):
        raise ConfigError(f"port {text!r} is not a number", where)
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
            raise ConfigError("not an SSH public host key line", f"{where}:{number}",
                              "expected `keytype base64` (e.g. `ssh-keyscan -p PORT HOST` output)")
        blob = fields[index + 1]
        try:
            decoded = base64.b64decode(blob, validate=True)
        except ValueError:
            raise ConfigError("host key is not valid base64", f"{where}:{number}") from None
        if fields[index].encode() not in decoded[:64]:
            raise ConfigError("host key blob does not match its key type", f"{where}:{number}")
        try:
            serialization.load_ssh_public_key(f"{fields[index]} {blob}".encode())
        except (ValueError, UnsupportedAlgorithm):
            raise ConfigError("host key is not a complete SSH public key", f"{where}:{number}",
                              "copy the whole line `ssh-keyscan` prints") from None
        key = HostKey(fields[index], blob)
        if key not in keys:
            keys.append(key)
    return keys


MAX_CONFIG_FILE = 1 << 20  # host keys and node address files are small text files


def read_config_file(path: Path, where: str, hint: str) -> str:
    """A small text file named by the config: regular, <= 1 MiB, ASCII; ConfigError otherwise."""
    if "\x00" in str(path):
        raise ConfigError("a path cannot contain a NUL byte", where, hint)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}", where, hint) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"{path} is not a regular file", where, hint)
        if st.st_size > MAX_CONFIG_FILE:
            raise ConfigError(f"{path} is larger than {MAX_CONFIG_FILE} bytes", where, hint)
        data = os.read(fd, MAX_CONFIG_FILE + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}", where, hint) from None
    finally:
        os.close(fd)
    try:
        return data.decode("ascii")
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not ASCII text", where, hint) from None


def parse_node_addresses(text: str, where: str) -> dict[str, str]:
    """`MAC IP` lines (`#` comments) -> {IP: mac12}; ConfigError naming file:line."""
    table: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        fields = line.split()
        if len(fields) != 2:
            raise ConfigError("expected `MAC IP`", f"{where}:{number}",
                              "one node per line, e.g. `dc:a6:32:01:02:03 192.168.152.10`")
        try:
            mac12 = normalise_mac(fields[0], f"{where}:{number}")
        except UsageError as exc:
            raise ConfigError(exc.what, f"{where}:{number}", exc.hint) from None
        try:
            ip = ipaddress.ip_address(fields[1])
        except ValueError:
            raise ConfigError(f"{fields[1][:40]!r} is not an IP address", f"{where}:{number}",
                              "use a plain IPv4 or IPv6 address") from None
        key = str(ip)
        if key in table and table[key] != mac12:
            raise ConfigError(f"address {key} is bound to two MACs", f"{where}:{number}",
                              "one address identifies one node")
        table[key] = mac12
    return table


def _subnets(value: tuple[str, ...], where: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    nets = []
    for i, text in enumerate(value):
        try:
            nets.append(ipaddress.ip_network(text, strict=True))
        except ValueError as exc:
            raise ConfigError(f"bad subnet {text!r}: {exc}", f"{where}[{i}]",
                              "use network/prefix with host bits zero, e.g. 10.0.0.0/8") from None
    return tuple(nets)


def _node_root(text: str, where: str) -> str:
    if not text.startswith("/"):
        raise ConfigError(f"node_root must be an absolute path, got {text!r}", where)
    for placeholder in re.findall(r"\{([^{}]*)\}", text):
        if placeholder not in _NODE_ROOT_FIELDS:
            raise ConfigError(f"unknown placeholder {{{placeholder}}}", where,
                              near_miss(placeholder, list(_NODE_ROOT_FIELDS))
                              or f"known: {', '.join('{' + f + '}' for f in _NODE_ROOT_FIELDS)}")
    literal = re.sub(r"\{mac12\}", "", text)
    if not re.fullmatch(r"/[A-Za-z0-9._/-]*", literal) or "/../" in literal + "/":
        raise ConfigError(f"node_root {text!r} is not a clean absolute path", where,
                          "letters, digits, `.`, `_`, `-`, `/` and {mac12}; no `:` or `..`")
    return text


def _single_line(value: str | None, where: str) -> str | None:
    if value is not None and (not value.isascii() or not value.isprintable() or " " in value):
        raise ConfigError("value must be printable ASCII without spaces", where)
    return value


def is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address.split("%", 1)[0]).is_loopback
    except ValueError:
        return address == "localhost"


def _path(text: str, base_dir: Path, where: str) -> Path:
    if "\x00" in text:
        raise ConfigError("a path cannot contain a NUL byte", where)
    p = Path(text)
    return p if p.is_absolute() else base_dir / p


def parse_config(data: Mapping[str, Any], base_dir: Path) -> ServerConfig:
    """Validate a decoded `server.toml` mapping (pure; nothing is read but the host key file)."""
    toml: ServerToml = from_table(ServerToml, data)
    srv, ent, adm = toml.server, toml.entrypoints, toml.admin
    if srv.default_boot_mode not in BOOT_MODES:
        raise ConfigError(f"unknown boot mode {srv.default_boot_mode!r}", "server.default_boot_mode",
                          near_miss(srv.default_boot_mode, list(BOOT_MODES))
                          or "use enforced or permissive")
    if not 1 <= srv.cert_validity_days <= 36500:
        raise ConfigError(f"cert_validity_days {srv.cert_validity_days} out of range",
                          "server.cert_validity_days", "use 1..36500")
    _ip_or_name(srv.listen, "server.listen")
    if not is_loopback(adm.listen):
        raise ConfigError(f"the admin API must listen on loopback, not {adm.listen!r}",
                          "admin.listen", "use 127.0.0.1 or ::1 (reach it through SSH if remote)")
    keys: list[HostKey] = []
    if ent.ssh_host_keys_file is not None:
        kf = _path(ent.ssh_host_keys_file, base_dir, "entrypoints.ssh_host_keys_file")
        text = read_config_file(kf, "entrypoints.ssh_host_keys_file",
                                "write it with `ssh-keyscan -p PORT HOST > FILE`")
        keys += parse_host_keys(text, str(kf))
    keys += [k for k in parse_host_keys("\n".join(ent.ssh_host_keys), "entrypoints.ssh_host_keys")
             if k not in keys]
    if not keys:
        raise ConfigError("no SSH entrypoint host key configured", "entrypoints.ssh_host_keys",
                          "nodes pin them: set ssh_host_keys_file (ssh-keyscan output) or ssh_host_keys")
    state_dir = _path(srv.state_dir, base_dir, "server.state_dir")
    addresses: dict[str, str] | None = None
    addresses_file: Path | None = None
    if srv.node_addresses is not None:
        addresses_file = _path(srv.node_addresses, base_dir, "server.node_addresses")
        addresses = parse_node_addresses(read_config_file(
            addresses_file, "server.node_addresses", "a file of `MAC IP` lines"),
            str(addresses_file))
    if not 1 <= srv.events_max_age_days <= 36500:
        raise ConfigError(f"events_max_age_days {srv.events_max_age_days} out of range",
                          "server.events_max_age_days", "use 1..36500")
    if not 100 <= srv.events_max_count <= 100_000_000:
        raise ConfigError(f"events_max_count {srv.events_max_count} out of range",
                          "server.events_max_count", "use 100..100000000")
    server_port = _port(srv.port, "server.port")
    admin_port = _port(adm.port, "admin.port")
    if admin_port == server_port != 0:
        raise ConfigError(f"admin.port {admin_port} is also server.port", "admin.port",
                          "the admin listener needs its own port: e.g. admin.port = "
                          f"{server_port + 1 if server_port < 65535 else server_port - 1}")
    revoked = (_path(srv.revoked_keys_file, base_dir, "server.revoked_keys_file")
               if srv.revoked_keys_file is not None else state_dir / "revoked_keys")
    return ServerConfig(
        listen=srv.listen,
        port=server_port,
        hostname=srv.hostname or socket.gethostname(),
        artifacts=_path(srv.artifacts, base_dir, "server.artifacts"),
        state_dir=state_dir,
        keys_dir=_path(srv.keys_dir, base_dir, "server.keys_dir"),
        default_boot_mode=srv.default_boot_mode,
        enrollment_subnets=_subnets(srv.enrollment_subnets, "server.enrollment_subnets"),
        node_root=_node_root(srv.node_root, "server.node_root"),
        cert_validity_days=srv.cert_validity_days,
        revoked_keys_file=revoked,
        http_entrypoint=_http_entrypoint(ent.http),
        ssh_entrypoint=parse_endpoint(ent.ssh, 22, "entrypoints.ssh"),
        ssh_host_keys=tuple(keys),
        proxy_jump=_single_line(ent.proxy_jump, "entrypoints.proxy_jump"),
        http_proxy=_single_line(ent.http_proxy, "entrypoints.http_proxy"),
        admin=AdminConfig(adm.listen, adm.port),
        node_addresses=addresses,
        node_addresses_file=addresses_file,
        events_max_age_days=srv.events_max_age_days,
        events_max_count=srv.events_max_count,
        database_url=_database_url(srv.database),
        http_trusted=_trusted(ent.http_trusted),
        http_cache_dir=clean_path(ent.http_cache_dir, "entrypoints.http_cache_dir"),
        http_cache_max_size=nginx_size(ent.http_cache_max_size),
    )


def _database_url(url: str | None) -> str | None:
    if url is None:
        return None
    if not url.startswith(("postgresql://", "postgres://")) or any(
            c in url for c in "\x00\n\r"):
        raise ConfigError("server.database must be a PostgreSQL URL", "server.database",
                          "e.g. postgresql://fwbuild@db.example.org/fwbuild (leave it out for "
                          "the embedded SQLite database in state_dir)")
    return str(url)


def _trusted(value: tuple[str, ...]) -> tuple[str, ...]:
    out = []
    for i, text in enumerate(value):
        try:
            out.append(str(ipaddress.ip_address(text)))
        except ValueError:
            raise ConfigError(f"{str(text)[:40]!r} is not an IP address",
                              f"entrypoints.http_trusted[{i}]",
                              "list the addresses the HTTP entrypoints connect from") from None
    return tuple(out)


def clean_path(text: str, where: str) -> str:
    if not re.fullmatch(r"/[A-Za-z0-9._/-]*", text) or "/../" in text + "/":
        raise ConfigError(f"{text[:60]!r} is not a clean absolute path", where,
                          "letters, digits, `.`, `_`, `-` and `/`")
    return text


def nginx_size(text: str, where: str = "entrypoints.http_cache_max_size") -> str:
    if not re.fullmatch(r"[1-9][0-9]{0,8}[kmg]?", text):
        raise ConfigError(f"bad cache size {text[:20]!r}", where,
                          "a number with k, m or g (nginx sizes), e.g. 20g")
    return text


def _http_entrypoint(text: str) -> Endpoint:
    endpoint = parse_endpoint(text, 80, "entrypoints.http")
    if ":" in endpoint.host or endpoint.host != endpoint.host.lower():
        raise ConfigError(f"HTTP entrypoint host {endpoint.host!r} cannot go in HTTP_HOST",
                          "entrypoints.http",
                          "the Pi 5 bootloader takes a lowercase host name or IPv4 address")
    return endpoint


def _ip_or_name(text: str, where: str) -> None:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        if not _HOST_RE.match(text):
            raise ConfigError(f"bad listen address {text!r}", where, "e.g. 0.0.0.0 or ::") from None


def load_config(path: Path) -> ServerConfig:
    """Read and validate a `server.toml`."""
    if "\x00" in str(path):
        raise ConfigError("a path cannot contain a NUL byte", repr(str(path)))
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise ConfigError("server config is not a regular file", str(path))
            if st.st_size > MAX_CONFIG_FILE:
                raise ConfigError(f"server config is larger than {MAX_CONFIG_FILE} bytes", str(path))
            raw = os.read(fd, MAX_CONFIG_FILE + 1)
        finally:
            os.close(fd)
    except FileNotFoundError:
        raise ConfigError("server config not found", str(path),
                          "copy server/server.example.toml (in the fwbuild source tree) to "
                          f"{path} and edit it, or pass --config PATH (or set "
                          "FWBUILD_SERVER_CONFIG)") from None
    except OSError as exc:
        raise ConfigError(f"cannot read server config: {exc.strerror}", str(path)) from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError, RecursionError) as exc:
        raise ConfigError(f"not valid TOML: {exc}", str(path)) from None
    try:
        return parse_config(data, path.resolve().parent)
    except ConfigError as exc:
        raise in_file(exc, str(path)) from None
