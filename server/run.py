"""Start the node listener and the loopback admin listener; stop gracefully on SIGTERM."""

from __future__ import annotations

import errno
import logging
import signal
import socket
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from types import FrameType

from fwbuild.errors import FwbuildError

from .config import ServerConfig
from .identity import NodeBinder
from .listener import Listeners, bind_socket
from .routes import build_routes
from .service import Service
from .web import WebApp

log = logging.getLogger("fwbuild.server")

WORKERS = 16  # handler threads (SQLite, EEPROM rendering); file bodies never use them


@dataclass
class RunningServer:
    """Both listeners of a started server (tests use it in-process)."""

    service: Service
    listeners: Listeners
    executor: ThreadPoolExecutor
    port: int
    admin_port: int
    follower: threading.Thread | None = None
    follow_stop: threading.Event | None = None

    def stop(self) -> None:
        """Graceful: stop accepting, finish in-flight responses, close the database."""
        if self.follow_stop is not None and self.follower is not None:
            self.follow_stop.set()
            self.follower.join()
        self.listeners.stop()
        self.executor.shutdown(wait=True, cancel_futures=True)
        self.service.close()


class ListenError(FwbuildError):
    """A listener cannot bind its address (in use, not on this host, privileged port)."""


_BIND_HINTS = {
    errno.EADDRINUSE: "another process listens there (`ss -ltnp 'sport = :{port}'` shows which; "
                      "another `fwbuild serve`?): stop it or change {where} in the config",
    errno.EADDRNOTAVAIL: "{host} is not an address of this host: fix {where} in the config",
    errno.EACCES: "ports below 1024 need root or CAP_NET_BIND_SERVICE: use a higher port in "
                  "{where} (and a reverse proxy in front)",
}


def _bind(host: str, port: int, listener: str, section: str) -> socket.socket:
    try:
        return bind_socket(host, port)
    except OSError as exc:
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        where = f"[{section}] listen/port"
        hint = _BIND_HINTS.get(exc.errno or 0, "check {where} in the config")
        raise ListenError(f"the {listener} listener cannot listen on {address}: "
                          f"{(exc.strerror or str(exc)).lower()}", where,
                          hint.format(port=port, host=host, where=where)) from None


def start_server(config: ServerConfig, service: Service | None = None) -> RunningServer:
    own = service is None
    service = service or Service(config)
    try:
        service.check_artifacts()  # no fake firmware: a set that cannot be served stops here
        node_sock = _bind(config.listen, config.port, "node", "server")
        try:
            admin_sock = _bind(config.admin.listen, config.admin.port, "admin", "admin")
        except BaseException:
            node_sock.close()
            raise
    except BaseException:
        if own:
            service.close()
        raise
    binder = NodeBinder(config)
    routes = build_routes(service, binder)
    executor = ThreadPoolExecutor(WORKERS, thread_name_prefix="fwbuild-handler")
    listeners = Listeners([
        (node_sock, WebApp(routes, "node", binder.bind_request, executor)),
        (admin_sock, WebApp(routes, "admin", binder.bind_request, executor)),
    ])
    listeners.start()
    port, admin_port = listeners.ports
    log.info("serving nodes on %s:%d, admin on %s:%d, artifacts %s", config.listen, port,
             config.admin.listen, admin_port, config.artifacts)
    # Changes made through other instances (shared PostgreSQL) or `fwbuild nodes`:
    # RevokedKeys and the rendered-image cache follow them within seconds.
    follow_stop = threading.Event()
    follower = threading.Thread(target=service.follow_changes, args=(follow_stop,),
                                name="fwbuild-follow", daemon=True)
    follower.start()
    return RunningServer(service, listeners, executor, port, admin_port, follower, follow_stop)


def run_server(config: ServerConfig, ready: Callable[[RunningServer], None] | None = None) -> None:
    """Serve until SIGTERM or SIGINT, then shut down gracefully."""
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("signal %d: shutting down", signum)
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        running = start_server(config)
        if ready is not None:
            ready(running)
        while not stop.wait(1.0):
            pass
        running.stop()
        log.info("stopped")
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
