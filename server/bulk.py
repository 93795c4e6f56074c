"""The bulk side channel: a large batch's bytes over a plain TCP connection next to the gRPC port.

grpcio moves a stream's bytes at about 2 GB/s here and copies them on the way (into messages, out of
them); a socket moves them at the wire's speed with `recv_into` straight into the batch's staging buffer.
Every worker process listens on a port of its own (a connection must reach the worker that holds the call):
an ephemeral one, or --bulk-port + the worker's index. A BatchStream call that asks for bulk
(BatchHeader.bulk) gets a Ticket: 16 random bytes the client sends first on a new connection, valid for
that call only and only while it lasts. The ticket is handed out on a call that passed the token check, so
the bulk port takes no token; with TLS it serves the gRPC port's certificate and asks for the same client
certificates. The protocol is stated in the .proto (BatchHeader.bulk).

The path of a bulk byte: Ticket.wait (the call's connection) -> receive_into (the kernel copies it into
the staging buffer, nothing else does) -> batch_service.decode_ops (typed views) -> ops (np.copyto into
the store). Values going back are copied under their locks into a Gather (one copy) and sent with
sendall after every lock is released.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import queue
import secrets
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from tensorps.client.bulk import ACCEPTED, TICKET_BYTES

log = logging.getLogger("tensorps.server")

# A connection has this long to finish its TLS handshake and present its ticket.
ADMIT_TIMEOUT = 10.0
# Connections between accept and their ticket at once; more are closed at once.
MAX_ADMITTING = 64
# How long the accepting thread waits for a plaintext connection's ticket before it hands the connection
# to a thread of its own.
INLINE_WAIT = 0.002
_BACKLOG = 128
# Idle staging buffers are let go after this many seconds.
POOL_IDLE = 10.0


class BulkError(Exception):
    """The bulk transfer of a call failed: `code` is the gRPC status name to answer with."""

    def __init__(self, message: str, code: str = "INVALID_ARGUMENT") -> None:
        super().__init__(message)
        self.code = code


def server_context(cert: str, key: str, client_ca: str | None) -> ssl.SSLContext:
    """The bulk port's TLS: the gRPC port's certificate, and its client CA for mutual TLS."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    if client_ca is not None:
        context.load_verify_locations(cafile=client_ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def receive_into(conn: socket.socket, buffer: Any, idle: float | None) -> None:
    """Fill `buffer` from `conn` (the kernel's copy is the only one); BulkError if the peer stops first."""
    view = memoryview(buffer).cast("B")
    total = view.nbytes
    conn.settimeout(idle)
    while view.nbytes:
        try:
            got = conn.recv_into(view)
        except TimeoutError:
            raise BulkError(
                f"the bulk transfer stalled for {idle:.1f} s after {total - view.nbytes} of {total} bytes",
                "DEADLINE_EXCEEDED",
            ) from None
        except OSError as exc:
            raise BulkError(f"the bulk connection failed: {exc.strerror or exc}", "UNAVAILABLE") from None
        if not got:
            raise BulkError(f"the bulk transfer ended after {total - view.nbytes} of {total} bytes")
        view = view[got:]


def accept(conn: socket.socket, idle: float | None) -> None:
    """Tell the client its ticket is good: it sends its data only then."""
    send_all(conn, (ACCEPTED,), idle)


def end_of_data(conn: socket.socket) -> None:
    """Half-close: the client reads the reply's values up to here."""
    try:
        conn.shutdown(socket.SHUT_WR)
    except OSError as exc:
        raise BulkError(f"the bulk connection failed: {exc.strerror or exc}", "UNAVAILABLE") from None


def send_all(conn: socket.socket, pieces: Iterable[Any], idle: float | None) -> None:
    """Send every piece in order; BulkError if the peer goes away or stops reading for `idle` seconds."""
    conn.settimeout(idle)
    try:
        for piece in pieces:
            conn.sendall(piece)
    except TimeoutError:
        raise BulkError("the client stopped reading the bulk reply", "DEADLINE_EXCEEDED") from None
    except OSError as exc:
        raise BulkError(f"the bulk connection failed: {exc.strerror or exc}", "UNAVAILABLE") from None


class Sender:
    """Sends buffers over a connection, in order, from a thread of its own while the caller produces more
    (the handler copies the next values under their locks while the previous ones travel). A failure is
    kept and raised by finish(): the caller's run is never interrupted half-way."""

    def __init__(self, conn: socket.socket, idle: float | None) -> None:
        self._conn = conn
        self._idle = idle
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._error: BulkError | None = None
        self._thread: threading.Thread | None = None

    def send(self, piece: Any) -> None:
        if self._thread is None:  # started by the first value: a reply without values needs none
            self._thread = threading.Thread(target=self._run, name="tensorps-bulk-send", daemon=True)
            self._thread.start()
        self._queue.put(piece)

    def _run(self) -> None:
        while (piece := self._queue.get()) is not None:
            if self._error is None:
                try:
                    send_all(self._conn, (piece,), self._idle)
                except BulkError as exc:
                    self._error = exc  # keep draining: the producer must not block

    def finish(self) -> None:
        """Wait until everything was sent; BulkError if the connection failed."""
        if self._thread is None:
            return
        self._queue.put(None)
        self._thread.join()
        self._thread = None
        if self._error is not None:
            raise self._error


class Ticket:
    """One call's claim on the bulk connection that presents its secret.

    The handler waits for the connection (wait), the gRPC call's end cancels the ticket (cancel: from any
    thread, it also shuts down a connection in use so that a blocked transfer returns), and the handler
    closes it when done (close).
    """

    def __init__(self, listener: BulkListener, secret: bytes) -> None:
        self.secret = secret
        self._listener = listener
        self._lock = threading.Lock()
        self._arrived = threading.Event()
        self._conn: socket.socket | None = None
        self._cancelled = False

    @property
    def port(self) -> int:
        return self._listener.port

    def deliver(self, conn: socket.socket) -> bool:
        """Hand over the connection that presented the secret; False if the call is gone."""
        with self._lock:
            if self._cancelled or self._conn is not None:
                return False
            self._conn = conn
        self._arrived.set()
        return True

    def wait(self, timeout: float | None) -> socket.socket | None:
        """The call's connection, or None if it did not come within `timeout` or the call ended."""
        self._arrived.wait(timeout)
        with self._lock:
            return None if self._cancelled else self._conn

    def cancel(self) -> None:
        """The call ended: the secret is void and any transfer on its connection stops."""
        self._listener.forget(self.secret)
        with self._lock:
            self._cancelled = True
            conn = self._conn
        self._arrived.set()
        if conn is not None:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        """The handler is done with the ticket: void, and its connection closed."""
        self.cancel()
        with self._lock:
            conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(OSError):
                conn.close()


class BufferPool:
    """Staging buffers reused from call to call: a fresh buffer costs its page faults and zeroing
    (a quarter of a transfer's time at model sizes), a reused one nothing. Idle ones go after POOL_IDLE s."""

    def __init__(self, keep: int = 2) -> None:
        self.keep = keep
        self.reply_bytes = 0  # the last bulk reply's size: where a reply's first arena starts
        self._free: list[tuple[float, np.ndarray[Any, Any]]] = []
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> np.ndarray[Any, Any]:
        """A uint8 buffer of exactly `nbytes` (a view of a pooled one when one is large enough)."""
        return self.take_at_least(nbytes, hint=0)[:nbytes]

    def take_at_least(self, nbytes: int, hint: int | None = None) -> np.ndarray[Any, Any]:
        """A uint8 buffer of `nbytes` or more: the smallest pooled one that fits, else a new one of
        max(nbytes, hint) (default: the last reply's size, see `reply_bytes`)."""
        with self._lock:
            fits = [i for i, (_t, b) in enumerate(self._free) if b.nbytes >= nbytes]
            if fits:
                return self._free.pop(min(fits, key=lambda i: self._free[i][1].nbytes))[1]
        return np.empty(max(nbytes, self.reply_bytes if hint is None else hint), np.uint8)

    def give(self, buffer: np.ndarray[Any, Any]) -> None:
        """Return a buffer from take(): nothing may use it any more."""
        base = buffer if buffer.base is None else buffer.base
        if not isinstance(base, np.ndarray) or base.nbytes < 1 << 20:
            return
        with self._lock:
            self._free.append((time.monotonic(), base))
            self._free.sort(key=lambda item: item[1].nbytes, reverse=True)
            del self._free[self.keep :]

    def trim(self) -> None:
        """Let go of buffers idle for more than POOL_IDLE seconds."""
        cutoff = time.monotonic() - POOL_IDLE
        with self._lock:
            self._free = [(t, b) for t, b in self._free if t >= cutoff]

    @property
    def idle_bytes(self) -> int:
        with self._lock:
            return sum(b.nbytes for _t, b in self._free)


class BulkListener:
    """A worker's bulk port: accepts connections, admits those that present a live ticket."""

    def __init__(self, host: str, port: int, tls: ssl.SSLContext | None = None) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._sock.bind((host.strip("[]"), port))
            self._sock.listen(_BACKLOG)
        except OSError:
            self._sock.close()
            raise
        self.port: int = self._sock.getsockname()[1]
        self.tls = tls
        self.pool = BufferPool()
        # Called with each bulk batch's bytes received and sent (the server's metrics; None: not counted).
        self.on_transfer: Callable[[int, int], None] | None = None
        self._tickets: dict[bytes, Ticket] = {}
        self._lock = threading.Lock()
        self._admitting = threading.BoundedSemaphore(MAX_ADMITTING)
        self._closing = False
        self._thread = threading.Thread(target=self._accept, name="tensorps-bulk", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._closing = True
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        self._thread.join(5)

    def ticket(self) -> Ticket:
        """A new ticket, live until it is cancelled or closed."""
        ticket = Ticket(self, secrets.token_bytes(TICKET_BYTES))
        with self._lock:
            self._tickets[ticket.secret] = ticket
        return ticket

    def forget(self, secret: bytes) -> None:
        with self._lock:
            self._tickets.pop(secret, None)

    @property
    def live_tickets(self) -> int:
        with self._lock:
            return len(self._tickets)

    def _accept(self) -> None:
        while not self._closing:
            try:
                conn, _peer = self._sock.accept()
            except OSError as exc:
                if self._closing:
                    return
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    log.warning("bulk port %d cannot accept: %s", self.port, exc.strerror)
                    time.sleep(0.1)
                continue
            if self.tls is None:
                secret = self._ticket_at_once(conn)
                if secret is not None:
                    self._claim(conn, secret)
                    continue
            if not self._admitting.acquire(blocking=False):
                conn.close()  # too many connections that have not shown a ticket yet
                continue
            admit = threading.Thread(target=self._admit, args=(conn,), name="tensorps-bulk", daemon=True)
            admit.start()

    @staticmethod
    def _ticket_at_once(conn: socket.socket) -> bytes | None:
        """The ticket of a plaintext connection if it is there already (a client sends it as soon as it is
        connected), taken without a thread of its own; None leaves the connection to _admit."""
        try:
            conn.settimeout(INLINE_WAIT)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if len(conn.recv(TICKET_BYTES, socket.MSG_PEEK)) < TICKET_BYTES:
                return None
            return conn.recv(TICKET_BYTES)
        except OSError:
            return None

    def _admit(self, conn: socket.socket) -> None:
        """TLS handshake and ticket within ADMIT_TIMEOUT (a thread of its own)."""
        try:
            conn.settimeout(ADMIT_TIMEOUT)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.tls is not None:
                conn = self.tls.wrap_socket(conn, server_side=True)
            secret = bytearray(TICKET_BYTES)
            receive_into(conn, secret, ADMIT_TIMEOUT)
        except (OSError, BulkError) as exc:
            log.info("bulk port %d: a connection failed before its ticket: %s", self.port, exc)
            with contextlib.suppress(OSError):
                conn.close()
            return
        finally:
            self._admitting.release()
        self._claim(conn, bytes(secret))

    def _claim(self, conn: socket.socket, secret: bytes) -> None:
        """A live ticket gets the connection (once); anything else closes it."""
        with self._lock:
            ticket = self._tickets.pop(secret, None)  # single use
        if ticket is not None and ticket.deliver(conn):
            return
        log.warning("bulk port %d: a connection presented no live ticket; closed", self.port)
        with contextlib.suppress(OSError):
            conn.close()
