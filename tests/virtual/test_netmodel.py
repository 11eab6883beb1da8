"""The network path model: the schedule (pure arithmetic) and the relay (real sockets, loopback).

Relay tests assert only floors that hold on any machine (a loaded machine is slower,
never faster than the model) and generous ceilings.
"""

from __future__ import annotations

import os
import socket
import threading
import time

import pytest

from fwbuild.errors import UsageError
from fwbuild.virtual.netmodel import PROFILES, Link, NetRelay, Profile, parse_profile


def test_unlimited_link_adds_only_the_delay() -> None:
    link = Link(0, 0.1)
    assert link.schedule(5.0, 10**6) == pytest.approx(5.1)
    assert link.schedule(5.0, 10**6) == pytest.approx(5.1)


def test_schedule_keeps_order_and_the_rate() -> None:
    rate_bps = 8e6  # 1 MB/s
    link = Link(rate_bps, 0.05, burst=16_384, segment=16_384)
    times = [link.schedule(0.0, 16_384) for _ in range(100)]
    assert times == sorted(times)
    # The first segment fits the full bucket: only the delay.
    assert times[0] == pytest.approx(0.05)
    # 100 segments: 99 of them wait for tokens at 1 MB/s.
    assert times[-1] == pytest.approx(0.05 + 99 * 16_384 / 1e6)
    # Throughput over any window never exceeds the cap (plus one bucket).
    for i in range(0, 100, 7):
        for j in range(i + 1, 100, 11):
            assert (j - i) * 16_384 <= (times[j] - times[i]) * 1e6 + 16_384 + 1e-6


def test_bucket_refills_while_idle() -> None:
    link = Link(8e6, 0.0, burst=100_000)
    assert link.schedule(0.0, 100_000) == pytest.approx(0.0)
    assert link.schedule(0.0, 50_000) == pytest.approx(0.05)      # empty bucket: 50 kB at 1 MB/s
    assert link.schedule(10.0, 100_000) == pytest.approx(10.0)    # idle: full again, no wait


def test_segment_larger_than_the_bucket_drains_it() -> None:
    link = Link(8e6, 0.0, burst=10_000)
    assert link.schedule(0.0, 1_000_000) == pytest.approx(0.0)
    # The debt of 990 kB is paid before the next byte leaves.
    assert link.schedule(0.0, 1) == pytest.approx(0.990001, rel=1e-4)


def test_profiles() -> None:
    assert PROFILES["distant"].rtt_ms == 200 and PROFILES["distant"].rate_bps == 20e6
    assert PROFILES["lan"].rate_bps == 1e9
    assert parse_profile("200/20") == Profile("200/20", 200.0, 20e6)
    with pytest.raises(UsageError):
        parse_profile("far")
    with pytest.raises(UsageError):
        Profile("x", -1, 0)


class _Echo:
    """A loopback echo server (one thread per connection)."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    @staticmethod
    def _echo(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)
            conn.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.sock.close()


def _roundtrip(port: int, payload: bytes) -> tuple[bytes, float]:
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=120) as sock:
        sender = threading.Thread(target=lambda: (sock.sendall(payload), sock.shutdown(socket.SHUT_WR)))
        sender.start()
        chunks = []
        while data := sock.recv(65536):
            chunks.append(data)
        sender.join()
    return b"".join(chunks), time.monotonic() - start


def test_relay_delivers_everything_in_order_with_the_delay() -> None:
    echo = _Echo()
    try:
        with NetRelay(("127.0.0.1", echo.port), Profile("t", 200, 0)) as relay:
            payload = os.urandom(300_000)
            back, elapsed = _roundtrip(relay.port, payload)
            assert back == payload
            assert elapsed >= 0.2          # one full added round trip at least
            assert elapsed < 60            # generous: nothing stalls
            assert relay.connections == 1
            assert relay.bytes_up == relay.bytes_down == len(payload)
    finally:
        echo.close()


def test_relay_throughput_stays_under_the_cap() -> None:
    echo = _Echo()
    try:
        rate = 8e6  # 1 MB/s each way
        with NetRelay(("127.0.0.1", echo.port), Profile("t", 0, rate), burst=32_768) as relay:
            payload = os.urandom(1_500_000)
            back, elapsed = _roundtrip(relay.port, payload)
            assert back == payload
            # Both directions are capped; the echo pipelines them, so the floor is one pass.
            assert elapsed >= (len(payload) - 32_768) / (rate / 8)
            assert elapsed < 120
    finally:
        echo.close()


def test_relay_shares_the_cap_between_connections() -> None:
    echo = _Echo()
    try:
        rate = 8e6
        with NetRelay(("127.0.0.1", echo.port), Profile("t", 0, rate), burst=16_384) as relay:
            payloads = [os.urandom(500_000) for _ in range(2)]
            results: list[bytes] = [b"", b""]

            def run(index: int) -> None:
                results[index] = _roundtrip(relay.port, payloads[index])[0]

            start = time.monotonic()
            threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(120)
            elapsed = time.monotonic() - start
            assert results == payloads
            assert relay.connections == 2
            assert elapsed >= (1_000_000 - 16_384) / (rate / 8)
    finally:
        echo.close()
