"""A whole site on one machine: the server, a real sshd entrypoint, a tiny node root, virtual nodes.

This is what `fwbuild virtual-node demo` runs and what the end-to-end tests drive:
build output (`out/virtual`) -> `fwbuild serve` (in process, loopback) -> enrollment ->
the node's own `pieeprom.bin` -> the emulated bootloader fetches and verifies boot.img
over HTTP -> QEMU boots the VPN initramfs -> SSH with the node's certificate -> sshfs
root -> switch_root -> the root's marker on the serial console.

Addresses: the server and sshd listen on 127.0.0.1 only. The guest runs with QEMU
`restrict=on` user networking; its one way out is the guestfwd rule that maps the SSH
entrypoint `10.0.2.100:22` (inside QEMU) to the sshd on the host's loopback, through a
`busybox nc` relay spawned per connection.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

from fwbuild.errors import ToolError
from fwbuild.fsutil import atomic_write
from fwbuild.keys import KeyPaths
from fwbuild.sources import Cache
from fwbuild.virtual.node import NodeOptions, NodeResult, boot_node
from fwbuild.virtual.rootfs import MARKER, build_root_image, build_tiny_root
from fwbuild.virtual.sshd import TestSshd, free_port

from .config import load_config
from .macs import normalise_mac
from .run import RunningServer, start_server

GUEST_ENTRYPOINT = "10.0.2.100"  # the SSH entrypoint as the guest sees it (QEMU guestfwd)


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
    root_image: bool = True   # export the root as an ext4 image (loop over sshfs: a second read
                              # never crosses the network) rather than as a directory


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
        port, admin_port = free_port(), free_port()
        # The node certificate's doors: the SSH gate reads the root and asks the admin API.
        self.sshd = TestSshd(work / "sshd", ca_public_key=keys.ssh_ca_pub.read_text(),
                             gate_root=str(exported),
                             gate_admin=f"http://127.0.0.1:{admin_port}").start()
        self.log(f"sshd entrypoint on 127.0.0.1:{self.sshd.port} (guest: {GUEST_ENTRYPOINT}:22)")
        toml = render_server_toml({
            "server": {
                "listen": "127.0.0.1", "port": port, "hostname": "virtual-site",
                "artifacts": str(self.options.artifacts), "state_dir": str(work / "state"),
                "keys_dir": str(self.options.keys_dir),
                "default_boot_mode": self.options.default_mode,
                "enrollment_subnets": ["127.0.0.0/8"], "node_root": str(exported),
                "revoked_keys_file": str(self.sshd.revoked),
            },
            "entrypoints": {"http": f"127.0.0.1:{self.options.http_entrypoint_port or port}", "ssh": f"{GUEST_ENTRYPOINT}:22",
                            "ssh_host_keys": [self.sshd.host_public_key.strip()]},
            "admin": {"listen": "127.0.0.1", "port": admin_port},
        })
        atomic_write(self.config_path, toml.encode())
        self.server = start_server(load_config(self.config_path))
        self.log(f"server on http://127.0.0.1:{port}/walt-vpn/ (config {self.config_path})")

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

    def get(self, path: str) -> bytes:
        with urllib.request.urlopen(f"{self.url}/{path}", timeout=30) as response:
            data: bytes = response.read()
        return data

    def enroll(self, mac: str) -> Path:
        """Enroll `mac` like a node on walt-net would, fetch its EEPROM image, return its path."""
        body = urllib.parse.urlencode({"mac": mac}).encode()
        request = urllib.request.Request(f"{self.url}/enroll", data=body, method="POST")
        with urllib.request.urlopen(request, timeout=60) as response:
            response.read()
        return self.fetch_eeprom(mac)

    def fetch_eeprom(self, mac: str) -> Path:
        mac12 = normalise_mac(mac)
        image = self.get(f"node/{mac12}/pieeprom.bin")
        path = self.options.work / "nodes" / mac12 / "pieeprom.bin"
        atomic_write(path, image, 0o600)  # it embeds the node's credentials
        self.log(f"node {mac12}: enrolled, EEPROM image {path}")
        return path

    def boot(self, eeprom: Path, *, sd: Path | None = None, timeout: float = 300.0,
             marker: str = MARKER, max_restarts: int = 2, name: str = "boot",
             extra_cmdline: str = "") -> NodeResult:
        assert self.sshd is not None
        # `cmd:` spawns a relay per guest connection (a `tcp:` chardev connects once, at
        # QEMU start, so a reconnecting node would find it gone).
        relay = shutil.which("busybox")
        if relay is None:
            raise ToolError("busybox not found (the guest's SSH relay)", hint="install busybox-static")
        options = NodeOptions(eeprom=eeprom, workdir=self.options.work / "runs" / name, sd=sd,
                              timeout=timeout, marker=marker, max_restarts=max_restarts,
                              guestfwd=(f"tcp:{GUEST_ENTRYPOINT}:22-cmd:{relay} nc 127.0.0.1 {self.sshd.port}",),
                              extra_cmdline=extra_cmdline)
        return boot_node(options, log=self.log)


@dataclass(frozen=True)
class DemoReport:
    out_dir: Path
    node_eeprom: Path
    result: NodeResult
    console_log: Path
    config: Path


def run_demo(recipe_path: Path, *, out_root: Path, keys_dir: Path, work: Path, mac: str,
             timeout: float, log: Callable[[str], None]) -> DemoReport:
    """Build the virtual recipe, verify it, start a site, enroll one node and boot it."""
    from fwbuild.build import build
    from fwbuild.keys import init_keys
    from fwbuild.recipe import load_recipe
    from fwbuild.verify import verify_output

    recipe = load_recipe(recipe_path)
    if not KeyPaths(keys_dir).boot_key.exists():
        init_keys(keys_dir)
        log(f"created site keys in {keys_dir}")
    log(f"building {recipe_path} into {out_root}/{recipe.name} (cached steps are reused)")
    built = build(recipe, out_root=out_root, keys_dir=keys_dir)
    for line in verify_output(built.out_dir).checked:
        log(f"verify: {line}")
    with VirtualSite(SiteOptions(built.out_dir, keys_dir, work), log=log) as site:
        eeprom = site.enroll(mac)
        result = site.boot(eeprom, timeout=timeout, name="demo")
    return DemoReport(built.out_dir, eeprom, result, site.options.work / "runs" / "demo" / "console.log",
                      site.config_path)
