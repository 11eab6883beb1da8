"""TCP relay into a network namespace (the test sshd's forwarder), run as a program:

    python3 -m fwbuild.virtual.forwarder LISTENER_FD PORT DELAY_MS

Relays connections accepted on the inherited listening socket LISTENER_FD (bound on
the host's loopback) to 127.0.0.1:PORT inside the network namespace it runs in. A
non-zero one-way DELAY_MS turns each direction into a delay line: every chunk is
delivered DELAY_MS after it was read (latency emulation when netem is unavailable).
Started by `fwbuild.virtual.sshd.TestSshd` under `ip netns exec`.
"""

from __future__ import annotations

import collections
import socket
import sys
import threading
import time

CHUNK = 262144


def close(*socks: socket.socket) -> None:
    for sock in socks:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def pump(src: socket.socket, dst: socket.socket, delay: float) -> None:
    """Copy src -> dst until src ends (after `delay` seconds per chunk when non-zero)."""
    if not delay:
        try:
            while True:
                data = src.recv(CHUNK)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        close(src, dst)
        return
    queue: collections.deque[tuple[float, bytes | None]] = collections.deque()
    cond = threading.Condition()

    def writer() -> None:
        while True:
            with cond:
                while not queue:
                    cond.wait()
                due, chunk = queue.popleft()
            pause = due - time.monotonic()
            if pause > 0:
                time.sleep(pause)
            if chunk is None:
                break
            try:
                dst.sendall(chunk)
            except OSError:
                break
        close(src, dst)

    threading.Thread(target=writer, daemon=True).start()
    try:
        while True:
            data = src.recv(CHUNK)
            with cond:
                queue.append((time.monotonic() + delay, data or None))
                cond.notify()
            if not data:
                break
    except OSError:
        with cond:
            queue.append((time.monotonic(), None))
            cond.notify()


def handle(client: socket.socket, port: int, delay: float) -> None:
    try:
        upstream = socket.create_connection(("127.0.0.1", port))
    except OSError:
        client.close()
        return
    for sock in (client, upstream):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    threading.Thread(target=pump, args=(client, upstream, delay), daemon=True).start()
    pump(upstream, client, delay)


def main(argv: list[str]) -> int:
    if len(argv) != 3 or not all(arg.isdigit() for arg in argv):
        print("usage: python3 -m fwbuild.virtual.forwarder LISTENER_FD PORT DELAY_MS", file=sys.stderr)
        return 2
    listener = socket.socket(fileno=int(argv[0]))
    port, delay = int(argv[1]), int(argv[2]) / 1000.0
    while True:
        conn, _ = listener.accept()
        threading.Thread(target=handle, args=(conn, port, delay), daemon=True).start()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
