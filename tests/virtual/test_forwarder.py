"""The test sshd's TCP relay (`python3 -m fwbuild.virtual.forwarder`), run as the program
it is, on loopback: bytes both ways, the delay line, bad arguments."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _echo_server() -> socket.socket:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                try:
                    while data := conn.recv(65536):
                        conn.sendall(data)
                except OSError:
                    pass

    threading.Thread(target=serve, daemon=True).start()
    return server


@pytest.fixture
def relay(request: pytest.FixtureRequest) -> Iterator[int]:
    delay_ms = getattr(request, "param", 0)
    upstream = _echo_server()
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "fwbuild.virtual.forwarder", str(listener.fileno()),
                             str(upstream.getsockname()[1]), str(delay_ms)],
                            pass_fds=[listener.fileno()], stdin=subprocess.DEVNULL, env=env)
    port = listener.getsockname()[1]
    listener.close()
    try:
        yield port
    finally:
        proc.kill()
        proc.wait()
        upstream.close()


def _round_trip(port: int, payload: bytes) -> tuple[bytes, float]:
    """Send `payload`, read back as many bytes (the relay closes both ways at the first EOF)."""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        started = time.monotonic()
        sock.sendall(payload)
        got = b""
        while len(got) < len(payload):
            data = sock.recv(65536)
            if not data:
                break
            got += data
        return got, time.monotonic() - started


def test_relays_bytes_both_ways(relay: int) -> None:
    payload = os.urandom(1 << 20)
    got, _ = _round_trip(relay, payload)
    assert got == payload


@pytest.mark.parametrize("relay", [150], indirect=True)
def test_delay_line_delays_each_direction(relay: int) -> None:
    got, elapsed = _round_trip(relay, b"ping")
    assert got == b"ping"
    assert elapsed >= 0.3   # 150 ms each way at least (a lower bound: no ceiling on a loaded host)


def test_bad_arguments_are_one_usage_line() -> None:
    result = subprocess.run([sys.executable, "-m", "fwbuild.virtual.forwarder", "x"], capture_output=True,
                            text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=60, check=False)
    assert result.returncode == 2
    assert result.stderr.startswith("usage: python3 -m fwbuild.virtual.forwarder")
