"""`python -m bench.clusterstep`: a whole-model step against one tensorps server and against a cluster of
local shards, with each server's CPU per step.

The same step as the model-step table (bench/modelstep.py: read_many of every variable, then assign_many
or assign_add_many, checked), through Client("host:port") and through Client("a,b,c"), whose batches go
to every shard at once. The point is that the fan-out adds no serialization: a cluster step should take no
longer than one server's on the same machine (here the cores are shared by every server and the client).
Prints Markdown on stdout.
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

from bench import procstat
from bench.backends.process import ServerProcess, free_port
from bench.backends.tps import TensorpsEndpoint
from bench.models import MODELS, Model
from bench.modelstep import PUSHES, Replica, initial_values

_READY = re.compile(r"tensorps ready: serving on (\S+):(\d+) with")


@dataclass
class Setup:
    label: str
    servers: list[ServerProcess]
    target: str
    steps: dict[str, list[float]] = field(default_factory=lambda: {push: [] for push in PUSHES})
    cpu: list[float] = field(default_factory=list)  # per server: CPU seconds over the timed steps


def start(shards: int, workers: int) -> Setup:
    """`shards` servers on loopback, as one cluster (a lone server for 1)."""
    ports = [free_port() for _ in range(shards)]
    members = ",".join(f"127.0.0.1:{port}" for port in ports)
    servers: list[ServerProcess] = []
    try:
        for index, port in enumerate(ports):
            store = f"/dev/shm/tensorps-bench-{uuid.uuid4().hex[:12]}"
            command = [sys.executable, "-m", "tensorps.server", "--host", "127.0.0.1", "--port", str(port)]
            command += ["--workers", str(workers), "--store", store, "--grace", "5"]
            if shards > 1:
                command += ["--cluster", members, "--shard-index", str(index)]
            servers.append(ServerProcess(command, _READY, cleanup=[store]))
    except BaseException:
        for server in servers:
            server.stop()
        raise
    each = f"{workers} worker{'s' if workers > 1 else ''}"
    label = f"1 server ({each})" if shards == 1 else f"{shards} shards ({each} each)"
    return Setup(label, servers, members)


def measure(setups: Sequence[Setup], model: Model, rounds: int) -> None:
    """`rounds` timed steps of each push kind per setup, setups interleaved; CPU per server around them."""
    deltas = {key: value * 1e-3 for key, value in initial_values(model, seed=4).items()}
    sources = {"assign": initial_values(model, seed=3), "assign_add": deltas}
    endpoints = [TensorpsEndpoint(setup.target) for setup in setups]
    try:
        replicas = [
            Replica(endpoint, model, f"bench/cluster/{model.name}", initial_values(model, seed=5))
            for endpoint in endpoints
        ]
        for replica in replicas:  # warm-up: connections, second buffers
            for push in PUSHES:
                replica.step(sources[push], add=push == "assign_add")
        before = [[procstat.tree_cpu_seconds(s.pid) for s in setup.servers] for setup in setups]
        for round_index in range(rounds):
            shift = round_index % len(setups)
            for index in [*range(shift, len(setups)), *range(shift)]:
                for push in PUSHES:
                    pull, push_s, _ = replicas[index].step(sources[push], add=push == "assign_add")
                    setups[index].steps[push].append(pull + push_s)
        for setup, start_cpu in zip(setups, before, strict=True):
            steps = rounds * len(PUSHES)
            used = [
                procstat.tree_cpu_seconds(s.pid) - c for s, c in zip(setup.servers, start_cpu, strict=True)
            ]
            setup.cpu = [seconds / steps for seconds in used]
        for replica in replicas:
            replica.verify("final read back", replica.endpoint.pull(replica.names))
    finally:
        for endpoint in endpoints:
            endpoint.close()


def table(setups: Sequence[Setup], model: Model, rounds: int) -> str:
    lines = [
        f"### {model.title}: one server vs a cluster of local shards ({rounds} steps of each push, median)",
        "",
        "| setup | step, assign (ms) | step, assign_add (ms) | server CPU per step (ms), per server |",
        "|---|---:|---:|---|",
    ]
    for setup in setups:
        cells = [f"{statistics.median(setup.steps[push]) * 1e3:.1f}" for push in PUSHES]
        cpu = ", ".join(f"{seconds * 1e3:.0f}" for seconds in setup.cpu)
        lines.append(
            f"| {setup.label} | {cells[0]} | {cells[1]} | {cpu} (total {sum(setup.cpu) * 1e3:.0f}) |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.clusterstep", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=sorted(MODELS), default="resnet50")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--shards", type=int, default=3)
    p.add_argument("--workers", type=int, default=1, help="worker processes per server")
    args = p.parse_args(argv)
    model = MODELS[args.model]()
    setups: list[Setup] = []
    try:
        setups = [start(1, args.workers), start(args.shards, args.workers)]
        measure(setups, model, args.rounds)
        print(table(setups, model, args.rounds))
    finally:
        for setup in setups:
            for server in setup.servers:
                server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
