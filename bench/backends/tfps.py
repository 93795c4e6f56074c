"""TensorFlow's own answer: a ps task holding ref variables, fed and fetched through a TF1 session.

The session's target is the ps task itself, so a feed goes to its master in one RunStep RPC and the
Assign runs where the variable lives, as a between-graph-replicated worker would do it.
Only runs when tensorflow is importable (it is not a dependency of tensorps).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from bench.backends.base import Array, Server, Skipped, Target
from bench.backends.process import ServerProcess, free_port

LABEL = "TF ps"
_READY = re.compile(r"tf ps ready: serving on (\S+)")


def start() -> Server | Skipped:
    if importlib.util.find_spec("tensorflow") is None:
        return Skipped(LABEL, "skipped: tensorflow not importable; install with `pip install tensorflow-cpu`")
    command = [sys.executable, "-m", "bench.backends.tfps_server", str(free_port())]
    process = ServerProcess(command, _READY, timeout=120)
    assert process.match is not None
    return Server(LABEL, Target("tf", process.match.group(1)), process)


@dataclass
class _Ops:
    placeholder: Any
    assign: Any  # the ref that Assign returns: fetching it reads the value after the write
    add: Any  # AssignAdd of the same placeholder (TF's default use_locking=False, as Assign's True)
    variable: Any
    layout: tuple[Any, tuple[int, ...]]


class TFEndpoint:
    """A model step is one session.run each way: fetch every variable, then feed every placeholder and
    run their Assign (or AssignAdd) ops, as a between-graph worker does."""

    note = ""

    def __init__(self, address: str) -> None:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TF's startup notes would bury the progress lines
        self.tf: Any = importlib.import_module("tensorflow")
        self.graph = self.tf.Graph()
        self.session = self.tf.compat.v1.Session(f"grpc://{address}", graph=self.graph)
        self.ops: dict[str, _Ops] = {}
        self.calls = 0

    def _ops(self, name: str, value: Array) -> _Ops:
        layout = (value.dtype, value.shape)
        found = self.ops.get(name)
        if found is not None and found.layout == layout:
            return found
        tf = self.tf
        with self.graph.as_default(), tf.device("/job:ps/task:0"):
            placeholder = tf.compat.v1.placeholder(tf.as_dtype(value.dtype), shape=value.shape)
            # A ref variable's state lives on the ps under its name, so every client process shares it.
            variable = tf.compat.v1.get_variable(
                name,
                shape=value.shape,
                dtype=tf.as_dtype(value.dtype),
                initializer=tf.compat.v1.zeros_initializer(),
                use_resource=False,
            )
            assign = tf.compat.v1.assign(variable, placeholder)
            add = tf.compat.v1.assign_add(variable, placeholder)
        self.ops[name] = found = _Ops(placeholder, assign, add, variable, layout)
        return found

    def put(self, name: str, value: Array) -> None:
        self.assign(name, value, read_value=False)

    def assign(self, name: str, value: Array, *, read_value: bool) -> Array | None:
        ops = self._ops(name, value)
        fetch = ops.assign if read_value else ops.assign.op
        result = self.session.run(fetch, feed_dict={ops.placeholder: value})
        return result if read_value else None

    def read(self, name: str) -> Array:
        return self.session.run(self.ops[name].variable)  # type: ignore[no-any-return]

    def pull(self, names: Sequence[str]) -> dict[str, Array]:
        self.calls += 1
        values = self.session.run([self.ops[name].variable for name in names])
        return dict(zip(names, values, strict=True))

    def push(self, values: Mapping[str, Array], *, add: bool) -> None:
        ops = [self._ops(name, value) for name, value in values.items()]
        targets = [o.add.op if add else o.assign.op for o in ops]
        self.calls += 1
        self.session.run(
            targets, feed_dict={o.placeholder: v for o, v in zip(ops, values.values(), strict=True)}
        )

    def batching(self, *, add: bool) -> str:
        return "one session.run each way (" + ("AssignAdd" if add else "Assign") + " ops)"

    def close(self) -> None:
        self.session.close()
