"""Markdown out: one comparison table with ratio rows, the notes that make it honest, the scaling table."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import shutil
import statistics
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from bench.backends import Skipped, tps
from bench.fleet import Concurrent
from bench.modelstep import ModelRun
from bench.profiles import Profile
from bench.runner import BASELINES, Results, median

MiB = 1 << 20


def size(nbytes: int) -> str:
    for unit, scale in (("MiB", MiB), ("KiB", 1 << 10)):
        if nbytes >= scale and nbytes % scale == 0:
            return f"{nbytes // scale} {unit}"
    return f"{nbytes} B"


def _number(value: float) -> str:
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


@dataclass(frozen=True)
class Metric:
    title: str
    higher_is_better: bool
    value: Callable[[Results], float | None]


def _concurrent(pick: Callable[[Concurrent], float], scale: float = 1.0) -> Callable[[Results], float | None]:
    def value(r: Results) -> float | None:
        found = median([pick(c) for c in r.concurrent])
        return None if found is None else found * scale

    return value


def _scaled(pick: Callable[[Results], list[float]], scale: float) -> Callable[[Results], float | None]:
    def value(r: Results) -> float | None:
        found = median(pick(r))
        return None if found is None else found * scale

    return value


def _per_stored_byte(idle: bool) -> Callable[[Results], float | None]:
    def value(r: Results) -> float | None:
        if r.memory is None or not r.stored:
            return None
        baseline = r.server.idle.rss if idle else 0
        return (r.memory.hwm - baseline) / r.stored

    return value


def metrics(profile: Profile) -> list[Metric]:
    small, large = size(profile.small_bytes), size(profile.large_bytes)
    clients = f"{profile.clients} client procs"
    return [
        Metric(f"{small} assign p50 µs", False, _scaled(lambda r: r.p50, 1e6)),
        Metric(f"{small} assign p99 µs", False, _scaled(lambda r: r.p99, 1e6)),
        Metric(f"{small} assigns/s, 1 client", True, _scaled(lambda r: r.small_rate, 1)),
        Metric(f"{large} assign GB/s, read_value", True, _scaled(lambda r: r.assign_read, 1)),
        Metric(f"{large} assign GB/s, no read_value", True, _scaled(lambda r: r.assign_blind, 1)),
        Metric(f"{large} read GB/s", True, _scaled(lambda r: r.read, 1)),
        Metric(f"{small} assigns/s, {clients}", True, _concurrent(lambda c: c.rate)),
        Metric(f"server CPU µs/call, {clients}", False, _concurrent(lambda c: c.server_cpu, 1e6)),
        Metric("peak RSS / stored B", False, _per_stored_byte(idle=False)),
        Metric("(peak - idle RSS) / stored B", False, _per_stored_byte(idle=True)),
    ]


def _ratio(metric: Metric, ours: Results, theirs: Results) -> str:
    a, b = metric.value(ours), metric.value(theirs)
    if a is None or b is None or a <= 0 or b <= 0:
        return "-"
    return f"{(a / b if metric.higher_is_better else b / a):.2f}x"


def comparison_table(results: Sequence[Results], skipped: Sequence[Skipped], profile: Profile) -> str:
    columns = metrics(profile)
    lines = ["| system | " + " | ".join(m.title for m in columns) + " |"]
    lines.append("|---|" + "---:|" * len(columns))
    for r in results:
        values = [metric.value(r) for metric in columns]
        lines.append(f"| {r.label} | " + " | ".join("-" if v is None else _number(v) for v in values) + " |")
    for s in skipped:
        lines.append(f"| {s.label} | {s.reason} |" + " |" * (len(columns) - 1))
    ours = [r for r in results if r.label.startswith("tensorps")]
    for label in BASELINES:
        theirs = next((r for r in results if r.label == label), None)
        if theirs is None:
            continue
        for mine in ours:
            cells = [_ratio(metric, mine, theirs) for metric in columns]
            lines.append(f"| *{mine.label} vs {label}* | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def legend(profile: Profile) -> str:
    small, large = size(profile.small_bytes), size(profile.large_bytes)
    return "\n".join(
        [
            f"Medians over {profile.rounds} interleaved rounds (systems round-robin, rotated each round); "
            "every written value was checked by reading it back.",
            f"- {small} assign: float32, sequential, read_value=True (the API's default; Redis: SET+GET in "
            f"one pipelined round trip); p50/p99 of {profile.small_calls} calls per round.",
            f"- {large} assign/read: GB/s = 10^9 tensor bytes per second of the median call of "
            f"{profile.large_calls}; with read_value the same bytes also travel back.",
            f"- {profile.clients} client procs: spawned processes each assigning their own {small} variable "
            f"for {profile.window:g} s; server CPU = utime+stime from /proc/<pid>/stat of the server and its "
            "children over the window, per completed call.",
            "- peak RSS / stored B: sum of VmHWM over the server's processes ÷ bytes of the variables "
            "stored; the second column first subtracts the RSS the processes had before any data "
            "(interpreter, libraries). Shared-memory pages count in the RSS of every process that maps "
            "them, so tensorps with 2 workers counts a variable once per worker that touched it; see "
            "the memory notes.",
            "- ratio rows: how many times better tensorps is (baseline ÷ tensorps for times, CPU and memory, "
            "tensorps ÷ baseline for rates); above 1x tensorps wins.",
        ]
    )


def memory_notes(results: Sequence[Results]) -> str:
    lines = [
        "| system | stored | idle RSS | peak RSS (Σ VmHWM) | RSS at end | of which shared memory | "
        "store files on tmpfs |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        m = r.memory
        if m is None:
            continue
        files = "-" if r.store_bytes is None else f"{r.store_bytes / MiB:.1f} MiB"
        mib = [f"{n / MiB:.1f} MiB" for n in (r.stored, r.server.idle.rss, m.hwm, m.rss, m.shmem)]
        lines.append(f"| {r.label} | " + " | ".join([*mib, files]) + " |")
    lines.append("")
    lines.append(
        "tensorps keeps variables in files on /dev/shm: their pages are machine memory once (store files "
        "on tmpfs, which include the second buffer a locked write fills for crash atomicity) but appear in "
        "the RSS of every worker that maps them (RssShmem), so summed RSS overstates tensorps with several "
        "workers and understates it for pages no process has mapped."
    )
    return "\n".join(lines)


def client_cpu_notes(results: Sequence[Results]) -> str:
    parts = []
    for r in results:
        found = median([c.client_cpu for c in r.concurrent])
        if found is not None:
            parts.append(f"{r.label} {found * 1e6:.0f}")
    return "Client CPU µs/call in the concurrent runs (all client processes): " + ", ".join(parts) + "."


def scaling_table(rounds: Sequence[tuple[Concurrent, Concurrent]], profile: Profile) -> str:
    lines = [
        f"Workers scaling: {size(profile.small_bytes)} read_value assigns from {profile.clients} client "
        f"processes, {profile.window:g} s windows, 1 and 2 workers alternating which goes first.",
        "",
        "| round | 1 worker calls/s | 2 workers calls/s | 2 / 1 | 1 worker server CPU µs/call "
        "| 2 workers server CPU µs/call | 1 worker client CPU µs/call | 2 workers client CPU µs/call |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def row(label: str, one: Concurrent, two: Concurrent, ratio: float) -> str:
        return (
            f"| {label} | {one.rate:,.0f} | {two.rate:,.0f} | {ratio:.2f} | "
            f"{one.server_cpu * 1e6:.0f} | {two.server_cpu * 1e6:.0f} | "
            f"{one.client_cpu * 1e6:.0f} | {two.client_cpu * 1e6:.0f} |"
        )

    for index, (one, two) in enumerate(rounds, 1):
        lines.append(row(str(index), one, two, two.rate / one.rate))

    def mid(which: int) -> Concurrent:
        runs = [pair[which] for pair in rounds]
        return Concurrent(
            statistics.median(c.rate for c in runs),
            statistics.median(c.server_cpu for c in runs),
            statistics.median(c.client_cpu for c in runs),
        )

    # The median of the per-round ratios: each round's pair ran back to back under the same conditions.
    ratio = statistics.median(two.rate / one.rate for one, two in rounds)
    lines.append(row("**median**", mid(0), mid(1), ratio))
    return "\n".join(lines)


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _redis_server() -> str:
    binary = shutil.which("redis-server")
    if binary is None:
        return "absent"
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, check=False).stdout.split()
    return next((w.removeprefix("v=") for w in out if w.startswith("v=")), "unknown")


def environment(profile: Profile) -> str:
    parser = "hiredis" if _version("hiredis") != "absent" else "pure-Python parser"
    tensorflow = _version("tensorflow")
    if tensorflow == "absent":
        tensorflow = _version("tensorflow-cpu")
    return (
        f"Profile `{profile.name}` on {_cpu_model()}, {os.cpu_count()} CPUs, Linux {platform.release()}, "
        f"Python {platform.python_version()}; grpcio {_version('grpcio')}, protobuf {_version('protobuf')}, "
        f"numpy {_version('numpy')}, redis-server {_redis_server()}, redis-py {_version('redis')} "
        f"({parser}), tensorflow {tensorflow}."
    )


def foreign_load(fraction: float) -> str:
    line = f"Other processes (and hypervisor steal) used {fraction:.0%} of this machine's CPU during the run."
    if fraction > 0.05:
        warning = "warning: the machine was not quiet; rerun on an idle machine before quoting these numbers"
        print(warning, file=sys.stderr)
        line += f" **{warning.capitalize()}.**"
    return line


def _ms(seconds: float) -> str:
    return _number(seconds * 1e3)


def _decimal_size(nbytes: int) -> str:
    return f"{nbytes / 1e6:.1f} MB" if nbytes >= 1e6 else f"{nbytes / 1e3:.1f} kB"


def model_step_table(run: ModelRun, skipped: Sequence[Skipped]) -> str:
    model = run.model
    lines = [
        f"Model step, **{model.title}**: {model.tensors} float32 tensors, {model.parameters:,} parameters "
        f"({_decimal_size(model.nbytes)}); a step pulls all of them and pushes all of them "
        f"({_decimal_size(2 * model.nbytes)}).",
        "",
        "| system | push | how it batches | calls per step | step ms | step ms, range | pull ms | push ms "
        "| step / raw-TCP floor |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    floor = statistics.median(e.total for e in run.floor)

    def row(label: str, push: str, how: str, calls: str, *, pulls: list[float], pushes: list[float]) -> str:
        steps = [a + b for a, b in zip(pulls, pushes, strict=True)]
        step = statistics.median(steps)
        cells = [label, push, how, calls, _ms(step), f"{_ms(min(steps))}-{_ms(max(steps))}"]
        cells += [_ms(statistics.median(pulls)), _ms(statistics.median(pushes)), f"{_number(step / floor)}x"]
        return "| " + " | ".join(cells) + " |"

    pulls, pushes = [e.pull for e in run.floor], [e.push for e in run.floor]
    how = "the same bytes each way, one loopback socket"
    lines.append(row("raw TCP floor", "-", how, "-", pulls=pulls, pushes=pushes))
    for r in run.rows:
        calls = f"{r.calls[0]} + {r.calls[1]}"
        lines.append(row(r.label, r.push, r.batching, calls, pulls=r.pulls, pushes=r.pushes))
    for s in skipped:
        lines.append(f"| {s.label} | {s.reason} |" + " |" * 7)
    return "\n".join(lines)


def model_step_legend(runs: Sequence[ModelRun]) -> str:
    rounds = runs[0].rounds if runs else 0
    plural = "s" if rounds != 1 else ""
    calls = "- calls per step: requests sent by the pull + by the push."
    if any(row.label.endswith(f"({tps.PER_VARIABLE})") for run in runs for row in run.rows):
        calls += (
            f" tensorps *({tps.PER_VARIABLE})*: this client has no `read_many`/`assign_many` (issue 9), "
            "so a step is one call per variable."
        )
    return "\n".join(
        [
            f"Model steps: medians and ranges (min-max) over {rounds} round{plural} of one timed step per "
            "system, model and push kind (systems round-robin, rotated each round); pull ms and push ms are "
            "the medians of the two halves. Every pull is compared with what the system must hold after the "
            "previous push (each pushed tensor carries a fresh tag), and a final pull checks the last one.",
            "- assign writes new values (tensorps: use_locking=True, TF's default), assign_add adds deltas "
            "(use_locking=False, TF's default); nothing is read back in the push (read_value=False).",
            calls,
            "- raw TCP floor: the step's bytes sent one way, then the other, over one loopback TCP socket "
            "between two Python processes (`sendall`/`recv_into`, no framing), measured every round in the "
            "same run; the last column is the median step ÷ the median floor.",
            '- tensorps shm://: `Client("shm://STORE")` on the 1-worker server\'s store, no network.',
            "- Redis cannot add tensors: assign_add is MGET, a numpy add and MSET in the client (two round "
            "trips, not atomic against another writer).",
        ]
    )
