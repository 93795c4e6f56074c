"""`python -m bench`: tensorps against a naive gRPC server, Redis and a TF ps task, in one run.

Two workloads: single calls (small and large assigns and reads, concurrent clients) and whole-model steps
(pull and push every tensor of ResNet-50 and a small CNN, against a raw TCP socket's floor). Prints
Markdown on stdout (progress goes to stderr). Exits 1 if any system returned a wrong value or a
required server failed to start; systems that are not installed are reported as skipped rows.
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Sequence
from dataclasses import replace
from types import FrameType

from bench import durability, modelstep, procstat, report, runner, sparse
from bench.backends import Server, Skipped, tps
from bench.backends.process import StartError
from bench.fleet import Fleet
from bench.models import MODELS
from bench.profiles import PROFILES
from bench.workloads import VerificationError

WORKLOADS = ("calls", "model", "sparse", "durability")
# sparse is opt-in: it loads a 256 MB table into every system; durability too: snapshots of 1 GiB, the
# write-ahead log against Redis's append-only file.
DEFAULT_WORKLOADS = ("calls", "model")


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    p.add_argument("--profile", choices=sorted(PROFILES), default="full", help="quick: a CI smoke run")
    p.add_argument("--rounds", type=int, help="interleaved rounds (default: the profile's)")
    p.add_argument(
        "--systems",
        default=",".join(k for k in runner.STARTERS if k not in runner.EXTRA),
        help=f"comma-separated subset of {','.join(runner.STARTERS)} (the -grpc ones: tensorps with its "
        "bulk channel off; not run by default)",
    )
    p.add_argument(
        "--workloads",
        default=",".join(DEFAULT_WORKLOADS),
        help="comma-separated subset of calls (single-call table), model (model steps), sparse (gather and "
        "scatter_add of embedding rows; not run by default), durability (snapshot and write-ahead log costs "
        "beside Redis's append-only file; not run by default)",
    )
    p.add_argument("--models", help=f"comma-separated subset of {','.join(MODELS)} (default: the profile's)")
    p.add_argument(
        "--sparse-rows",
        type=int,
        default=sparse.ROWS,
        help=f"rows of the sparse workload's table (default {sparse.ROWS:,}; at least {sparse.BATCH})",
    )
    p.add_argument(
        "--workers-scaling",
        action="store_true",
        help="also compare --workers 1 and 2 under concurrent clients (starts both tensorps servers)",
    )
    args = p.parse_args(argv)
    keys = [k.strip() for k in args.systems.split(",") if k.strip()]
    unknown = [k for k in keys if k not in runner.STARTERS]
    if unknown or not keys:
        p.error(f"unknown systems {unknown}; choose from {','.join(runner.STARTERS)}")
    if args.workers_scaling:
        keys += [k for k in ("tensorps1", "tensorps2") if k not in keys]
    args.keys = [k for k in runner.STARTERS if k in keys]
    if args.sparse_rows < sparse.BATCH:
        p.error(f"--sparse-rows must be at least {sparse.BATCH}")
    args.workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    if not args.workloads or any(w not in WORKLOADS for w in args.workloads):
        p.error(f"unknown workloads {args.workloads}; choose from {','.join(WORKLOADS)}")
    if args.models is not None:
        args.models = [m.strip() for m in args.models.split(",") if m.strip()]
        if not args.models or any(m not in MODELS for m in args.models):
            p.error(f"unknown models {args.models}; choose from {','.join(MODELS)}")
    return args


def _terminate(signum: int, frame: FrameType | None) -> None:
    # As an exception, so that the finally blocks stop the servers (they run in their own sessions).
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    profile = PROFILES[args.profile]
    if args.rounds:
        profile = replace(profile, rounds=args.rounds, scaling_rounds=args.rounds, model_rounds=args.rounds)
    models = [MODELS[key]() for key in (args.models or profile.models)]
    signal.signal(signal.SIGTERM, _terminate)
    # The client processes serve the single-call table's concurrent runs and the workers-scaling table.
    concurrent = "calls" in args.workloads or "durability" in args.workloads or args.workers_scaling
    clients = profile.clients if concurrent else 0
    runner.progress(f"starting {', '.join(args.keys)} and {clients} client processes")
    foreign = procstat.ForeignLoad()
    with Fleet(clients) as fleet:
        try:
            # The durability workload starts servers of its own (with data directories, Redis with AOF).
            needed = set(args.workloads) - {"durability"} or args.workers_scaling
            systems = runner.start_systems(args.keys) if needed else []
        except StartError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        try:
            servers = [s for s in systems if isinstance(s, Server)]
            skipped = [s for s in systems if isinstance(s, Skipped)]
            print(report.environment(profile) + "\n", flush=True)
            if "calls" in args.workloads:
                results = runner.compare(servers, profile, fleet)
                print(report.comparison_table(results, skipped, profile) + "\n")
                print(report.legend(profile) + "\n")
                print(report.memory_notes(results) + "\n")
                print(report.client_cpu_notes(results) + "\n", flush=True)
            if "model" in args.workloads:
                # After the memory figures above: the models would otherwise count as the servers' peak.
                steppers = runner.model_systems(servers)
                runs = modelstep.run(steppers, models, profile.model_rounds, runner.progress)
                for run in runs:
                    print(report.model_step_table(run, skipped) + "\n")
                print(report.model_step_legend(runs) + "\n", flush=True)
            if "durability" in args.workloads:
                print(
                    durability.run(
                        fleet, runner.progress, window=profile.window, quick=profile.name == "quick"
                    )
                    + "\n",
                    flush=True,
                )
            if args.workers_scaling:
                by_label = {s.label: s for s in servers}
                one, two = by_label[tps.label(1)], by_label[tps.label(2)]
                print(report.scaling_table(runner.scaling(one, two, profile, fleet), profile) + "\n")
            if "sparse" in args.workloads:
                rows, targets = sparse.run(servers, profile, runner.progress, table_rows=args.sparse_rows)
                reasons = [f"{s.label}: {s.reason}" for s in skipped]
                print(sparse.table(rows, targets, reasons, table_rows=args.sparse_rows) + "\n")
            # Measured while the servers and clients still run: the CPU of exited processes is not found.
            print(report.foreign_load(foreign.fraction()), flush=True)
        except VerificationError as exc:
            print(f"FAILED: {exc}", file=sys.stderr)
            return 1
        finally:
            runner.stop_systems(systems)
    return 0


if __name__ == "__main__":
    sys.exit(main())
