"""Node identity on walt-net: bound to the request's source address, never claimed.

A request on the enrollment subnets is the node whose MAC the source address maps to:
from the `[server] node_addresses` file (`MAC IP` lines) when configured, else from the
kernel neighbour table (`/proc/net/arp` for IPv4, `ip -j neigh` for IPv6), restricted to
the interface that received the request. No binding: 403 with the reason.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import socket
import struct
import subprocess
import threading
from typing import Any

from fwbuild.errors import ConfigError

from .config import ServerConfig, parse_node_addresses, read_config_file
from .errors import Forbidden, Unbound
from .macs import colon_mac, normalise_mac

log = logging.getLogger("fwbuild.server")

ARP_TABLE = "/proc/net/arp"
ATF_COM = 0x2  # completed entry
SIOCGIFADDR = 0x8915


def plain_address(address: str) -> str:
    """The canonical text of an address (IPv4-mapped IPv6 -> IPv4, zone dropped)."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return str(ip)


def _interface_of(local: str) -> str | None:
    """The IPv4 interface holding `local` (the one that received the request), if known."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            import fcntl

            for _, name in socket.if_nameindex():
                try:
                    raw = fcntl.ioctl(sock.fileno(), SIOCGIFADDR,
                                      struct.pack("256s", name.encode()[:15]))
                except OSError:
                    continue
                if socket.inet_ntoa(raw[20:24]) == local:
                    return name
    except OSError:
        return None
    return None


def arp_lookup(ip: str, device: str | None, table: str = ARP_TABLE) -> str | None:
    """mac12 of a complete IPv4 neighbour entry (on `device` when given)."""
    try:
        with open(table, encoding="ascii") as handle:
            lines = handle.read().splitlines()[1:]
    except (OSError, UnicodeDecodeError):
        return None
    for line in lines:
        fields = line.split()
        if len(fields) < 6 or fields[0] != ip:
            continue
        try:
            flags = int(fields[2], 16)
        except ValueError:
            continue
        if not flags & ATF_COM or (device is not None and fields[5] != device):
            continue
        try:
            return normalise_mac(fields[3])
        except Exception:  # noqa: BLE001 - incomplete or odd entry: no binding
            return None
    return None


def ip6_lookup(ip: str) -> str | None:
    """mac12 of a reachable IPv6 neighbour (`ip -j -6 neigh show to IP`)."""
    try:
        out = subprocess.run(["ip", "-j", "-6", "neigh", "show", "to", ip], capture_output=True,
                             timeout=5, check=True).stdout
        entries = json.loads(out or b"[]")
    except (OSError, subprocess.SubprocessError, ValueError):
        return None
    for entry in entries:
        mac = entry.get("lladdr") if isinstance(entry, dict) else None
        state = entry.get("state", []) if isinstance(entry, dict) else []
        if isinstance(mac, str) and "FAILED" not in state and "INCOMPLETE" not in state:
            try:
                return normalise_mac(mac)
            except Exception:  # noqa: BLE001
                return None
    return None


class NodeBinder:
    """Maps a request's source address to the node MAC it is bound to.

    The `node_addresses` file is read again when it changes (size or mtime), so a site
    whose DHCP runs elsewhere can update it without a restart; a version that does not
    parse is logged and the previous table stays in force.
    """

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self._table = config.node_addresses
        self._stamp = self._file_stamp()
        self._lock = threading.Lock()

    def _file_stamp(self) -> tuple[int, int] | None:
        path = self.config.node_addresses_file
        if path is None:
            return None
        try:
            st = os.stat(path)
        except OSError:
            return None
        return st.st_size, st.st_mtime_ns

    def _addresses(self) -> dict[str, str] | None:
        path = self.config.node_addresses_file
        if path is None:
            return self._table
        stamp = self._file_stamp()
        with self._lock:
            if stamp is not None and stamp != self._stamp:
                self._stamp = stamp
                try:
                    self._table = parse_node_addresses(read_config_file(
                        path, "server.node_addresses", "a file of `MAC IP` lines"), str(path))
                    log.info("node addresses reloaded from %s (%d)", path, len(self._table))
                except ConfigError as exc:
                    log.error("node addresses %s not reloaded, the previous table stays: %s",
                              path, exc)
            return self._table

    def source(self) -> str:
        if self.config.node_addresses is not None:
            return f"the node address file {self.config.node_addresses_file}"
        return "the kernel neighbour table"

    def lookup(self, client: str, local: str) -> str | None:
        """mac12 bound to `client`, or None."""
        try:
            ip = plain_address(client)
        except ValueError:
            return None
        table = self._addresses()
        if table is not None:
            return table.get(ip)
        if ":" in ip:
            return ip6_lookup(ip)
        try:
            device = _interface_of(plain_address(local))
        except ValueError:
            device = None
        return arp_lookup(ip, device)

    def bind(self, client: str, local: str) -> str:
        """mac12 of the node at `client`; Forbidden (403) with the reason otherwise."""
        if not self.config.in_enrollment_subnets(client):
            raise Forbidden(f"{client} is not on the enrollment subnets: node resources are "
                            "served to the node itself only",
                            hint="connect from the platform network (walt-net)")
        mac12 = self.lookup(client, local)
        if mac12 is None:
            raise Unbound(f"no node is bound to address {client} in {self.source()}",
                            hint="the node must fetch its own resources from its own address")
        return mac12

    def bind_request(self, request: Any) -> str:
        """Node class: the bound MAC of a web Request; a MAC it names in the path or
        `?mac=` must be that one (403)."""
        mac12 = self.bind(request.client, request.local)
        if "mac" in request.params:
            check_claim(mac12, request.params["mac"], "the path")
        if "mac" in request.query:
            check_claim(mac12, request.query["mac"], "?mac=")
        return mac12


def check_claim(bound: str, claimed: str, where: str) -> str:
    """The client-named MAC must be the bound one (403 otherwise); returns mac12."""
    mac12 = normalise_mac(claimed, where)
    if mac12 != bound:
        raise Forbidden(f"{where} names {colon_mac(mac12)} but this address is bound to "
                        f"{colon_mac(bound)}", hint="a node may only ask for its own resources")
    return mac12
