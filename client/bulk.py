"""The client's side of the bulk channel: a large batch's bytes over a plain TCP connection (the protocol is
in the .proto, BatchHeader.bulk; the server's side is server/bulk.py).

The connection goes to the host the gRPC target names, on the port the server's first reply gives, TLS-wrapped
with the channel's own root certificates and client certificate. The client sends the call's ticket and waits
for the server's one-byte acceptance before it sends a byte of data, so a port that is unreachable, refuses
the ticket (another server behind the same name) or speaks no TLS is known before anything could be applied:
then the channel is off for the client's lifetime and batches go over gRPC as before.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import ssl
import tempfile
import threading
from collections.abc import Sequence
from typing import Any

import grpc
import numpy as np

from tensorps.client import wire

log = logging.getLogger("tensorps.client")
CONNECT_TIMEOUT = 5.0
# The first reply buffer when the reply's size is unknown.
MIN_BUFFER = 16 << 20
TICKET_BYTES = 16
# The server's answer to a live ticket, before any data moves.
ACCEPTED = b"\x01"
_SCHEMES = ("dns:///", "dns:", "ipv4:", "ipv6:")


class BulkUnusable(Exception):
    """The bulk channel cannot be used with this server (off, unreachable, refused): send without it."""


def target_host(target: str) -> str | None:
    """The host of a gRPC target ("host:port", "[v6]:port", "dns:///host:port", "ipv4:a.b.c.d:port"), or
    None for targets the bulk channel cannot follow (unix sockets, several addresses, other schemes)."""
    rest = target
    for scheme in _SCHEMES:
        if rest.startswith(scheme):
            rest = rest[len(scheme) :]
            break
    else:
        if "://" in rest or rest.startswith("unix:"):
            return None
    if rest.startswith("//") or "," in rest or "/" in rest or not rest:
        return None  # a DNS authority, several addresses or a path
    if rest.startswith("["):
        end = rest.find("]")
        return rest[1:end] if end > 1 else None
    if rest.count(":") > 1:
        return rest  # a bare IPv6 address
    host = rest.partition(":")[0]
    return host or None


def _client_context(
    root_certificates: bytes | None, certificate_chain: bytes | None, private_key: bytes | None
) -> ssl.SSLContext:
    """The gRPC channel's TLS settings as an ssl context (the system's roots when none were given)."""
    context = ssl.create_default_context(
        cadata=root_certificates.decode("ascii", "replace") if root_certificates else None
    )
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if certificate_chain is not None and private_key is not None:
        _load_chain(context, certificate_chain + b"\n" + private_key)
    return context


def _load_chain(context: ssl.SSLContext, pem: bytes) -> None:
    """load_cert_chain reads files only: an anonymous memory file (memfd), else a private temporary file
    removed at once."""
    memfd = getattr(os, "memfd_create", None)
    if memfd is not None:
        try:
            fd = memfd("tensorps-client-cert", os.MFD_CLOEXEC)
        except OSError:
            fd = -1
        if fd >= 0:
            try:
                os.write(fd, pem)
                context.load_cert_chain(f"/proc/self/fd/{fd}")
                return
            except FileNotFoundError:
                pass  # no /proc: fall back to a file
            finally:
                os.close(fd)
    with tempfile.TemporaryDirectory(prefix="tensorps-") as directory:
        path = os.path.join(directory, "client.pem")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(pem)
        context.load_cert_chain(path)


class BulkChannel:
    """One client's way to the bulk ports of its server; `usable` until a connection fails once."""

    def __init__(
        self,
        target: str,
        *,
        tls: bool,
        root_certificates: bytes | None = None,
        certificate_chain: bytes | None = None,
        private_key: bytes | None = None,
    ) -> None:
        self.host = target_host(target)
        self.usable = self.host is not None
        self.reason = "" if self.usable else f"the target {target!r} names no single host"
        self.tls = tls
        self._pems = (root_certificates, certificate_chain, private_key)
        self._context: ssl.SSLContext | None = None
        self._lock = threading.Lock()

    def disable(self, reason: str) -> None:
        """Off for good: batches go over gRPC from now on (logged once)."""
        if self.usable:
            log.log(
                logging.INFO if "--bulk-port off" in reason else logging.WARNING,
                "tensorps: not using the bulk channel, batches go over gRPC: %s",
                reason,
            )
        self.usable = False
        self.reason = reason

    def _ssl(self) -> ssl.SSLContext:
        with self._lock:
            if self._context is None:
                self._context = _client_context(*self._pems)
            return self._context

    def connect(self, port: int, ticket: bytes, timeout: float | None) -> socket.socket:
        """A connection to bulk port `port` that presented `ticket` and was accepted.

        Anything that fails here (the port unreachable, TLS refused, the ticket refused) turns the channel
        off for good and raises BulkUnusable: nothing was sent that the server could apply.
        """
        assert self.host is not None
        limit = CONNECT_TIMEOUT if timeout is None else min(CONNECT_TIMEOUT, timeout)
        sock: socket.socket | None = None
        try:
            if not 0 < port < 65536:
                raise OSError(f"the server offered bulk port {port}")
            sock = socket.create_connection((self.host, port), timeout=limit)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.tls:
                sock = self._ssl().wrap_socket(sock, server_hostname=self.host)
            sock.sendall(ticket)
            answer = sock.recv(1)
            if answer != ACCEPTED:
                raise OSError("the bulk port did not accept the call's ticket")
        except (OSError, ValueError) as exc:
            if sock is not None:
                sock.close()
            self.disable(f"cannot use bulk port {port} of {self.host}: {exc}")
            raise BulkUnusable(self.reason) from None
        sock.settimeout(timeout)
        return sock


def send_values(sock: socket.socket, arrays: Sequence[Any]) -> None:
    """The values' bytes, concatenated (large ones straight from the arrays, small ones packed)."""
    gather = wire.Gather()
    for array in arrays:
        gather.add(array)
    for piece in gather.finish():
        sock.sendall(piece)


def receive_values(sock: socket.socket, expected: int | None) -> list[memoryview]:
    """The reply's values: every byte up to the server's half-close, received straight into new buffers
    (the kernel's copy is the only one). The first buffer holds `expected` bytes (the sizes last seen of
    what the batch reads; unknown: MIN_BUFFER), each further one as much as all before: a reply of the
    expected size lies in one buffer, and any tensor within one buffer is used in place."""
    chunks: list[memoryview] = []
    size = MIN_BUFFER if expected is None else expected
    received = 0
    while True:
        buffer = np.empty(max(size, 1), np.uint8).data
        filled = 0
        while filled < buffer.nbytes:
            got = sock.recv_into(buffer[filled:])
            if not got:
                if filled:
                    chunks.append(buffer[:filled].toreadonly())
                return chunks
            filled += got
        chunks.append(buffer.toreadonly())
        received += filled
        size = max(MIN_BUFFER, received)


def shut_unless_ok(call: Any, sock: socket.socket) -> None:
    """A gRPC call's done-callback: if it failed, stop the transfer in progress on `sock` (another thread)."""
    if call.code() != grpc.StatusCode.OK:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
