"""The shared-memory store on its own: table, index, segments and budget (no server, real tmpfs files)."""

from __future__ import annotations

import os
import random
from collections.abc import Iterator

import pytest

from support import fresh_store_path
from tensorps.client.codec import dtype_of
from tensorps.server.store import Descriptor, Store, StoreFullError

F32 = dtype_of("float32").code


@pytest.fixture
def store() -> Iterator[Store]:
    s = Store.open(fresh_store_path(), max_variables=256, max_total_bytes=1 << 20)
    yield s
    s.destroy()


def declared(shape: tuple[int, ...] = (4,)) -> Descriptor:
    return Descriptor(F32, False, shape, 0, 0)


def test_insert_find_delete_keep_names_and_index_consistent(store: Store) -> None:
    """Random inserts and deletes (with probe collisions and tombstones): find and names agree with a set."""
    rng = random.Random(7)
    live: set[str] = set()
    for step in range(2000):
        name = f"v{rng.randrange(300)}"
        if name in live and rng.random() < 0.5:
            slot = store.find(name)
            assert slot is not None
            store.delete_slot(slot)
            live.discard(name)
        elif name not in live and len(live) < 256:
            store.insert(name, declared())
            live.add(name)
        if step % 97 == 0:
            assert store.names() == sorted(live)
            assert store.variable_count == len(live)
    for name in live:
        assert store.find(name) is not None
    assert store.find("absent") is None


def test_a_second_handle_sees_the_first_ones_changes(store: Store) -> None:
    """Two handles on one store (as two processes have) see each other's inserts and deletes."""
    other = Store.open(store.path)
    try:
        assert not other.created
        slot = store.insert("x", declared())
        assert other.find("x") == slot
        store.delete_slot(slot)
        assert other.find("x") is None
        other.insert("y", declared())
        assert store.names() == ["y"]
    finally:
        other.close()


def test_variable_limit(store: Store) -> None:
    """Beyond max_variables, insert raises StoreFullError and changes nothing."""
    for i in range(256):
        store.insert(f"n{i}", declared())
    with pytest.raises(StoreFullError):
        store.insert("one-too-many", declared())
    assert store.variable_count == 256


def test_budget_counts_segments_and_refuses_beyond_it(store: Store) -> None:
    """Segments count against the byte budget; a refused allocation leaves the count unchanged."""
    slot = store.insert("big", declared((1 << 18,)))
    store.spare_segment(slot, 1 << 20)
    assert store.used_bytes == 1 << 20
    other = store.insert("more", declared((1,)))
    with pytest.raises(StoreFullError, match="budget"):
        store.spare_segment(other, 4)
    assert store.used_bytes == 1 << 20
    store.delete_slot(slot)
    assert store.used_bytes == 0
    assert [f for f in os.listdir(store.path) if f.startswith("seg-")] == []


def test_listing_reads_only_the_dense_index(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """names() reads one slot per variable through the dense index, never the whole sparse table."""
    big = Store.open(fresh_store_path(), max_variables=65536)
    try:
        for i in range(10):
            big.insert(f"w{i}", declared())
        read: list[int] = []
        original = big._read_slot_head

        def counted(slot: int) -> tuple[int, int, str]:
            read.append(slot)
            return original(slot)

        monkeypatch.setattr(big, "_read_slot_head", counted)
        assert len(big.names()) == 10
        assert len(read) == 10  # of 131072 slots
    finally:
        big.destroy()


def test_the_table_is_reserved_when_the_store_is_created(store: Store) -> None:
    """Every page of the meta file is allocated at creation: touching one later can never SIGBUS."""
    st = os.stat(os.path.join(store.path, "meta"))
    assert st.st_blocks * 512 >= st.st_size


def test_churn_does_not_fill_the_table_with_tombstones(store: Store) -> None:
    """Creating and deleting many distinct names keeps empty slots, so missing-name lookups stay short."""
    for i in range(5000):
        store.delete_slot(store.insert(f"churn{i}", declared()))
    states = [store._meta[store._slot_offset(s) + 4] for s in range(store.capacity)]
    assert states.count(0) == store.capacity  # every tombstone reclaimed (no neighbours kept them alive)
    assert store.find("never-created") is None
