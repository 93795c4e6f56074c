"""The row and optimizer examples against the shared server: both models converge in a short run."""

from __future__ import annotations

import re
import sys
import uuid

from support import ServerProcess, run
from tensorps.client import Client

EMBEDDING = [sys.executable, "-m", "tensorps.examples.embedding"]
ADAM = [sys.executable, "-m", "tensorps.examples.adam"]


def test_embedding_model_converges(server: ServerProcess) -> None:
    """gather + sparse_apply_adagrad on 300,000 embedding rows: the held-out log loss falls from 0.69 below
    0.625 within 150 steps (the true model's is 0.58)."""
    target = server.address
    prefix = f"ctr-{uuid.uuid4().hex[:8]}"
    result = run(
        [*EMBEDDING, "--target", target, "--prefix", prefix, "--steps", "150", "--threshold", "0.625"],
        timeout=180,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    losses = [float(x) for x in re.findall(r"held-out log loss (\S+)", result.stdout)]
    assert losses[0] > 0.68 and losses[-1] < 0.625, result.stdout
    _remove(server, prefix)


def test_dense_model_converges_with_server_side_adam(server: ServerProcess) -> None:
    """A two-layer network whose every gradient is applied by apply_adam on the server reaches mse < 0.01
    (over shm://: the same ops in the worker's process)."""
    prefix = f"adam-{uuid.uuid4().hex[:8]}"
    target = f"shm://{server.store}"
    result = run([*ADAM, "--target", target, "--prefix", prefix, "--steps", "150"], timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "converged: mse" in result.stdout
    _remove(server, prefix)


def _remove(server: ServerProcess, prefix: str) -> None:
    """The example's variables go: the session's server is shared."""
    with Client(server.address) as ps:
        for info in ps.list(prefix + "/"):
            ps.delete(info.name)


def test_unreachable_server_exits_2() -> None:
    """A call that fails exits 2 with the server's error."""
    result = run([*ADAM, "--target", "shm:///nonexistent-store", "--steps", "1"], timeout=60)
    assert result.returncode == 2 and "server error" in result.stderr
