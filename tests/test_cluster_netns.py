"""A cluster across hosts: three shards in three Linux network namespaces and two trainers in two others,
joined by a private bridge (test_deploy's Lan); the training job converges with its variables on all three."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator

import pytest
from test_deploy import Lan, LoggedServer

from support import fresh_store_path, remove_store, run
from tensorps.client import placement

SHARDS = ("ps0", "ps1", "ps2")
TRAINERS = ("trainer0", "trainer1")


@pytest.fixture
def lan() -> Iterator[Lan]:
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    if not shutil.which("ip"):
        pytest.skip("no `ip` command (apt-get install iproute2)")
    try:
        network = Lan([*SHARDS, *TRAINERS])
    except RuntimeError as exc:
        pytest.skip(f"cannot create network namespaces here: {exc}")
    try:
        yield network
    finally:
        network.close()
        assert not [n for n in run(["ip", "netns", "list"]).stdout.split() if n.startswith(network.prefix)]


def test_training_across_a_cluster_in_network_namespaces(lan: Lan) -> None:
    members = [f"{lan.address(host)}:50051" for host in SHARDS]
    cluster = ",".join(members)
    # A model whose variables (examples/train.py's names) land on every shard.
    suffixes = ("weights", "bias", "global_step", "workers_joined")
    model = next(
        m
        for m in (f"netns{i}" for i in range(1000))
        if len({placement.owner(f"{m}/{s}", len(SHARDS)) for s in suffixes}) == len(SHARDS)
    )
    stores = [fresh_store_path() for _ in SHARDS]
    servers: list[LoggedServer] = []
    trainers: list[subprocess.Popen[str]] = []
    try:
        for index, host in enumerate(SHARDS):
            command = lan.command(
                host,
                *(sys.executable, "-m", "tensorps.server", "--host", lan.address(host), "--port", "50051"),
                *("--workers", "1", "--store", stores[index], "--grace", "5"),
                *("--cluster", cluster, "--shard-index", str(index)),
            )
            servers.append(LoggedServer(command))
        for server in servers:
            assert server.wait_ready() == 50051
        train = (sys.executable, "-m", "tensorps.examples.train", "--role", "worker", "--num-workers", "2")
        for name in TRAINERS:
            command = lan.command(
                name, *train, "--target", cluster, "--model", model, "--connect-timeout", "30"
            )
            trainers.append(
                subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            )
        outputs = []
        for trainer in trainers:
            out, err = trainer.communicate(timeout=180)
            assert trainer.returncode == 0, out + err + "".join(s.log for s in servers)
            outputs.append(out)
        shards = sorted(int(re.search(r"^worker (\d)/2", out, re.M)[1]) for out in outputs)  # type: ignore[index]
        assert shards == [0, 1]
        for out in outputs:
            assert re.search(r"final loss \S+ .*: converged$", out, re.M), out
        for server in servers:
            assert server.stop() == 0, server.log
        assert not any(os.path.exists(store) for store in stores)
    finally:
        for trainer in trainers:
            if trainer.poll() is None:
                trainer.kill()
                trainer.communicate()
        for server in servers:
            server.kill()
        for store in stores:
            remove_store(store)
