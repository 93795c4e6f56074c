"""`tensorps snapshot` and `tensorps restore`: a point-in-time snapshot now, and a snapshot's variables
written into a running server (or cluster).

`restore` reads a snapshot directory on the machine where the command runs (the server's `snap-*`
directory, or a copy of it): every file and tensor is checked first, as the server's own restore does, and
nothing is written if one fails. Missing variables are created; existing ones are assigned (their shape may
change, as Assign with validate_shape=False); variables the snapshot holds uninitialized are created if
missing and otherwise left as they are; variables the snapshot does not hold are not touched. The server
numbers the writes with its own versions: a snapshot's versions come back only through the server's
start-up restore (--data-dir, --restore).
"""

from __future__ import annotations

import argparse
from typing import Any

from tensorps.cli.commands import Session, command
from tensorps.cli.exits import CommandError
from tensorps.cli.output import shape_text
from tensorps.client import Client
from tensorps.client.cluster import ClusterClient, members_of
from tensorps.client.cluster import is_cluster_target as is_cluster
from tensorps.client.snapshot import SnapshotInfo
from tensorps.server.persist.restore import CorruptSnapshot, SnapshotVariable, read_snapshot

# Variables written per batch: a bounded number of values in flight, one call per server each.
_BATCH = 256


def _snapshot_json(info: SnapshotInfo) -> dict[str, Any]:
    return {
        "path": info.path,
        "generation": info.generation,
        "variables": info.variables,
        "bytes": info.bytes,
        "seconds": info.seconds,
        "pause_ms": info.pause_ms,
        "time": info.time,
    }


def _snapshot_text(where: str, info: SnapshotInfo) -> str:
    return (
        f"{where}snapshot {info.generation} at {info.path}: {info.variables} variables, {info.bytes} bytes "
        f"in {info.seconds:.3f} s, writes paused {info.pause_ms:.1f} ms"
    )


@command(
    "snapshot", "take a point-in-time snapshot to the server's --data-dir now (every shard of a cluster)"
)
def snapshot(session: Session) -> int | None:
    connection = session.connection
    members = members_of(connection.target) if is_cluster(connection.target) else []
    if not members:
        info = session.client.snapshot()
        session.out.result(_snapshot_json(info), _snapshot_text("", info))
        return None
    # A cluster: each shard snapshots its own variables (each a cut of its own; shards are not cut together).
    assert isinstance(session.client, ClusterClient)
    taken = [
        (index, member, info)
        for index, (member, info) in enumerate(zip(members, session.client.snapshot(), strict=True))
    ]
    data = {"shards": [{"shard": i, "member": m, **_snapshot_json(info)} for i, m, info in taken]}
    text = "\n".join(_snapshot_text(f"shard {i} ({m}): ", info) for i, m, info in taken)
    session.out.result(data, text)
    return None


def _restore_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "path", metavar="SNAPSHOT_DIR", help="a snapshot directory (snap-*: manifest.json + files)"
    )
    parser.add_argument("--prefix", default="", help="only the variables whose names start with this")
    parser.add_argument(
        "--dry-run", action="store_true", help="check the snapshot and say what would be written"
    )


def _plan(client: Client, variables: list[SnapshotVariable]) -> tuple[list[SnapshotVariable], ...]:
    """(to create, to assign, left as they are) against what the server holds now."""
    existing = {info.name for info in client.list()}
    create = [v for v in variables if v.name not in existing]
    assign = [v for v in variables if v.name in existing and v.data is not None]
    left = [v for v in variables if v.name in existing and v.data is None]
    return create, assign, left


def _create_spec(v: SnapshotVariable) -> dict[str, Any]:
    value = v.array()
    if value is not None:
        return {"value": value}
    return {"dtype": v.dtype.name, "shape": v.shape}


@command(
    "restore",
    "write a snapshot's variables into the server: create missing ones, assign the rest",
    _restore_arguments,
)
def restore(session: Session) -> int | None:
    args = session.args
    try:
        generation, variables = read_snapshot(args.path)
    except CorruptSnapshot as exc:
        raise CommandError(f"refusing the snapshot: {exc}") from None
    variables = [v for v in variables if v.name.startswith(args.prefix)]
    client = session.client
    create, assign, left = _plan(client, variables)
    total = sum(len(v.data) for v in (*create, *assign) if v.data is not None)
    if not args.dry_run:
        for start in range(0, len(create), _BATCH):
            client.create_many({v.name: _create_spec(v) for v in create[start : start + _BATCH]})
        for start in range(0, len(assign), _BATCH):
            values = {v.name: v.array() for v in assign[start : start + _BATCH]}
            client.assign_many(values, validate_shape=False)
    verb = "would create" if args.dry_run else "created"
    data = {
        "snapshot": args.path,
        "generation": generation,
        "dry_run": args.dry_run,
        "created": [v.name for v in create],
        "assigned": [v.name for v in assign],
        "left_uninitialized_in_snapshot": [v.name for v in left],
        "bytes": total,
    }
    lines = [
        f"snapshot {generation} ({args.path}): {len(variables)} variables, {total} bytes",
        f"{verb} {len(create)}, {'would assign' if args.dry_run else 'assigned'} {len(assign)}, "
        f"left {len(left)} (uninitialized in the snapshot, present on the server)",
    ]
    lines += [f"  {v.name}: {v.dtype.name} {shape_text(v.shape)}" for v in (*create, *assign)][:20]
    session.out.result(data, "\n".join(lines))
    return None
