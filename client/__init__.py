"""The thin tensorps client: numpy arrays in and out, exceptions named like tf.errors."""

from tensorps.client.batch import BatchError, Pipeline
from tensorps.client.client import Client, ServerInfo, VariableInfo
from tensorps.client.errors import (
    AlreadyExistsError,
    DeadlineExceededError,
    FailedPreconditionError,
    InternalError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    TensorPSError,
    UnauthenticatedError,
    UnavailableError,
)

__all__ = [
    "AlreadyExistsError",
    "BatchError",
    "Client",
    "DeadlineExceededError",
    "FailedPreconditionError",
    "InternalError",
    "InvalidArgumentError",
    "NotFoundError",
    "PermissionDeniedError",
    "Pipeline",
    "ResourceExhaustedError",
    "ServerInfo",
    "TensorPSError",
    "UnauthenticatedError",
    "UnavailableError",
    "VariableInfo",
]
