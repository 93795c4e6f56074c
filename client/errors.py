"""Exceptions of tensorps.client, named like tf.errors.

TensorPSError                 the server (or the client's own check) refused a call; .code, .message
├── InvalidArgumentError      bad name, dtype, shape or value; TF's shape-mismatch texts
├── NotFoundError             no variable of that name
├── AlreadyExistsError        create() of an existing name
├── FailedPreconditionError   read/assign_add/assign_sub of an uninitialized variable
├── ResourceExhaustedError    a limit (bytes per variable, total bytes, variable count, message size)
├── UnauthenticatedError      missing or wrong token
├── PermissionDeniedError     the token may not do this (read-only)
├── UnavailableError          the server cannot be reached
├── DeadlineExceededError     the call's timeout passed
└── InternalError             anything else the server reports
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


class InternalError(TensorPSError):
    default_code = grpc.StatusCode.INTERNAL


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
        InternalError,
    )
}


def from_rpc_error(error: grpc.RpcError) -> TensorPSError:
    """The typed exception for a failed gRPC call."""
    code: grpc.StatusCode = error.code()
    details: str = error.details() or ""
    return from_status(code, details)


def from_status(code: grpc.StatusCode, message: str) -> TensorPSError:
    """The typed exception for a status code and message."""
    return _BY_CODE.get(code, TensorPSError)(message, code)
