"""The thin tensorps client: numpy arrays in and out, exceptions named like tf.errors."""

from tensorps.client.batch import BatchError, Pipeline
from tensorps.client.client import Client
from tensorps.client.errors import (
    AbortedError,
    AlreadyExistsError,
    CancelledError,
    DataLossError,
    DeadlineExceededError,
    FailedPreconditionError,
    InternalError,
    InvalidArgumentError,
    NotFoundError,
    OutOfRangeError,
    PermissionDeniedError,
    ResourceExhaustedError,
    TensorPSError,
    UnauthenticatedError,
    UnavailableError,
    UnimplementedError,
    UnknownError,
    UsageError,
)
from tensorps.client.infos import ServerInfo, VariableInfo
from tensorps.client.placement import (
    FixedShardsPartitioner,
    MinSizePartitioner,
    fixed_size_partitioner,
    min_max_variable_partitioner,
)
from tensorps.client.snapshot import SnapshotInfo

__all__ = [
    "AbortedError",
    "AlreadyExistsError",
    "BatchError",
    "CancelledError",
    "Client",
    "DataLossError",
    "DeadlineExceededError",
    "FailedPreconditionError",
    "FixedShardsPartitioner",
    "InternalError",
    "InvalidArgumentError",
    "MinSizePartitioner",
    "NotFoundError",
    "OutOfRangeError",
    "PermissionDeniedError",
    "Pipeline",
    "ResourceExhaustedError",
    "ServerInfo",
    "SnapshotInfo",
    "TensorPSError",
    "UnauthenticatedError",
    "UnavailableError",
    "UnimplementedError",
    "UnknownError",
    "UsageError",
    "VariableInfo",
    "fixed_size_partitioner",
    "min_max_variable_partitioner",
]
