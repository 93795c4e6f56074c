"""A dense model trained by server-side Adam: workers push gradients, the server applies them.

    python -m tensorps.examples.adam --target localhost:50051 [--steps 300]

A two-layer network (64 -> 32 -> 1, tanh) fits a synthetic regression target, nothing to download. Its
variables live on the server with their Adam slots, named as TensorFlow names them (`dense/kernel/Adam`,
`dense/kernel/Adam_1`). A step is two calls: read_many pulls the weights; the gradients are computed here
(numpy), and one atomic pipeline pushes every one of them with apply_adam, so that the server updates each
variable and its two slots, all of them together. On a cluster target (`--target A,B,...`) the slots are
created beside their variable (colocate_with) and the push is one batch per shard, not atomic across
shards. beta1_power and beta2_power (beta^t) are the worker's to keep, as TF's optimizer keeps them in
variables of its own. Exit 0 when the mean squared error falls below
--threshold, 1 otherwise, 2 on a server error.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from tensorps.client import Client, TensorPSError
from tensorps.client.cluster import ClusterClient
from tensorps.examples.healthcheck import default_target

Array = np.ndarray[Any, Any]
SHAPES = {"dense/kernel": (64, 32), "dense/bias": (32,), "out/kernel": (32, 1), "out/bias": (1,)}
F32 = np.float32


def create(ps: Client, prefix: str, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    names = []
    for name, shape in SHAPES.items():
        full = f"{prefix}/{name}"
        scale = 1 / np.sqrt(shape[0]) if len(shape) == 2 else 0.0
        value = (scale * rng.standard_normal(shape)).astype(F32)
        for n, v in (
            (full, value),
            (f"{full}/Adam", np.zeros(shape, F32)),
            (f"{full}/Adam_1", np.zeros(shape, F32)),
        ):
            if any(info.name == n for info in ps.list(n)):
                ps.delete(n)
            ps.create(n, value=v, colocate_with=None if n == full else full)  # slots beside their variable
        names.append(full)
    return names


def forward(w: dict[str, Array], x: Array) -> tuple[Array, Array]:
    hidden = np.tanh(x @ w["dense/kernel"] + w["dense/bias"])
    return hidden, hidden @ w["out/kernel"] + w["out/bias"]


def gradients(w: dict[str, Array], x: Array, y: Array) -> tuple[float, dict[str, Array]]:
    hidden, out = forward(w, x)
    error = out - y
    d_out = 2 * error / len(x)
    d_hidden = (d_out @ w["out/kernel"].T) * (1 - hidden**2)
    grads = {
        "out/kernel": hidden.T @ d_out,
        "out/bias": d_out.sum(0),
        "dense/kernel": x.T @ d_hidden,
        "dense/bias": d_hidden.sum(0),
    }
    return float(np.mean(error**2)), {k: v.astype(F32) for k, v in grads.items()}


def train(ps: Client, args: argparse.Namespace) -> float:
    rng = np.random.default_rng(args.seed + 1)
    teacher = rng.standard_normal((64, 1)).astype(F32) / 8
    names = create(ps, args.prefix, args.seed)
    lr, beta1, beta2, epsilon = F32(args.lr), F32(0.9), F32(0.999), F32(1e-7)
    beta1_power, beta2_power = F32(1), F32(1)
    loss = float("inf")
    for step in range(1, args.steps + 1):
        x = rng.standard_normal((args.batch, 64)).astype(F32)
        y = np.sin(x @ teacher) + 0.5 * (x @ teacher)
        pulled = ps.read_many(names)
        w = {name.removeprefix(f"{args.prefix}/"): value for name, value in pulled.items()}
        loss, grads = gradients(w, x, y)
        beta1_power, beta2_power = beta1_power * beta1, beta2_power * beta2
        # One store: all of them together. A cluster's batches are atomic per shard only, and the
        # variables are spread over the shards: there, one non-atomic pipeline (one batch per shard).
        with ps.pipeline(atomic=not isinstance(ps, ClusterClient)) as push:
            for name in names:
                grad = grads[name.removeprefix(f"{args.prefix}/")]
                push.apply_adam(
                    name,
                    f"{name}/Adam",
                    f"{name}/Adam_1",
                    beta1_power,
                    beta2_power,
                    lr,
                    beta1,
                    beta2,
                    epsilon,
                    grad,
                )
        if step % args.log_every == 0 or step == args.steps:
            print(f"step {step}: mse {loss:.5f}", flush=True)
    return loss


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--target", default=default_target(), help="server address, shm:// store or cluster (A,B,...)"
    )
    parser.add_argument("--prefix", default="adam", help="variable name prefix (default adam)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--lr", type=float, default=0.01, help="Adam's learning rate (rounded to float32)")
    parser.add_argument("--threshold", type=float, default=0.01, help="mean squared error to reach")
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        with Client(args.target, timeout=60) as ps:
            loss = train(ps, args)
    except TensorPSError as exc:
        print(f"server error: {exc}", file=sys.stderr)
        return 2
    if loss < args.threshold:
        print(f"converged: mse {loss:.5f} < {args.threshold}")
        return 0
    print(f"not converged: mse {loss:.5f} >= {args.threshold}")
    return 1


if __name__ == "__main__":
    sys.exit(main())
