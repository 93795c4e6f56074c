"""docker/compose.cluster.yaml: the multi-shard variant passes `config` under every installed Compose, and
its shards and trainers agree on one cluster map that the server accepts."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml
from cluster_support import config_with_env

from support import run

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = "docker/compose.cluster.yaml"  # relative to ROOT, as the README runs it


def _compose_commands() -> list[list[str]]:
    found = []
    if shutil.which("docker-compose"):
        found.append(["docker-compose"])
    if shutil.which("docker") and run(["docker", "compose", "version"], timeout=30).returncode == 0:
        found.append(["docker", "compose"])
    if not found:
        pytest.skip("no Compose implementation: install docker-compose (apt-get install docker-compose)")
    return found


def test_cluster_compose_file_is_valid() -> None:
    for command in _compose_commands():
        base = [*command, "-f", COMPOSE]
        checked = run([*base, "config", "-q"], timeout=60, cwd=ROOT)
        assert checked.returncode == 0, f"{command}: {checked.stderr}"
        assert "WARN" not in checked.stderr.upper(), checked.stderr
        services = run([*base, "config", "--services"], timeout=60, cwd=ROOT)
        assert sorted(services.stdout.split()) == ["ps-0", "ps-1", "trainer"], services.stderr


def test_shards_and_trainers_share_one_map() -> None:
    resolved = run([*_compose_commands()[0], "-f", COMPOSE, "config"], timeout=60, cwd=ROOT)
    assert resolved.returncode == 0, resolved.stderr
    services: dict[str, Any] = yaml.safe_load(resolved.stdout)["services"]
    members = services["ps-0"]["environment"]["TENSORPS_CLUSTER"].split(",")
    assert members == ["ps-0:50051", "ps-1:50061"]
    volumes: set[str] = set()
    for index, member in enumerate(members):
        shard = services[f"ps-{index}"]
        config = config_with_env({k: str(v) for k, v in shard["environment"].items()})
        assert config.cluster == tuple(members) and config.shard_index == index
        assert member == f"ps-{index}:{config.port}"
        # Published on loopback under the same numbers: the bulk port a server names is reachable as is.
        published = {(str(p["published"]), int(p["target"])) for p in _ports(shard["ports"])}
        wanted = {config.port, *(config.worker_bulk_port(i) for i in range(config.workers))}
        assert published == {(str(port), port) for port in wanted}
        assert str(config.port) in " ".join(shard["healthcheck"]["test"])
        volumes.update(v.split(":")[0] if isinstance(v, str) else v["source"] for v in shard["volumes"])
    assert len(volumes) == len(members)  # a data volume per shard
    trainer = services["trainer"]
    assert trainer["environment"]["TENSORPS_TARGET"].split(",") == members
    assert set(trainer["depends_on"]) == {"ps-0", "ps-1"}


def _ports(ports: list[Any]) -> list[dict[str, Any]]:
    """Compose 1's short syntax ("127.0.0.1:50051:50051/tcp") and Compose 2's long one, alike."""
    found = []
    for port in ports:
        if isinstance(port, dict):
            found.append(port)
            continue
        host_ip, published, target = str(port).split("/")[0].split(":")
        found.append({"host_ip": host_ip, "published": published, "target": target})
    return found
