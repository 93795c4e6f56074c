"""Progress of large transfers, for progress bars (the admin CLI's `get` and `put`).

    with progress.reporting(lambda moved, total: bar.update(moved)):
        ps.read("big")

The callback gets each chunk's byte count and the tensor's size as a streamed read or write (tensors over
STREAM_THRESHOLD) moves it, in the calling thread for reads and in gRPC's sending thread for writes. Unary
calls, batches and shm:// clients move a tensor in one piece and report nothing.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

Callback = Callable[[int, int], None]

_local = threading.local()


@contextmanager
def reporting(callback: Callback) -> Iterator[None]:
    """Report this thread's streamed transfers to `callback(moved, total)` within the block."""
    previous = current()
    _local.callback = callback
    try:
        yield
    finally:
        _local.callback = previous


def current() -> Callback | None:
    """This thread's callback (None: nobody is watching)."""
    callback: Callback | None = getattr(_local, "callback", None)
    return callback
