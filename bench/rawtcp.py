"""The floor under a model step: the same bytes over one loopback TCP socket between two processes.

No framing, no serialization, no copy beyond the kernel's: the peer sends from one buffer with `sendall`
and receives into it with `recv_into`, as does the client. One exchange: the client sends a header (bytes
to pull, bytes to push), receives the pull bytes, sends the push bytes, and waits for a one-byte answer
that says they all arrived. Run the peer as `python -m bench.rawtcp`; it prints its port and serves until
SIGTERM.
"""

from __future__ import annotations

import re
import signal
import socket
import struct
import sys
import threading
import time
from dataclasses import dataclass
from types import FrameType

from bench.backends.process import ServerProcess

_HEADER = struct.Struct("<QQ")  # bytes the peer sends, bytes it then receives
_READY = re.compile(r"raw tcp ready: serving on (\S+):(\d+)")


def _receive(sock: socket.socket, view: memoryview) -> bool:
    """Fill `view`; False if the peer closed the connection first."""
    while view:
        got = sock.recv_into(view)
        if not got:
            return False
        view = view[got:]
    return True


def _serve(conn: socket.socket) -> None:
    buffer = memoryview(bytearray(0))
    header = memoryview(bytearray(_HEADER.size))
    with conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        while _receive(conn, header):
            send, receive = _HEADER.unpack(header)
            if len(buffer) < max(send, receive):
                buffer = memoryview(bytearray(max(send, receive)))
            conn.sendall(buffer[:send])
            if not _receive(conn, buffer[:receive]):
                return
            conn.sendall(b"k")


def main() -> None:
    def on_signal(signum: int, frame: FrameType | None) -> None:
        sys.exit(0)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    with socket.create_server(("127.0.0.1", 0)) as listener:
        host, port = listener.getsockname()[:2]
        print(f"raw tcp ready: serving on {host}:{port}", file=sys.stderr, flush=True)
        while True:
            conn, _ = listener.accept()
            threading.Thread(target=_serve, args=(conn,), daemon=True).start()


@dataclass(frozen=True)
class Exchange:
    pull: float  # seconds from the header's send to the last pulled byte
    push: float  # seconds from there to the peer's answer after the last pushed byte

    @property
    def total(self) -> float:
        return self.pull + self.push


class RawTCP:
    """The peer process and one connection to it; use as a context manager."""

    def __init__(self) -> None:
        self.process = ServerProcess([sys.executable, "-m", "bench.rawtcp"], _READY)
        try:
            assert self.process.match is not None
            address = (self.process.match.group(1), int(self.process.match.group(2)))
            self.sock = socket.create_connection(address)
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except BaseException:
            self.process.stop()
            raise
        self.buffer = memoryview(bytearray(0))

    def exchange(self, pull: int, push: int) -> Exchange:
        if len(self.buffer) < max(pull, push):
            self.buffer = memoryview(bytearray(max(pull, push)))
        ack = memoryview(bytearray(1))
        start = time.perf_counter()
        self.sock.sendall(_HEADER.pack(pull, push))
        if not _receive(self.sock, self.buffer[:pull]):
            raise ConnectionError("the raw TCP peer closed the connection")
        pulled = time.perf_counter()
        self.sock.sendall(self.buffer[:push])
        if not _receive(self.sock, ack):
            raise ConnectionError("the raw TCP peer closed the connection")
        return Exchange(pulled - start, time.perf_counter() - pulled)

    def close(self) -> None:
        try:
            self.sock.close()
        finally:
            self.process.stop()

    def __enter__(self) -> RawTCP:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


if __name__ == "__main__":
    main()
