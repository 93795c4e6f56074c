"""The largest reply a client accepts, so that a unary write whose reply would not reach it is refused
before it applies, instead of applied and then lost to the client's own receive limit.

A client declares its limit in the call metadata `tensorps-max-receive-bytes` (a decimal byte count; the
reference client sends its 2 GiB - 1 on every write). Without it the server assumes gRPC's default of
4 MiB, which every official gRPC library applies until told otherwise. Unary writes whose reply carries
the variable (read_value, and not a locked Assign) are refused with RESOURCE_EXHAUSTED, before anything
changes, when the value's bytes plus REPLY_OVERHEAD exceed the limit. A Read is refused likewise when the
client declared a limit (it changes nothing either way; this only replaces the client library's error
with one that names the variable and ReadStream).
"""

from __future__ import annotations

import grpc

from tensorps.client.codec import CodecError
from tensorps.server.ops import ResourceExhausted

KEY = "tensorps-max-receive-bytes"
GRPC_DEFAULT = 4 << 20
# More than the rest of any reply besides the value's bytes: the variable's info (a name of up to 255
# characters, a shape of up to 32 dims) and the value's dtype and shape.
REPLY_OVERHEAD = 2048


def declared(context: grpc.ServicerContext) -> int | None:
    """The limit the call's metadata declares, if any (malformed: INVALID_ARGUMENT)."""
    for key, value in context.invocation_metadata() or ():
        if key == KEY:
            if not isinstance(value, str) or not value.isdigit() or len(value) > 19:
                raise CodecError(f"{KEY} must be a decimal byte count; got {value!r:.40}")
            return int(value)
    return None


def check_write(name: str, nbytes: int, context: grpc.ServicerContext) -> None:
    """Refuse a unary write whose reply, carrying `nbytes` of the variable, exceeds the client's limit."""
    limit = declared(context)
    source = f"the client's {KEY}"
    if limit is None:
        limit, source = GRPC_DEFAULT, f"gRPC's default, as the call declares no {KEY}"
    if nbytes + REPLY_OVERHEAD > limit:
        raise ResourceExhausted(
            f"variable '{name}': the reply would carry its {nbytes} bytes, more than the {limit} bytes "
            f"the client accepts ({source}); nothing was applied: send read_value=false, write with "
            f"WriteStream, or declare a larger {KEY}"
        )


def check_read(name: str, nbytes: int, limit: int | None) -> None:
    """Refuse a Read whose reply exceeds the limit the client declared (`declared`; None: no check)."""
    if limit is not None and nbytes + REPLY_OVERHEAD > limit:
        raise ResourceExhausted(
            f"variable '{name}' has {nbytes} bytes, more than the {limit} bytes the client accepts "
            f"({KEY}): read it with ReadStream"
        )
