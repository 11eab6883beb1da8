"""A whole site on one machine: the server, a real sshd entrypoint, a tiny node root, virtual nodes.

This is what `fwbuild virtual-node demo` runs and what the end-to-end tests drive:
build output (`out/virtual`) -> `fwbuild serve` (in process, loopback) -> enrollment ->
the node's own `pieeprom.bin` -> the emulated bootloader fetches and verifies boot.img
over HTTP -> QEMU boots the VPN initramfs -> SSH with the node's certificate -> sshfs
root -> switch_root -> the root's marker on the serial console.

Addresses: the server and sshd listen on 127.0.0.1 only. The guest runs with QEMU
`restrict=on` user networking; its ways out are guestfwd rules, a relay spawned per
connection: the SSH entrypoint `10.0.2.100:22` (and any other port the site's
entrypoint uses) to the sshd, and the server's walt-net address (the recovery EEPROM's
HTTP_HOST:HTTP_PORT, from the recipe) to the server, connecting from the node's own
loopback address 127.0.0.N. The server binds node identity to that address through the
`node_addresses` file (`MAC IP` lines) the site writes next to server.toml. The
emulated bootloader reaches walt-net addresses the same way (same source address).

Each node's SPI flash is `<work>/nodes/<mac12>/pieeprom.bin`; `power_on` is one power
cycle (the bootloader reads the flash, QEMU runs until the root's marker, a reboot or the
timeout). Nothing in here enrolls or flashes a node during its life: the node does.
`enroll`/`fetch_eeprom` remain for the older tests that put an image in place by hand.
"""

from __future__ import annotations

import dataclasses
import http.client
import json
import shutil
import sys
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Self

from fwbuild.cache import Cache
from fwbuild.eeprom.bootconf import parse_bootconf
from fwbuild.eeprom.image import parse_image
from fwbuild.eeprom.synthetic import synthetic_image
from fwbuild.errors import FwbuildError, ToolError
from fwbuild.fsutil import atomic_write
from fwbuild.keys import KeyPaths
from fwbuild.layout import EEPROM_IMAGE
from fwbuild.virtual import relay as relay_module
from fwbuild.virtual.node import NodeOptions, NodeResult, boot_node
from fwbuild.virtual.rootfs import MARKER, build_root_image, build_tiny_root
from fwbuild.virtual.sshd import TestSshd, free_port

from .config import load_config
from .macs import normalise_mac
from .run import RunningServer, start_server

GUEST_ENTRYPOINT = "10.0.2.100"  # the SSH entrypoint as the guest sees it (QEMU guestfwd)
DEFAULT_WALT_NET = (GUEST_ENTRYPOINT, 8080)  # the server on walt-net, when the recipe names none
FIRST_NODE_ADDRESS = 10                       # node k is 127.0.0.(10 + k) on the host


class SiteHttpError(FwbuildError):
    """The site's server answered an HTTP error to a harness request."""

    def __init__(self, status: int, what: str) -> None:
        super().__init__(what)
        self.code = status


def _toml_value(value: object) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, int):
        return str(value)
    return json.dumps(str(value))  # a JSON string is a valid TOML basic string


def render_server_toml(tables: dict[str, dict[str, object]]) -> str:
    return "".join(f"[{name}]\n" + "".join(f"{k} = {_toml_value(v)}\n" for k, v in table.items()) + "\n"
                   for name, table in tables.items())


@dataclass(frozen=True)
class SiteOptions:
    artifacts: Path           # a build output, e.g. out/virtual
    keys_dir: Path            # the keys the artifacts were signed with
    work: Path                # state, sshd files, node images, console logs
    default_mode: str = "enforced"
    cache: Cache | None = None
    http_entrypoint_port: int | None = None  # nodes' HTTP_PORT: a proxy in front (default: the server)
    # The HTTP entrypoint as nodes see it, a walt-net (host, port) the bootloader reaches the
    # server through (WalT's client writes `http-entrypoint` as HTTP_HOST, port 80 implied).
    http_entrypoint: tuple[str, int] | None = None
    root_image: bool = True   # export the root as an ext4 image (loop over sshfs: a second read
                              # never crosses the network) rather than as a directory
    ssh_port: int = 22        # the SSH entrypoint's port as nodes see it (10.0.2.100:PORT)
    # Where the guest's walt-net connections to the server go, instead of the server
    # itself (tests put a proxy there, or nothing); the bootloader still reaches the server.
    walt_net_target: tuple[str, int] | None = None


@dataclass
class VirtualNode:
    mac: str                  # aa:bb:cc:dd:ee:ff
    address: str              # its walt-net address as the server sees it (127.0.0.N)
    flash: Path               # its SPI flash (pieeprom.bin)
    power_ons: list[NodeResult] = field(default_factory=list)

    @property
    def mac12(self) -> str:
        return self.mac.replace(":", "")


class VirtualSite:
    """Context manager: starts sshd and the server; `enroll`, `boot`, then stops everything."""

    def __init__(self, options: SiteOptions, log: Callable[[str], None] = lambda line: None) -> None:
        # Absolute paths: sshd and the server resolve them from other working directories.
        options = dataclasses.replace(options, artifacts=options.artifacts.resolve(),
                                      keys_dir=options.keys_dir.resolve(), work=options.work.resolve())
        self.options = options
        self.log = log
        self.sshd: TestSshd | None = None
        self.server: RunningServer | None = None
        self.config_path = options.work / "server.toml"
        self.addresses_path = options.work / "node_addresses"
        self.nodes: dict[str, VirtualNode] = {}
        self.ssh_ports: set[int] = {options.ssh_port}
        self.walt_net = _walt_net_address(options.artifacts)

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def start(self) -> None:
        work = self.options.work
        work.mkdir(parents=True, exist_ok=True)
        root = work / "export" / "root"
        if not root.exists():
            self.log("building the node's tiny arm64 root (busybox)")
            build_tiny_root(root, self.options.cache or Cache.default())
        exported = root
        if self.options.root_image:
            exported = work / "export" / "images" / "root.img"
            if not exported.exists():
                exported.parent.mkdir(parents=True, exist_ok=True)
                build_root_image(root, exported)
        keys = KeyPaths(self.options.keys_dir)
        self.exported = exported
        self.port, self.admin_port = free_port(), free_port()
        # The node certificate's doors: the SSH gate reads the root and asks the admin API.
        self.sshd = TestSshd(work / "sshd", ca_public_key=keys.ssh_ca_pub.read_text(),
                             gate_root=str(exported),
                             gate_admin=f"http://127.0.0.1:{self.admin_port}").start()
        self.log(f"sshd entrypoint on 127.0.0.1:{self.sshd.port} (guest: {GUEST_ENTRYPOINT}:{self.options.ssh_port})")
        self._write_addresses()
        self._start_server()

    def _server_toml(self) -> str:
        assert self.sshd is not None
        work = self.options.work
        return render_server_toml({
            "server": {
                "listen": "127.0.0.1", "port": self.port, "hostname": "virtual-site",
                "artifacts": str(self.options.artifacts), "state_dir": str(work / "state"),
                "keys_dir": str(self.options.keys_dir),
                "default_boot_mode": self.options.default_mode,
                "enrollment_subnets": ["127.0.0.0/8"], "node_root": str(self.exported),
                "revoked_keys_file": str(self.sshd.revoked),
                "node_addresses": self.addresses_path.name,
            },
            "entrypoints": {"http": self._http_entrypoint(),
                            "ssh": f"{GUEST_ENTRYPOINT}:{self.options.ssh_port}",
                            "ssh_host_keys": [self.sshd.host_public_key.strip()]},
            "admin": {"listen": "127.0.0.1", "port": self.admin_port},
        })

    def _http_entrypoint(self) -> str:
        if self.options.http_entrypoint is not None:
            host, port = self.options.http_entrypoint
            return f"{host}:{port}"
        return f"127.0.0.1:{self.options.http_entrypoint_port or self.port}"

    def _start_server(self) -> None:
        atomic_write(self.config_path, self._server_toml().encode())
        if self.sshd is not None:
            self.sshd.set_gate(admin=f"http://127.0.0.1:{self.admin_port}")
        self.server = start_server(load_config(self.config_path))
        self.log(f"server on http://127.0.0.1:{self.port}/walt-vpn/ (config {self.config_path}); "
                 f"on walt-net: {self.walt_net[0]}:{self.walt_net[1]}")

    def restart_server(self, *, ssh_port: int | None = None) -> None:
        """Stop the server, edit server.toml ([entrypoints] ssh port), start it again.

        The old entrypoint port keeps reaching the sshd (a site moves its entrypoint
        without cutting the nodes that still use the old one)."""
        if ssh_port is not None:
            self.options = dataclasses.replace(self.options, ssh_port=ssh_port)
            self.ssh_ports.add(ssh_port)
        if self.server is not None:
            self.server.stop()
            self.server = None
        self._start_server()

    def stop_admin_api(self) -> None:
        """The SSH gate loses the server's admin API (it then finds the server unreachable)
        while the HTTP boot files stay served: the gate is pointed at a port nothing listens
        on; `restart_server` points it back."""
        if self.sshd is not None:
            self.sshd.set_gate(admin=f"http://127.0.0.1:{free_port()}")

    def stop_server(self) -> None:
        """The server goes away (nodes then find it unreachable); `restart_server` brings it back."""
        if self.server is not None:
            self.server.stop()
            self.server = None

    # -- nodes -----------------------------------------------------------------------------
    def add_node(self, mac: str, flash: bytes | None = None) -> VirtualNode:
        """A new board on walt-net: its address, and its SPI flash (a factory image by default)."""
        mac12 = normalise_mac(mac)
        if mac12 in self.nodes:
            return self.nodes[mac12]
        node = VirtualNode(":".join(mac12[i:i + 2] for i in range(0, 12, 2)),
                           f"127.0.0.{FIRST_NODE_ADDRESS + len(self.nodes)}",
                           self.options.work / "nodes" / mac12 / "pieeprom.bin")
        if flash is not None or not node.flash.exists():
            atomic_write(node.flash, flash if flash is not None else synthetic_image(), 0o600)
        self.nodes[mac12] = node
        self._write_addresses()
        return node

    def _write_addresses(self) -> None:
        lines = "".join(f"{node.mac} {node.address}\n" for node in self.nodes.values())
        atomic_write(self.addresses_path, ("# MAC IP: each virtual node's walt-net address\n" + lines).encode())

    def guestfwd(self, node: VirtualNode | None) -> tuple[str, ...]:
        assert self.sshd is not None
        # `cmd:` spawns a relay per guest connection (a `tcp:` chardev connects once, at
        # QEMU start, so a reconnecting node would find it gone).
        busybox = shutil.which("busybox")
        if busybox is None:
            raise ToolError("busybox not found (the guest's SSH relay)", hint="install busybox-static")
        rules = [f"tcp:{GUEST_ENTRYPOINT}:{port}-cmd:{busybox} nc 127.0.0.1 {self.sshd.port}"
                 for port in sorted(self.ssh_ports)]
        if node is not None:
            host, port = self.options.walt_net_target or ("127.0.0.1", self.port)
            rules.append(f"tcp:{self.walt_net[0]}:{self.walt_net[1]}-cmd:{sys.executable} -I "
                         f"{relay_module.__file__} {node.address} {host} {port}")
        return tuple(rules)

    def power_on(self, node: VirtualNode, *, sd: Path | None = None, timeout: float = 300.0,
                 marker: str = MARKER, name: str | None = None, extra_cmdline: str = "",
                 power_cut: str | None = None, max_restarts: int = 2) -> NodeResult:
        """One power cycle of `node`: bootloader, then QEMU until the marker, a reboot or the timeout."""
        name = name or f"{node.mac12}-{len(node.power_ons) + 1}"
        # The bootloader reaches the server itself; `walt_net_target` redirects the guest only.
        walt_target = ("127.0.0.1", self.port)
        walt_net = {self.walt_net: walt_target}
        if self.options.http_entrypoint is not None:
            walt_net[self.options.http_entrypoint] = walt_target
        options = NodeOptions(eeprom=node.flash, workdir=self.options.work / "runs" / name, sd=sd,
                              timeout=timeout, marker=marker, max_restarts=max_restarts,
                              guestfwd=self.guestfwd(node), extra_cmdline=extra_cmdline, mac=node.mac,
                              walt_net=walt_net, source_address=node.address,
                              power_cut=power_cut)
        result = boot_node(options, log=self.log)
        node.power_ons.append(result)
        return result

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None
        if self.sshd is not None:
            self.sshd.stop()
            self.sshd = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.port}/walt-vpn"

    def request(self, method: str, path: str, *, mac: str | None = None, body: bytes | None = None,
                source: str | None = None) -> tuple[int, bytes]:
        """One request to the node listener, from `mac`'s walt-net address (or `source`)."""
        assert self.server is not None
        if source is None and mac is not None:
            source = self.add_node(mac).address
        conn = http.client.HTTPConnection("127.0.0.1", self.server.port, timeout=60,
                                          source_address=(source, 0) if source else None)
        try:
            headers = {"Content-Type": "application/x-www-form-urlencoded"} if body is not None else {}
            conn.request(method, f"/walt-vpn/{path}", body=body, headers=headers)
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    def get(self, path: str, mac: str | None = None) -> bytes:
        status, data = self.request("GET", path, mac=mac)
        if status != 200:
            raise SiteHttpError(status, f"GET /walt-vpn/{path}: HTTP {status}: {data[:200]!r}")
        return data

    def enroll(self, mac: str) -> Path:
        """Enroll `mac` from its own walt-net address (as the node would), fetch its EEPROM image."""
        body = urllib.parse.urlencode({"mac": mac}).encode()
        status, data = self.request("POST", "enroll", mac=mac, body=body)
        if status not in (200, 201):
            raise SiteHttpError(status, f"POST /walt-vpn/enroll: HTTP {status}: {data[:200]!r}")
        return self.fetch_eeprom(mac)

    def fetch_eeprom(self, mac: str) -> Path:
        node = self.add_node(mac)
        image = self.get(f"node/{node.mac12}/pieeprom.bin", mac=mac)
        atomic_write(node.flash, image, 0o600)  # it embeds the node's credentials
        self.log(f"node {node.mac12}: enrolled, EEPROM image {node.flash}")
        return node.flash

    def boot(self, eeprom: Path, *, sd: Path | None = None, timeout: float = 300.0,
             marker: str = MARKER, max_restarts: int = 2, name: str = "boot",
             extra_cmdline: str = "") -> NodeResult:
        """Power on the node whose flash is `eeprom` (older tests' entry point)."""
        node = next((n for n in self.nodes.values() if n.flash == eeprom), None)
        if node is None:
            options = NodeOptions(eeprom=eeprom, workdir=self.options.work / "runs" / name, sd=sd,
                                  timeout=timeout, marker=marker, max_restarts=max_restarts,
                                  guestfwd=self.guestfwd(None), extra_cmdline=extra_cmdline)
            return boot_node(options, log=self.log)
        return self.power_on(node, sd=sd, timeout=timeout, marker=marker, name=name,
                             extra_cmdline=extra_cmdline, max_restarts=max_restarts)


def _walt_net_address(artifacts: Path) -> tuple[str, int]:
    """The server's walt-net (host, port): the recovery EEPROM's HTTP_HOST and HTTP_PORT."""
    try:
        image = parse_image(EEPROM_IMAGE("recovery").path(artifacts).read_bytes())
        conf = parse_bootconf(image.read_file("bootconf.txt").decode("ascii", "replace"))
    except (OSError, FwbuildError):
        return DEFAULT_WALT_NET
    host, port = conf.get("HTTP_HOST"), conf.get("HTTP_PORT", "80")
    if not host or not port.isdigit():
        return DEFAULT_WALT_NET
    return host, int(port)
