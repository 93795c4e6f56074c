"""The exit codes of `tensorps`, and the gRPC status codes they stand for.

  0   ok
  1   the server refused or failed the call (INVALID_ARGUMENT, FAILED_PRECONDITION, ALREADY_EXISTS,
      RESOURCE_EXHAUSTED, ABORTED, INTERNAL, ... : every status not named below)
  2   usage: bad arguments, a local file that cannot be read or written, an option the client refuses
  3   not found: no variable of that name (NOT_FOUND)
  4   not allowed: a missing or wrong token (UNAUTHENTICATED), a read-only token (PERMISSION_DENIED)
  5   unreachable: the server cannot be reached, is not serving, or did not answer in time
      (UNAVAILABLE, DEADLINE_EXCEEDED, CANCELLED; `health` answering NOT_SERVING)
130   interrupted (Ctrl-C)
"""

from __future__ import annotations

import grpc

from tensorps.client import TensorPSError, UsageError

OK = 0
SERVER_ERROR = 1
USAGE = 2
NOT_FOUND = 3
NOT_ALLOWED = 4
UNREACHABLE = 5
INTERRUPTED = 130

_BY_CODE = {
    grpc.StatusCode.NOT_FOUND: NOT_FOUND,
    grpc.StatusCode.UNAUTHENTICATED: NOT_ALLOWED,
    grpc.StatusCode.PERMISSION_DENIED: NOT_ALLOWED,
    grpc.StatusCode.UNAVAILABLE: UNREACHABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED: UNREACHABLE,
    grpc.StatusCode.CANCELLED: UNREACHABLE,
}


def exit_code(error: TensorPSError) -> int:
    """The exit code for a failed call."""
    if isinstance(error, UsageError):
        return USAGE
    return _BY_CODE.get(error.code, SERVER_ERROR)


class CommandError(Exception):
    """A command cannot go on (a local file, a bad argument): its message, its exit code and status name."""

    def __init__(self, message: str, code: int = USAGE, status: str = "USAGE") -> None:
        super().__init__(message)
        self.message = message
        self.exit = code
        self.status = status
