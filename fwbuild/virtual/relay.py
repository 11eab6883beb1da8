"""One TCP connection of the virtual walt-net: stdin/stdout <-> HOST:PORT, from a chosen source.

QEMU's `guestfwd=...-cmd:` runs this once per guest connection with the connection on
stdin/stdout:

    python3 relay.py SOURCE_IP HOST PORT

It connects to HOST:PORT from SOURCE_IP (a distinct loopback address per virtual node,
so the server sees each node at its own bound address, as on a real walt-net) and
copies bytes both ways until either side closes. Standard library only: it runs as a
plain script, without fwbuild on the path.
"""

from __future__ import annotations

import os
import selectors
import socket
import sys


def relay(source: str, host: str, port: int) -> int:
    try:
        sock = socket.create_connection((host, port), timeout=30, source_address=(source, 0))
    except OSError as exc:
        print(f"relay: cannot connect to {host}:{port} from {source}: {exc.strerror}", file=sys.stderr)
        return 1
    sock.settimeout(None)
    selector = selectors.DefaultSelector()
    selector.register(0, selectors.EVENT_READ)
    selector.register(sock, selectors.EVENT_READ)
    open_inputs = 2
    while open_inputs:
        for key, _ in selector.select():
            if key.fileobj == 0:
                data = os.read(0, 65536)
                if not data:
                    selector.unregister(0)
                    open_inputs -= 1
                    try:
                        sock.shutdown(socket.SHUT_WR)
                    except OSError:
                        pass
                    continue
                sock.sendall(data)
            else:
                try:
                    data = sock.recv(65536)
                except OSError:
                    data = b""
                if not data:
                    selector.unregister(sock)
                    open_inputs -= 1
                    try:
                        os.close(1)
                    except OSError:
                        pass
                    open_inputs = 0  # the server closed: the guest's connection ends too
                    continue
                view = memoryview(data)
                while view:
                    written = os.write(1, view)
                    view = view[written:]
    sock.close()
    return 0


def main(argv: list[str]) -> int:
    if len(argv) != 3 or not argv[2].isdigit():
        print("usage: relay.py SOURCE_IP HOST PORT", file=sys.stderr)
        return 2
    return relay(argv[0], argv[1], int(argv[2]))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
