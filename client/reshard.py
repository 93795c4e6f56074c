"""Offline re-sharding: copy every variable of one cluster into another of a different size.

    python -m tensorps.client.reshard --source ps-0:50051,ps-1:50051 --target new-0:50051,new-1:50051,...

A cluster's size is part of every variable's address (placement.py), so a cluster cannot grow or shrink
under a model: stop the jobs, start the new cluster (empty), copy, and point the jobs at it. Every variable
is copied whole, one at a time (memory for the largest one): plain variables stay plain, partitioned ones
keep their number of parts (spread over the new shards by their names), variables created beside another
(colocate_with: an optimizer's slots) are created beside it again, after it, and uninitialized ones are
created with their dtype and shape. A variable that exists in the target already is refused
(AlreadyExists) and the copy stops; --prefix copies a part of the model.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any

from tensorps.client.client import Client
from tensorps.client.cluster import ClusterClient
from tensorps.client.errors import TensorPSError
from tensorps.client.placement import fixed_size_partitioner


def reshard(
    source: ClusterClient, target: ClusterClient, *, prefix: str = "", say: Callable[[str], None] = print
) -> int:
    """Copy every variable under `prefix` from `source` to `target`; returns how many were copied."""
    copied = 0
    listed = source.list(prefix)
    # Primaries before the slots created beside them (colocate_with), which keep their colocation.
    primaries = {info.name: source.layouts.primary(info.name) for info in listed}
    for info in sorted(listed, key=lambda info: primaries[info.name] is not None):
        spec = source.layouts.get(info.name)
        options: dict[str, Any] = {}
        if primaries[info.name] is not None:
            options["colocate_with"] = primaries[info.name]
        elif spec is not None:
            options["partitioner"] = fixed_size_partitioner(spec.parts)
        if info.initialized:
            target.create(info.name, value=source.read(info.name), **options)
        else:
            target.create(info.name, dtype=info.dtype, shape=info.shape, **options)
        copied += 1
        parts = f", {spec.parts} parts" if spec is not None else ""
        say(f"copied {info.name} ({info.dtype}, shape {list(info.shape or [])}{parts})")
    return copied


def _cluster(target: str, **options: Any) -> ClusterClient:
    client = Client(target if "," in target else f"cluster://{target}", **options)
    assert isinstance(client, ClusterClient)
    return client


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m tensorps.client.reshard", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--source", required=True, help="the old cluster: HOST:PORT,... (or one member)")
    p.add_argument("--target", required=True, help="the new cluster: HOST:PORT,... (or one member)")
    p.add_argument("--prefix", default="", help="copy only the variables whose names start with this")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per call")
    args = p.parse_args(argv)
    try:
        with (
            _cluster(args.source, timeout=args.timeout) as old,
            _cluster(args.target, timeout=args.timeout) as new,
        ):
            if old.members == new.members:
                p.error("the source and the target are the same cluster")
            copied = reshard(old, new, prefix=args.prefix)
    except TensorPSError as exc:
        print(f"reshard: {exc}", file=sys.stderr)
        return 1
    print(f"copied {copied} variable(s) from {len(old.members)} shards to {len(new.members)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
