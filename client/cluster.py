"""The router: one API over a cluster of servers, each variable's calls sent to the server that owns it.

    client API (ClusterClient, ClusterPipeline) -> router (placement.owner, partition layouts)
        -> transport per server (a Client per member, tagged with its shard: `tensorps-shard: I/N`)

`Client("ps-0:50051,ps-1:50051,ps-2:50051")`, `Client([...])` or `Client("cluster://ps-0:50051")` (one
member: the map is fetched from its GetServerInfo) make a ClusterClient. A call on a variable goes to its
owner (placement.py; a variable created with colocate_with lives beside its primary: colocation.py);
batched calls go to every server involved at once (cluster_batch.py); list() and read_many(prefix=...)
merge every server's answers. A partitioned variable (create(..., partitioner=...)) is stored as parts on
several servers and read and written whole; the row operations and optimizers route each row to its part
(cluster_rows.py). Any other per-variable method of Client (first parameter `name`) is routed to the
owner (`_route_by_name`), and refused on a partitioned variable.

A server that is down makes the calls on its variables fail with UnavailableError naming the shard; the
others go on. gRPC reconnects on its own within about a second, so calls resume when it is back.
"""

from __future__ import annotations

import builtins
import functools
import inspect
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import numpy as np

from tensorps.client import colocation, placement
from tensorps.client.batch import BatchCalls
from tensorps.client.client import Client
from tensorps.client.cluster_batch import (
    ClusterBatchCalls,
    ClusterPipeline,
    first_result,
)
from tensorps.client.cluster_rows import ClusterRowCalls
from tensorps.client.errors import (
    AlreadyExistsError,
    InvalidArgumentError,
    NotFoundError,
    TensorPSError,
    UnavailableError,
    UsageError,
)
from tensorps.client.infos import ServerInfo, VariableInfo
from tensorps.client.layouts import Layouts, logical_info, read_records
from tensorps.client.placement import PartitionSpec
from tensorps.client.rows import RowCalls
from tensorps.client.snapshot import SnapshotInfo

T = TypeVar("T")
Array = np.ndarray[Any, Any]
SHARD_KEY = "tensorps-shard"  # metadata: the shard "I/N" a call is routed to (the .proto, Clusters)
SCHEME = "cluster://"


def members_of(target: str | Sequence[str]) -> list[str]:
    """The HOST:PORT members a cluster target names: "a:1,b:2", "cluster://a:1" or a list."""
    if isinstance(target, str):
        items = target.removeprefix(SCHEME).split(",")
    elif isinstance(target, list | tuple) and all(isinstance(m, str) for m in target):
        items = list(target)
    else:
        raise UsageError(f"a cluster target is a str or a list of 'host:port' str, not {target!r:.60}")
    members = [m.strip() for m in items if m.strip()]
    if not members:
        raise UsageError(f"the cluster target {target!r:.60} names no server")
    if len(set(members)) != len(members):
        raise UsageError(f"the cluster target names a server twice: {target!r:.100}")
    return members


def is_cluster_target(target: object) -> bool:
    """Whether Client(target) is a ClusterClient: a list, "a:1,b:2" or "cluster://a:1"."""
    return not isinstance(target, str) or "," in target or target.startswith(SCHEME)


class ClusterClient(ClusterRowCalls, ClusterBatchCalls, Client):  # type: ignore[misc] # pipeline() is a ClusterPipeline
    """A client of a cluster of tensorps servers (see the module); the options are Client's, for every
    server. server_info() returns one ServerInfo per shard, in shard order."""

    def __init__(self, target: str | Sequence[str], **options: Any) -> None:
        members = members_of(target)
        if len(members) == 1:
            members = _discover(members[0], options)
        self.members = members
        self.shards: builtins.list[Client] = [Client(member, **options) for member in members]
        for index, shard in enumerate(self.shards):
            # Every call names the shard it is meant for: a server with another map refuses it loudly.
            shard._transport.metadata = (
                *(shard._transport.metadata or ()),
                (SHARD_KEY, f"{index}/{len(members)}"),
            )
        self.target = ",".join(members)
        self.timeout = self.shards[0].timeout
        self.wait_for_ready = self.shards[0].wait_for_ready
        self._closed = False
        self._lock = threading.Lock()
        self._executor: ThreadPoolExecutor | None = None
        self._fan = ThreadPoolExecutor(max_workers=2 * len(members), thread_name_prefix="tensorps-cluster")
        self._owners: dict[str, int] = {}
        self.layouts = Layouts(self._read_layouts)
        self._row_dtypes: dict[str, Any] = {}  # for Python values in row calls

    def close(self) -> None:
        self._close_background()
        self._closed = True
        self._fan.shutdown(wait=True)
        for shard in self.shards:
            shard.close()

    def __enter__(self) -> ClusterClient:
        return self

    @classmethod
    def local(cls, store: str) -> Client:
        raise UsageError("a cluster has no local store: use Client('shm://STORE') on one of its hosts")

    # ---- placement -----------------------------------------------------------------------------

    def owner(self, name: str) -> int:
        """The index of the shard that holds variable `name`: its primary's if it was created colocated
        (colocation.py), else placement.owner (cached)."""
        colocated = self.layouts.colocated(name.removeprefix(placement.COLOCATED_PREFIX))
        if colocated is not None:
            return colocated
        shard = self._owners.get(name)
        if shard is None:
            shard = placement.owner(name, len(self.shards))
            if len(self._owners) > 1 << 16:
                self._owners.clear()
            self._owners[name] = shard
        return shard

    def describe(self, shard: int) -> str:
        return f"shard {shard} ({self.members[shard]})"

    def fan_out(self, jobs: Mapping[int, Callable[[], T]]) -> dict[int, T | BaseException]:
        """Run one job per shard, all at once (the first on this thread); each shard's result or exception
        (an UnavailableError names the shard)."""
        pending = list(jobs.items())
        futures = {shard: self._fan.submit(self._on, shard, job) for shard, job in pending[1:]}
        results: dict[int, T | BaseException] = {}
        for shard, job in pending[:1]:
            try:
                results[shard] = self._on(shard, job)
            except TensorPSError as exc:
                results[shard] = exc
        for shard, future in futures.items():
            try:
                results[shard] = future.result()
            except TensorPSError as exc:
                results[shard] = exc
        return results

    def _on(self, shard: int, job: Callable[[], T]) -> T:
        try:
            return job()
        except UnavailableError as exc:
            raise UnavailableError(
                f"{self.describe(shard)} is unavailable: {exc.message}", exc.code
            ) from None

    def _at_owner(self, name: str, call: Callable[[Client], T]) -> T:
        shard = self.owner(name)
        return self._on(shard, lambda: call(self.shards[shard]))

    def _gathered(self, jobs: Mapping[int, Callable[[], T]]) -> dict[int, T]:
        """fan_out, raising the first shard's error."""
        results = self.fan_out(jobs)
        for shard in sorted(results):
            outcome = results[shard]
            if isinstance(outcome, BaseException):
                raise outcome
        return results  # type: ignore[return-value]

    # ---- partitioned variables -----------------------------------------------------------------

    def _read_layouts(self) -> dict[int, Any]:
        return self.fan_out({i: functools.partial(read_records, c) for i, c in enumerate(self.shards)})

    def _routed(self, name: str, plain: Callable[[Client], T], whole: Callable[[PartitionSpec], T]) -> T:
        """A call on `name`: to its owner, or on its parts if it is partitioned. A variable not found makes
        the client read the layouts again (another client may have partitioned it, removed it, or created
        it beside another variable)."""
        spec, home = self.layouts.get(name), self.owner(name)
        try:
            if spec is None:
                return self._at_owner(name, plain)
            return whole(spec)
        except NotFoundError:
            fresh = self.layouts.load().get(name)
            layout_shard = self.owner(placement.layout_name(name))
            if fresh is None and layout_shard in self.layouts.unread:
                raise UnavailableError(
                    f"variable '{name}' is not on {self.describe(self.owner(name))}, and "
                    f"{self.describe(layout_shard)}, which would hold its partition layout, is unavailable"
                ) from None
            if fresh == spec and self.owner(name) == home:
                raise
        return self._at_owner(name, plain) if fresh is None else whole(fresh)

    def partition_spec(
        self, name: object, dtype: Any, shape: Any, value: Any, partitioner: Any
    ) -> PartitionSpec | None:
        """The layout create() makes for `partitioner` (None: no partitioner, or it gives one part)."""
        name = self._checked(name)
        if partitioner is None:
            return None
        if not callable(partitioner):
            raise UsageError(f"partitioner must be callable (shape, dtype) -> parts, not {partitioner!r:.60}")
        declared, dims, array = self._create_args(name, dtype, shape, value)
        full = array.shape if array is not None else dims
        if full is None or len(full) == 0:
            raise InvalidArgumentError(
                f"variable '{name}': a partitioned variable needs a shape of rank 1 or more"
            )
        try:
            parts = placement.parts_along_axis0(partitioner, name, full, declared)
        except ValueError as exc:
            raise InvalidArgumentError(str(exc)) from None
        return PartitionSpec(name, declared, tuple(full), parts) if parts > 1 else None

    def _create_args(self, name: str, dtype: Any, shape: Any, value: Any) -> Any:
        return self.shards[0]._create_args(name, dtype, shape, value)

    # ---- catalog -------------------------------------------------------------------------------

    def create(
        self,
        name: str,
        *,
        dtype: Any = None,
        shape: Sequence[int] | None = None,
        value: Any = None,
        partitioner: Any = None,
        colocate_with: str | None = None,
    ) -> VariableInfo:
        """Create a variable on its shard; with a `partitioner` (placement.fixed_size_partitioner,
        MinSizePartitioner, ...) that gives it more than one part, as parts on their own shards; with
        `colocate_with`, beside that variable (partitioned like it: colocation.py)."""
        if colocate_with is not None:
            return colocation.create(
                self, name, colocate_with, dtype=dtype, shape=shape, value=value, partitioner=partitioner
            )
        spec = self.partition_spec(name, dtype, shape, value, partitioner)
        if spec is None:
            return self._at_owner(name, lambda c: c.create(name, dtype=dtype, shape=shape, value=value))
        try:
            self._at_owner(name, lambda c: c.info(name))
        except NotFoundError:
            pass
        else:
            raise AlreadyExistsError(f"variable '{name}' already exists (not partitioned)")
        # The layout and every part at once, each its own operation, so that a failure undoes the others.
        pipe = self.pipeline(raise_on_error=False)
        for piece in pipe.create_pieces(spec, value):
            pipe._add(name, [piece], first_result)
        results = pipe.execute()
        failed = [r for r in results if isinstance(r, TensorPSError)]
        if failed:
            undo = self.pipeline(raise_on_error=False)
            for made, result in zip([placement.layout_name(name), *spec.part_names], results, strict=True):
                if not isinstance(result, TensorPSError):
                    undo._single(made, "delete")
            undo.execute()
            raise failed[0]
        self.layouts.remember(spec)
        return logical_info(spec, results[1:])

    def delete(self, name: str) -> None:
        name = self._checked(name)

        def plain(client: Client) -> None:  # a colocated variable goes with its record
            self._one("delete", name) if self.layouts.colocated(name) is not None else client.delete(name)

        self._routed(name, plain, lambda spec: self._one("delete", name))

    def info(self, name: str) -> VariableInfo:
        name = self._checked(name)
        info: VariableInfo = self._routed(name, lambda c: c.info(name), lambda spec: self._one("info", name))
        return info

    def is_initialized(self, name: str) -> bool:
        return self.info(name).initialized

    def list(self, prefix: str = "") -> list[VariableInfo]:
        """Every variable of every shard whose name starts with `prefix`, in name order; a partitioned
        variable once, with its logical shape."""
        self._check_open()
        if not isinstance(prefix, str):
            raise UsageError(f"prefix must be a str, not {type(prefix).__name__} ({prefix!r:.60})")
        found = self._gathered({i: functools.partial(c.list, prefix) for i, c in enumerate(self.shards)})
        return self.layouts.fold_infos(
            prefix, {info.name: info for listed in found.values() for info in listed}
        )

    def server_info(self) -> builtins.list[ServerInfo]:  # type: ignore[override]
        """One ServerInfo per shard, in shard order (each from the answering worker)."""
        self._check_open()
        found = self._gathered({i: c.server_info for i, c in enumerate(self.shards)})
        return [found[i] for i in range(len(self.shards))]

    def snapshot(self) -> builtins.list[SnapshotInfo]:  # type: ignore[override]
        """Every shard's snapshot, in shard order: each shard takes its own point-in-time cut of its own
        variables (shards are not cut together)."""
        self._check_open()
        taken = self._gathered({i: c.snapshot for i, c in enumerate(self.shards)})
        return [taken[i] for i in range(len(self.shards))]

    # ---- reads and writes ----------------------------------------------------------------------

    def _one(self, method: str, name: str, *args: Any, **kwargs: Any) -> Any:
        """One operation on a partitioned variable, through a pipeline (one batch per shard of its parts)."""
        pipe = self.pipeline(raise_on_error=False)
        getattr(pipe, method)(name, *args, **kwargs)
        (result,) = pipe.execute()
        if isinstance(result, TensorPSError):
            raise result
        return result

    def read(self, name: str) -> Array:
        name = self._checked(name)
        return self._routed(name, lambda c: c.read(name), lambda spec: self._one("read", name))

    def assign(
        self,
        name: str,
        value: Any,
        *,
        validate_shape: bool = True,
        use_locking: bool = True,
        read_value: bool = True,
    ) -> Any:
        return self._update(
            "assign",
            name,
            value,
            validate_shape=validate_shape,
            use_locking=use_locking,
            read_value=read_value,
        )

    def assign_add(self, name: str, delta: Any, *, use_locking: bool = False, read_value: bool = True) -> Any:
        return self._update("assign_add", name, delta, use_locking=use_locking, read_value=read_value)

    def assign_sub(self, name: str, delta: Any, *, use_locking: bool = False, read_value: bool = True) -> Any:
        return self._update("assign_sub", name, delta, use_locking=use_locking, read_value=read_value)

    def _update(self, method: str, name: str, delta: Any, **flags: Any) -> Any:
        name = self._checked(name)
        return self._routed(
            name,
            lambda c: getattr(c, method)(name, delta, **flags),
            lambda spec: self._one(method, name, delta, **flags),
        )

    # ---- futures -------------------------------------------------------------------------------

    def _background(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="tensorps-client")
            return self._executor


def _discover(member: str, options: dict[str, Any]) -> list[str]:
    """The cluster's members as `member` knows them (GetServerInfo); just it for a lone server."""
    with Client(member, **options) as probe:
        info = probe.server_info()
    return list(info.cluster) or [member]


def _route_by_name(method: str) -> Callable[..., Any]:
    """A ClusterClient method for Client's per-variable `method`: sent to the variable's owner."""

    def routed(self: ClusterClient, name: str, *args: Any, **kwargs: Any) -> Any:
        name = self._checked(name)
        if self.layouts.get(name) is not None:
            raise UsageError(
                f"{method}() of partitioned variable '{name}' is not available over a cluster yet"
            )
        return self._at_owner(name, lambda client: getattr(client, method)(name, *args, **kwargs))

    routed.__name__ = method
    routed.__doc__ = getattr(Client, method).__doc__
    return routed


def _unsupported(method: str) -> Callable[..., Any]:
    def refused(self: ClusterClient, *args: Any, **kwargs: Any) -> Any:
        raise UsageError(f"{method}() is not available on a client of a cluster")

    refused.__name__ = method
    return refused


def _route_the_rest() -> None:
    """Every public method of Client that ClusterClient does not define: routed by its `name` argument if
    it has one first, refused otherwise (never sent to a server chosen at random)."""
    for attribute, value in inspect.getmembers(Client, inspect.isfunction):
        if (
            attribute.startswith("_")
            or attribute in vars(ClusterClient)
            or attribute in vars(ClusterBatchCalls)
            or attribute in vars(BatchCalls)  # they go through pipeline(): a ClusterPipeline here
            or attribute in vars(RowCalls)  # cluster_rows.py routes them
        ):
            continue
        parameters = list(inspect.signature(value).parameters)
        if len(parameters) > 1 and parameters[1] == "name":
            setattr(ClusterClient, attribute, _route_by_name(attribute))
        else:
            setattr(ClusterClient, attribute, _unsupported(attribute))


_route_the_rest()
__all__ = ["ClusterClient", "ClusterPipeline", "members_of"]
