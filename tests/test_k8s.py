"""The Kubernetes manifests (k8s/): valid for a pinned Kubernetes version (kubernetes-validate --strict), with
settings that fit the server and each other (the cluster map, the shared-memory size, probes, security)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from cluster_support import config_with_env

from support import run

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "k8s"
KUBERNETES_VERSION = "1.34.0"
MANIFESTS = sorted(K8S.glob("*.yaml"))


def _validator() -> list[str]:
    found = shutil.which("kubernetes-validate", path=os.path.dirname(sys.executable))
    if found is None:
        pytest.skip("kubernetes-validate is not installed (pip install -e '.[dev]')")
    return [found, "--strict", "--kubernetes-version", KUBERNETES_VERSION]


def _resources() -> dict[str, dict[str, Any]]:
    found = {}
    for path in MANIFESTS:
        for document in yaml.safe_load_all(path.read_text()):
            if document:
                found[f"{document['kind']}/{document['metadata']['name']}"] = document
    return found


def _env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


def test_manifests_pass_strict_validation() -> None:
    assert {p.name for p in MANIFESTS} >= {"ps.yaml", "trainers.yaml", "secrets.example.yaml"}
    result = run([*_validator(), *map(str, MANIFESTS)], timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("passed") == 6, result.stdout


def test_strict_validation_rejects_an_unknown_field(tmp_path: Path) -> None:
    """The validator is strict: a misspelt field fails (so the test above proves something)."""
    broken = (K8S / "ps.yaml").read_text().replace("serviceName: ps", "serviceName: ps\n  replica: 3", 1)
    (tmp_path / "ps.yaml").write_text(broken)
    result = run([*_validator(), str(tmp_path / "ps.yaml")], timeout=120)
    assert result.returncode != 0 and "replica" in result.stdout + result.stderr


def test_statefulset_settings_fit_the_server() -> None:
    resources = _resources()
    service, ps = resources["Service/ps"], resources["StatefulSet/ps"]
    assert service["spec"]["clusterIP"] == "None" and ps["spec"]["serviceName"] == "ps"
    spec = ps["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    env = _env(container)
    replicas = ps["spec"]["replicas"]
    assert env["TENSORPS_CLUSTER"].split(",") == [f"ps-{i}.ps:50051" for i in range(replicas)]
    # The server takes this environment, and pod ps-I finds its shard index in its hostname.
    for index in range(replicas):
        config = config_with_env(env, f"ps-{index}")
        assert config.shard_index == index and len(config.cluster) == replicas
    config = config_with_env(env, "ps-0")
    # /dev/shm is memory sized to the byte budget plus the tables, within the container's memory limit.
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    shm = volumes[mounts["/dev/shm"]]["emptyDir"]
    assert shm["medium"] == "Memory" and config.store_path.startswith("/dev/shm/")
    shm_bytes = _quantity(shm["sizeLimit"])
    assert config.max_total_bytes is not None
    assert config.max_total_bytes < shm_bytes <= config.max_total_bytes + (512 << 20)
    limits, requests = container["resources"]["limits"], container["resources"]["requests"]
    assert _quantity(limits["memory"]) >= shm_bytes + (1 << 30) and requests["memory"] == limits["memory"]
    # The data volume comes from the claim template, mounted where TENSORPS_DATA_DIR points.
    (claim,) = ps["spec"]["volumeClaimTemplates"]
    assert mounts[env["TENSORPS_DATA_DIR"]] == claim["metadata"]["name"]
    # Native gRPC probes on the server's port; ports for gRPC and each worker's bulk channel.
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == config.port
    ports = sorted(p["containerPort"] for p in container["ports"])
    assert ports == [config.port, *(config.worker_bulk_port(i) for i in range(config.workers))]
    # Non-root, read-only root filesystem, no privileges; writable paths are volumes.
    assert spec["securityContext"]["runAsNonRoot"] and spec["securityContext"]["runAsUser"] == 10001
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] and not security["allowPrivilegeEscalation"]
    assert security["capabilities"]["drop"] == ["ALL"]
    assert "/tmp" in mounts and mounts[os.path.dirname(env["TENSORPS_TOKEN_FILE"])] == "tokens"
    assert spec["terminationGracePeriodSeconds"] > config.grace + 5


def test_disruption_budget_and_trainers_fit_the_statefulset() -> None:
    resources = _resources()
    ps, pdb, job = resources["StatefulSet/ps"], resources["PodDisruptionBudget/ps"], resources["Job/trainers"]
    labels = ps["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["spec"]["maxUnavailable"] == 1
    assert job["spec"]["completionMode"] == "Indexed"
    (trainer,) = job["spec"]["template"]["spec"]["containers"]
    (ps_container,) = ps["spec"]["template"]["spec"]["containers"]
    assert _env(trainer)["TENSORPS_TARGET"] == _env(ps_container)["TENSORPS_CLUSTER"]
    index = next(e for e in trainer["env"] if e["name"] == "JOB_COMPLETION_INDEX")
    assert "job-completion-index" in index["valueFrom"]["fieldRef"]["fieldPath"]
    assert "--worker-index=$(JOB_COMPLETION_INDEX)" in trainer["args"]
    workers = next(a for a in trainer["args"] if a.startswith("--num-workers="))
    assert int(workers.split("=")[1]) == job["spec"]["completions"] == job["spec"]["parallelism"]
    assert trainer["securityContext"]["readOnlyRootFilesystem"]
    # The trainer's command line is one the example accepts.
    help_text = subprocess.run(
        [sys.executable, "-m", "tensorps.examples.train", "--help"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    for argument in trainer["args"]:
        assert argument.split("=")[0] in help_text


def _quantity(text: str) -> int:
    """A Kubernetes quantity in bytes (binary suffixes)."""
    match = re.fullmatch(r"(\d+)(Ki|Mi|Gi|Ti)?", str(text))
    assert match, text
    scale = {None: 1, "Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40}[match.group(2)]
    return int(match.group(1)) * scale
