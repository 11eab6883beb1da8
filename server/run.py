"""Start the node listener and the loopback admin listener; stop gracefully on SIGTERM."""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType

from .admin import AdminApp
from .config import ServerConfig
from .http import FwbuildHTTPServer
from .routes import NodeApp
from .service import Service

log = logging.getLogger("fwbuild.server")


@dataclass
class RunningServer:
    """Both listeners of a started server (tests use it in-process)."""

    service: Service
    node: FwbuildHTTPServer
    admin: FwbuildHTTPServer
    threads: tuple[threading.Thread, ...]

    @property
    def port(self) -> int:
        return self.node.port

    @property
    def admin_port(self) -> int:
        return self.admin.port

    def stop(self) -> None:
        """Graceful: stop accepting, finish in-flight responses, close the database."""
        for listener in (self.node, self.admin):
            listener.drain()
        for thread in self.threads:
            thread.join()
        self.service.close()


def start_server(config: ServerConfig, service: Service | None = None) -> RunningServer:
    service = service or Service(config)
    node = FwbuildHTTPServer((config.listen, config.port), NodeApp(service))
    try:
        admin = FwbuildHTTPServer((config.admin.listen, config.admin.port), AdminApp(service))
    except BaseException:
        node.server_close()
        raise
    threads = tuple(
        threading.Thread(target=listener.serve_forever, kwargs={"poll_interval": 0.2},
                         name=name, daemon=True)
        for name, listener in (("fwbuild-node-http", node), ("fwbuild-admin-http", admin)))
    for thread in threads:
        thread.start()
    log.info("serving nodes on %s:%d, admin on %s:%d, artifacts %s", config.listen, node.port,
             config.admin.listen, admin.port, config.artifacts)
    return RunningServer(service, node, admin, threads)


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
