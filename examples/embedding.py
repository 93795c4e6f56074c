"""A click-through model with embedding tables on a tensorps server: gather + sparse_apply_adagrad.

    python -m tensorps.examples.embedding --target localhost:50051 [--steps 400]

Synthetic data, nothing to download: users and items (300,000 rows in all, by default) have hidden
8-dimensional tastes; a user clicks an item with probability sigmoid(3 * <taste_u, taste_i>), and ids follow
a Zipf law, as real traffic does (a few rows are hot, most are rarely touched). The model learns one
embedding row per user and per item; its logit is their dot product.

A step is two calls, whatever the table sizes: one pipeline gathers the minibatch's user and item rows; the
gradients are computed here (numpy); a second pipeline pushes them with sparse_apply_adagrad, which updates
only the touched rows of each table and of its Adagrad accumulator (`users/Adagrad`, as TF names slots) on
the server. On a cluster target (`--target ps-0:50051,ps-1:50051,...`) each table is partitioned over every
shard and every call routes each row to the part that holds it. Exit 0 when the held-out log loss falls
below --threshold, 1 otherwise, 2 on a server error.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from tensorps.client import Client, TensorPSError, fixed_size_partitioner
from tensorps.client.cluster import ClusterClient
from tensorps.examples.healthcheck import default_target

Array = np.ndarray[Any, Any]
DIM = 8
SCALE, ZIPF = 5.0, 1.5  # signal strength; ids drawn with P(k) ~ k^-ZIPF


class Data:
    """The synthetic click log: (user ids, item ids, clicks) minibatches drawn from one seed."""

    def __init__(self, users: int, items: int, seed: int) -> None:
        rng = np.random.default_rng(seed)
        self.users, self.items = users, items
        self.user_taste = rng.standard_normal((users, DIM)).astype(np.float32) / np.sqrt(DIM)
        self.item_taste = rng.standard_normal((items, DIM)).astype(np.float32) / np.sqrt(DIM)
        self.rng = rng

    def _ids(self, count: int, size: int) -> Array:
        ids: Array = (self.rng.zipf(ZIPF, size) - 1) % count
        return ids

    def truth(self, users: Array, items: Array) -> Array:
        """The true click probabilities (what a perfect model would predict)."""
        logit = SCALE * np.einsum("bd,bd->b", self.user_taste[users], self.item_taste[items])
        p: Array = 1 / (1 + np.exp(-logit))
        return p

    def batch(self, size: int) -> tuple[Array, Array, Array]:
        users, items = self._ids(self.users, size), self._ids(self.items, size)
        clicks = (self.rng.random(size) < self.truth(users, items)).astype(np.float32)
        return users.astype(np.int64), items.astype(np.int64), clicks


def log_loss(p: Array, y: Array) -> float:
    p = np.clip(p, 1e-7, 1 - 1e-7)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def create(ps: Client, prefix: str, users: int, items: int, seed: int) -> None:
    """The tables (small random rows) and their Adagrad accumulators, replacing any left from a run."""
    rng = np.random.default_rng(seed + 1)
    for table, rows in (("users", users), ("items", items)):
        for name in (f"{prefix}/{table}", f"{prefix}/{table}/Adagrad"):
            if any(v.name == name for v in ps.list(name)):
                ps.delete(name)
        value = (0.1 * rng.standard_normal((rows, DIM))).astype(np.float32)
        if isinstance(ps, ClusterClient):  # a table split over every shard, rows routed to their parts
            ps.create(f"{prefix}/{table}", value=value, partitioner=fixed_size_partitioner(len(ps.shards)))
        else:
            ps.create(f"{prefix}/{table}", value=value)
        # The accumulator beside its table (on a cluster: partitioned like it, each part beside its part).
        accumulator = np.full((rows, DIM), 0.1, np.float32)
        ps.create(f"{prefix}/{table}/Adagrad", value=accumulator, colocate_with=f"{prefix}/{table}")


def predict(ps: Client, prefix: str, users: Array, items: Array) -> tuple[Array, Array, Array]:
    """The click probabilities of a minibatch, and the rows they used (one call)."""
    u, v = ps.pipeline().gather(f"{prefix}/users", users).gather(f"{prefix}/items", items).execute()
    logit = np.clip(np.einsum("bd,bd->b", u, v), -30, 30)
    return 1 / (1 + np.exp(-logit)), u, v


def train(ps: Client, args: argparse.Namespace) -> float:
    data = Data(args.users, args.items, args.seed)
    create(ps, args.prefix, args.users, args.items, args.seed)
    held_out = data.batch(8192)
    lr = np.float32(args.lr)
    start = time.monotonic()
    loss = log_loss(predict(ps, args.prefix, *held_out[:2])[0], held_out[2])
    best = log_loss(data.truth(*held_out[:2]), held_out[2])
    print(f"step 0: held-out log loss {loss:.4f} (the true model's: {best:.4f})", flush=True)
    for step in range(1, args.steps + 1):
        users, items, clicks = data.batch(args.batch)
        p, u, v = predict(ps, args.prefix, users, items)
        error = (p - clicks)[:, None].astype(np.float32)
        with ps.pipeline() as push:
            push.sparse_apply_adagrad(
                f"{args.prefix}/users", f"{args.prefix}/users/Adagrad", lr, error * v, users
            )
            push.sparse_apply_adagrad(
                f"{args.prefix}/items", f"{args.prefix}/items/Adagrad", lr, error * u, items
            )
        if step % args.log_every == 0 or step == args.steps:
            loss = log_loss(predict(ps, args.prefix, *held_out[:2])[0], held_out[2])
            rate = step / (time.monotonic() - start)
            print(f"step {step}: held-out log loss {loss:.4f} ({rate:.0f} steps/s)", flush=True)
    return loss


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--target", default=default_target(), help="server address, shm:// store or cluster (A,B,...)"
    )
    parser.add_argument("--prefix", default="ctr", help="variable name prefix (default ctr)")
    parser.add_argument("--users", type=int, default=200_000)
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--lr", type=float, default=0.2, help="Adagrad learning rate (rounded to float32)")
    parser.add_argument(
        "--threshold", type=float, default=0.62, help="held-out log loss to reach (untrained 0.69, true 0.58)"
    )
    parser.add_argument("--log-every", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        with Client(args.target, timeout=60) as ps:
            loss = train(ps, args)
    except TensorPSError as exc:
        print(f"server error: {exc}", file=sys.stderr)
        return 2
    if loss < args.threshold:
        print(f"converged: held-out log loss {loss:.4f} < {args.threshold}")
        return 0
    print(f"not converged: held-out log loss {loss:.4f} >= {args.threshold}")
    return 1


if __name__ == "__main__":
    sys.exit(main())
