"""The model that judges a chaos run (tests/test_chaos.py) from the clients' logs (tests/chaos_client.py).

Each client slot owns some variables and is their only writer, and it logs each operation before sending it
and its outcome after; so, read in order, a slot's log says exactly which values each owned variable may
hold at any point: the last acknowledged write's, or one of the writes after it whose outcome is unknown
(UNAVAILABLE, a process killed mid-call). A read that shows anything else is a lost acknowledged write or a
phantom; two stamps in one value are a torn value (allowed only after an unknown *unlocked* write, which
TensorFlow's semantics leave undefined). Counters are shared: each only ever grows by 1 per locked add, so
its value lies between the adds acknowledged and the adds attempted. Atomic groups always show one stamp.

Outcome classes of an error code: the server said no, nothing changed (DEFINITE), or nobody knows whether
the call applied (everything else). Codes a correct run may show at all are EXPECTED; any other is reported.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter as Tally
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from chaos_client import Layout, stamp_slot

# A value a variable may hold: (stamp, length); (ABSENT_STAMP, 0) for "does not exist" and
# (UNINIT_STAMP, length) for "declared, not yet assigned".
Val = tuple[int, int]
ABSENT_STAMP, UNINIT_STAMP = -1, -2
ABSENT: Val = (ABSENT_STAMP, 0)

DEFINITE = frozenset(
    {
        "INVALID_ARGUMENT",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "FAILED_PRECONDITION",
        "RESOURCE_EXHAUSTED",
        "PERMISSION_DENIED",
        "UNAUTHENTICATED",
        "OUT_OF_RANGE",
    }
)
# Codes a correct server can give these clients; NOT_FOUND/ALREADY_EXISTS/FAILED_PRECONDITION only where
# the model says the variable may be absent/present/uninitialized (checked per operation).
# CANCELLED: a worker stopping (its supervisor was killed) cancels the calls still in flight after its
# grace period; ABORTED: a retried write (request id) that had applied but whose result is no longer known.
EXPECTED = frozenset({"UNAVAILABLE", "RESOURCE_EXHAUSTED", "CANCELLED", "ABORTED"})
CATEGORIES = (
    "torn",
    "counts",
    "acked",
    "atomic",
    "errors",
    "accounting",
    "segments",
    "records",
    "processes",
    "stores",
    "health",
    "orphans",
    "clients",
)
_OWNER = re.compile(r"^(own|eph)(\d+)/")


def owner_of(name: str) -> int | None:
    match = _OWNER.match(name)
    return int(match.group(2)) if match else None


@dataclass
class Owned:
    """What one owned variable may hold, as far as its owner's log tells."""

    name: str
    vals: set[Val]
    torn: bool = False  # an unknown unlocked write may have left a mix of stamps
    zombies: set[Val] = field(default_factory=set)  # writes that may still land at any time (deadline)
    pending: list[Val] = field(default_factory=list)  # writes in flight
    attempts: list[Val] = field(default_factory=list)  # every value ever sent, in order
    sent: set[int] = field(default_factory=lambda: {0})  # their stamps (and the initial 0)

    def possible(self) -> set[Val]:
        return self.vals | self.zombies | set(self.pending)

    def stamps(self) -> set[int]:
        return {s for s, _n in self.possible() if s >= 0}


@dataclass
class CounterState:
    ok: int = 0
    failed: int = 0
    unknown: int = 0  # outcome reported as unknown by the client (UNAVAILABLE, ...)
    killed: int = 0  # in flight in a process that was SIGKILLed
    pending: int = 0

    def upper(self, exact: bool) -> int:
        """Most adds that may have applied; with exactly-once writes only a killed caller leaves doubt."""
        return self.ok + self.pending + self.killed + (0 if exact else self.unknown)


@dataclass
class Obs:
    shape: list[int]
    distinct: list[int]
    count: int

    @property
    def uniform(self) -> bool:
        return self.count == 1

    @property
    def length(self) -> int:
        return self.shape[0] if self.shape else 1

    @property
    def stamp(self) -> int:
        return self.distinct[0]


def _obs(result: Any) -> Obs | None:
    if isinstance(result, list) and result and result[0] == "v":
        return Obs(result[1], result[2], result[3])
    return None


class Model:
    """Reads the logs incrementally (poll) and records every violation it finds, by category."""

    def __init__(
        self, layout: Layout, logs: dict[int, str], *, exact: bool, note: Callable[[str], None]
    ) -> None:
        self.layout = layout
        self.logs = logs
        self.exact = exact
        self.note = note  # where violations also go as they are found (the run's event log)
        self.violations: dict[str, list[str]] = {c: [] for c in CATEGORIES}
        self.owned: dict[str, Owned] = {}
        for slot in layout.slots:
            for kind, name in layout.owned(slot).items():
                length = layout.big if kind == "big" else layout.small
                self.owned[name] = Owned(name, {(0, length)})
            for i in range(layout.ephemerals):
                name = layout.ephemeral(slot, i)
                self.owned[name] = Owned(name, {ABSENT})
        self.counters = {name: CounterState() for name in layout.counter_names()}
        self.group_of = {m: g for g in range(layout.groups) for m in layout.group(g)}
        self.group_stamps: dict[int, set[int]] = {g: {0} for g in range(layout.groups)}
        self.fixed = set(layout.initial())
        self.stats: Tally[str] = Tally()
        self.versions: dict[tuple[int, str], int] = {}  # (slot, name) -> the highest version it saw
        self._offsets = dict.fromkeys(logs, 0)
        self._tails = dict.fromkeys(logs, b"")
        self._pending: dict[int, dict[str, Any]] = {}
        self._incarnation: dict[int, int] = {}
        self._deferred: list[Callable[[], None]] = []
        self._deferred_next: list[Callable[[], None]] = []

    # ---- reporting -----------------------------------------------------------------------------

    def violation(self, category: str, message: str) -> None:
        found = self.violations[category]
        if len(found) < 200:
            found.append(message)
        self.stats[f"violation:{category}"] += 1
        self.note(f"VIOLATION {category}: {message}")

    # ---- reading the logs ----------------------------------------------------------------------

    def poll(self) -> None:
        """Read what the clients appended; check what the previous poll deferred (see _defer)."""
        due, self._deferred = self._deferred, self._deferred_next
        self._deferred_next = []
        for slot, path in self.logs.items():
            try:
                with open(path, "rb") as handle:
                    handle.seek(self._offsets[slot])
                    data = handle.read()
            except FileNotFoundError:
                continue
            self._offsets[slot] += len(data)
            lines = (self._tails[slot] + data).split(b"\n")
            self._tails[slot] = lines.pop()
            for line in lines:
                if line:
                    self._record(slot, json.loads(line))
        for check in due:
            check()

    def finish(self) -> None:
        """Every client has exited: in-flight operations died with their process; check everything left."""
        self.poll()
        for slot in list(self._pending):
            self._resolve_killed(slot)
        for check in self._deferred + self._deferred_next:
            check()
        self._deferred, self._deferred_next = [], []

    def _defer(self, check: Callable[[], None]) -> None:
        """Run `check` after the next poll: by then every log holds every attempt made before it ran."""
        self._deferred_next.append(check)

    def _record(self, slot: int, record: dict[str, Any]) -> None:
        kind = record["t"]
        if kind == "start":
            if slot in self._pending:
                self._resolve_killed(slot)
            self._incarnation[slot] = record["inc"]
        elif kind == "op":
            self._pending[slot] = record
            for sub in record["ops"]:
                self._begin(slot, sub)
        elif kind in ("ok", "err"):
            op = self._pending.pop(slot)
            if op["id"] != record["id"]:
                self.violation("clients", f"slot {slot}: outcome of op {record['id']} after op {op['id']}")
                return
            self._outcome(slot, op, record)
        elif kind == "end" and slot in self._pending:
            self.violation("clients", f"slot {slot}: ended with op {self._pending[slot]['id']} in flight")

    def _resolve_killed(self, slot: int) -> None:
        op = self._pending.pop(slot)
        for sub in op["ops"]:
            self._settle(slot, sub, "killed", None, op)

    def _begin(self, slot: int, sub: list[Any]) -> None:
        kind, name = sub[0], sub[1]
        value = self._written(sub)
        var = self.owned.get(name)
        if value is not None and var is not None and owner_of(name) == slot:
            var.pending.append(value)
            var.attempts.append(value)
            var.sent.add(value[0])
        elif kind == "assign" and name in self.group_of:
            self.group_stamps[self.group_of[name]].add(sub[2])
        elif kind == "add" and name in self.counters:
            self.counters[name].pending += 1

    @staticmethod
    def _written(sub: list[Any]) -> Val | None:
        kind = sub[0]
        if kind == "assign":
            return (sub[2], sub[3])
        if kind == "create":
            return (sub[2], sub[3]) if sub[2] is not None else (UNINIT_STAMP, sub[3])
        if kind == "delete":
            return ABSENT
        return None

    def _outcome(self, slot: int, op: dict[str, Any], record: dict[str, Any]) -> None:
        subs = op["ops"]
        call = op.get("batch") or subs[0][0]
        where = f"slot {slot} op {op['id']} ({call} {subs[0][1]}...)"
        self.stats[f"call:{call}{' atomic' if op.get('atomic') else ''}:{record['t']}"] += 1
        if record["t"] == "ok":
            results = record["res"]
            if len(results) != len(subs):
                self.violation("errors", f"{where}: {len(results)} results for {len(subs)} operations")
                return
            for sub, result in zip(subs, results, strict=True):
                self._settle(slot, sub, "ok", result, op)
            if op.get("atomic"):
                self._check_atomic_read(where, subs, results)
            return
        code = record["code"]
        self.stats[f"error:{code}"] += 1
        if "no room" in record.get("msg", "") or "No space left" in record.get("msg", ""):
            self.stats["enospc"] += 1
        if "budget" in record.get("msg", ""):
            self.stats["budget"] += 1
        per_op = record.get("res")
        if per_op is not None and len(per_op) == len(subs):  # a plain batch: each operation's own outcome
            for sub, result in zip(subs, per_op, strict=True):
                if isinstance(result, list) and result and result[0] == "e":
                    self._failed(slot, sub, result[1], op, where, record)
                else:
                    self._settle(slot, sub, "ok", result, op)
            return
        for sub in subs:
            self._failed(slot, sub, code, op, where, record)

    def _failed(
        self, slot: int, sub: list[Any], code: str, op: dict[str, Any], where: str, record: dict[str, Any]
    ) -> None:
        if code not in EXPECTED and code not in ("NOT_FOUND", "ALREADY_EXISTS", "FAILED_PRECONDITION"):
            self.violation("errors", f"{where}: {code}: {record.get('msg', '')[:1500]}")
        if code == "DEADLINE_EXCEEDED":
            self._settle(slot, sub, "zombie", None, op)
        elif code in DEFINITE:
            self._settle(slot, sub, code, None, op)
        else:
            self._settle(slot, sub, "unknown", None, op)
            if self.exact and sub[0] in ("assign", "add", "create", "delete"):
                self.violation(
                    "counts", f"{where}: a write's outcome left unknown ({code}) with exactly-once writes"
                )

    # ---- judging one operation -----------------------------------------------------------------

    def _settle(self, slot: int, sub: list[Any], outcome: str, result: Any, op: dict[str, Any]) -> None:
        """`outcome`: "ok" (result: its logged result), a DEFINITE code, "unknown", "zombie" or "killed"."""
        kind, name = sub[0], sub[1]
        where = f"slot {slot} op {op['id']} {kind} {name}"
        self.stats[f"{outcome if outcome in ('ok', 'unknown', 'killed') else 'refused'}:{kind}"] += 1
        if kind == "list":
            if outcome == "ok":
                self._check_list(slot, sub[1], result, where)
            return
        if outcome == "ok" and isinstance(result, list) and result and result[0] == "i":
            self._check_version(slot, kind, name, result[3], where)
        var = self.owned.get(name)
        if var is not None and owner_of(name) == slot:
            self._settle_owned(var, sub, outcome, result, where)
        elif name in self.counters:
            self._settle_counter(name, sub, outcome, result, where)
        elif var is not None:
            if outcome == "ok" and kind == "read":
                self._check_foreign(var, _obs(result), where)
            elif outcome in ("NOT_FOUND", "FAILED_PRECONDITION"):
                self.violation("acked", f"{where}: {outcome} for a variable that always exists initialized")
        elif name in self.group_of:
            if outcome == "ok":
                self._check_member(name, sub, _obs(result), where)
            elif outcome in ("NOT_FOUND", "FAILED_PRECONDITION", "ALREADY_EXISTS"):
                self.violation("acked", f"{where}: {outcome} for a group member that always exists")
        elif outcome == "ok" and kind == "read":
            self.violation("errors", f"{where}: read a variable the model does not know")

    def _check_version(self, slot: int, kind: str, name: str, version: int, where: str) -> None:
        """Versions only grow: what one client sees of a variable never goes back, and its own
        acknowledged write always moves it on (ephemerals restart at each create, so they are skipped)."""
        if name.startswith("eph"):
            return
        last = self.versions.get((slot, name))
        if last is not None and (version < last or (kind in ("assign", "add") and version == last)):
            self.violation("acked", f"{where}: version {version} after this client saw {last}")
        self.versions[(slot, name)] = max(version, last or 0)

    def _settle_owned(self, var: Owned, sub: list[Any], outcome: str, result: Any, where: str) -> None:
        kind = sub[0]
        value = self._written(sub)
        if value is not None:
            with_value = value in var.pending
            if with_value:
                var.pending.remove(value)
            if outcome == "ok":
                possible = var.vals | var.zombies
                if kind == "create" and ABSENT not in possible:
                    self.violation("acked", f"{where}: create acknowledged but the variable may only exist")
                if kind in ("assign", "delete") and not possible - {ABSENT}:
                    self.violation("acked", f"{where}: {kind} acknowledged but the variable cannot exist")
                var.vals, var.torn = {value}, False
                obs = _obs(result)
                if obs is not None and (not obs.uniform or (obs.stamp, obs.length) != value):
                    self.violation("torn", f"{where}: the write returned {obs} instead of its value {value}")
            elif outcome in ("unknown", "killed", "zombie"):
                var.vals = var.vals | {value}
                if kind == "assign" and not sub[4]:
                    var.torn = True  # an unlocked copy may have stopped half-way
                if outcome == "zombie":
                    var.zombies.add(value)
            else:
                self._refuse(var, outcome, where)
            return
        if outcome == "ok":
            if kind == "read":
                self._check_owned_read(var, _obs(result), where)
            elif kind == "info":
                self._check_owned_info(var, result, where)
        elif outcome in DEFINITE:
            self._refuse(var, outcome, where)

    def _refuse(self, var: Owned, code: str, where: str) -> None:
        """A definite refusal tells what the variable is: absent, present, or uninitialized."""
        possible = var.vals | var.zombies
        keep = {
            "NOT_FOUND": {v for v in possible if v == ABSENT},
            "ALREADY_EXISTS": {v for v in possible if v != ABSENT},
            "FAILED_PRECONDITION": {v for v in possible if v[0] == UNINIT_STAMP},
        }.get(code)
        if keep is None:
            return
        if not keep:
            self.violation("acked", f"{where}: {code}, but the variable may only be {sorted(possible)}")
            return
        var.vals = keep

    def _check_owned_read(self, var: Owned, obs: Obs | None, where: str) -> None:
        possible = var.vals | var.zombies
        if obs is None:
            self.violation("errors", f"{where}: read gave no value")
            return
        if obs.uniform:
            seen = (obs.stamp, obs.length)
            if seen not in possible:
                self.violation(
                    "acked",
                    f"{where}: read {_show(seen)}, but the variable may only hold {_show_all(possible)}",
                )
            var.vals, var.torn = {seen}, False
            return
        stamps = {s for s, _n in possible if s >= 0}
        if not var.torn:
            self.violation(
                "torn", f"{where}: read {obs.count} stamps {obs.distinct} (only locked writes since)"
            )
        elif not set(obs.distinct) <= stamps:
            self.violation(
                "acked", f"{where}: torn read {obs.distinct} holds stamps never possible {sorted(stamps)}"
            )

    def _check_owned_info(self, var: Owned, result: Any, where: str) -> None:
        if not (isinstance(result, list) and result and result[0] == "i"):
            return
        _tag, initialized, shape, _version = result
        length = shape[0] if shape else None
        matching = {
            v
            for v in var.vals | var.zombies
            if v != ABSENT and (v[0] >= 0) == initialized and (length is None or v[1] == length)
        }
        if not matching:
            self.violation(
                "acked",
                f"{where}: info says initialized={initialized} shape={shape}, "
                f"but the variable may only be {_show_all(var.vals | var.zombies)}",
            )
            if not initialized and length is not None:
                var.vals = {(UNINIT_STAMP, length)}  # judge what follows from what is there now
            return
        var.vals = matching

    def _check_list(self, slot: int, prefix: str, result: Any, where: str) -> None:
        if not (isinstance(result, list) and result and result[0] == "l"):
            return
        names = set(result[1])
        if prefix == f"eph{slot}/":
            for i in range(self.layout.ephemerals):
                var = self.owned[self.layout.ephemeral(slot, i)]
                listed = var.name in names
                keep = {v for v in var.vals | var.zombies if (v != ABSENT) == listed}
                if not keep:
                    self.violation(
                        "acked", f"{where}: {var.name} listed={listed}, but may only be {var.vals}"
                    )
                else:
                    var.vals = keep
        else:
            missing = sorted(n for n in self.fixed if n.startswith(prefix) and n not in names)
            if missing:
                self.violation("acked", f"{where}: list('{prefix}') misses {missing[:5]}")

    def _settle_counter(self, name: str, sub: list[Any], outcome: str, result: Any, where: str) -> None:
        state = self.counters[name]
        if sub[0] == "add":
            state.pending -= 1
            if outcome == "ok":
                state.ok += 1
            elif outcome == "killed":
                state.killed += 1
            elif outcome in ("unknown", "zombie"):
                state.unknown += 1
            else:
                state.failed += 1
                if outcome != "RESOURCE_EXHAUSTED":
                    self.violation("acked", f"{where}: {outcome} for a counter that always exists")
        elif outcome in ("NOT_FOUND", "FAILED_PRECONDITION"):
            self.violation("acked", f"{where}: {outcome} for a counter that always exists")
        obs = _obs(result)
        if obs is not None and not obs.uniform:
            self.violation("torn", f"{where}: counter shows {obs.count} values {obs.distinct}")

    def _check_foreign(self, var: Owned, obs: Obs | None, where: str) -> None:
        """Another slot's variable: uniform if only locked writes reach it; every stamp one its owner sent."""
        if obs is None:
            return
        if not var.name.endswith("/mixed") and not obs.uniform:
            self.violation("torn", f"{where}: {obs.count} stamps {obs.distinct} in a locked-only variable")
        owner = owner_of(var.name)
        if any(s != 0 and stamp_slot(s) != owner for s in obs.distinct):
            self.violation("acked", f"{where}: stamps {obs.distinct} of another writer than slot {owner}")

        def check() -> None:
            if not set(obs.distinct) <= var.sent:
                self.violation("acked", f"{where}: stamps {obs.distinct} that slot {owner} never wrote")

        self._defer(check)

    def _check_member(self, name: str, sub: list[Any], obs: Obs | None, where: str) -> None:
        if obs is None:
            return
        if not obs.uniform:
            self.violation("torn", f"{where}: group member shows stamps {obs.distinct}")
            return
        if sub[0] == "assign" and obs.stamp != sub[2]:
            self.violation("atomic", f"{where}: the batch's assign returned {obs.stamp}, not {sub[2]}")
        group = self.group_of[name]

        def check() -> None:
            if obs.stamp not in self.group_stamps[group]:
                self.violation("acked", f"{where}: stamp {obs.stamp} was never written to group {group}")

        self._defer(check)

    def _check_atomic_read(self, where: str, subs: list[list[Any]], results: list[Any]) -> None:
        """In an atomic batch every read of a group member shows one and the same stamp."""
        by_group: dict[int, set[int]] = {}
        written: dict[int, int] = {}
        for sub, result in zip(subs, results, strict=True):
            group = self.group_of.get(sub[1])
            if group is None:
                continue
            if sub[0] == "assign":
                written[group] = sub[2]
            obs = _obs(result)
            if sub[0] == "read" and obs is not None and obs.uniform:
                by_group.setdefault(group, set()).add(obs.stamp)
        for group, stamps in by_group.items():
            expected = {written[group]} if group in written else stamps
            if len(stamps) != 1 or stamps != expected:
                self.violation(
                    "atomic", f"{where}: an atomic batch saw group {group} with stamps {sorted(stamps)}"
                )

    # ---- checks of the whole state (the parent's own reads) ------------------------------------

    def snapshot(self) -> tuple[dict[str, int], dict[str, tuple[set[Val], int]]]:
        """Before the parent reads: acknowledged adds per counter, and what each owned variable may hold."""
        acked = {name: state.ok for name, state in self.counters.items()}
        owned = {name: (var.possible(), len(var.attempts)) for name, var in self.owned.items()}
        return acked, owned

    def check_counter(self, name: str, acked_before: int, obs: Obs, final: bool, where: str) -> None:
        """After the parent read counter `name` (and polled): acked before ≤ value ≤ attempted after."""
        state = self.counters[name]
        if not obs.uniform:
            self.violation("torn", f"{where}: counter {name} shows {obs.count} values {obs.distinct}")
            return
        upper = state.upper(self.exact)
        value = obs.stamp
        if not acked_before <= value <= upper:
            self.violation(
                "counts",
                f"{where}: counter {name} = {value}, outside "
                f"[{acked_before} acknowledged, {upper} attempted] "
                f"(ok {state.ok}, unknown {state.unknown}, killed {state.killed}, in flight {state.pending}, "
                f"refused {state.failed})",
            )
        if final and self.exact and value != state.ok and state.killed == 0:
            self.violation(
                "counts", f"{where}: counter {name} = {value} != {state.ok} acknowledged (exactly-once)"
            )

    def check_owned_value(self, name: str, before: tuple[set[Val], int], seen: Val | Obs, where: str) -> None:
        """The parent's read of an owned variable: one of the values possible before, or sent meanwhile."""
        possible, index = before
        var = self.owned[name]
        allowed = possible | set(var.attempts[index:])
        if isinstance(seen, Obs):
            if not seen.uniform:
                if var.torn:
                    stamps = {s for s, _n in allowed if s >= 0}
                    if not set(seen.distinct) <= stamps:
                        self.violation(
                            "acked", f"{where}: {name} holds stamps {seen.distinct} never possible"
                        )
                    return
                self.violation("torn", f"{where}: {name} shows {seen.count} stamps {seen.distinct}")
                return
            seen = (seen.stamp, seen.length)
        if seen not in allowed:
            self.violation(
                "acked", f"{where}: {name} holds {_show(seen)}, but may only hold {_show_all(allowed)}"
            )

    def check_group(self, group: int, observed: Iterable[Obs], where: str) -> None:
        stamps = set()
        for obs in observed:
            if not obs.uniform:
                self.violation("torn", f"{where}: a member of group {group} shows stamps {obs.distinct}")
                return
            stamps.add(obs.stamp)
        if len(stamps) != 1:
            self.violation("atomic", f"{where}: group {group} shows stamps {sorted(stamps)} at once")
        elif not stamps <= self.group_stamps[group]:
            self.violation("acked", f"{where}: group {group} holds stamp {stamps} that nobody wrote")


def _show(value: Val) -> str:
    stamp, length = value
    if stamp == ABSENT_STAMP:
        return "absent"
    if stamp == UNINIT_STAMP:
        return f"uninitialized[{length}]"
    return f"{stamp:#x}[{length}]"


def _show_all(values: Iterable[Val]) -> str:
    return "{" + ", ".join(_show(v) for v in sorted(values)) + "}"


def obs_of(value: Any) -> Obs:
    """The parent's own reads, summarised as the clients log them."""
    from chaos_client import observe

    result = observe(value)
    return Obs(result[1], result[2], result[3])


def exactly_once(client: Any) -> bool:
    """Whether the client retries writes with request ids (issue 10's exactly-once writes).

    The chaos checks turn exact when it does: a client that exposes `exactly_once_writes = True` (or a
    server whose ServerInfo lists "request_ids" among its `capabilities`) must never leave a write's outcome
    unknown, so counters must then equal their acknowledged adds unless a SIGKILLed caller had one in flight.
    """
    if getattr(client, "exactly_once_writes", False) is True:
        return True
    try:
        capabilities = getattr(client.server_info(), "capabilities", ())
    except Exception:
        return False
    return "request_ids" in capabilities


def env_seconds(default: float = 600.0) -> float:
    return float(os.environ.get("TENSORPS_CHAOS_SECONDS") or default)
