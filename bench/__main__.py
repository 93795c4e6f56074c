"""`python -m bench`: tensorps against a naive gRPC server, Redis and a TF ps task, in one run.

Prints Markdown on stdout (progress goes to stderr). Exits 1 if any system returned a wrong value or a
required server failed to start; systems that are not installed are reported as skipped rows.
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Sequence
from dataclasses import replace
from types import FrameType

from bench import procstat, report, runner
from bench.backends import Server, Skipped, tps
from bench.backends.process import StartError
from bench.fleet import Fleet
from bench.profiles import PROFILES
from bench.workloads import VerificationError


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    p.add_argument("--profile", choices=sorted(PROFILES), default="full", help="quick: a CI smoke run")
    p.add_argument("--rounds", type=int, help="interleaved rounds (default: the profile's)")
    p.add_argument(
        "--systems",
        default=",".join(runner.STARTERS),
        help=f"comma-separated subset of {','.join(runner.STARTERS)}",
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
    return args


def _terminate(signum: int, frame: FrameType | None) -> None:
    # As an exception, so that the finally blocks stop the servers (they run in their own sessions).
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    profile = PROFILES[args.profile]
    if args.rounds:
        profile = replace(profile, rounds=args.rounds, scaling_rounds=args.rounds)
    signal.signal(signal.SIGTERM, _terminate)
    runner.progress(f"starting {', '.join(args.keys)} and {profile.clients} client processes")
    foreign = procstat.ForeignLoad()
    with Fleet(profile.clients) as fleet:
        try:
            systems = runner.start_systems(args.keys)
        except StartError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        try:
            servers = [s for s in systems if isinstance(s, Server)]
            skipped = [s for s in systems if isinstance(s, Skipped)]
            results = runner.compare(servers, profile, fleet)
            print(report.environment(profile) + "\n")
            print(report.comparison_table(results, skipped, profile) + "\n")
            print(report.legend(profile) + "\n")
            print(report.memory_notes(results) + "\n")
            print(report.client_cpu_notes(results) + "\n", flush=True)
            if args.workers_scaling:
                by_label = {s.label: s for s in servers}
                one, two = by_label[tps.label(1)], by_label[tps.label(2)]
                print(report.scaling_table(runner.scaling(one, two, profile, fleet), profile) + "\n")
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
