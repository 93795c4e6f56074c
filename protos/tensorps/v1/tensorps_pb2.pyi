from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DataType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DT_INVALID: _ClassVar[DataType]
    DT_FLOAT: _ClassVar[DataType]
    DT_DOUBLE: _ClassVar[DataType]
    DT_INT32: _ClassVar[DataType]
    DT_UINT8: _ClassVar[DataType]
    DT_INT16: _ClassVar[DataType]
    DT_INT8: _ClassVar[DataType]
    DT_COMPLEX64: _ClassVar[DataType]
    DT_INT64: _ClassVar[DataType]
    DT_BOOL: _ClassVar[DataType]
    DT_BFLOAT16: _ClassVar[DataType]
    DT_UINT16: _ClassVar[DataType]
    DT_COMPLEX128: _ClassVar[DataType]
    DT_HALF: _ClassVar[DataType]
    DT_UINT32: _ClassVar[DataType]
    DT_UINT64: _ClassVar[DataType]

class WriteOp(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    WRITE_OP_UNSPECIFIED: _ClassVar[WriteOp]
    WRITE_OP_ASSIGN: _ClassVar[WriteOp]
    WRITE_OP_ASSIGN_ADD: _ClassVar[WriteOp]
    WRITE_OP_ASSIGN_SUB: _ClassVar[WriteOp]
    WRITE_OP_CREATE: _ClassVar[WriteOp]

class BatchOpKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    BATCH_OP_UNSPECIFIED: _ClassVar[BatchOpKind]
    BATCH_OP_CREATE: _ClassVar[BatchOpKind]
    BATCH_OP_ASSIGN: _ClassVar[BatchOpKind]
    BATCH_OP_ASSIGN_ADD: _ClassVar[BatchOpKind]
    BATCH_OP_ASSIGN_SUB: _ClassVar[BatchOpKind]
    BATCH_OP_READ: _ClassVar[BatchOpKind]
    BATCH_OP_INFO: _ClassVar[BatchOpKind]
    BATCH_OP_DELETE: _ClassVar[BatchOpKind]
    BATCH_OP_READ_PREFIX: _ClassVar[BatchOpKind]
    BATCH_OP_GATHER: _ClassVar[BatchOpKind]
    BATCH_OP_SCATTER_UPDATE: _ClassVar[BatchOpKind]
    BATCH_OP_SCATTER_ADD: _ClassVar[BatchOpKind]
    BATCH_OP_SCATTER_SUB: _ClassVar[BatchOpKind]
    BATCH_OP_SCATTER_MUL: _ClassVar[BatchOpKind]
    BATCH_OP_SCATTER_DIV: _ClassVar[BatchOpKind]
    BATCH_OP_SCATTER_MIN: _ClassVar[BatchOpKind]
    BATCH_OP_SCATTER_MAX: _ClassVar[BatchOpKind]
    BATCH_OP_SCATTER_ND_UPDATE: _ClassVar[BatchOpKind]
    BATCH_OP_SCATTER_ND_ADD: _ClassVar[BatchOpKind]
    BATCH_OP_SCATTER_ND_SUB: _ClassVar[BatchOpKind]
    BATCH_OP_APPLY_GRADIENT_DESCENT: _ClassVar[BatchOpKind]
    BATCH_OP_APPLY_MOMENTUM: _ClassVar[BatchOpKind]
    BATCH_OP_APPLY_ADAGRAD: _ClassVar[BatchOpKind]
    BATCH_OP_APPLY_ADAM: _ClassVar[BatchOpKind]
    BATCH_OP_APPLY_RMS_PROP: _ClassVar[BatchOpKind]
    BATCH_OP_APPLY_FTRL: _ClassVar[BatchOpKind]
    BATCH_OP_SPARSE_APPLY_ADAGRAD: _ClassVar[BatchOpKind]
    BATCH_OP_SPARSE_APPLY_MOMENTUM: _ClassVar[BatchOpKind]
    BATCH_OP_SPARSE_APPLY_FTRL: _ClassVar[BatchOpKind]
    BATCH_OP_SPARSE_APPLY_RMS_PROP: _ClassVar[BatchOpKind]
DT_INVALID: DataType
DT_FLOAT: DataType
DT_DOUBLE: DataType
DT_INT32: DataType
DT_UINT8: DataType
DT_INT16: DataType
DT_INT8: DataType
DT_COMPLEX64: DataType
DT_INT64: DataType
DT_BOOL: DataType
DT_BFLOAT16: DataType
DT_UINT16: DataType
DT_COMPLEX128: DataType
DT_HALF: DataType
DT_UINT32: DataType
DT_UINT64: DataType
WRITE_OP_UNSPECIFIED: WriteOp
WRITE_OP_ASSIGN: WriteOp
WRITE_OP_ASSIGN_ADD: WriteOp
WRITE_OP_ASSIGN_SUB: WriteOp
WRITE_OP_CREATE: WriteOp
BATCH_OP_UNSPECIFIED: BatchOpKind
BATCH_OP_CREATE: BatchOpKind
BATCH_OP_ASSIGN: BatchOpKind
BATCH_OP_ASSIGN_ADD: BatchOpKind
BATCH_OP_ASSIGN_SUB: BatchOpKind
BATCH_OP_READ: BatchOpKind
BATCH_OP_INFO: BatchOpKind
BATCH_OP_DELETE: BatchOpKind
BATCH_OP_READ_PREFIX: BatchOpKind
BATCH_OP_GATHER: BatchOpKind
BATCH_OP_SCATTER_UPDATE: BatchOpKind
BATCH_OP_SCATTER_ADD: BatchOpKind
BATCH_OP_SCATTER_SUB: BatchOpKind
BATCH_OP_SCATTER_MUL: BatchOpKind
BATCH_OP_SCATTER_DIV: BatchOpKind
BATCH_OP_SCATTER_MIN: BatchOpKind
BATCH_OP_SCATTER_MAX: BatchOpKind
BATCH_OP_SCATTER_ND_UPDATE: BatchOpKind
BATCH_OP_SCATTER_ND_ADD: BatchOpKind
BATCH_OP_SCATTER_ND_SUB: BatchOpKind
BATCH_OP_APPLY_GRADIENT_DESCENT: BatchOpKind
BATCH_OP_APPLY_MOMENTUM: BatchOpKind
BATCH_OP_APPLY_ADAGRAD: BatchOpKind
BATCH_OP_APPLY_ADAM: BatchOpKind
BATCH_OP_APPLY_RMS_PROP: BatchOpKind
BATCH_OP_APPLY_FTRL: BatchOpKind
BATCH_OP_SPARSE_APPLY_ADAGRAD: BatchOpKind
BATCH_OP_SPARSE_APPLY_MOMENTUM: BatchOpKind
BATCH_OP_SPARSE_APPLY_FTRL: BatchOpKind
BATCH_OP_SPARSE_APPLY_RMS_PROP: BatchOpKind

class TensorShapeProto(_message.Message):
    __slots__ = ("dim", "unknown_rank")
    class Dim(_message.Message):
        __slots__ = ("size", "name")
        SIZE_FIELD_NUMBER: _ClassVar[int]
        NAME_FIELD_NUMBER: _ClassVar[int]
        size: int
        name: str
        def __init__(self, size: _Optional[int] = ..., name: _Optional[str] = ...) -> None: ...
    DIM_FIELD_NUMBER: _ClassVar[int]
    UNKNOWN_RANK_FIELD_NUMBER: _ClassVar[int]
    dim: _containers.RepeatedCompositeFieldContainer[TensorShapeProto.Dim]
    unknown_rank: bool
    def __init__(self, dim: _Optional[_Iterable[_Union[TensorShapeProto.Dim, _Mapping]]] = ..., unknown_rank: _Optional[bool] = ...) -> None: ...

class TensorProto(_message.Message):
    __slots__ = ("dtype", "tensor_shape", "version_number", "tensor_content", "half_val", "float_val", "double_val", "int_val", "string_val", "scomplex_val", "int64_val", "bool_val", "dcomplex_val", "resource_handle_val", "variant_val", "uint32_val", "uint64_val", "float8_val")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    TENSOR_SHAPE_FIELD_NUMBER: _ClassVar[int]
    VERSION_NUMBER_FIELD_NUMBER: _ClassVar[int]
    TENSOR_CONTENT_FIELD_NUMBER: _ClassVar[int]
    HALF_VAL_FIELD_NUMBER: _ClassVar[int]
    FLOAT_VAL_FIELD_NUMBER: _ClassVar[int]
    DOUBLE_VAL_FIELD_NUMBER: _ClassVar[int]
    INT_VAL_FIELD_NUMBER: _ClassVar[int]
    STRING_VAL_FIELD_NUMBER: _ClassVar[int]
    SCOMPLEX_VAL_FIELD_NUMBER: _ClassVar[int]
    INT64_VAL_FIELD_NUMBER: _ClassVar[int]
    BOOL_VAL_FIELD_NUMBER: _ClassVar[int]
    DCOMPLEX_VAL_FIELD_NUMBER: _ClassVar[int]
    RESOURCE_HANDLE_VAL_FIELD_NUMBER: _ClassVar[int]
    VARIANT_VAL_FIELD_NUMBER: _ClassVar[int]
    UINT32_VAL_FIELD_NUMBER: _ClassVar[int]
    UINT64_VAL_FIELD_NUMBER: _ClassVar[int]
    FLOAT8_VAL_FIELD_NUMBER: _ClassVar[int]
    dtype: DataType
    tensor_shape: TensorShapeProto
    version_number: int
    tensor_content: bytes
    half_val: _containers.RepeatedScalarFieldContainer[int]
    float_val: _containers.RepeatedScalarFieldContainer[float]
    double_val: _containers.RepeatedScalarFieldContainer[float]
    int_val: _containers.RepeatedScalarFieldContainer[int]
    string_val: _containers.RepeatedScalarFieldContainer[bytes]
    scomplex_val: _containers.RepeatedScalarFieldContainer[float]
    int64_val: _containers.RepeatedScalarFieldContainer[int]
    bool_val: _containers.RepeatedScalarFieldContainer[bool]
    dcomplex_val: _containers.RepeatedScalarFieldContainer[float]
    resource_handle_val: _containers.RepeatedScalarFieldContainer[bytes]
    variant_val: _containers.RepeatedScalarFieldContainer[bytes]
    uint32_val: _containers.RepeatedScalarFieldContainer[int]
    uint64_val: _containers.RepeatedScalarFieldContainer[int]
    float8_val: bytes
    def __init__(self, dtype: _Optional[_Union[DataType, str]] = ..., tensor_shape: _Optional[_Union[TensorShapeProto, _Mapping]] = ..., version_number: _Optional[int] = ..., tensor_content: _Optional[bytes] = ..., half_val: _Optional[_Iterable[int]] = ..., float_val: _Optional[_Iterable[float]] = ..., double_val: _Optional[_Iterable[float]] = ..., int_val: _Optional[_Iterable[int]] = ..., string_val: _Optional[_Iterable[bytes]] = ..., scomplex_val: _Optional[_Iterable[float]] = ..., int64_val: _Optional[_Iterable[int]] = ..., bool_val: _Optional[_Iterable[bool]] = ..., dcomplex_val: _Optional[_Iterable[float]] = ..., resource_handle_val: _Optional[_Iterable[bytes]] = ..., variant_val: _Optional[_Iterable[bytes]] = ..., uint32_val: _Optional[_Iterable[int]] = ..., uint64_val: _Optional[_Iterable[int]] = ..., float8_val: _Optional[bytes] = ...) -> None: ...

class VariableInfo(_message.Message):
    __slots__ = ("name", "dtype", "shape", "initialized", "version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    INITIALIZED_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: DataType
    shape: TensorShapeProto
    initialized: bool
    version: int
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[_Union[DataType, str]] = ..., shape: _Optional[_Union[TensorShapeProto, _Mapping]] = ..., initialized: _Optional[bool] = ..., version: _Optional[int] = ...) -> None: ...

class CreateVariableRequest(_message.Message):
    __slots__ = ("name", "dtype", "shape", "value")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: DataType
    shape: TensorShapeProto
    value: TensorProto
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[_Union[DataType, str]] = ..., shape: _Optional[_Union[TensorShapeProto, _Mapping]] = ..., value: _Optional[_Union[TensorProto, _Mapping]] = ...) -> None: ...

class CreateVariableResponse(_message.Message):
    __slots__ = ("info",)
    INFO_FIELD_NUMBER: _ClassVar[int]
    info: VariableInfo
    def __init__(self, info: _Optional[_Union[VariableInfo, _Mapping]] = ...) -> None: ...

class DeleteVariableRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class DeleteVariableResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListVariablesRequest(_message.Message):
    __slots__ = ("prefix",)
    PREFIX_FIELD_NUMBER: _ClassVar[int]
    prefix: str
    def __init__(self, prefix: _Optional[str] = ...) -> None: ...

class ListVariablesResponse(_message.Message):
    __slots__ = ("variables",)
    VARIABLES_FIELD_NUMBER: _ClassVar[int]
    variables: _containers.RepeatedCompositeFieldContainer[VariableInfo]
    def __init__(self, variables: _Optional[_Iterable[_Union[VariableInfo, _Mapping]]] = ...) -> None: ...

class GetVariableRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class GetVariableResponse(_message.Message):
    __slots__ = ("info",)
    INFO_FIELD_NUMBER: _ClassVar[int]
    info: VariableInfo
    def __init__(self, info: _Optional[_Union[VariableInfo, _Mapping]] = ...) -> None: ...

class AssignRequest(_message.Message):
    __slots__ = ("name", "validate_shape", "use_locking", "read_value", "value")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VALIDATE_SHAPE_FIELD_NUMBER: _ClassVar[int]
    USE_LOCKING_FIELD_NUMBER: _ClassVar[int]
    READ_VALUE_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    name: str
    validate_shape: bool
    use_locking: bool
    read_value: bool
    value: TensorProto
    def __init__(self, name: _Optional[str] = ..., validate_shape: _Optional[bool] = ..., use_locking: _Optional[bool] = ..., read_value: _Optional[bool] = ..., value: _Optional[_Union[TensorProto, _Mapping]] = ...) -> None: ...

class AssignResponse(_message.Message):
    __slots__ = ("info", "value", "value_is_request")
    INFO_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    VALUE_IS_REQUEST_FIELD_NUMBER: _ClassVar[int]
    info: VariableInfo
    value: TensorProto
    value_is_request: bool
    def __init__(self, info: _Optional[_Union[VariableInfo, _Mapping]] = ..., value: _Optional[_Union[TensorProto, _Mapping]] = ..., value_is_request: _Optional[bool] = ...) -> None: ...

class ReadRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ReadResponse(_message.Message):
    __slots__ = ("info", "value")
    INFO_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    info: VariableInfo
    value: TensorProto
    def __init__(self, info: _Optional[_Union[VariableInfo, _Mapping]] = ..., value: _Optional[_Union[TensorProto, _Mapping]] = ...) -> None: ...

class WriteHeader(_message.Message):
    __slots__ = ("op", "name", "validate_shape", "use_locking", "read_value", "dtype", "shape")
    OP_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    VALIDATE_SHAPE_FIELD_NUMBER: _ClassVar[int]
    USE_LOCKING_FIELD_NUMBER: _ClassVar[int]
    READ_VALUE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    op: WriteOp
    name: str
    validate_shape: bool
    use_locking: bool
    read_value: bool
    dtype: DataType
    shape: TensorShapeProto
    def __init__(self, op: _Optional[_Union[WriteOp, str]] = ..., name: _Optional[str] = ..., validate_shape: _Optional[bool] = ..., use_locking: _Optional[bool] = ..., read_value: _Optional[bool] = ..., dtype: _Optional[_Union[DataType, str]] = ..., shape: _Optional[_Union[TensorShapeProto, _Mapping]] = ...) -> None: ...

class WriteChunk(_message.Message):
    __slots__ = ("header", "offset", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: WriteHeader
    offset: int
    data: bytes
    def __init__(self, header: _Optional[_Union[WriteHeader, _Mapping]] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class ReadChunk(_message.Message):
    __slots__ = ("info", "offset", "value_is_request", "data")
    INFO_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    VALUE_IS_REQUEST_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    info: VariableInfo
    offset: int
    value_is_request: bool
    data: bytes
    def __init__(self, info: _Optional[_Union[VariableInfo, _Mapping]] = ..., offset: _Optional[int] = ..., value_is_request: _Optional[bool] = ..., data: _Optional[bytes] = ...) -> None: ...

class GetServerInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ServerInfo(_message.Message):
    __slots__ = ("pid", "workers", "store", "variables", "used_bytes", "max_total_bytes", "version", "cluster", "shard_index", "worker_index", "worker_started", "staging_bytes", "staging_limit_bytes", "bulk_port", "data_dir", "wal", "last_snapshot_time", "last_snapshot_seconds", "last_snapshot_pause_ms")
    PID_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    STORE_FIELD_NUMBER: _ClassVar[int]
    VARIABLES_FIELD_NUMBER: _ClassVar[int]
    USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CLUSTER_FIELD_NUMBER: _ClassVar[int]
    SHARD_INDEX_FIELD_NUMBER: _ClassVar[int]
    WORKER_INDEX_FIELD_NUMBER: _ClassVar[int]
    WORKER_STARTED_FIELD_NUMBER: _ClassVar[int]
    STAGING_BYTES_FIELD_NUMBER: _ClassVar[int]
    STAGING_LIMIT_BYTES_FIELD_NUMBER: _ClassVar[int]
    BULK_PORT_FIELD_NUMBER: _ClassVar[int]
    DATA_DIR_FIELD_NUMBER: _ClassVar[int]
    WAL_FIELD_NUMBER: _ClassVar[int]
    LAST_SNAPSHOT_TIME_FIELD_NUMBER: _ClassVar[int]
    LAST_SNAPSHOT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    LAST_SNAPSHOT_PAUSE_MS_FIELD_NUMBER: _ClassVar[int]
    pid: int
    workers: int
    store: str
    variables: int
    used_bytes: int
    max_total_bytes: int
    version: str
    cluster: _containers.RepeatedScalarFieldContainer[str]
    shard_index: int
    worker_index: int
    worker_started: float
    staging_bytes: int
    staging_limit_bytes: int
    bulk_port: int
    data_dir: str
    wal: str
    last_snapshot_time: float
    last_snapshot_seconds: float
    last_snapshot_pause_ms: float
    def __init__(self, pid: _Optional[int] = ..., workers: _Optional[int] = ..., store: _Optional[str] = ..., variables: _Optional[int] = ..., used_bytes: _Optional[int] = ..., max_total_bytes: _Optional[int] = ..., version: _Optional[str] = ..., cluster: _Optional[_Iterable[str]] = ..., shard_index: _Optional[int] = ..., worker_index: _Optional[int] = ..., worker_started: _Optional[float] = ..., staging_bytes: _Optional[int] = ..., staging_limit_bytes: _Optional[int] = ..., bulk_port: _Optional[int] = ..., data_dir: _Optional[str] = ..., wal: _Optional[str] = ..., last_snapshot_time: _Optional[float] = ..., last_snapshot_seconds: _Optional[float] = ..., last_snapshot_pause_ms: _Optional[float] = ...) -> None: ...

class BatchChunk(_message.Message):
    __slots__ = ("header", "offset", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: BatchHeader
    offset: int
    data: bytes
    def __init__(self, header: _Optional[_Union[BatchHeader, _Mapping]] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class BatchHeader(_message.Message):
    __slots__ = ("atomic", "ops", "bulk")
    ATOMIC_FIELD_NUMBER: _ClassVar[int]
    OPS_FIELD_NUMBER: _ClassVar[int]
    BULK_FIELD_NUMBER: _ClassVar[int]
    atomic: bool
    ops: _containers.RepeatedCompositeFieldContainer[BatchOp]
    bulk: bool
    def __init__(self, atomic: _Optional[bool] = ..., ops: _Optional[_Iterable[_Union[BatchOp, _Mapping]]] = ..., bulk: _Optional[bool] = ...) -> None: ...

class BatchOp(_message.Message):
    __slots__ = ("kind", "name", "validate_shape", "use_locking", "read_value", "dtype", "shape", "value", "inputs", "slots", "batch_dims", "use_nesterov", "update_slots", "multiply_linear_by_lr")
    KIND_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    VALIDATE_SHAPE_FIELD_NUMBER: _ClassVar[int]
    USE_LOCKING_FIELD_NUMBER: _ClassVar[int]
    READ_VALUE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    BATCH_DIMS_FIELD_NUMBER: _ClassVar[int]
    USE_NESTEROV_FIELD_NUMBER: _ClassVar[int]
    UPDATE_SLOTS_FIELD_NUMBER: _ClassVar[int]
    MULTIPLY_LINEAR_BY_LR_FIELD_NUMBER: _ClassVar[int]
    kind: BatchOpKind
    name: str
    validate_shape: bool
    use_locking: bool
    read_value: bool
    dtype: DataType
    shape: TensorShapeProto
    value: TensorProto
    inputs: _containers.RepeatedCompositeFieldContainer[TensorProto]
    slots: _containers.RepeatedScalarFieldContainer[str]
    batch_dims: int
    use_nesterov: bool
    update_slots: bool
    multiply_linear_by_lr: bool
    def __init__(self, kind: _Optional[_Union[BatchOpKind, str]] = ..., name: _Optional[str] = ..., validate_shape: _Optional[bool] = ..., use_locking: _Optional[bool] = ..., read_value: _Optional[bool] = ..., dtype: _Optional[_Union[DataType, str]] = ..., shape: _Optional[_Union[TensorShapeProto, _Mapping]] = ..., value: _Optional[_Union[TensorProto, _Mapping]] = ..., inputs: _Optional[_Iterable[_Union[TensorProto, _Mapping]]] = ..., slots: _Optional[_Iterable[str]] = ..., batch_dims: _Optional[int] = ..., use_nesterov: _Optional[bool] = ..., update_slots: _Optional[bool] = ..., multiply_linear_by_lr: _Optional[bool] = ...) -> None: ...

class BatchResult(_message.Message):
    __slots__ = ("op", "code", "message", "info", "value", "value_is_request")
    OP_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    INFO_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    VALUE_IS_REQUEST_FIELD_NUMBER: _ClassVar[int]
    op: int
    code: int
    message: str
    info: VariableInfo
    value: TensorProto
    value_is_request: bool
    def __init__(self, op: _Optional[int] = ..., code: _Optional[int] = ..., message: _Optional[str] = ..., info: _Optional[_Union[VariableInfo, _Mapping]] = ..., value: _Optional[_Union[TensorProto, _Mapping]] = ..., value_is_request: _Optional[bool] = ...) -> None: ...

class BatchReply(_message.Message):
    __slots__ = ("results", "offset", "bulk_port", "bulk_ticket", "data")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    BULK_PORT_FIELD_NUMBER: _ClassVar[int]
    BULK_TICKET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[BatchResult]
    offset: int
    bulk_port: int
    bulk_ticket: bytes
    data: bytes
    def __init__(self, results: _Optional[_Iterable[_Union[BatchResult, _Mapping]]] = ..., offset: _Optional[int] = ..., bulk_port: _Optional[int] = ..., bulk_ticket: _Optional[bytes] = ..., data: _Optional[bytes] = ...) -> None: ...

class SnapshotRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SnapshotInfo(_message.Message):
    __slots__ = ("path", "generation", "variables", "bytes", "seconds", "pause_ms", "time")
    PATH_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    VARIABLES_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    PAUSE_MS_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    path: str
    generation: int
    variables: int
    bytes: int
    seconds: float
    pause_ms: float
    time: float
    def __init__(self, path: _Optional[str] = ..., generation: _Optional[int] = ..., variables: _Optional[int] = ..., bytes: _Optional[int] = ..., seconds: _Optional[float] = ..., pause_ms: _Optional[float] = ..., time: _Optional[float] = ...) -> None: ...
