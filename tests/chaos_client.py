"""A client process of the chaos suite (tests/test_chaos.py): random operations of every kind, each logged.

Run as `python tests/chaos_client.py CONFIG_JSON`. The process is client "slot" K of the run; it owns the
variables `own{K}/...` and `eph{K}/...` (the only process that writes them, so the parent can tell exactly
what each of its reads must show) and shares the counters and the atomic groups with every other client.

Every operation is logged *before* it is sent ({"t": "op", ...}) and its outcome after ({"t": "ok"} or
{"t": "err"}), one JSON line per record, appended with one write(2) each, so that a SIGKILL at any instant
leaves a log the parent can read: an operation without an outcome was in flight when the process died.
Successive incarnations of a slot (the parent SIGKILLs local clients and starts them again) append to the
same log, each after a {"t": "start"} record. The parent (test_chaos.Model) judges every outcome; this
process only acts and reports.

Every written tensor is uniform (np.full) with a stamp that names its writer: slot << 40 | incarnation << 24
| sequence, so a torn value shows two stamps. Counters only ever grow by 1 per locked assign_add (or
locked assign_sub of -1).
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from tensorps.client import BatchError, Client, TensorPSError, VariableInfo

Array = np.ndarray[Any, Any]
DTYPE = np.int64

# A sub-operation as logged: [kind, name, *arguments]; kinds and arguments:
#   ["assign", name, stamp, length, locked]   ["add", name, +1]   ["read", name]   ["info", name]
#   ["create", name, stamp or None (declared), length]   ["delete", name]   ["list", prefix]
SubOp = list[Any]


@dataclass
class Layout:
    """The variables of a run and how the clients use them (shared by the parent and every client)."""

    slots: list[int]
    small: int = 256  # elements of the small owned variables, counters and group members
    big: int = 655_360  # elements of own{K}/big: 5 MiB of int64, above the client's 4 MiB streaming switch
    counters: int = 4
    groups: int = 3
    group_members: int = 4
    ephemerals: int = 4
    # Lengths (int64 elements) of ephemeral variables, up to 6 MiB (streamed); they fill the byte budget.
    eph_lengths: list[int] = field(default_factory=lambda: [16, 1024, 32_768, 262_144, 786_432])
    eph_weights: list[float] = field(default_factory=lambda: [0.3, 0.3, 0.2, 0.12, 0.08])

    def counter_names(self) -> list[str]:
        return [f"ctr/{i}" for i in range(self.counters)] + [f"grp{g}/count" for g in range(self.groups)]

    def group(self, g: int) -> list[str]:
        return [f"grp{g}/m{m}" for m in range(self.group_members)]

    @staticmethod
    def owned(slot: int) -> dict[str, str]:
        return {kind: f"own{slot}/{kind}" for kind in ("locked", "mixed", "shape", "big")}

    def ephemeral(self, slot: int, i: int) -> str:
        return f"eph{slot}/{i}"

    def initial(self) -> dict[str, Array]:
        """Every variable that exists from the start, with its initial value (zeros: stamp 0)."""
        values = {name: np.zeros(self.small, DTYPE) for name in self.counter_names()}
        for g in range(self.groups):
            values.update({name: np.zeros(self.small, DTYPE) for name in self.group(g)})
        for slot in self.slots:
            names = self.owned(slot)
            values.update({names[k]: np.zeros(self.small, DTYPE) for k in ("locked", "mixed", "shape")})
            values[names["big"]] = np.zeros(self.big, DTYPE)
        return values


def stamp_slot(stamp: int) -> int:
    return stamp >> 40


def observe(value: Any) -> Any:
    """A result as logged: arrays as ["v", shape, distinct values (at most 8), how many distinct]."""
    if isinstance(value, np.ndarray):
        if value.size and value.min() == value.max():
            distinct = [int(value.flat[0])]
            count = 1
        else:
            unique = np.unique(value)
            distinct = [int(v) for v in unique[:8]]
            count = len(unique)
        return ["v", list(value.shape), distinct, count]
    if isinstance(value, VariableInfo):
        shape = None if value.shape is None else list(value.shape)
        return ["i", value.initialized, shape, value.version]
    if isinstance(value, TensorPSError):
        return ["e", code_of(value)]
    if isinstance(value, list):
        return ["l", sorted(v.name for v in value if isinstance(v, VariableInfo))]
    return None


def code_of(error: TensorPSError) -> str:
    return error.code.name if error.code is not None else "UNKNOWN"


class ChaosClient:
    def __init__(self, config: dict[str, Any]) -> None:
        self.layout = Layout(**config["layout"])
        self.slot: int = config["slot"]
        self.incarnation: int = config["incarnation"]
        self.stop_path: str = config["stop"]
        self.rng = random.Random(f"{config['seed']}:{self.slot}:{self.incarnation}")
        self.log_fd = os.open(config["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self.target: str = config["target"]
        self.client = Client(self.target, timeout=config["timeout"])
        self.sequence = 0
        self.op_id = 0
        self.names = self.layout.owned(self.slot)
        # What this process believes of its ephemerals: True exists, False absent, None unknown.
        self.ephemerals: dict[str, bool | None] = {
            self.layout.ephemeral(self.slot, i): None for i in range(self.layout.ephemerals)
        }
        self.eph_lengths: dict[str, int] = {}
        self.others = [s for s in self.layout.slots if s != self.slot]

    # ---- logging -------------------------------------------------------------------------------

    def log(self, record: dict[str, Any]) -> None:
        os.write(self.log_fd, (json.dumps(record, separators=(",", ":")) + "\n").encode())

    def stamp(self) -> int:
        self.sequence += 1
        return (self.slot << 40) | (self.incarnation << 24) | self.sequence

    def call(
        self,
        ops: Sequence[SubOp],
        run: Callable[[], list[Any]],
        *,
        batch: str | None = None,
        atomic: bool = False,
    ) -> list[Any] | TensorPSError:
        """Log `ops`, run them, log the outcome; returns the results, or the error."""
        self.op_id += 1
        op_id = self.op_id
        record: dict[str, Any] = {"t": "op", "id": op_id, "ops": list(ops), "time": time.time()}
        if batch is not None:
            record |= {"batch": batch, "atomic": atomic}
        self.log(record)
        try:
            results = run()
        except BatchError as error:
            self.log(
                {
                    "t": "err",
                    "id": op_id,
                    "code": code_of(error),
                    "msg": error.message[:300],
                    "res": [observe(r) for r in error.results],
                }
            )
            return error
        except TensorPSError as error:
            self.log({"t": "err", "id": op_id, "code": code_of(error), "msg": error.message[:300]})
            if code_of(error) == "UNAVAILABLE":
                time.sleep(0.05)  # the server is restarting: do not spin
            return error
        except Exception as exc:  # outside the documented exception tree: the parent reports it
            self.log(
                {
                    "t": "err",
                    "id": op_id,
                    "code": f"EXCEPTION:{type(exc).__name__}",
                    "msg": "".join(traceback.format_exception(exc))[-2000:],
                }
            )
            return TensorPSError(f"{type(exc).__name__}: {exc}")
        self.log({"t": "ok", "id": op_id, "res": [observe(r) for r in results]})
        return results

    # ---- the operations ------------------------------------------------------------------------

    def full(self, stamp: int, length: int) -> Array:
        return np.full(length, stamp, DTYPE)

    def assign_owned(self) -> None:
        kind = self.rng.choice(["locked", "locked", "mixed", "mixed", "shape"])
        name = self.names[kind]
        stamp = self.stamp()
        length = self.rng.randint(1, 600) if kind == "shape" else self.layout.small
        locked = kind != "mixed" or self.rng.random() < 0.5
        read_value = self.rng.random() < 0.5
        value = self.full(stamp, length)
        self.call(
            [["assign", name, stamp, length, locked]],
            lambda: [
                self.client.assign(
                    name, value, use_locking=locked, read_value=read_value, validate_shape=kind != "shape"
                )
            ],
        )

    def read_owned(self) -> None:
        name = self.names[self.rng.choice(["locked", "mixed", "shape"])]
        self.call([["read", name]], lambda: [self.client.read(name)])

    def big(self) -> None:
        name = self.names["big"]
        if self.rng.random() < 0.5:
            self.call([["read", name]], lambda: [self.client.read(name)])
            return
        stamp = self.stamp()
        value = self.full(stamp, self.layout.big)
        self.call(
            [["assign", name, stamp, self.layout.big, True]],
            lambda: [self.client.assign(name, value, read_value=False)],
        )

    def add(self) -> None:
        name = self.rng.choice(self.layout.counter_names())
        ones = np.ones(self.layout.small, DTYPE)
        read_value = self.rng.random() < 0.3
        if self.rng.random() < 0.5:
            run = lambda: [self.client.assign_add(name, ones, use_locking=True, read_value=read_value)]  # noqa: E731
        else:
            run = lambda: [self.client.assign_sub(name, -ones, use_locking=True, read_value=read_value)]  # noqa: E731
        self.call([["add", name, 1]], run)

    def read_shared(self) -> None:
        choices = self.layout.counter_names() + [self.layout.owned(s)["locked"] for s in self.others]
        choices += self.layout.group(self.rng.randrange(self.layout.groups))
        name = self.rng.choice(choices)
        self.call([["read", name]], lambda: [self.client.read(name)])

    def info_or_list(self) -> None:
        roll = self.rng.random()
        if roll < 0.5:
            name = self.rng.choice([*self.names.values(), *self.layout.counter_names()])
            self.call([["info", name]], lambda: [self.client.info(name)])
        else:
            prefix = f"eph{self.slot}/" if roll < 0.85 else self.rng.choice(["ctr/", ""])
            self.call([["list", prefix]], lambda: [self.client.list(prefix)])

    def ephemeral(self) -> None:
        """Create, assign, read, inspect or delete one of this slot's ephemeral variables."""
        name = self.rng.choice(sorted(self.ephemerals))
        exists = self.ephemerals[name]
        if exists is None:
            self.eph_lookup(name)
        elif not exists:
            self.eph_create(name)
        else:
            self.eph_use(name)

    def eph_lookup(self, name: str) -> None:
        result = self.call([["info", name]], lambda: [self.client.info(name)])
        if isinstance(result, list):
            self.ephemerals[name] = True
            info = result[0]
            assert isinstance(info, VariableInfo)
            if info.shape is not None:
                self.eph_lengths[name] = info.shape[0]
        elif code_of(result) == "NOT_FOUND":
            self.ephemerals[name] = False

    def eph_create(self, name: str) -> None:
        length = self.rng.choices(self.layout.eph_lengths, self.layout.eph_weights)[0]
        if self.rng.random() < 0.6:
            stamp = self.stamp()
            value = self.full(stamp, length)
            result = self.call(
                [["create", name, stamp, length]], lambda: [self.client.create(name, value=value)]
            )
        else:
            result = self.call(
                [["create", name, None, length]],
                lambda: [self.client.create(name, dtype="int64", shape=(length,))],
            )
        if isinstance(result, list):
            self.ephemerals[name] = True
            self.eph_lengths[name] = length
        elif code_of(result) != "RESOURCE_EXHAUSTED":
            self.ephemerals[name] = None

    def eph_use(self, name: str) -> None:
        roll = self.rng.random()
        length = self.eph_lengths.get(name)
        if roll < 0.3 and length is not None:
            stamp = self.stamp()
            value = self.full(stamp, length)
            result = self.call(
                [["assign", name, stamp, length, True]],
                lambda: [self.client.assign(name, value, read_value=False)],
            )
        elif roll < 0.5:
            result = self.call([["read", name]], lambda: [self.client.read(name)])
            if isinstance(result, TensorPSError) and code_of(result) == "FAILED_PRECONDITION":
                return  # declared and not assigned yet
        elif roll < 0.6:
            result = self.call([["info", name]], lambda: [self.client.info(name)])
        else:

            def delete() -> list[Any]:
                self.client.delete(name)
                return [None]

            result = self.call([["delete", name]], delete)
            if isinstance(result, list):
                self.ephemerals[name] = False
                return
        if isinstance(result, TensorPSError) and code_of(result) != "RESOURCE_EXHAUSTED":
            self.ephemerals[name] = None

    def read_many(self) -> None:
        pool = self.layout.counter_names() + [self.layout.owned(s)["locked"] for s in self.layout.slots]
        pool += [self.names["mixed"], self.names["shape"]]
        names = self.rng.sample(pool, self.rng.randint(1, 6))
        self.call(
            [["read", n] for n in names],
            lambda: list(self.client.read_many(names).values()),
            batch="read_many",
        )

    def assign_many(self) -> None:
        names = self.rng.sample([self.names["locked"], self.names["mixed"]], self.rng.randint(1, 2))
        locked = self.rng.random() < 0.6 or self.names["locked"] in names
        atomic = self.rng.random() < 0.5
        read_value = self.rng.random() < 0.3
        stamps = {n: self.stamp() for n in names}
        values = {n: self.full(s, self.layout.small) for n, s in stamps.items()}
        self.call(
            [["assign", n, stamps[n], self.layout.small, locked] for n in names],
            lambda: list(
                self.client.assign_many(
                    values, use_locking=locked, atomic=atomic, read_value=read_value
                ).values()
            ),
            batch="assign_many",
            atomic=atomic,
        )

    def add_many(self) -> None:
        names = self.rng.sample(self.layout.counter_names(), self.rng.randint(1, 4))
        atomic = self.rng.random() < 0.5
        deltas = {n: np.ones(self.layout.small, DTYPE) for n in names}
        self.call(
            [["add", n, 1] for n in names],
            lambda: list(self.client.assign_add_many(deltas, use_locking=True, atomic=atomic).values()),
            batch="assign_add_many",
            atomic=atomic,
        )

    def group_write(self) -> None:
        g = self.rng.randrange(self.layout.groups)
        members = self.layout.group(g)
        stamp = self.stamp()
        value = self.full(stamp, self.layout.small)
        if self.rng.random() < 0.3:
            self.call(
                [["assign", n, stamp, self.layout.small, True] for n in members],
                lambda: list(self.client.assign_many(dict.fromkeys(members, value), atomic=True).values()),
                batch="assign_many",
                atomic=True,
            )
            return
        count = f"grp{g}/count"
        ops: list[SubOp] = [
            ["assign", n, stamp, self.layout.small, True] for n in self.rng.sample(members, len(members))
        ]
        ops.insert(self.rng.randrange(len(ops) + 1), ["add", count, 1])
        if self.rng.random() < 0.5:
            ops.append(["read", self.rng.choice(members)])
        ones = np.ones(self.layout.small, DTYPE)

        def run() -> list[Any]:
            pipe = self.client.pipeline(atomic=True)
            for op in ops:
                if op[0] == "assign":
                    pipe.assign(op[1], value, read_value=self.rng.random() < 0.3)
                elif op[0] == "add":
                    pipe.assign_add(op[1], ones, use_locking=True)
                else:
                    pipe.read(op[1])
            return pipe.execute()

        self.call(ops, run, batch="pipeline", atomic=True)

    def group_read(self) -> None:
        g = self.rng.randrange(self.layout.groups)
        names = [*self.layout.group(g), f"grp{g}/count"]
        atomic = self.rng.random() < 0.7

        def run() -> list[Any]:
            pipe = self.client.pipeline(atomic=atomic)
            for name in names:
                pipe.read(name)
            return pipe.execute()

        self.call([["read", n] for n in names], run, batch="pipeline", atomic=atomic)

    def mixed_pipeline(self) -> None:
        """A plain (non-atomic) pipeline of writes and reads of several kinds."""
        stamp = self.stamp()
        counter = self.rng.choice(self.layout.counter_names())
        eph = self.rng.choice(sorted(self.ephemerals))
        ops: list[SubOp] = [
            ["assign", self.names["locked"], stamp, self.layout.small, True],
            ["add", counter, 1],
            ["read", self.names["mixed"]],
            ["info", eph],
            ["read", counter],
        ]
        self.rng.shuffle(ops)
        value = self.full(stamp, self.layout.small)
        ones = np.ones(self.layout.small, DTYPE)

        def run() -> list[Any]:
            pipe = self.client.pipeline()
            for op in ops:
                if op[0] == "assign":
                    pipe.assign(op[1], value)
                elif op[0] == "add":
                    pipe.assign_add(op[1], ones, use_locking=True)
                elif op[0] == "read":
                    pipe.read(op[1])
                else:
                    pipe.info(op[1])
            return pipe.execute()

        self.call(ops, run, batch="pipeline", atomic=False)
        self.ephemerals[eph] = None  # the info's outcome is the parent's to judge; look again before use

    MENU: tuple[tuple[str, float], ...] = (
        ("assign_owned", 0.16),
        ("read_owned", 0.08),
        ("big", 0.03),
        ("add", 0.14),
        ("read_shared", 0.08),
        ("info_or_list", 0.05),
        ("ephemeral", 0.14),
        ("read_many", 0.05),
        ("assign_many", 0.05),
        ("add_many", 0.05),
        ("group_write", 0.07),
        ("group_read", 0.05),
        ("mixed_pipeline", 0.05),
    )

    def run(self) -> None:
        self.log({"t": "start", "inc": self.incarnation, "pid": os.getpid(), "time": time.time()})
        kinds = [k for k, _w in self.MENU]
        weights = [w for _k, w in self.MENU]
        while not os.path.exists(self.stop_path):
            kind = self.rng.choices(kinds, weights)[0]
            getattr(self, kind)()
            if self.target.startswith("shm://"):
                time.sleep(0.001)  # local calls take microseconds: leave the cores to the servers too
        self.client.close()
        self.log({"t": "end", "time": time.time()})


def main() -> None:
    config = json.loads(sys.argv[1])
    ChaosClient(config).run()


def config_json(
    *,
    target: str,
    slot: int,
    incarnation: int,
    seed: int,
    log: str,
    stop: str,
    layout: Layout,
    timeout: float,
) -> str:
    return json.dumps(
        {
            "target": target,
            "slot": slot,
            "incarnation": incarnation,
            "seed": seed,
            "log": log,
            "stop": stop,
            "layout": asdict(layout),
            "timeout": timeout,
        }
    )


if __name__ == "__main__":
    main()
