"""Tensor bytes in transit through a worker's heap, counted against --max-staging-bytes.

A streamed write is received into a buffer of its tensor's size before it is applied, a batch's values into
one buffer for the whole batch, and a streamed reply (ReadStream, a batch's values, a streamed write's
read_value) is copied out of shared memory under the variable's lock, so that the lock is not held while
the client drains it. Unbounded, max_concurrent_rpcs such streams could each hold a tensor as large as the
store's whole budget. So every such buffer is reserved here before it is allocated, and released when its
call ends (completed, failed or cancelled); beyond the limit the call fails with RESOURCE_EXHAUSTED before
it changes anything. The limit is per worker process: the buffers live in its heap.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from types import TracebackType

from tensorps.server.ops import ResourceExhausted

GiB = 1 << 30
log = logging.getLogger("tensorps.server")


def default_staging_bytes(max_total_bytes: int) -> int:
    """A quarter of the store's budget, but at least 1 GiB (or the whole budget, if smaller): any tensor
    up to that size can always be staged."""
    return max(min(GiB, max_total_bytes), max_total_bytes // 4)


class Staging:
    """One worker's staging budget. Thread-safe."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._lock = threading.Lock()
        # Called with the bytes in use after each change (the server's metrics; None: not watched).
        self.on_change: Callable[[int], None] | None = None

    def reservation(self, what: str) -> Reservation:
        """An empty reservation for one call (`what` names it in errors); grow it before each allocation."""
        return Reservation(self, what)

    def _take(self, nbytes: int, total: int, what: str) -> None:
        """Take `nbytes` more for a call that then holds `total`."""
        with self._lock:
            if total > self.limit:
                raise ResourceExhausted(
                    f"{what} needs {total} bytes in transit, more than the server's staging budget of "
                    f"{self.limit} bytes (--max-staging-bytes, per worker)"
                )
            if self.used + nbytes > self.limit:
                raise ResourceExhausted(
                    f"the server's staging budget cannot take {nbytes} more bytes for {what}: {self.used} of "
                    f"its {self.limit} bytes (--max-staging-bytes, per worker) hold other calls' tensors in "
                    "transit; retry later"
                )
            self.used += nbytes
            if self.on_change is not None:
                self.on_change(self.used)
            log.debug("staging: %d bytes taken for %s, %d of %d in use", nbytes, what, self.used, self.limit)

    def _give_back(self, nbytes: int) -> None:
        with self._lock:
            self.used -= nbytes
            if self.on_change is not None:
                self.on_change(self.used)


class Reservation:
    """The staging bytes of one call, given back when it ends (a context manager; release is idempotent)."""

    def __init__(self, staging: Staging, what: str) -> None:
        self._staging = staging
        self.what = what
        self.nbytes = 0

    def grow(self, nbytes: int) -> None:
        """Reserve `nbytes` more before allocating them; ResourceExhausted if the budget has no room."""
        if nbytes > 0:
            self._staging._take(nbytes, self.nbytes + nbytes, self.what)
            self.nbytes += nbytes

    def release(self) -> None:
        nbytes, self.nbytes = self.nbytes, 0
        if nbytes:
            self._staging._give_back(nbytes)

    def __enter__(self) -> Reservation:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()
