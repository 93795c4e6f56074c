"""The chaos suite's judge (tests/chaos_model.py) on hand-written logs: it flags what it must, only that."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from chaos_client import Layout
from chaos_model import Model, Obs

LAYOUT = Layout(slots=[1, 2])
S1 = (1 << 40) | 1  # stamps of slot 1
S2 = (1 << 40) | 2
SMALL = LAYOUT.small


class Log:
    """Records of one client slot, written as chaos_client.py writes them."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.ids = 0
        self.write({"t": "start", "inc": 0, "pid": 1})

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")

    def op(self, *ops: list[Any], batch: str | None = None, atomic: bool = False) -> int:
        self.ids += 1
        record: dict[str, Any] = {"t": "op", "id": self.ids, "ops": list(ops)}
        if batch:
            record |= {"batch": batch, "atomic": atomic}
        self.write(record)
        return self.ids

    def ok(self, *results: Any) -> None:
        self.write({"t": "ok", "id": self.ids, "res": list(results)})

    def err(self, code: str, msg: str = "") -> None:
        self.write({"t": "err", "id": self.ids, "code": code, "msg": msg})


def value(stamp: int, length: int = SMALL, *others: int) -> list[Any]:
    distinct = sorted({stamp, *others})
    return ["v", [length], distinct, len(distinct)]


@pytest.fixture
def logs(tmp_path: Path) -> tuple[Model, Log, Log]:
    paths = {1: str(tmp_path / "1.log"), 2: str(tmp_path / "2.log")}
    one, two = Log(Path(paths[1])), Log(Path(paths[2]))
    return Model(LAYOUT, paths, exact=False, note=lambda text: None), one, two


def flagged(model: Model) -> dict[str, list[str]]:
    model.finish()
    return {c: v for c, v in model.violations.items() if v}


def test_a_clean_history_is_clean(logs: tuple[Model, Log, Log]) -> None:
    model, one, two = logs
    one.op(["assign", "own1/locked", S1, SMALL, True])
    one.ok(["i", True, [SMALL], 2])
    one.op(["read", "own1/locked"])
    one.ok(value(S1))
    two.op(["read", "own1/locked"])
    two.ok(value(S1))
    one.op(["add", "ctr/0", 1])
    one.ok(value(1))
    assert flagged(model) == {}
    assert model.counters["ctr/0"].ok == 1


def test_a_lost_acknowledged_write_is_flagged(logs: tuple[Model, Log, Log]) -> None:
    model, one, _two = logs
    one.op(["assign", "own1/mixed", S1, SMALL, True])
    one.ok(["i", True, [SMALL], 2])
    one.op(["read", "own1/mixed"])
    one.ok(value(0))
    assert list(flagged(model)) == ["acked"]


def test_an_unknown_write_may_or_may_not_have_landed(logs: tuple[Model, Log, Log]) -> None:
    model, one, _two = logs
    one.op(["assign", "own1/locked", S1, SMALL, True])
    one.err("UNAVAILABLE")
    one.op(["read", "own1/locked"])
    one.ok(value(0))
    one.op(["assign", "own1/mixed", S2, SMALL, True])
    one.err("UNAVAILABLE")
    one.op(["read", "own1/mixed"])
    one.ok(value(S2))
    assert flagged(model) == {}


def test_two_stamps_are_torn_unless_an_unlocked_write_was_cut_short(logs: tuple[Model, Log, Log]) -> None:
    model, one, _two = logs
    one.op(["assign", "own1/mixed", S1, SMALL, False])
    one.write({"t": "start", "inc": 1, "pid": 2})  # killed mid-write: the copy may have stopped anywhere
    one.op(["read", "own1/mixed"])
    one.ok(value(0, SMALL, S1))
    assert flagged(model) == {}
    one.op(["assign", "own1/locked", S2, SMALL, True])
    one.write({"t": "start", "inc": 2, "pid": 3})
    one.op(["read", "own1/locked"])
    one.ok(value(0, SMALL, S2))
    assert list(flagged(model)) == ["torn"]


def test_a_counter_outside_its_bounds_is_flagged(logs: tuple[Model, Log, Log]) -> None:
    model, one, two = logs
    for version in range(2, 5):
        one.op(["add", "ctr/1", 1])
        one.ok(["i", True, [SMALL], version])
    two.op(["add", "ctr/1", 1])
    two.err("UNAVAILABLE")
    model.poll()
    state = model.counters["ctr/1"]
    assert (state.ok, state.unknown) == (3, 1)
    model.check_counter("ctr/1", 3, Obs([SMALL], [4], 1), True, "test")
    model.check_counter("ctr/1", 3, Obs([SMALL], [3], 1), True, "test")
    assert flagged(model) == {}
    model.check_counter("ctr/1", 3, Obs([SMALL], [2], 1), True, "test")
    model.check_counter("ctr/1", 3, Obs([SMALL], [5], 1), True, "test")
    assert len(flagged(model)["counts"]) == 2


def test_exactly_once_writes_make_counts_exact(logs: tuple[Model, Log, Log]) -> None:
    model, one, _two = logs
    model.exact = True
    one.op(["add", "ctr/2", 1])
    one.ok(["i", True, [SMALL], 2])
    one.op(["add", "ctr/2", 1])
    one.err("UNAVAILABLE")  # with request ids the client must have retried this to a definite answer
    model.poll()
    model.check_counter("ctr/2", 1, Obs([SMALL], [2], 1), True, "test")
    found = flagged(model)
    assert list(found) == ["counts"]
    assert [m.split(": ", 1)[1][:20] for m in found["counts"]] == [
        "a write's outcome le",  # an unknown outcome surfaced to the caller
        "counter ctr/2 = 2, o",  # above acknowledged + killed
        "counter ctr/2 = 2 !=",  # and not equal to the acknowledged adds
    ]


def test_an_atomic_read_of_two_batches_is_flagged(logs: tuple[Model, Log, Log]) -> None:
    model, one, two = logs
    members = LAYOUT.group(0)
    two.op(*[["assign", m, S2, SMALL, True] for m in members], batch="assign_many", atomic=True)
    two.ok(*[["i", True, [SMALL], 2] for _ in members])
    one.op(*[["read", m] for m in members], batch="pipeline", atomic=True)
    one.ok(*[value(S2 if i else 0) for i in range(len(members))])
    assert list(flagged(model)) == ["atomic"]


def test_a_stamp_nobody_wrote_is_flagged(logs: tuple[Model, Log, Log]) -> None:
    model, _one, two = logs
    two.op(["read", "own1/locked"])
    two.ok(value(S1))  # slot 1 never sent S1
    assert list(flagged(model)) == ["acked"]


def test_a_create_killed_half_way_must_not_leave_a_declared_variable(logs: tuple[Model, Log, Log]) -> None:
    """Creation with a value is atomic (README): after a kill the variable is absent or holds the value."""
    model, one, _two = logs
    one.op(["create", "eph1/0", S1, 16])
    one.write({"t": "start", "inc": 1, "pid": 2})
    one.op(["info", "eph1/0"])
    one.ok(["i", True, [16], 1])
    assert flagged(model) == {}
    one.op(["delete", "eph1/0"])
    one.ok(None)
    one.op(["create", "eph1/0", S2, 16])
    one.write({"t": "start", "inc": 2, "pid": 3})
    one.op(["info", "eph1/0"])
    one.ok(["i", False, [16], 0])
    assert list(flagged(model)) == ["acked"]


def test_versions_never_go_back(logs: tuple[Model, Log, Log]) -> None:
    model, one, _two = logs
    one.op(["info", "ctr/3"])
    one.ok(["i", True, [SMALL], 7])
    one.op(["add", "ctr/3", 1])
    one.ok(["i", True, [SMALL], 6])
    assert list(flagged(model)) == ["acked"]


def test_unexpected_errors_are_flagged(logs: tuple[Model, Log, Log]) -> None:
    model, one, _two = logs
    one.op(["read", "own1/locked"])
    one.err("INTERNAL", "boom")
    one.op(["read", "own1/big"])
    one.err("NOT_FOUND")
    assert sorted(flagged(model)) == ["acked", "errors"]
