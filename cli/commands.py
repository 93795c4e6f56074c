"""The commands of `tensorps`: each one small function, registered with its arguments by @command.

A command gets a Session (its arguments, the output, a client made on first use) and prints its result
through session.out.result(json_data, text). Errors are exceptions: the client's (TensorPSError, mapped to
exit codes in exits.py) or CommandError for local problems.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tensorps.cli.exits import UNREACHABLE, CommandError
from tensorps.cli.options import Connection
from tensorps.cli.output import Output, info_json, nbytes, shape_text, summary, summary_text, table
from tensorps.client import AlreadyExistsError, Client, NotFoundError, ServerInfo, VariableInfo
from tensorps.client import codec as tensor_codec
from tensorps.client.cluster import ClusterClient, members_of
from tensorps.client.cluster import is_cluster_target as is_cluster
from tensorps.client.codec import CodecError
from tensorps.client.errors import from_rpc_error

Array = np.ndarray[Any, Any]


@dataclass
class Session:
    """One run of a command: its arguments, its output and (made when first asked for) its client."""

    args: argparse.Namespace
    out: Output
    _connection: Connection | None = None
    _client: Client | None = None

    @property
    def connection(self) -> Connection:
        if self._connection is None:
            self._connection = Connection.from_args(self.args)
        return self._connection

    @property
    def client(self) -> Client:
        if self._client is None:
            self._client = self.connection.client()
        return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()


# A command returns its exit code (None: 0) or raises.
Run = Callable[[Session], int | None]


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    run: Run
    arguments: Callable[[argparse.ArgumentParser], None]


COMMANDS: dict[str, Command] = {}


def command(
    name: str, help: str, arguments: Callable[[argparse.ArgumentParser], None] = lambda parser: None
) -> Callable[[Run], Run]:
    """Register `run` as the command `name` (a new command is one function and this line)."""

    def register(run: Run) -> Run:
        COMMANDS[name] = Command(name, help, run, arguments)
        return run

    return register


def _info_text(info: VariableInfo) -> str:
    size = nbytes(info)
    return "\n".join(
        (
            f"name:        {info.name}",
            f"dtype:       {info.dtype.name}",
            f"shape:       {shape_text(info.shape)}",
            f"initialized: {'yes' if info.initialized else 'no'}",
            f"version:     {info.version}",
            f"bytes:       {'?' if size is None else size}",
        )
    )


# ---- catalog -----------------------------------------------------------------------------------------


def _ls_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prefix", nargs="?", default="", help="only names that start with this")


@command("ls", "list variables: name, dtype, shape, initialized, version, bytes", _ls_arguments)
def ls(session: Session) -> int | None:
    infos = sorted(session.client.list(session.args.prefix), key=lambda info: info.name)
    rows = [
        (
            info.name,
            info.dtype.name,
            shape_text(info.shape),
            "yes" if info.initialized else "no",
            str(info.version),
            "?" if nbytes(info) is None else str(nbytes(info)),
        )
        for info in infos
    ]
    header = ("NAME", "DTYPE", "SHAPE", "INITIALIZED", "VERSION", "BYTES")
    text = table(rows, header, right=(4, 5)) if rows else "(no variables)"
    session.out.result({"variables": [info_json(info) for info in infos]}, text)
    return None


def _name_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", help="variable name")


@command("info", "a variable's dtype, shape, initialized, version and bytes", _name_argument)
def info(session: Session) -> int | None:
    found = session.client.info(session.args.name)
    session.out.result(info_json(found), _info_text(found))
    return None


def _rm_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("names", nargs="+", metavar="NAME", help="variables to delete")


@command("rm", "delete variables (all that exist; NOT_FOUND if one does not)", _rm_arguments)
def rm(session: Session) -> int | None:
    deleted, missing = [], []
    for name in session.args.names:
        try:
            session.client.delete(name)
            deleted.append(name)
        except NotFoundError:
            missing.append(name)
    if missing:
        raise NotFoundError(f"no variable {', '.join(repr(n) for n in missing)} (deleted: {len(deleted)})")
    session.out.result({"deleted": deleted}, "\n".join(f"deleted {name}" for name in deleted))
    return None


# ---- values ------------------------------------------------------------------------------------------


def _get_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", help="variable name")
    parser.add_argument("-o", "--output", metavar="FILE.npy", help="also save the value to this .npy file")
    _progress_argument(parser)


def _progress_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="a progress bar for transfers from 4 MiB (default: when stderr is a terminal)",
    )


@command(
    "get", "read a variable: summary (shape, dtype, min/max/mean, first values), -o saves it", _get_arguments
)
def get(session: Session) -> int | None:
    name = session.args.name
    found = session.client.info(name)  # its size first: a large value is then read as a stream
    with session.out.transfer(f"get {name}", None if session.connection.local else nbytes(found)):
        value = session.client.read(name)
    output = session.args.output
    if output is not None:
        try:
            np.save(output, value, allow_pickle=False)
        except OSError as exc:
            raise CommandError(f"cannot write {output}: {exc.strerror}") from None
    stats = summary(value)
    text = summary_text(name, stats)
    if output is not None:
        text += f"\n  saved to {output}" + ("" if output.endswith(".npy") else ".npy")
    session.out.result({"variable": info_json(found), "summary": stats, "output": output}, text)
    return None


def _put_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", help="variable name")
    parser.add_argument("file", metavar="FILE.npy", help="the value, as numpy saved it (np.save)")
    parser.add_argument(
        "--no-create", action="store_true", help="fail with NOT_FOUND instead of creating a missing variable"
    )
    parser.add_argument(
        "--reshape",
        action="store_true",
        help="let the value change the variable's shape (Assign with validate_shape=False)",
    )
    parser.add_argument(
        "--dtype",
        help="read the file's data as this dtype of the same item size (e.g. bfloat16, which numpy saves "
        "as 2-byte void)",
    )
    _progress_argument(parser)


def _load(path: str, dtype: str | None) -> Array:
    try:
        array: Array = np.load(path, mmap_mode="r", allow_pickle=False)
    except OSError as exc:
        raise CommandError(f"cannot read {path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise CommandError(f"{path} is not a .npy file numpy can read without pickles: {exc}") from None
    if not isinstance(array, np.ndarray):
        raise CommandError(f"{path} holds several arrays (.npz): save one array with np.save")
    if dtype is not None:
        try:
            wanted = tensor_codec.dtype_of(dtype).numpy
        except CodecError as exc:
            raise CommandError(str(exc)) from None
        if wanted.itemsize != array.dtype.itemsize:
            raise CommandError(
                f"--dtype {dtype} has {wanted.itemsize}-byte items, {path} holds {array.dtype} of "
                f"{array.dtype.itemsize} bytes"
            )
        array = array.view(wanted)
    return array


@command("put", "write a .npy file to a variable: assign it, or create it if it is missing", _put_arguments)
def put(session: Session) -> int | None:
    args = session.args
    value = _load(args.file, args.dtype)
    ps = session.client
    try:
        ps.info(args.name)  # first: a missing variable must not cost a whole upload to find out
        created = False
    except NotFoundError:
        if args.no_create:
            raise
        created = True
    with session.out.transfer(f"put {args.name}", None if session.connection.local else value.nbytes):
        written = None
        if created:
            try:
                written = ps.create(args.name, value=value)
            except AlreadyExistsError:
                created = False  # another client created it meanwhile: assign, as if it had been there
        if written is None:
            written = ps.assign(args.name, value, validate_shape=not args.reshape, read_value=False)
    verb = "created" if created else "assigned"
    text = (
        f"{verb} {written.name}: {written.dtype.name} {shape_text(written.shape)}, version {written.version}"
    )
    session.out.result({"variable": info_json(written), "created": created}, text)
    return None


# ---- the server --------------------------------------------------------------------------------------


def _workers_reached(session: Session, workers: int) -> list[ServerInfo]:
    """Each worker's own ServerInfo, reached over up to 8 * workers fresh connections (the kernel balances
    connections, not calls, over the workers: each new connection may reach another)."""
    seen: dict[int, ServerInfo] = {}
    for _ in range(8 * workers):
        if len(seen) >= workers:
            break
        with session.connection.client(channels=1) as probe:
            answer = probe.server_info()
        seen.setdefault(answer.pid, answer)
    return sorted(seen.values(), key=lambda w: (w.worker_index, w.pid))


def _worker_json(w: ServerInfo, now: float) -> dict[str, Any]:
    return {
        "index": w.worker_index,
        "pid": w.pid,
        "uptime_seconds": round(now - w.worker_started, 3) if w.worker_started else None,
        "staging_bytes": w.staging_bytes,
        "staging_limit_bytes": w.staging_limit_bytes,
        "bulk_port": w.bulk_port or None,
    }


def _worker_text(w: ServerInfo, now: float) -> str:
    uptime = f"up {now - w.worker_started:.0f} s" if w.worker_started else "up ?"
    bulk = f"bulk port {w.bulk_port}" if w.bulk_port else "no bulk port"
    return (
        f"  worker {w.worker_index}: pid {w.pid}, {uptime}, staging {w.staging_bytes} of "
        f"{w.staging_limit_bytes} bytes, {bulk}"
    )


@command(
    "stats",
    "server info: version, store, variables, bytes and budget, and each worker's pid, uptime, staging",
)
def stats(session: Session) -> int | None:
    if isinstance(session.client, ClusterClient):
        _cluster_stats(session, session.client)
        return None
    served = session.client.server_info()
    local = session.connection.local
    reached = [] if local else _workers_reached(session, served.workers)
    now = time.time()
    budget = served.max_total_bytes
    data = {
        "target": session.connection.target,
        "version": served.version,
        "store": served.store,
        "variables": served.variables,
        "used_bytes": served.used_bytes,
        "max_total_bytes": budget,
        "budget_used": served.used_bytes / budget if budget else None,
        "workers": None if local else served.workers,
        "worker_pids": [w.pid for w in reached],
        "worker_details": [_worker_json(w, now) for w in reached],
    }
    share = f" ({100 * served.used_bytes / budget:.1f}% of {budget})" if budget else ""
    lines = [
        f"target:     {session.connection.target}",
        f"version:    {served.version}",
        f"store:      {served.store}",
        f"variables:  {served.variables}",
        f"bytes:      {served.used_bytes}{share}",
    ]
    if local:
        lines.append("workers:    (shm:// opens the store directly: no worker answers)")
    else:
        count = (
            f"{len(reached)} of {served.workers} reached" if len(reached) < served.workers else "all reached"
        )
        pids = " ".join(str(w.pid) for w in reached)
        lines.append(f"workers:    {served.workers} ({count}): pids {pids}")
        lines += [_worker_text(w, now) for w in reached]
    session.out.result(data, "\n".join(lines))
    return None


def _cluster_stats(session: Session, client: ClusterClient) -> None:
    """stats of a cluster target ("a,b,c" or cluster://a): one entry per shard."""
    shards = [
        {
            "shard": index,
            "member": member,
            "version": served.version,
            "store": served.store,
            "variables": served.variables,
            "used_bytes": served.used_bytes,
            "max_total_bytes": served.max_total_bytes,
            "workers": served.workers,
        }
        for index, (member, served) in enumerate(zip(client.members, client.server_info(), strict=True))
    ]
    lines = [f"target:     {session.connection.target} (a cluster of {len(shards)})"]
    lines += [
        f"shard {s['shard']}:    {s['member']}: {s['variables']} variables, {s['used_bytes']} of "
        f"{s['max_total_bytes']} bytes, {s['workers']} workers, store {s['store']}"
        for s in shards
    ]
    session.out.result({"target": session.connection.target, "shards": shards}, "\n".join(lines))


def _health_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--service", default="", help="service to check ('' is the whole server)")


def _health_of(connection: Connection, service: str) -> str:
    with connection.channel() as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        request = health_pb2.HealthCheckRequest(service=service)
        try:
            reply = stub.Check(request, timeout=connection.timeout)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


@command("health", "grpc.health.v1 check: exit 0 if SERVING, 5 if not", _health_arguments)
def health(session: Session) -> int | None:
    connection = session.connection
    members = members_of(connection.target) if is_cluster(connection.target) else []
    if members:
        # A cluster: every member is checked; it serves when they all do.
        statuses = {m: _health_of(replace(connection, target=m), session.args.service) for m in members}
        serving = all(status == "SERVING" for status in statuses.values())
        status = "SERVING" if serving else "NOT_SERVING"
        text = "\n".join(f"{m}: {s}" for m, s in statuses.items())
        session.out.result({"target": connection.target, "status": status, "shards": statuses}, text)
        return None if serving else UNREACHABLE
    if connection.local:
        # No server in between: the store itself is what must be there (the client checks it opens).
        session.client.server_info()
        status = "SERVING"
    else:
        status = _health_of(connection, session.args.service)
    session.out.result({"target": connection.target, "status": status}, f"{connection.target}: {status}")
    return None if status == "SERVING" else UNREACHABLE
