"""Chaos profile (issue 10): every operation from several client processes while things die, then checks.

For TENSORPS_CHAOS_SECONDS (default 600) remote (gRPC) and local (shm://) client processes
(tests/chaos_client.py) mix create, assign (locked and unlocked), locked assign_add/assign_sub, read, info,
list, delete, read_many, assign_many, assign_add_many and pipelines (plain and atomic), while a schedule drawn
from TENSORPS_CHAOS_SEED SIGKILLs workers, the supervisor (the test then starts a new server on the same port
and store, which attaches to it) and local clients (started again as a new incarnation), SIGSTOPs a local
client for 0.2-2 s (whoever needs a stripe it holds waits meanwhile), and fills the store: its byte budget
(--max-total-bytes) is small, and where `unshare --mount` is permitted the store lives on a small private
tmpfs that a ballast file fills up, so that allocations meet a real ENOSPC (TENSORPS_CHAOS_TMPFS=0 keeps the
store in /dev/shm, as where unshare is not permitted). The logs, the schedule, the servers' logs and
report.json go to pytest's temporary directory, or under TENSORPS_CHAOS_DIR when it is set.

The model (tests/chaos_model.py) judges every logged outcome and the test's own periodic reads; afterwards
the store's segment files are compared with what its descriptors reference, every variable is deleted,
the server stopped, and every process and store the run made must be gone. One run serves all the tests
below, one invariant each, so that a failure names what broke; each message carries the seed to replay.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from chaos_client import Layout, config_json
from chaos_model import ABSENT, CATEGORIES, UNINIT_STAMP, Model, Obs, Val, env_seconds, exactly_once, obs_of

from support import ServerProcess, fresh_store_path
from tensorps.client import Client, NotFoundError, TensorPSError
from tensorps.server import commits
from tensorps.server.store import Store

SECONDS = env_seconds()
SEED = int(os.environ.get("TENSORPS_CHAOS_SEED") or secrets.randbelow(1 << 31))
REPLAY = (
    f"replay: TENSORPS_CHAOS=1 TENSORPS_CHAOS_SEED={SEED} TENSORPS_CHAOS_SECONDS={SECONDS:g} "
    "pytest tests/test_chaos.py"
)
pytestmark = [pytest.mark.chaos, pytest.mark.timeout(SECONDS + 900)]

CLIENT = str(Path(__file__).with_name("chaos_client.py"))
REMOTE_CLIENTS, LOCAL_CLIENTS, WORKERS = 3, 2, 2
BUDGET = 72 << 20  # --max-total-bytes: the working set (~55 MiB) fits, the large ephemerals often do not
TMPFS = 112 << 20  # the private tmpfs: above the budget, so that the ballast (not the budget) fills it
CLIENT_TIMEOUT = 30.0
HEALTH_BOUND = 20.0  # seconds from a disruption's end to SERVING again
RESTART_BOUND = 30.0  # ... and from a supervisor's SIGKILL to a new server SERVING
CHECK_EVERY = 5.0
DISRUPTIONS = {"kill_worker": 3.0, "kill_local": 2.0, "stop_local": 3.0, "fill": 2.0, "kill_supervisor": 0.5}


@dataclass
class Event:
    at: float
    kind: str
    slot: int = 0
    index: int = 0
    duration: float = 0.0


def make_schedule(seed: int, seconds: float, local_slots: list[int]) -> list[Event]:
    """The disruptions, in time order: a function of the seed alone (interleavings still vary)."""
    rng = random.Random(f"schedule:{seed}")
    kinds, weights = list(DISRUPTIONS), list(DISRUPTIONS.values())

    def event(at: float, kind: str) -> Event:
        duration = {"stop_local": rng.uniform(0.2, 2.0), "fill": rng.uniform(1.0, 4.0)}.get(kind, 0.0)
        if kind == "kill_local":
            duration = rng.uniform(0.0, 1.0)  # until the next incarnation starts
        return Event(round(at, 3), kind, rng.choice(local_slots), rng.randrange(64), round(duration, 3))

    events = []
    at = 3.0
    while at < seconds - 5.0:
        events.append(event(at, rng.choices(kinds, weights)[0]))
        at += rng.uniform(1.0, 4.0)
    for i, kind in enumerate(kinds):  # every kind at least once, even in a short run
        if not any(e.kind == kind for e in events):
            events.append(event(max(1.0, seconds * (0.1 + 0.15 * i)), kind))
    return sorted(events, key=lambda e: e.at)


# ---- processes ----------------------------------------------------------------------------------


def proc_stat(pid: int) -> tuple[int, str] | None:
    """(start time, state) of a process, or None if there is none."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            rest = handle.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None
    return int(rest[19]), rest[0]


def alive(pid: int, start: int) -> bool:
    stat = proc_stat(pid)
    return stat is not None and stat[0] == start and stat[1] != "Z"


class Namespace:
    """A small tmpfs in a private mount namespace, kept alive by a holder process; None if not permitted."""

    def __init__(self, mountpoint: str, size: int) -> None:
        self.mountpoint = mountpoint
        mount = f"mount -t tmpfs -o size={size},mode=0700 tensorps-chaos"
        script = f'{mount} "$0" && echo mounted && exec sleep 1000000'
        self.holder = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, mountpoint],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.holder.stdout is not None
        line = self.holder.stdout.readline().strip()
        if line != "mounted":
            self.holder.kill()
            _out, err = self.holder.communicate(timeout=10)
            raise OSError(f"unshare --mount with a tmpfs is not permitted here: {err.strip() or line}")
        self.prefix = ["nsenter", f"--mount=/proc/{self.holder.pid}/ns/mnt"]
        self.ballast = self.outer(os.path.join(mountpoint, "ballast"))

    def outer(self, path: str) -> str:
        """The path, as seen from outside the namespace."""
        return f"/proc/{self.holder.pid}/root{path}"

    def fill(self, slack: int) -> int:
        """Grow the ballast until the tmpfs has only `slack` bytes free; returns the ballast's size."""
        st = os.statvfs(self.outer(self.mountpoint))
        free = st.f_bavail * st.f_frsize
        fd = os.open(self.ballast, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            size = os.fstat(fd).st_size + max(0, free - slack)
            with contextlib.suppress(OSError):
                os.posix_fallocate(fd, 0, size)
            return os.fstat(fd).st_size
        finally:
            os.close(fd)

    def empty(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.truncate(self.ballast, 0)

    def close(self) -> None:
        self.holder.kill()
        self.holder.wait(10)
        if self.holder.stdout is not None:
            self.holder.stdout.close()
        if self.holder.stderr is not None:
            self.holder.stderr.close()


# ---- the run ------------------------------------------------------------------------------------


@dataclass
class Report:
    seed: int
    seconds: float
    workdir: str
    violations: dict[str, list[str]]
    stats: dict[str, int]
    events: list[str]
    namespace: str  # "" if the private tmpfs was used, else why not
    recoveries: list[tuple[str, float]] = field(default_factory=list)
    exact: bool = False

    def failure(self, category: str) -> str:
        found = self.violations[category]
        shown = "\n  ".join(found[:15])
        more = f"\n  ... and {len(found) - 15} more" if len(found) > 15 else ""
        return f"{len(found)} {category} violation(s):\n  {shown}{more}\n{REPLAY}\nlogs: {self.workdir}"


class ChaosRun:
    def __init__(self, workdir: Path, seed: int, seconds: float) -> None:
        self.workdir = workdir
        self.seed = seed
        self.seconds = seconds
        slots = list(range(1, REMOTE_CLIENTS + LOCAL_CLIENTS + 1))
        self.remote, self.local = slots[:REMOTE_CLIENTS], slots[REMOTE_CLIENTS:]
        self.layout = Layout(slots=slots)
        self.rng = random.Random(f"run:{seed}")
        self.t0 = time.monotonic()
        self.wall0 = time.time()
        self.events: list[str] = []
        self.recoveries: list[tuple[str, float]] = []
        self.logs = {s: str(workdir / f"client{s}.log") for s in slots}
        self.stop_path = str(workdir / "stop")
        self.model = Model(self.layout, self.logs, exact=False, note=self.note)
        self.pids: dict[int, tuple[int, str]] = {}  # every process the run started or saw: start time, what
        self.children: dict[int, subprocess.Popen[bytes]] = {}
        self.incarnations: dict[int, int] = {}
        # Stopped clients: slot -> the timer that SIGCONTs it on time, whatever the main loop waits for (a
        # check of ours may itself wait for a stripe that the stopped client holds).
        self.stopped: dict[int, threading.Timer] = {}
        self.resumed: list[tuple[int, float]] = []  # filled by the timers: (slot, when)
        self.respawn_at: dict[int, float] = {}
        self.health_due: list[tuple[str, float, float]] = []  # (what, bound, since)
        self.ballast_until: float | None = None
        self.stopping = False  # the clients are told to stop: their exits are expected
        self.next_check = time.monotonic() + CHECK_EVERY
        self.servers: list[ServerProcess] = []
        self.namespace: Namespace | None = None
        self.namespace_reason = ""
        self.shm_before = set(os.listdir("/dev/shm"))
        self._mountpoint = tempfile.mkdtemp(prefix="tensorps-chaos-tmpfs-")
        if os.environ.get("TENSORPS_CHAOS_TMPFS") == "0":
            self.namespace_reason = "TENSORPS_CHAOS_TMPFS=0"
        else:
            try:
                self.namespace = Namespace(self._mountpoint, TMPFS)
            except OSError as exc:
                self.namespace_reason = str(exc)
        if self.namespace is not None:
            self.store = os.path.join(self._mountpoint, "store")
            self.store_outer = self.namespace.outer(self.store)
            self.prefix: list[str] = self.namespace.prefix
            self.track(self.namespace.holder.pid, "namespace holder")
        else:
            self.store = self.store_outer = fresh_store_path()
            self.prefix = []

    # ---- bookkeeping ---------------------------------------------------------------------------

    def note(self, text: str) -> None:
        self.events.append(f"{time.monotonic() - self.t0:8.2f} {text}")

    def track(self, pid: int, what: str) -> None:
        stat = proc_stat(pid)
        if stat is not None and pid not in self.pids:
            self.pids[pid] = (stat[0], what)

    @property
    def server(self) -> ServerProcess:
        return self.servers[-1]

    @property
    def address(self) -> str:
        return self.server.address

    def track_workers(self) -> None:
        for pid in self.server.worker_pids():
            self.track(pid, f"worker of server {len(self.servers)}")

    def start_server(self, port: int = 0) -> None:
        args = ("--max-total-bytes", str(BUDGET), "--max-variables", "4096")
        for attempt in range(5):
            try:
                server = ServerProcess(
                    *args, store=self.store, workers=WORKERS, port=port, wrapper=self.prefix
                )
                break
            except RuntimeError as exc:
                self.note(f"server start {attempt} failed: {str(exc)[-500:]}")
                time.sleep(1.0)
        else:
            raise RuntimeError(f"no server could start on port {port}")
        self.servers.append(server)
        self.track(server.proc.pid, f"supervisor {len(self.servers)}")
        self.track_workers()
        self.note(f"server {len(self.servers)} ready on {server.address} (supervisor {server.proc.pid})")

    def spawn(self, slot: int) -> None:
        incarnation = self.incarnations[slot] = self.incarnations.get(slot, -1) + 1
        local = slot in self.local
        target = f"shm://{self.store}" if local else self.address
        config = config_json(
            target=target,
            slot=slot,
            incarnation=incarnation,
            seed=self.seed,
            log=self.logs[slot],
            stop=self.stop_path,
            layout=self.layout,
            timeout=CLIENT_TIMEOUT,
        )
        with open(self.workdir / f"client{slot}.err", "ab") as err:
            proc = subprocess.Popen(
                [*(self.prefix if local else []), sys.executable, CLIENT, config],
                stdout=subprocess.DEVNULL,
                stderr=err,
            )
        self.children[slot] = proc
        self.track(proc.pid, f"client {slot} incarnation {incarnation}")

    def stderr_tail(self, slot: int) -> str:
        text = (self.workdir / f"client{slot}.err").read_text(errors="replace")
        return text[-1500:]

    # ---- the loop ------------------------------------------------------------------------------

    def stop_client(self, slot: int, duration: float) -> None:
        proc = self.children[slot]
        os.kill(proc.pid, signal.SIGSTOP)
        timer = threading.Timer(duration, self._resume, (slot, proc))
        timer.daemon = True
        self.stopped[slot] = timer
        timer.start()
        self.note(f"SIGSTOP client {slot} for {duration:.2f} s")

    def _resume(self, slot: int, proc: subprocess.Popen[bytes]) -> None:
        """In the timer's thread: SIGCONT, unless the client was killed meanwhile."""
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGCONT)
        self.resumed.append((slot, time.monotonic()))

    def resume_all(self) -> None:
        for slot, timer in list(self.stopped.items()):
            timer.cancel()
            proc = self.children[slot]
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGCONT)
        self.stopped.clear()

    def resume_due(self) -> None:
        """Note the clients the timers resumed; their health checks are due."""
        while self.resumed:
            slot, when = self.resumed.pop(0)
            self.stopped.pop(slot, None)  # no new stop of a slot starts before its resume is noted here
            self.note(f"SIGCONT client {slot}")
            self.health_due.append((f"SIGCONT of client {slot}", HEALTH_BOUND, when))

    def tick(self) -> None:
        """Housekeeping between events: resume stopped clients, respawn, watch for deaths, check."""
        self.resume_due()
        now = time.monotonic()
        for slot, proc in list(self.children.items()):
            code = proc.poll()
            if code is not None and slot not in self.respawn_at and not self.stopping:
                self.model.violation(
                    "clients", f"client {slot} exited by itself ({code}): {self.stderr_tail(slot)}"
                )
                self.respawn_at[slot] = now
        for slot, at in list(self.respawn_at.items()):
            if now >= at:
                del self.respawn_at[slot]
                self.spawn(slot)
        if self.server.proc.poll() is not None:
            self.model.violation("health", f"the supervisor exited by itself: {self.server.log[-20:]}")
            self.server.stop()
            self.start_server(self.server.port)
        self.track_workers()
        if self.ballast_until is not None and now >= self.ballast_until and self.namespace is not None:
            self.namespace.empty()
            self.ballast_until = None
            self.note("ballast emptied")
            self.health_due.append(("a full tmpfs", HEALTH_BOUND, now))
        if now >= self.next_check:
            self.check()
            self.next_check = time.monotonic() + CHECK_EVERY

    def await_health(self, what: str, bound: float, since: float, gone: int | None = None) -> None:
        """Wait until the server answers SERVING (and the worker `gone` is replaced); bounded."""
        while True:
            self.tick()
            workers = self.server.worker_pids()
            replaced = gone is None or (gone not in workers and len(workers) == WORKERS)
            if replaced and self.server.healthy(timeout=1.0):
                took = time.monotonic() - since
                self.recoveries.append((what, round(took, 2)))
                return
            if time.monotonic() - since > bound:
                self.model.violation(
                    "health", f"not SERVING {bound:.0f} s after {what}: {self.server.log[-10:]}"
                )
                return
            time.sleep(0.1)

    def run(self) -> None:
        self.start_server()
        with Client(self.address, timeout=60) as ps:
            ps.create_many({name: {"value": value} for name, value in self.layout.initial().items()})
            self.model.exact = exactly_once(ps)
        for slot in self.layout.slots:
            self.spawn(slot)
        schedule = make_schedule(self.seed, self.seconds, self.local)
        (self.workdir / "schedule.json").write_text(json.dumps([e.__dict__ for e in schedule], indent=1))
        self.note(f"seed {self.seed}, {len(schedule)} disruptions over {self.seconds:g} s; {REPLAY}")
        for event in schedule:
            while time.monotonic() - self.t0 < event.at:
                self.tick()
                self.serve_health_due()
                time.sleep(0.05)
            self.disrupt(event)
            self.serve_health_due()
        while time.monotonic() - self.t0 < self.seconds:
            self.tick()
            self.serve_health_due()
            time.sleep(0.05)

    def serve_health_due(self) -> None:
        while self.health_due:
            what, bound, since = self.health_due.pop(0)
            self.await_health(what, bound, since)

    def disrupt(self, event: Event) -> None:
        now = time.monotonic()
        if event.kind == "kill_worker":
            workers = self.server.worker_pids()
            if not workers:
                return
            victim = workers[event.index % len(workers)]
            self.track(victim, "worker")
            os.kill(victim, signal.SIGKILL)
            self.note(f"SIGKILL worker {victim}")
            self.await_health(f"SIGKILL of worker {victim}", HEALTH_BOUND, now, gone=victim)
        elif event.kind == "kill_supervisor":
            self.kill_supervisor()
        elif event.kind == "kill_local":
            proc = self.children[event.slot]
            if event.slot in self.respawn_at:
                return
            timer = self.stopped.pop(event.slot, None)
            if timer is not None:
                timer.cancel()
            proc.kill()
            proc.wait(10)
            self.respawn_at[event.slot] = now + event.duration
            self.note(f"SIGKILL client {event.slot} (pid {proc.pid})")
            self.health_due.append((f"SIGKILL of client {event.slot}", HEALTH_BOUND, now))
        elif event.kind == "stop_local":
            if event.slot in self.stopped or event.slot in self.respawn_at:
                return
            self.stop_client(event.slot, event.duration)
        elif event.kind == "fill":
            if self.namespace is None:
                return
            size = self.namespace.fill(slack=self.rng.choice([0, 64 << 10, 1 << 20]))
            self.ballast_until = now + event.duration
            self.note(f"ballast {size >> 20} MiB fills the tmpfs for {event.duration:.2f} s")

    def kill_supervisor(self) -> None:
        server = self.server
        workers = {pid: stat[0] for pid in server.worker_pids() if (stat := proc_stat(pid)) is not None}
        started = time.monotonic()
        server.proc.kill()
        server.proc.wait(10)
        self.note(f"SIGKILL supervisor {server.proc.pid} (workers {sorted(workers)})")
        deadline = time.monotonic() + 5.0
        survivors = [pid for pid, start in workers.items() if alive(pid, start)]
        while survivors and time.monotonic() < deadline:
            self.resume_due()
            time.sleep(0.1)
            survivors = [pid for pid in survivors if alive(pid, workers[pid])]
        if survivors:
            self.model.violation(
                "orphans",
                f"workers {survivors} still run 5 s after their supervisor {server.proc.pid} was SIGKILLed "
                "(they keep the port and the store; the test kills them)",
            )
            for pid in survivors:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        server.stop()
        self.start_server(server.port)
        self.await_health(f"SIGKILL of supervisor {server.proc.pid}", RESTART_BOUND, started)

    # ---- checks --------------------------------------------------------------------------------

    def check(self, final: bool = False) -> None:
        """Read the counters, every slot's locked and big variables and every group; judge them."""
        model = self.model
        model.poll()
        acked, owned = model.snapshot()
        counters = self.layout.counter_names()
        locked = [self.layout.owned(s)[k] for s in self.layout.slots for k in ("locked", "big")]
        where = "final check" if final else f"check at {time.monotonic() - self.t0:.1f} s"
        try:
            with Client(self.address, timeout=CLIENT_TIMEOUT) as ps:
                counted = ps.read_many(counters)
                values = ps.read_many(locked)
                groups = []
                for g in range(self.layout.groups):
                    pipe = ps.pipeline(atomic=True)
                    for name in self.layout.group(g):
                        pipe.read(name)
                    groups.append(pipe.execute())
        except TensorPSError as exc:
            if final:
                model.violation("health", f"{where}: {exc}")
            else:
                self.note(f"{where} skipped: {type(exc).__name__} {exc.message[:200]}")
            return
        model.poll()
        for name, value in counted.items():
            model.check_counter(name, acked[name], obs_of(value), final, where)
        for name, value in values.items():
            model.check_owned_value(name, owned[name], obs_of(value), where)
        for g, found in enumerate(groups):
            model.check_group(g, [obs_of(v) for v in found], where)
        self.note(f"{where}: counters {[int(v[0]) for v in counted.values()]}")

    def stop_clients(self) -> None:
        self.resume_all()
        self.stopping = True
        self.respawn_at.clear()
        Path(self.stop_path).touch()
        deadline = time.monotonic() + 60.0
        for slot, proc in self.children.items():
            try:
                code = proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.model.violation("clients", f"client {slot} did not stop within 60 s (hung); killed")
                proc.kill()
                proc.wait(10)
                continue
            if code != 0:
                self.model.violation("clients", f"client {slot} exited with {code}: {self.stderr_tail(slot)}")

    def final_values(self) -> None:
        """Every owned variable as the model says it may be; ephemerals by info, then read."""
        model = self.model
        with Client(self.address, timeout=CLIENT_TIMEOUT) as ps:
            for name, var in model.owned.items():
                before = (var.possible(), len(var.attempts))
                seen: Val | Obs
                try:
                    info = ps.info(name)
                except NotFoundError:
                    seen = ABSENT
                else:
                    if info.initialized:
                        seen = obs_of(ps.read(name))
                    else:
                        seen = (UNINIT_STAMP, info.shape[0] if info.shape else 0)
                model.check_owned_value(name, before, seen, "final value")

    def audit(self, what: str) -> tuple[int, int]:
        """Segment files against the descriptors that reference them; returns (files, variables)."""
        store = Store.attach(self.store_outer, wait=0.0)
        try:
            names = store.names()
            referenced: dict[int, int] = {}
            for name in names:
                slot = store.find(name)
                if slot is None:
                    continue
                for which in (0, 1):
                    d = store.descriptor(slot, which)
                    if d.segment:
                        referenced[d.segment] = d.capacity
            listing = os.listdir(self.store_outer)
            files = {int(n[4:], 16): n for n in listing if n.startswith("seg-")}
            records = [n for n in listing if n.startswith("commit-")]
            used, count = store.used_bytes, store.variable_count
        finally:
            store.close()
        leaked = sorted(set(files) - set(referenced))
        dangling = sorted(set(referenced) - set(files))
        if leaked:
            shown = [self.describe_file(files[s]) for s in leaked[:8]]
            self.model.violation(
                "segments", f"{what}: {len(leaked)} segment files that no descriptor references: {shown}"
            )
        if dangling:
            self.model.violation(
                "accounting", f"{what}: descriptors reference missing segments {dangling[:8]}"
            )
        if records:
            states: dict[str, int] = {}
            for name in records:
                with (
                    contextlib.suppress(FileNotFoundError),
                    open(os.path.join(self.store_outer, name), "rb") as f,
                ):
                    head = f.read(1)
                    state = {b"": "empty", bytes([commits.PREPARING]): "preparing"}.get(head, "committed")
                    states[state] = states.get(state, 0) + 1
            committed = [r for r in records if self.describe_file(r).count("state 2")]
            shown = [
                self.describe_file(r) for r in (committed + [r for r in records if r not in committed])[:5]
            ]
            self.model.violation(
                "records", f"{what}: {len(records)} commit records left behind {states}: {shown}"
            )
        if used != sum(referenced.values()):
            self.model.violation(
                "accounting",
                f"{what}: the store counts {used} bytes used, "
                f"its variables reference {sum(referenced.values())}",
            )
        if count != len(names):
            self.model.violation(
                "accounting", f"{what}: the store counts {count} variables, lists {len(names)}"
            )
        self.note(f"audit {what}: {len(files)} segment files, {len(names)} variables, {used} bytes used")
        return len(files), len(names)

    def describe_file(self, name: str) -> str:
        """A leftover store file: size, age in the run, content of a commit record, who holds it open."""
        path = os.path.join(self.store_outer, name)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return f"{name} (gone)"
        text = f"{name}: {st.st_size} bytes, written at {st.st_mtime - self.wall0:.2f} s"
        if name.startswith(commits.PREFIX):
            with open(path, "rb") as handle:
                data = handle.read()
            if data:
                entries = [(e.kind, e.slot, e.name) for e in commits._entries(data)]
                text += f", state {data[0]}, entries (kind, slot, name) {entries[:12]}"
        holders = []
        for pid, (start, what) in self.pids.items():
            if not alive(pid, start):
                continue
            with contextlib.suppress(OSError):
                for fd in os.listdir(f"/proc/{pid}/fd"):
                    with contextlib.suppress(OSError):
                        if os.readlink(f"/proc/{pid}/fd/{fd}").endswith(name):
                            holders.append(f"{what} (pid {pid}) fd {fd}")
        return text + (f", open in {holders}" if holders else "")

    def finish(self) -> None:
        """Quiesce, check everything, delete everything, stop, and look for leftovers."""
        if self.namespace is not None:
            self.namespace.empty()
        self.ballast_until = None
        self.stop_clients()
        self.await_health("the end of the run", RESTART_BOUND, time.monotonic())
        self.model.finish()
        self.check(final=True)
        self.final_values()
        self.model.finish()
        self.audit("after the run")
        with Client(self.address, timeout=CLIENT_TIMEOUT) as ps:
            for info in ps.list():
                with contextlib.suppress(NotFoundError):
                    ps.delete(info.name)
        self.audit("after deleting every variable")
        server = self.server
        code = server.stop()
        if code != 0:
            self.model.violation("processes", f"the last server exited with {code}: {server.log[-10:]}")
        store_left = os.path.exists(self.store_outer)
        if len(self.servers) == 1 and store_left:
            self.model.violation("stores", f"the server that created {self.store} left it behind")
        # A server that attached to an existing store leaves it (README); the test removes it.
        Store.remove_files(self.store_outer)

    def cleanup(self) -> None:
        """Whatever happened: no process and no store of this run survives it."""
        self.resume_all()
        for proc in self.children.values():
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGCONT)
                proc.kill()
            proc.wait(10)
        for server in self.servers:
            if server.proc.poll() is None:
                server.kill()
        deadline = time.monotonic() + 10.0
        holder = self.namespace.holder.pid if self.namespace is not None else None
        leaked = {p: v for p, v in self.pids.items() if p != holder and alive(p, v[0])}
        while leaked and time.monotonic() < deadline:
            time.sleep(0.1)
            leaked = {p: v for p, v in leaked.items() if alive(p, v[0])}
        if leaked:
            self.model.violation("processes", f"processes of the run still alive: {leaked}")
            for pid in leaked:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        Store.remove_files(self.store_outer)
        if self.namespace is not None:
            left = os.listdir(self.namespace.outer(self._mountpoint))
            if set(left) - {"ballast"}:
                self.model.violation("stores", f"the private tmpfs still holds {left}")
            self.namespace.close()
            if alive(self.namespace.holder.pid, self.pids[self.namespace.holder.pid][0]):
                self.model.violation("processes", "the namespace holder survived")
        with contextlib.suppress(OSError):
            os.rmdir(self._mountpoint)
        if os.path.exists(self.store_outer):
            self.model.violation("stores", f"{self.store_outer} still exists")
        new = sorted(set(os.listdir("/dev/shm")) - self.shm_before)
        # Other test runs on this machine make stores of their own (tensorps-test-*, tensorps-bench-*) and
        # multiprocessing semaphores (sem.mp-*): look only for what this run's processes could leave.
        strays = [
            n
            for n in new
            if n.startswith("psm_")
            or (n.startswith("tensorps-") and not n.startswith(("tensorps-test-", "tensorps-bench-")))
        ]
        if self.store_outer.startswith("/dev/shm/") and os.path.basename(self.store_outer) in new:
            strays.append(os.path.basename(self.store_outer))
        if strays:
            self.model.violation("stores", f"new entries left in /dev/shm: {strays[:10]}")

    def report(self) -> Report:
        return Report(
            seed=self.seed,
            seconds=self.seconds,
            workdir=str(self.workdir),
            violations=self.model.violations,
            stats=dict(self.model.stats),
            events=self.events,
            namespace=self.namespace_reason,
            recoveries=self.recoveries,
            exact=self.model.exact,
        )


@pytest.fixture(scope="module")
def chaos(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Report]:
    keep = os.environ.get("TENSORPS_CHAOS_DIR")  # a directory that outlives pytest's temporary ones
    if keep:
        workdir = Path(keep) / f"chaos-{SEED}-{time.strftime('%Y%m%d-%H%M%S')}"
        workdir.mkdir(parents=True)
    else:
        workdir = tmp_path_factory.mktemp("chaos")
    print(f"\nchaos: seed {SEED}, {SECONDS:g} s, logs in {workdir}\n{REPLAY}")
    run = ChaosRun(workdir, SEED, SECONDS)
    try:
        run.run()
        run.finish()
    finally:
        run.cleanup()
        for server in run.servers:
            (workdir / f"server{run.servers.index(server) + 1}.log").write_text("\n".join(server.log))
        report = run.report()
        (workdir / "report.json").write_text(json.dumps(report.__dict__, indent=1, default=str))
    counts = {c: len(v) for c, v in report.violations.items() if v}
    print(f"chaos: seed {SEED}: violations {counts or 'none'}; stats {sorted(report.stats.items())}")
    yield report


def _check(report: Report, category: str) -> None:
    assert category in CATEGORIES
    assert not report.violations[category], report.failure(category)


def test_no_torn_values(chaos: Report) -> None:
    """Every value read is uniform (one stamp), except after an unlocked write whose outcome is unknown."""
    _check(chaos, "torn")


def test_locked_counts_are_exact(chaos: Report) -> None:
    """Each counter lies between its acknowledged and its attempted locked +1 adds, whenever read.

    Equality (acknowledged == value) once the client retries writes with request ids
    (chaos_model.exactly_once).
    """
    _check(chaos, "counts")


def test_every_acknowledged_write_is_present(chaos: Report) -> None:
    """A read of an owned variable shows its last acknowledged write or a later unacknowledged one."""
    _check(chaos, "acked")


def test_atomic_batches_are_all_or_nothing(chaos: Report) -> None:
    """A group written by atomic batches always shows one stamp in every member at once."""
    _check(chaos, "atomic")


def test_only_expected_errors(chaos: Report) -> None:
    """Clients see only UNAVAILABLE, RESOURCE_EXHAUSTED and errors the model explains (no INTERNAL, ...)."""
    _check(chaos, "errors")


def test_clients_survive(chaos: Report) -> None:
    """No client process dies or hangs unless the test killed it."""
    _check(chaos, "clients")


def test_health_recovers(chaos: Report) -> None:
    """After each disruption the server answers SERVING within a bound."""
    _check(chaos, "health")


def test_store_accounting_is_consistent(chaos: Report) -> None:
    """Descriptors reference only existing segments; used bytes and the variable count match them."""
    _check(chaos, "accounting")


def test_no_leaked_commit_records(chaos: Report) -> None:
    """No commit record of an atomic batch outlives it (a stale one would be replayed by a later recovery)."""
    _check(chaos, "records")


def test_no_leaked_segments(chaos: Report) -> None:
    """Every segment file is referenced by a descriptor and counted in the budget, before and after
    deleting every variable."""
    _check(chaos, "segments")


def test_no_leaked_processes(chaos: Report) -> None:
    """Every process the run started or saw (clients, supervisors, workers) is gone afterwards."""
    _check(chaos, "processes")


def test_supervisor_death_takes_its_workers(chaos: Report) -> None:
    """Workers of a SIGKILLed supervisor exit by themselves (else they hold the port and the store)."""
    _check(chaos, "orphans")


def test_no_leaked_stores(chaos: Report) -> None:
    """No store directory, tmpfs content or /dev/shm entry of the run is left."""
    _check(chaos, "stores")


def test_the_run_exercised_everything(chaos: Report) -> None:
    """Every kind of call was acknowledged and every kind of disruption happened (the run is not vacuous)."""
    stats = chaos.stats
    calls = [
        "assign",
        "read",
        "info",
        "list",
        "create",
        "delete",
        "add",
        "read_many",
        "assign_many",
        "assign_many atomic",
        "assign_add_many",
        "assign_add_many atomic",
        "pipeline",
        "pipeline atomic",
    ]
    missing = [c for c in calls if not stats.get(f"call:{c}:ok")]
    assert not missing, f"never acknowledged: {missing}\n{REPLAY}"
    happened = " ".join(chaos.events)
    for what in ("SIGKILL worker", "SIGKILL supervisor", "SIGKILL client", "SIGSTOP client"):
        assert what in happened, f"no {what} in the run\n{REPLAY}"
    assert stats.get("budget", 0) > 0, f"the byte budget never refused an allocation\n{REPLAY}"
    assert stats.get("killed:add", 0) + stats.get("unknown:add", 0) > 0, f"no add left in doubt\n{REPLAY}"


def test_a_full_tmpfs_gives_resource_exhausted(chaos: Report) -> None:
    """With a private tmpfs, allocations that meet a real ENOSPC were refused as RESOURCE_EXHAUSTED."""
    if chaos.namespace:
        pytest.skip(f"no private tmpfs: {chaos.namespace}")
    assert "ballast" in " ".join(chaos.events)
    assert chaos.stats.get("enospc", 0) > 0, f"no allocation met the full tmpfs\n{REPLAY}"


def test_schedule_depends_on_the_seed_alone() -> None:
    """The disruption schedule is a function of the seed (what TENSORPS_CHAOS_SEED replays)."""
    first = make_schedule(SEED, SECONDS, [4, 5])
    assert first == make_schedule(SEED, SECONDS, [4, 5])
    assert first != make_schedule(SEED + 1, SECONDS, [4, 5])
    assert {e.kind for e in first} == set(DISRUPTIONS)
    assert np.all(np.diff([e.at for e in first]) >= 0)
