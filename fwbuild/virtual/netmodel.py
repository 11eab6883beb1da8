"""A network path model for benchmarks and tests: added round-trip time and a bandwidth cap.

The host kernel may have no netem, so the path between the virtual node and the
entrypoints (HTTP boot server, SSH entrypoint) is modelled in user space by a TCP
relay: `NetRelay(target, profile)` listens on a loopback port and forwards every
connection to `target`, each direction through a `Link`.

A `Link` is a token-bucket shaper followed by a fixed one-way delay line:

- bytes are cut into segments of at most `segment` bytes (a segment is what the
  model schedules, so a large read does not travel as one lump);
- a segment leaves the shaper when the bucket holds enough tokens (tokens refill at
  `rate_bps / 8` bytes per second up to `burst` bytes; a segment larger than what the
  bucket can ever hold waits until the bucket is full, then drains it below zero,
  so the long-run rate never exceeds the cap);
- segments leave in arrival order (FIFO), and all connections of one direction share
  the link, as they share a real bottleneck;
- a segment is delivered `delay` seconds after it left the shaper (half the added RTT).

`Link.schedule(now, size)` is pure arithmetic on the model's state and returns the
delivery time, so the model is testable without a clock; the relay only sleeps until
the times the model gives. A bounded queue per direction keeps TCP back-pressure: a
sender faster than the cap blocks instead of filling memory.
"""

from __future__ import annotations

import queue
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import Self

from ..errors import UsageError

SEGMENT = 16 * 1024
QUEUE_SEGMENTS = 256          # 4 MiB in flight per direction and connection at most


@dataclass(frozen=True)
class Profile:
    """A path: added round-trip time (ms) and a bandwidth cap (bit/s, 0 = none)."""

    name: str
    rtt_ms: float
    rate_bps: float

    def __post_init__(self) -> None:
        if self.rtt_ms < 0 or self.rate_bps < 0:
            raise UsageError(f"network profile {self.name!r}: negative RTT or rate",
                             "network profile", "use rtt_ms >= 0 and rate_bps >= 0")

    @property
    def one_way_s(self) -> float:
        return self.rtt_ms / 2000.0


PROFILES = {
    "lan": Profile("lan", 0, 1e9),
    "50ms": Profile("50ms", 50, 1e9),
    "200ms": Profile("200ms", 200, 1e9),
    "distant": Profile("distant", 200, 20e6),
}


def parse_profile(text: str) -> Profile:
    """A profile by name (`lan`, `50ms`, `200ms`, `distant`) or `RTT_MS/MBITS` (e.g. `200/20`)."""
    if text in PROFILES:
        return PROFILES[text]
    rtt, sep, rate = text.partition("/")
    try:
        return Profile(text, float(rtt), float(rate) * 1e6 if sep else 0.0)
    except ValueError:
        raise UsageError(f"unknown network profile {text!r}", "network profile",
                         f"use one of {', '.join(PROFILES)} or RTT_MS/MBITS") from None


class Link:
    """One direction of the path: token bucket (rate, burst), then a delay line."""

    def __init__(self, rate_bps: float, delay_s: float, *, burst: int = 64 * 1024,
                 segment: int = SEGMENT) -> None:
        self.rate = rate_bps / 8.0  # bytes per second; 0 = unlimited
        self.delay = delay_s
        self.burst = burst
        self.segment = segment
        self._tokens = float(burst)
        self._stamp: float | None = None   # time the token count refers to
        self._lock = threading.Lock()

    def segments(self, data: bytes) -> Iterator[bytes]:
        for offset in range(0, len(data), self.segment):
            yield data[offset:offset + self.segment]

    def schedule(self, now: float, size: int) -> float:
        """When a segment of `size` bytes offered at `now` is delivered (FIFO, shared)."""
        with self._lock:
            if not self.rate:
                return now + self.delay
            last = now if self._stamp is None else self._stamp
            stamp = max(now, last)
            tokens = min(float(self.burst), self._tokens + (stamp - last) * self.rate)
            need = min(float(size), float(self.burst))
            depart = stamp if tokens >= need else stamp + (need - tokens) / self.rate
            # At departure the bucket holds max(tokens, need); the segment takes `size`.
            self._tokens = max(tokens, need) - size
            self._stamp = depart
            return depart + self.delay


class _Pipe:
    """One direction of one relayed connection: reader -> model -> timed writer."""

    def __init__(self, src: socket.socket, dst: socket.socket, link: Link) -> None:
        self.src, self.dst, self.link = src, dst, link
        self.queue: queue.Queue[tuple[float, bytes | None]] = queue.Queue(QUEUE_SEGMENTS)
        self.bytes = 0

    def read_loop(self) -> None:
        try:
            while True:
                data = self.src.recv(65536)
                if not data:
                    break
                for seg in self.link.segments(data):
                    self.queue.put((self.link.schedule(time.monotonic(), len(seg)), seg))
        except OSError:
            pass
        self.queue.put((time.monotonic() + self.link.delay, None))

    def write_loop(self) -> None:
        try:
            while True:
                when, seg = self.queue.get()
                wait = when - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                if seg is None:
                    self.dst.shutdown(socket.SHUT_WR)
                    return
                self.dst.sendall(seg)
                self.bytes += len(seg)
        except OSError:
            # The far side is gone: stop reading from this side too.
            for sock in (self.src, self.dst):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            while True:  # unblock the reader if it waits on a full queue
                try:
                    self.queue.get_nowait()
                except queue.Empty:
                    return


class NetRelay:
    """A loopback TCP relay to `target` through the model of `profile` (both directions).

    Use as a context manager; `port` is where clients connect. `connections` counts
    accepted connections, `bytes_up` / `bytes_down` what was delivered each way.
    """

    def __init__(self, target: tuple[str, int], profile: Profile, *, host: str = "127.0.0.1",
                 burst: int = 64 * 1024) -> None:
        self.target = target
        self.profile = profile
        self.up = Link(profile.rate_bps, profile.one_way_s, burst=burst)     # client -> target
        self.down = Link(profile.rate_bps, profile.one_way_s, burst=burst)   # target -> client
        self._listener = socket.create_server((host, 0))
        self.host = host
        self.port: int = self._listener.getsockname()[1]
        self.connections = 0
        self._pipes: list[tuple[_Pipe, _Pipe]] = []
        self._threads: list[threading.Thread] = []
        self._closed = threading.Event()
        self._sockets: list[socket.socket] = []

    @property
    def bytes_up(self) -> int:
        return sum(p[0].bytes for p in self._pipes)

    @property
    def bytes_down(self) -> int:
        return sum(p[1].bytes for p in self._pipes)

    def __enter__(self) -> Self:
        self._spawn(self._accept_loop)
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _spawn(self, target: object) -> None:
        thread = threading.Thread(target=target, daemon=True)  # type: ignore[arg-type]
        thread.start()
        self._threads.append(thread)

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.target, timeout=30)
                server.settimeout(None)
            except OSError:
                client.close()
                continue
            for sock in (client, server):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._sockets += [client, server]
            self.connections += 1
            pipes = (_Pipe(client, server, self.up), _Pipe(server, client, self.down))
            self._pipes.append(pipes)
            for pipe in pipes:
                self._spawn(pipe.read_loop)
                self._spawn(pipe.write_loop)

    def close(self) -> None:
        self._closed.set()
        self._listener.close()
        for sock in self._sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()
