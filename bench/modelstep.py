"""Whole-model steps: what a training worker does every step, against every system and a raw socket.

A step pulls every variable of a model and pushes all of them, either new values (`assign`) or deltas
(`assign_add`). Every pushed tensor carries a fresh tag and the client keeps what each system must hold
(copies, or sums for assign_add), so each step's pull checks the previous step's push and a final pull
checks the last one: a system that drops, mixes up or misapplies a write fails the run. Checks run outside
the timings.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from bench.backends import Array, Endpoint, Target, connect
from bench.models import Model
from bench.rawtcp import Exchange, RawTCP
from bench.workloads import VerificationError, check, tag

PUSHES = ("assign", "assign_add")


@dataclass(frozen=True)
class System:
    label: str
    target: Target


@dataclass
class Row:
    """One system and push kind on one model: a step's parts per round."""

    label: str
    push: str
    batching: str
    calls: tuple[int, int]  # pull calls + push calls of one step
    pulls: list[float] = field(default_factory=list)  # seconds, one per round
    pushes: list[float] = field(default_factory=list)

    @property
    def steps(self) -> list[float]:
        return [a + b for a, b in zip(self.pulls, self.pushes, strict=True)]


@dataclass
class ModelRun:
    model: Model
    rounds: int
    floor: list[Exchange] = field(default_factory=list)  # the raw-TCP exchange of the same bytes, per round
    rows: list[Row] = field(default_factory=list)


def initial_values(model: Model, seed: int) -> dict[str, Array]:
    rng = np.random.default_rng(seed)
    return {name: rng.standard_normal(shape, dtype=np.float32) for name, shape in model.shapes.items()}


class Replica:
    """One system's copy of one model under `prefix`, and what the system must hold (`expected`)."""

    def __init__(self, endpoint: Endpoint, model: Model, prefix: str, values: dict[str, Array]) -> None:
        self.endpoint = endpoint
        self.keys = list(model.shapes)
        self.names = [f"{prefix}/{key}" for key in self.keys]
        self.expected: dict[str, Array] = {}
        for name, key in zip(self.names, self.keys, strict=True):
            endpoint.put(name, values[key])
            self.expected[name] = values[key].copy()

    def verify(self, what: str, got: dict[str, Array]) -> None:
        if set(got) != set(self.names):
            raise VerificationError(
                f"{what}: pulled {len(got)} variables, not the {len(self.names)} asked for"
            )
        for name in self.names:
            check(f"{what} {name}", got[name], self.expected[name])

    def step(self, source: dict[str, Array], *, add: bool) -> tuple[float, float, tuple[int, int]]:
        """Pull all, check, push all of `source` (tagged anew): seconds of the pull and the push, calls."""
        before = self.endpoint.calls
        start = time.perf_counter()
        got = self.endpoint.pull(self.names)
        pulled = time.perf_counter()
        middle = self.endpoint.calls
        self.verify("pull", got)
        del got  # a step holds one pulled model at a time
        values = {name: tag(source[key]) for name, key in zip(self.names, self.keys, strict=True)}
        start_push = time.perf_counter()
        self.endpoint.push(values, add=add)
        pushed = time.perf_counter()
        for name, value in values.items():
            if add:
                np.add(self.expected[name], value, out=self.expected[name])
            else:
                np.copyto(self.expected[name], value)
        return pulled - start, pushed - start_push, (middle - before, self.endpoint.calls - middle)


def _label(system: System, endpoint: Endpoint) -> str:
    return f"{system.label} ({endpoint.note})" if endpoint.note else system.label


def run(
    systems: Sequence[System],
    models: Sequence[Model],
    rounds: int,
    progress: Callable[[str], None],
) -> list[ModelRun]:
    """`rounds` timed steps of each push kind per system and model (systems round-robin, rotated)."""
    endpoints = [connect(system.target) for system in systems]
    runs = [ModelRun(model, rounds) for model in models]
    try:
        with RawTCP() as raw:
            for run_ in runs:
                _measure(run_, systems, endpoints, raw, progress)
    finally:
        for endpoint in endpoints:
            endpoint.close()
    return runs


def _measure(
    run_: ModelRun,
    systems: Sequence[System],
    endpoints: Sequence[Endpoint],
    raw: RawTCP,
    progress: Callable[[str], None],
) -> None:
    model = run_.model
    progress(f"model step {model.title}: creating {model.tensors} variables on {len(systems)} systems")
    # Small deltas, as a learning rate makes them.
    deltas = {key: value * np.float32(1e-3) for key, value in initial_values(model, seed=4).items()}
    sources = {"assign": initial_values(model, seed=3), "assign_add": deltas}
    replicas = [
        Replica(endpoint, model, f"bench/model/s{index}/{model.name}", initial_values(model, seed=5))
        for index, endpoint in enumerate(endpoints)
    ]
    rows: dict[tuple[int, str], Row] = {}
    # Untimed warm-up: first calls open connections, allocate second buffers, build TF's graph.
    raw.exchange(model.nbytes, model.nbytes)
    for index, (system, replica) in enumerate(zip(systems, replicas, strict=True)):
        for push in PUSHES:
            add = push == "assign_add"
            _, _, calls = replica.step(sources[push], add=add)
            row = Row(_label(system, replica.endpoint), push, replica.endpoint.batching(add=add), calls)
            rows[(index, push)] = row
    order = list(range(len(systems)))
    for round_index in range(run_.rounds):
        shift = round_index % len(order)
        rotated = order[shift:] + order[:shift]
        progress(
            f"model step {model.title}: round {round_index + 1}/{run_.rounds}: "
            + ", ".join(systems[i].label for i in rotated)
        )
        run_.floor.append(raw.exchange(model.nbytes, model.nbytes))
        for index in rotated:
            for push in PUSHES:
                pull_s, push_s, calls = replicas[index].step(sources[push], add=push == "assign_add")
                row = rows[(index, push)]
                if calls != row.calls:
                    raise VerificationError(f"{row.label}: {calls} calls in a step, {row.calls} before")
                row.pulls.append(pull_s)
                row.pushes.append(push_s)
    for replica in replicas:
        replica.verify("final read back", replica.endpoint.pull(replica.names))
    run_.rows = [rows[(index, push)] for index in order for push in PUSHES]
