"""Exceptions of tensorps.client, named like tf.errors.

Every failure a caller can cause is one of these, of the same type over gRPC and over shm://. Two kinds:
the client refused to make the call (UsageError: nothing was sent), or the call was made and the server
(or the transport on its way) said no (every other class, one per gRPC status code).

TensorPSError                 base; .code is the grpc.StatusCode, .message the text
├── UsageError                the client was used wrongly, nothing was sent: an argument of the wrong type
│                             (a name that is not a str, a flag that is not a bool), contradictory or
│                             malformed options (certificate_chain without private_key, not PEM), a closed
│                             client. .code is INVALID_ARGUMENT, but it is no InvalidArgumentError.
├── InvalidArgumentError      bad name, dtype, shape or value; TF's shape-mismatch texts; a lossy conversion
├── NotFoundError             no variable of that name
├── AlreadyExistsError        create() of an existing name
├── FailedPreconditionError   read/assign_add/assign_sub of an uninitialized variable
├── ResourceExhaustedError    a limit (bytes per variable, total bytes, variable count, message size)
├── UnauthenticatedError      missing or wrong token
├── PermissionDeniedError     the token may not do this (read-only)
├── UnavailableError          the server cannot be reached (idempotent calls were retried first)
├── DeadlineExceededError     the call's timeout passed (one deadline for all of a call's attempts)
├── CancelledError            the call was cancelled (e.g. the server cancelled a streamed write that stalled)
├── AbortedError              the server aborted the call (a conflict); nothing was applied
├── OutOfRangeError           a value outside the range the server accepts
├── UnimplementedError        the server does not offer this call (an older server)
├── DataLossError             unrecoverable corruption of stored data
├── InternalError             the server failed (a broken invariant or an operating-system error)
└── UnknownError              any other failure, including a status this client does not know
"""

from __future__ import annotations

import grpc


class TensorPSError(Exception):
    """Base of every error a call can raise; `code` is the grpc.StatusCode, `message` the server's text."""

    default_code = grpc.StatusCode.UNKNOWN

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code if code is not None else self.default_code

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"


class UsageError(TensorPSError):
    """The client refused to make the call as written (wrong argument type, bad options, closed client).

    Nothing was sent. The code is INVALID_ARGUMENT, as a server would answer, but it is deliberately not an
    InvalidArgumentError, so that `except InvalidArgumentError` catches only what a server refused.
    """

    default_code = grpc.StatusCode.INVALID_ARGUMENT


class InvalidArgumentError(TensorPSError):
    default_code = grpc.StatusCode.INVALID_ARGUMENT


class NotFoundError(TensorPSError):
    default_code = grpc.StatusCode.NOT_FOUND


class AlreadyExistsError(TensorPSError):
    default_code = grpc.StatusCode.ALREADY_EXISTS


class FailedPreconditionError(TensorPSError):
    default_code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhaustedError(TensorPSError):
    default_code = grpc.StatusCode.RESOURCE_EXHAUSTED


class UnauthenticatedError(TensorPSError):
    default_code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDeniedError(TensorPSError):
    default_code = grpc.StatusCode.PERMISSION_DENIED


class UnavailableError(TensorPSError):
    default_code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceededError(TensorPSError):
    default_code = grpc.StatusCode.DEADLINE_EXCEEDED


class CancelledError(TensorPSError):
    default_code = grpc.StatusCode.CANCELLED


class AbortedError(TensorPSError):
    default_code = grpc.StatusCode.ABORTED


class OutOfRangeError(TensorPSError):
    default_code = grpc.StatusCode.OUT_OF_RANGE


class UnimplementedError(TensorPSError):
    default_code = grpc.StatusCode.UNIMPLEMENTED


class DataLossError(TensorPSError):
    default_code = grpc.StatusCode.DATA_LOSS


class InternalError(TensorPSError):
    default_code = grpc.StatusCode.INTERNAL


class UnknownError(TensorPSError):
    default_code = grpc.StatusCode.UNKNOWN


# One class per status code a failed call can carry (every grpc.StatusCode but OK): no failure ends up as
# the bare base class. UsageError is not here: no server sends it.
_BY_CODE: dict[grpc.StatusCode, type[TensorPSError]] = {
    cls.default_code: cls
    for cls in (
        InvalidArgumentError,
        NotFoundError,
        AlreadyExistsError,
        FailedPreconditionError,
        ResourceExhaustedError,
        UnauthenticatedError,
        PermissionDeniedError,
        UnavailableError,
        DeadlineExceededError,
        CancelledError,
        AbortedError,
        OutOfRangeError,
        UnimplementedError,
        DataLossError,
        InternalError,
        UnknownError,
    )
}


def from_rpc_error(error: grpc.RpcError) -> TensorPSError:
    """The typed exception for a failed gRPC call."""
    code: grpc.StatusCode = error.code()
    details: str = error.details() or ""
    return from_status(code, details)


def from_status(code: grpc.StatusCode, message: str) -> TensorPSError:
    """The typed exception for a status code and message (UnknownError for a code without a class)."""
    return _BY_CODE.get(code, UnknownError)(message, code)
