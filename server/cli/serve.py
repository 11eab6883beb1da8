"""Commands: serve, entrypoint (the `nodes` commands are in nodes.py)."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

if TYPE_CHECKING:
    from ..config import Endpoint
    from ..run import RunningServer
    from ..service import Service

F = TypeVar("F", bound=Callable[..., Any])
DEFAULT_CONFIG = "server.toml"


def config_option(func: F) -> F:
    return click.option(
        "--config", "config_path", type=click.Path(dir_okay=False, path_type=Path),
        default=lambda: os.environ.get("FWBUILD_SERVER_CONFIG", DEFAULT_CONFIG),
        show_default="$FWBUILD_SERVER_CONFIG or server.toml",
        help="Server configuration (TOML).")(func)


@contextlib.contextmanager
def _service(config_path: Path) -> Iterator[Service]:
    """The server's core on its state database (safe beside a running server), closed after use."""
    from server.config import load_config
    from server.service import Service

    service = Service(load_config(config_path))
    try:
        yield service
    finally:
        service.close()


@click.command("serve")
@config_option
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]),
              default="info", show_default=True, help="One line per response at info.")
@click.option("--check", is_flag=True,
              help="Validate the config, keys, state and artifact set, then exit (0: servable).")
def serve(config_path: Path, log_level: str, check: bool) -> None:
    """Serve artifacts to nodes, enroll them, track their boot modes (until SIGTERM)."""
    from server.config import load_config
    from server.run import run_server

    config = load_config(config_path)
    if check:
        from server.pgstore import redact_url
        database = f" (database {redact_url(config.database_url)})" if config.database_url \
            else ""
        with _service(config_path) as service:
            service.check_artifacts()
            virtual = " (virtual recipe: synthetic EEPROM base)" if \
                service.artifacts.is_virtual() else ""
        click.echo(f"{config_path}: OK; artifacts {config.artifacts}{virtual}; "
                   f"state {config.state_dir}{database}; node binding "
                   f"{config.node_addresses_file or 'kernel neighbour table'}")
        return
    logging.basicConfig(level=log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    def ready(running: RunningServer) -> None:
        click.echo(f"fwbuild server: nodes on http://{config.listen}:{running.port}/walt-vpn/, "
                   f"admin on http://{config.admin.listen}:{running.admin_port}/", err=True)

    run_server(config, ready)


@click.group("entrypoint")
def entrypoint_group() -> None:
    """Print the setup of the site's HTTP and SSH entrypoints."""


def _server_endpoint(text: str | None, config_path: Path, default_port: int | None) -> Endpoint:
    from server.config import load_config, parse_endpoint

    if text:
        return parse_endpoint(text, default_port or 80, "--server")
    config = load_config(config_path)
    return parse_endpoint(config.hostname, default_port or config.port, "server.hostname")


@entrypoint_group.command("http")
@click.option("--nginx", "kind", flag_value="nginx", help="nginx `location` block.")
@click.option("--haproxy", "kind", flag_value="haproxy", help="HAProxy frontend + backend.")
@click.option("--apache", "kind", flag_value="apache", help="Apache VirtualHost (mod_proxy).")
@click.option("--server", "server_texts", metavar="HOST[:PORT]", multiple=True,
              help="A fwbuild server; repeat for several sharing one PostgreSQL state "
                   "(default: hostname and port from --config).")
@click.option("--listen-port", type=int, default=80, show_default=True,
              help="Port the proxy listens on.")
@click.option("--cache-dir", metavar="DIR",
              help="nginx: the boot image cache directory (default: [entrypoints] "
                   "http_cache_dir of --config).")
@click.option("--cache-max-size", metavar="SIZE",
              help="nginx: the cache's max_size, e.g. 20g (default: [entrypoints] "
                   "http_cache_max_size of --config).")
@config_option
def entrypoint_http(kind: str | None, server_texts: tuple[str, ...], listen_port: int,
                    cache_dir: str | None, cache_max_size: str | None,
                    config_path: Path) -> None:
    """Print the reverse-proxy config forwarding /walt-vpn/ to this server (nginx: with
    the boot image cache by digest, sized by [entrypoints] http_cache_* in the config)."""
    from server.config import clean_path, load_config, nginx_size
    from server.entrypoints import HttpCache, http_entrypoint_config

    if kind is None:
        raise click.UsageError("choose one of --nginx, --haproxy, --apache")
    servers = tuple(_server_endpoint(t, config_path, None) for t in server_texts) or (
        _server_endpoint(None, config_path, None),)
    cache = None
    if kind == "nginx":
        if cache_dir is None or cache_max_size is None or not server_texts:
            config = load_config(config_path)
            cache_dir = cache_dir or config.http_cache_dir
            cache_max_size = cache_max_size or config.http_cache_max_size
        cache = HttpCache(clean_path(cache_dir, "--cache-dir"),
                          nginx_size(cache_max_size, "--cache-max-size"))
    click.echo(http_entrypoint_config(kind, servers, listen_port, cache), nl=False)


@entrypoint_group.command("ssh")
@click.option("--forwarding-host", is_flag=True,
              help="Print the script for a separate entrypoint host that only relays nodes "
                   "to the server's sshd (ProxyJump) instead of the server's own sshd setup.")
@click.option("--server-ssh", metavar="HOST[:PORT]",
              help="With --forwarding-host: the fwbuild server's sshd "
                   "(default: server.hostname:22 from --config).")
@click.option("--server-host-keys", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="With --forwarding-host: pinned host keys of that sshd (ssh-keyscan "
                   "output); default: keyscan at setup.")
@config_option
def entrypoint_ssh(forwarding_host: bool, server_ssh: str | None, server_host_keys: Path | None,
                   config_path: Path) -> None:
    """Print the SSH setup script: the SSH gate on this server's sshd (user walt-vpn:
    node certificates get their tunnel, read-only SFTP of their own root and their own
    EEPROM image/digest, nothing else), or a separate relaying entrypoint host."""
    from fwbuild.keys import KeyPaths
    from server.config import load_config, parse_endpoint, parse_host_keys
    from server.entrypoints import server_sshd_script, ssh_entrypoint_script

    config = load_config(config_path)
    ca_pub = KeyPaths(config.keys_dir).ssh_ca_pub.read_text("ascii")
    if not forwarding_host:
        if server_ssh or server_host_keys:
            raise click.UsageError("--server-ssh and --server-host-keys need --forwarding-host")
        if config.admin.port == 0:
            raise click.UsageError("the SSH gate needs a fixed [admin] port in the config, not 0")
        host = config.admin.listen
        admin = f"http://{f'[{host}]' if ':' in host else host}:{config.admin.port}"
        click.echo(server_sshd_script(ca_pub, admin, config.node_root,
                                      str(config.revoked_keys_file)), nl=False)
        return
    endpoint = (parse_endpoint(server_ssh, 22, "--server-ssh") if server_ssh
                else parse_endpoint(config.hostname, 22, "server.hostname"))
    keys = tuple(parse_host_keys(server_host_keys.read_text("ascii"), str(server_host_keys))
                 ) if server_host_keys else ()
    click.echo(ssh_entrypoint_script(ca_pub, endpoint, keys), nl=False)


COMMANDS = [serve, entrypoint_group]
