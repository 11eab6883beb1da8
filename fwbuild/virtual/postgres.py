"""A private PostgreSQL cluster for tests and benchmarks (Debian's `postgresql` package).

`PrivateCluster` runs `initdb` into a fresh directory and starts `postgres` on 127.0.0.1
with a free port and a unix socket in that directory; trust authentication on loopback
only. As root (PostgreSQL refuses to run as root) the cluster belongs to the `postgres`
user and its programs run through `runuser`. `stop()` (or leaving the `with`) ends it.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Self

from fwbuild.errors import ToolError


def postgres_bindir() -> Path | None:
    """Directory of initdb/postgres: PATH, else the newest /usr/lib/postgresql/*/bin."""
    found = shutil.which("initdb")
    if found:
        return Path(os.path.realpath(found)).parent
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                        key=lambda p: int(p.split("/")[4]) if p.split("/")[4].isdigit() else 0)
    return Path(candidates[-1]).parent if candidates else None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PrivateCluster:
    """initdb + postgres in `directory`, listening on 127.0.0.1:`port`."""

    def __init__(self, directory: Path, start_timeout: float = 120) -> None:
        bindir = postgres_bindir()
        if bindir is None:
            raise ToolError("PostgreSQL is not installed (initdb not found)", "postgresql",
                            "apt-get install postgresql")
        self._bindir = bindir
        self.port = _free_port()
        self._as: list[str] = []
        self._own_dir = False
        directory.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            # The postgres user must reach its directory: a private one under /tmp (test
            # directories sit below 0700 parents), removed by stop().
            import pwd
            entry = pwd.getpwnam("postgres")
            directory = Path(tempfile.mkdtemp(prefix="fwbuild-pg-"))
            os.chown(directory, entry.pw_uid, entry.pw_gid)
            self._as = ["runuser", "-u", "postgres", "--"]
            self._own_dir = True
        self.directory = directory
        self.data = directory / "data"
        init = subprocess.run([*self._as, str(bindir / "initdb"), "-D", str(self.data), "-U",
                               "postgres", "-A", "trust", "-E", "UTF8", "--no-sync"],
                              capture_output=True, text=True, check=False)
        if init.returncode != 0:
            raise ToolError(f"initdb failed: {init.stderr.strip()[-600:]}", str(self.data))
        self.log = directory / "postgres.log"  # written by postgres itself (logging_collector off)
        self.proc = subprocess.Popen(
            [*self._as, str(bindir / "postgres"), "-D", str(self.data), "-p", str(self.port),
             "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={directory}",
             "-c", "fsync=off", "-c", "max_connections=300", "-c", "shared_buffers=32MB",
             "-c", "log_destination=stderr", "-c", "logging_collector=on",
             "-c", f"log_directory={directory}", "-c", "log_filename=postgres.log"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + start_timeout
        while True:
            if self.proc.poll() is not None:
                raise ToolError(f"postgres exited: {self.log.read_text(errors='replace')[-800:]}",
                                str(self.data))
            ready = subprocess.run([str(bindir / "pg_isready"), "-h", "127.0.0.1", "-p",
                                    str(self.port)], capture_output=True, check=False)
            if ready.returncode == 0:
                break
            if time.monotonic() > deadline:
                self.stop()
                raise ToolError("postgres did not accept connections", str(self.data))
            time.sleep(0.2)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        """A new empty database; its URL."""
        import psycopg
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        if self.proc.poll() is None:
            # fast shutdown (clients disconnected); the default "smart" one waits for them
            subprocess.run([*self._as, str(self._bindir / "pg_ctl"), "stop", "-D",
                            str(self.data), "-m", "fast", "-w"], capture_output=True,
                           check=False, timeout=120)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self._own_dir:
            shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
