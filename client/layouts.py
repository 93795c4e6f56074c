"""The partition layouts and colocations of a cluster as one client knows them: which names are
partitioned variables (and how to show them whole in listings and prefix reads), and which names live on
another shard than their hash's because they were created colocated with a primary.

Layouts are the variables `.partitions/NAME` (placement.PartitionSpec), spread over the shards like any
variable. A client reads them all at its first call (one prefix read per shard, at once), adds the ones it
creates, and reads them again when a name is not found where it looked (another client may have
partitioned the variable, or removed it) or when a listing shows parts of a variable it does not know.
Colocation records `.colocated/NAME` are read alike, with them: NAME lives on the shard holding its record.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from tensorps.client import codec, placement
from tensorps.client.codec import CodecError
from tensorps.client.errors import InvalidArgumentError
from tensorps.client.infos import VariableInfo
from tensorps.client.placement import PartitionSpec

Array = np.ndarray[Any, Any]
# Per shard: its layout variables (name -> value), or the error that kept them from being read.
ReadAll = Callable[[], Mapping[int, Mapping[str, Array] | BaseException]]


def logical_info(spec: PartitionSpec, parts: list[VariableInfo]) -> VariableInfo:
    """The VariableInfo of a partitioned variable from its parts': logical shape, initialized when every
    part is, a version that grows with every write of any part (their sum)."""
    return VariableInfo(
        name=spec.name,
        dtype=spec.dtype.numpy,
        shape=spec.shape,
        initialized=all(info.initialized for info in parts),
        version=sum(info.version for info in parts),
    )


def join_values(values: list[Array]) -> Array:
    joined = np.concatenate(values, axis=0)
    joined.flags.writeable = False
    return joined


def refusal(spec: PartitionSpec, array: Array, op: str) -> InvalidArgumentError | None:
    """The error a server gives a write of `array` to the whole variable: its dtype, then its shape (a
    partitioned variable keeps its shape whatever validate_shape says)."""
    dtype = codec.dtype_of(array.dtype)
    if dtype != spec.dtype:
        return InvalidArgumentError(
            f"{op} of variable '{spec.name}': the variable has dtype {spec.dtype.name} but the value has "
            f"dtype {dtype.name}; nothing is cast"
        )
    if array.shape != spec.shape:
        have, got = codec.format_shape(spec.shape), codec.format_shape(array.shape)
        if op == "Assign":
            text = f"Assign requires shapes of both tensors to match. lhs shape= {have} rhs shape= {got}"
        else:
            text = f"Parameters and update must be the same size. lhs shape= {have} rhs shape= {got}"
        return InvalidArgumentError(f"{text} (variable '{spec.name}', partitioned: its shape is fixed)")
    return None


def read_records(client: Any) -> dict[str, Array]:
    """One shard's layouts and colocation records (one batch of prefix reads)."""
    found = client.pipeline()
    for prefix in placement.METADATA_PREFIXES:
        found.read_prefix(prefix)
    return {name: value for part in found.execute() for name, value in part.items()}


class Layouts:
    """The layouts of the partitioned variables, read with `read_all` (see the module)."""

    def __init__(self, read_all: ReadAll) -> None:
        self._read_all = read_all
        self._specs: dict[str, PartitionSpec] | None = None
        self._colocated: dict[str, int] = {}  # name -> the shard holding it and its colocation record
        self._primaries: dict[str, str] = {}  # name -> the primary it was created beside
        self._lock = threading.Lock()
        # Shards whose layouts could not be read last time: a name not found elsewhere may be theirs.
        self.unread: set[int] = set()

    def get(self, name: str) -> PartitionSpec | None:
        """The layout of `name` if it is a partitioned variable (read on first use)."""
        return self._known().get(name)

    def _known(self) -> dict[str, PartitionSpec]:
        specs = self._specs
        return specs if specs is not None else self.load()

    def colocated(self, name: str) -> int | None:
        """The shard that holds `name` if it was created colocated with a primary (None: its hash's)."""
        self._known()
        return self._colocated.get(name)

    def note_colocated(self, name: str, shard: int, primary: str) -> None:
        self._known()
        self._colocated[name] = shard
        self._primaries[name] = primary

    def primary(self, name: str) -> str | None:
        """The variable `name` was created beside (colocate_with), if any; for a partitioned slot, the
        logical variable whose parts its parts are beside."""
        self._known()
        if name in self._primaries:
            return self._primaries[name]
        first = self._primaries.get(placement.part_name(name, 0))
        if self.get(name) is None or first is None or not first.endswith(placement.part_name("", 0)):
            return None
        return first.removesuffix(placement.part_name("", 0))

    def load(self) -> dict[str, PartitionSpec]:
        """Read every layout and colocation again; a shard that cannot be reached is remembered in
        `unread` (the colocations it held are kept)."""
        specs: dict[str, PartitionSpec] = {}
        colocated: dict[str, int] = {}
        primaries = {name: p for name, p in self._primaries.items()}  # kept for shards not read
        unread = set()
        for shard, outcome in self._read_all().items():
            if isinstance(outcome, BaseException):
                unread.add(shard)
                colocated.update((name, s) for name, s in self._colocated.items() if s == shard)
                continue
            for layout, value in outcome.items():
                if layout.startswith(placement.COLOCATED_PREFIX):
                    name = layout.removeprefix(placement.COLOCATED_PREFIX)
                    colocated[name] = shard
                    primaries[name] = bytes(np.asarray(value, np.uint8)).decode(errors="replace")
                    continue
                name = layout.removeprefix(placement.PARTITIONS_PREFIX)
                try:
                    specs[name] = PartitionSpec.decode(name, value)
                except CodecError:
                    continue  # not a layout this client writes: the name stays a plain variable
        with self._lock:
            self._specs, self.unread, self._colocated = specs, unread, colocated
            self._primaries = {name: p for name, p in primaries.items() if name in colocated}
        return specs

    def remember(self, spec: PartitionSpec) -> None:
        self._known()[spec.name] = spec

    def forget(self, name: str) -> None:
        if self._specs is not None:
            self._specs.pop(name, None)
        self._colocated.pop(name, None)

    def stale(self) -> None:
        """Read them again at the next use."""
        self._specs = None

    def fold_infos(self, prefix: str, infos: Mapping[str, VariableInfo]) -> list[VariableInfo]:
        """Every shard's listing merged, a partitioned variable once with its logical shape, in name order."""
        specs = self._known()
        if any(_is_unknown_part(name, specs) for name in infos):
            specs = self.load()  # another client partitioned a variable since the layouts were read
        hidden = {part for spec in specs.values() for part in spec.part_names}
        folded = [
            info for name, info in infos.items() if name not in hidden and not placement.is_metadata(name)
        ]
        for name, spec in specs.items():
            if name.startswith(prefix) and all(part in infos for part in spec.part_names):
                folded.append(logical_info(spec, [infos[part] for part in spec.part_names]))
        return sorted(folded, key=lambda info: info.name)

    def fold_values(self, prefix: str, results: list[dict[str, Array]]) -> dict[str, Array]:
        """Every shard's prefix read merged, a partitioned variable once and whole, in name order."""
        merged = {name: value for found in results for name, value in found.items()}
        specs = self._known()
        if any(_is_unknown_part(name, specs) for name in merged):
            specs = self.load()
        hidden = {part for spec in specs.values() for part in spec.part_names}
        out = {
            name: value
            for name, value in merged.items()
            if name not in hidden and not placement.is_metadata(name)
        }
        for name, spec in specs.items():
            if name.startswith(prefix) and all(part in merged for part in spec.part_names):
                out[name] = join_values([merged[part] for part in spec.part_names])
        return dict(sorted(out.items()))


def _is_unknown_part(name: str, specs: Mapping[str, PartitionSpec]) -> bool:
    base, infix, number = name.rpartition(placement.PART_INFIX)
    return bool(infix) and number.isdigit() and base not in specs
