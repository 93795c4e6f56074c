"""Asynchronous SGD against a tensorps server: a synthetic linear regression, nothing to download.

    python -m tensorps.examples.train                          # coordinator + 2 worker processes
    python -m tensorps.examples.train --role coordinator       # (re)initialize the model, watch, report
    python -m tensorps.examples.train --role worker --worker-index auto --num-workers 2

Every process derives the same dataset from --seed, so no data is shipped; worker i of K trains on rows
i, i+K, i+2K, ... A step is two batched calls: the pull claims a step number with a locked assign_add on the
global step counter (so that exactly --steps updates happen however many workers run) and reads the weights;
the push applies the gradient of the mean squared error on a minibatch (numpy) to every variable:

    --update assign_sub   unlocked assign_sub of lr * gradient: Hogwild, concurrent updates may interleave
    --update assign       locked assign of w - lr * gradient: a stale read may overwrite another's update

Roles: `coordinator` creates the variables (or resets them), then prints the loss until the last step and
checks it; `worker` creates any missing variable itself (so that replicas started together need no
coordinator), trains, and checks the final loss too; `all` runs a coordinator and K worker processes.
`--worker-index auto` takes the next index from a counter on the server (a locked assign_add), which gives
replicas that share one configuration distinct shards.

Exit codes: 0 the final loss is below --threshold, 1 it is not (or --timeout passed), 2 the server is
unreachable or a call failed.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import signal
import sys
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from types import FrameType
from typing import Any

import numpy as np

from tensorps.client import AlreadyExistsError, Client, TensorPSError
from tensorps.examples.healthcheck import default_target, wait_until_serving

Array = np.ndarray[Any, Any]

EXIT_CONVERGED, EXIT_NOT_CONVERGED, EXIT_ERROR = 0, 1, 2


def say(line: str, *, err: bool = False) -> None:
    """Print a line with one write: worker processes share the terminal, and print() writes the newline
    separately, which lets their lines interleave."""
    stream = sys.stderr if err else sys.stdout
    stream.write(line + "\n")
    stream.flush()


class TrainingError(Exception):
    """A condition that ends the job with EXIT_ERROR and a one-line explanation."""


# ---- the problem -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    x: Array
    y: Array
    true_w: Array
    true_b: float
    noise: float

    @property
    def noise_floor(self) -> float:
        """The expected loss of the least-squares fit on this data: where training levels off."""
        samples, features = (int(n) for n in self.x.shape)
        return float(self.noise**2 * max(0.0, 1.0 - (features + 1) / samples))

    def loss(self, w: Array, b: Any, rows: slice | Array = slice(None)) -> float:
        err = self.x[rows] @ np.asarray(w, np.float64) + float(b) - self.y[rows]
        return float(np.mean(err * err))


def make_problem(seed: int, samples: int, features: int, noise: float) -> Problem:
    rng = np.random.default_rng(seed)
    true_w = rng.normal(0.0, 1.0, features)
    true_b = float(rng.normal())
    x = rng.normal(0.0, 1.0, (samples, features))
    y = x @ true_w + true_b + rng.normal(0.0, noise, samples)
    return Problem(x, y, true_w, true_b, noise)


@dataclass(frozen=True)
class Names:
    weights: str
    bias: str
    step: str
    joined: str

    @classmethod
    def of(cls, model: str) -> Names:
        return cls(f"{model}/weights", f"{model}/bias", f"{model}/global_step", f"{model}/workers_joined")


def initial_values(names: Names, features: int) -> dict[str, Array]:
    return {
        names.weights: np.zeros(features, np.float32),
        names.bias: np.zeros((), np.float32),
        names.step: np.zeros((), np.int64),
        names.joined: np.zeros((), np.int64),
    }


def ensure_model(ps: Client, names: Names, features: int, *, reset: bool) -> None:
    """Create the model's variables; existing ones are kept (reset=False) or set to their initial values.

    Creating with a value is atomic on the server, so replicas racing here either create a variable or get
    AlreadyExistsError for one that is already complete.
    """
    for name, initial in initial_values(names, features).items():
        try:
            ps.create(name, value=initial)
            continue
        except AlreadyExistsError:
            pass
        info = ps.info(name)
        if info.dtype != initial.dtype or info.shape != initial.shape:
            raise TrainingError(
                f"variable '{name}' already exists as {info.dtype} {info.shape}, but this job needs "
                f"{initial.dtype} {initial.shape}: choose another --model or delete the old one"
            )
        if reset:
            ps.assign(name, initial, read_value=False)


# ---- workers -----------------------------------------------------------------------------------------


def client_for(args: argparse.Namespace) -> Client:
    """A client with the job's target, call timeout and (optional) token and TLS trust."""
    return Client(
        args.target,
        timeout=args.rpc_timeout,
        token=read_token(args.token_file) if args.token_file else args.token,
        root_certificates=read_file(args.ca_file) if args.ca_file else None,
    )


def read_token(path: str) -> str:
    """The first token of a token file (the server's format: 'TOKEN [read-only]' lines, '#' comments)."""
    for line in read_file(path).decode().splitlines():
        words = line.split()
        if words and not words[0].startswith("#"):
            return words[0]
    raise TrainingError(f"no token in {path}")


def read_file(path: str) -> bytes:
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except OSError as exc:
        raise TrainingError(f"cannot read {path}: {exc.strerror}") from None


def _connect(args: argparse.Namespace) -> None:
    trust = read_file(args.ca_file) if args.ca_file else None
    # A cluster target ("a:1,b:2,..." or "cluster://a:1") waits for every server it names.
    for target in args.target.removeprefix("cluster://").split(","):
        serving, description = wait_until_serving(target, args.connect_timeout, root_certificates=trust)
        if not serving:
            raise TrainingError(
                f"cannot reach a serving tensorps server at {target} within {args.connect_timeout:g} s "
                f"({description}); start one or set --target / TENSORPS_TARGET"
            )


def _claim_index(ps: Client, names: Names, num_workers: int) -> int:
    joined = int(ps.assign_add(names.joined, np.int64(1), use_locking=True))
    return (joined - 1) % num_workers


def train_worker(args: argparse.Namespace, *, index: int | None, quiet: bool) -> tuple[int, float]:
    """Run updates until the global step reaches --steps; returns (updates applied here, seconds)."""
    names = Names.of(args.model)
    problem = make_problem(args.seed, args.samples, args.features, args.noise)
    with client_for(args) as ps:
        if index is None:
            index = _claim_index(ps, names, args.num_workers)
        shard_x = problem.x[index :: args.num_workers]
        shard_y = problem.y[index :: args.num_workers]
        # Seeded per worker: reproducible minibatches, yet different ones on every worker.
        rng = np.random.default_rng([args.seed, index])
        label = f"worker {index}/{args.num_workers} (pid {os.getpid()})"
        say(f"{label}: {len(shard_y)} rows, update {args.update}")
        one = np.int64(1)
        start = last_log = time.monotonic()
        deadline = start + args.timeout
        done = done_at_log = 0
        while True:
            # The pull: claim a step and read the model in one batched call.
            claimed, w, b_value = (
                ps.pipeline()
                .assign_add(names.step, one, use_locking=True)
                .read(names.weights)
                .read(names.bias)
                .execute()
            )
            step, b = int(claimed), float(b_value)
            if step > args.steps:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"{label}: stopped by --timeout {args.timeout:g} s at step {step}")
            rows = rng.integers(0, len(shard_y), args.batch_size)
            xb = shard_x[rows]
            err = xb @ w.astype(np.float64) + b - shard_y[rows]
            grad_w = (2.0 / args.batch_size) * (xb.T @ err)
            grad_b = 2.0 * float(np.mean(err))
            # The push: the whole update in one batched call.
            if args.update == "assign_sub":
                deltas = {names.weights: args.lr * grad_w, names.bias: np.asarray(args.lr * grad_b)}
                ps.assign_sub_many({n: d.astype(np.float32) for n, d in deltas.items()})
            else:
                updated = {names.weights: w - args.lr * grad_w, names.bias: np.asarray(b - args.lr * grad_b)}
                ps.assign_many({n: v.astype(np.float32) for n, v in updated.items()})
            done += 1
            now = time.monotonic()
            if not quiet and now - last_log >= args.log_interval:
                rate = (done - done_at_log) / (now - last_log)
                shard_loss = problem.loss(w, b, slice(index, None, args.num_workers))
                say(
                    f"{label}: step {step:>6}/{args.steps}  shard loss {shard_loss:10.6f}  "
                    f"{rate:6.0f} steps/s here"
                )
                last_log, done_at_log = now, done
        elapsed = time.monotonic() - start
        say(f"{label}: {done} steps in {elapsed:.1f} s ({done / max(elapsed, 1e-9):.0f} steps/s)")
        return done, elapsed


def _worker_process(args: argparse.Namespace, index: int, ready: Any) -> None:
    """A worker of --role all, in a spawned process: waits for the coordinator's variables, then trains."""
    try:
        if not ready.wait(args.connect_timeout + 60):
            say(f"worker {index}: the coordinator never said the model was ready", err=True)
            sys.exit(EXIT_ERROR)
        train_worker(args, index=index, quiet=True)
    except KeyboardInterrupt:
        sys.exit(130)
    except (TensorPSError, TimeoutError) as exc:
        say(f"worker {index}: {exc}", err=True)
        sys.exit(EXIT_NOT_CONVERGED if isinstance(exc, TimeoutError) else EXIT_ERROR)
    except Exception:
        # An uncaught exception would exit 1, which the coordinator reads as "did not converge".
        traceback.print_exc()
        sys.exit(EXIT_ERROR)


# ---- coordinator -------------------------------------------------------------------------------------


def report(ps: Client, args: argparse.Namespace, problem: Problem, updates: int, elapsed: float) -> int:
    names = Names.of(args.model)
    w = ps.read(names.weights)
    b = float(ps.read(names.bias))
    loss = problem.loss(w, b)
    distance = float(np.linalg.norm(w - problem.true_w))
    converged = loss < args.threshold
    say(
        f"final loss {loss:.6f} (threshold {args.threshold:g}, noise floor {problem.noise_floor:.6f}, "
        f"|w - w*| {distance:.4f}) after {updates} updates in {elapsed:.1f} s, "
        f"{updates / max(elapsed, 1e-9):.0f} steps/s: {'converged' if converged else 'did NOT converge'}"
    )
    return EXIT_CONVERGED if converged else EXIT_NOT_CONVERGED


def monitor(
    ps: Client,
    args: argparse.Namespace,
    problem: Problem,
    processes: Sequence[multiprocessing.process.BaseProcess],
) -> int:
    """Print the loss on the whole dataset until the last step is claimed and the workers are done."""
    names = Names.of(args.model)
    start = last_log = time.monotonic()
    deadline = start + args.timeout
    last_step = 0
    say(f"{'step':>14}  {'loss':>12}  steps/s")
    while True:
        time.sleep(min(args.log_interval, 0.05))
        step = min(int(ps.read(names.step)), args.steps)
        # With worker processes, done when they are; with external workers, when the last step is claimed.
        finished = all(p.exitcode is not None for p in processes) if processes else step >= args.steps
        now = time.monotonic()
        if now - last_log >= args.log_interval or (finished and step != last_step):
            loss = problem.loss(ps.read(names.weights), float(ps.read(names.bias)))
            rate = (step - last_step) / max(now - last_log, 1e-9)
            say(f"{step:>6}/{args.steps:<7}  {loss:12.6f}  {rate:9.0f}")
            last_log, last_step = now, step
        if finished:
            break
        if now > deadline:
            say(f"stopped by --timeout {args.timeout:g} s at step {step}", err=True)
            return EXIT_NOT_CONVERGED
    failed = [p for p in processes if p.exitcode != 0]
    if failed:
        codes = ", ".join(f"{p.name} exited with {p.exitcode}" for p in failed)
        say(f"train: workers failed ({codes})", err=True)
        return EXIT_NOT_CONVERGED if all(p.exitcode == EXIT_NOT_CONVERGED for p in failed) else EXIT_ERROR
    return report(ps, args, problem, step, time.monotonic() - start)


def _stop_once(signum: int, frame: FrameType | None) -> None:
    """SIGINT or SIGTERM: stop like ^C, and ignore further signals so that the workers get cleaned up."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise KeyboardInterrupt


def run_coordinator(args: argparse.Namespace, *, workers: int) -> int:
    names = Names.of(args.model)
    problem = make_problem(args.seed, args.samples, args.features, args.noise)
    # Spawned, not forked: each worker starts a fresh interpreter, so no gRPC state crosses a fork.
    context = multiprocessing.get_context("spawn")
    ready = context.Event() if workers else None
    processes = [
        context.Process(target=_worker_process, args=(args, i, ready), name=f"worker-{i}", daemon=True)
        for i in range(workers)
    ]
    for process in processes:
        process.start()
    # Installed after the spawns, so that the workers keep default signal handling.
    signal.signal(signal.SIGINT, _stop_once)
    signal.signal(signal.SIGTERM, _stop_once)
    try:
        _connect(args)
        with client_for(args) as ps:
            ensure_model(ps, names, args.features, reset=True)
            say(
                f"model '{args.model}': {args.features} features, {args.samples} samples, "
                f"{args.steps} steps, lr {args.lr:g}, batch {args.batch_size}, update {args.update}, "
                f"{workers or 'external'} workers; "
                f"loss at start {problem.loss(np.zeros(args.features), 0.0):.4f}"
            )
            if ready is not None:
                ready.set()
            return monitor(ps, args, problem, processes)
    finally:
        # After a normal end the workers have exited already; after an error or an interrupt, stop them.
        for process in processes:
            if process.is_alive():
                process.terminate()
        for process in processes:
            process.join(5)


def run_standalone_worker(args: argparse.Namespace) -> int:
    _connect(args)
    names = Names.of(args.model)
    index = None if args.worker_index == "auto" else int(args.worker_index)
    with client_for(args) as ps:
        ensure_model(ps, names, args.features, reset=False)
    updates, elapsed = train_worker(args, index=index, quiet=False)
    problem = make_problem(args.seed, args.samples, args.features, args.noise)
    with client_for(args) as ps:
        return report(ps, args, problem, updates, elapsed)


# ---- command line ------------------------------------------------------------------------------------


def _index(text: str) -> str:
    if text != "auto" and not (text.isdigit() and int(text) >= 0):
        raise argparse.ArgumentTypeError("a worker index is 'auto' or an integer >= 0")
    return text


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m tensorps.examples.train",
        description="Asynchronous SGD on a synthetic linear regression through a tensorps server.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--target",
        default=default_target(),
        help="server host:port, or a cluster's host:port,host:port,... (env TENSORPS_TARGET)",
    )
    p.add_argument("--role", choices=("all", "coordinator", "worker"), default="all")
    p.add_argument("--num-workers", type=int, default=2, help="K: worker processes (all) or shards (worker)")
    p.add_argument("--worker-index", type=_index, default="auto", help="this worker's shard, or 'auto'")
    p.add_argument("--update", choices=("assign_sub", "assign"), default="assign_sub")
    p.add_argument("--model", default="linreg", help="prefix of the model's variable names")
    p.add_argument("--features", type=int, default=32)
    p.add_argument("--samples", type=int, default=4096)
    p.add_argument("--noise", type=float, default=0.1, help="standard deviation of the label noise")
    p.add_argument("--steps", type=int, default=1500, help="updates in total, over all workers")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.005, help="learning rate")
    p.add_argument("--seed", type=int, default=0, help="seed of the dataset and the minibatches")
    p.add_argument("--threshold", type=float, default=0.05, help="the final loss must be below this")
    p.add_argument("--log-interval", type=float, default=0.5, help="seconds between progress lines")
    p.add_argument("--connect-timeout", type=float, default=10.0, help="seconds to wait for the server")
    p.add_argument("--rpc-timeout", type=float, default=10.0, help="seconds for each call")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds for the whole training")
    p.add_argument(
        "--token", default=os.environ.get("TENSORPS_TOKEN"), help="bearer token (env TENSORPS_TOKEN)"
    )
    p.add_argument("--token-file", help="read the bearer token from this file (e.g. a Docker secret)")
    p.add_argument(
        "--ca-file",
        default=os.environ.get("TENSORPS_CA_FILE"),
        help="CA to trust for TLS (env TENSORPS_CA_FILE)",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if args.num_workers < 1:
        p.error("--num-workers must be at least 1")
    if args.worker_index != "auto" and int(args.worker_index) >= args.num_workers:
        p.error("--worker-index must be below --num-workers")
    if min(args.features, args.batch_size, args.steps) < 1 or args.samples < args.num_workers:
        p.error("--features, --batch-size and --steps must be positive and --samples at least --num-workers")
    try:
        if args.role == "worker":
            return run_standalone_worker(args)
        return run_coordinator(args, workers=args.num_workers if args.role == "all" else 0)
    except (TrainingError, TensorPSError) as exc:
        say(f"train: {exc}", err=True)
        return EXIT_ERROR
    except TimeoutError as exc:
        say(f"train: {exc}", err=True)
        return EXIT_NOT_CONVERGED
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
