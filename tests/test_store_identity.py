"""A store's identity (issue 10, defect 2): a process that outlives its store gets "the store was removed"
and never touches a new store made at the same path."""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Callable

import numpy as np
import pytest

from support import ServerProcess, fresh_store_path, remove_store
from tensorps.client import Client, UnavailableError
from tensorps.client.codec import dtype_of
from tensorps.server.store import Descriptor, Store, StoreGoneError

F32 = dtype_of("float32")


def _files(path: str) -> set[tuple[str, int]]:
    return {(name, os.stat(os.path.join(path, name)).st_ino) for name in os.listdir(path)}


def test_shm_client_outliving_its_server_gets_unavailable_and_spares_the_next_server() -> None:
    """A shm:// client whose server stopped: every call is UNAVAILABLE, and the next server is untouched."""
    first = ServerProcess()
    old = Client(f"shm://{first.store}")
    try:
        old.create("a", value=np.zeros(4, np.float32))
        old.assign("a", np.ones(4, np.float32))
        assert first.stop() == 0
        with ServerProcess(store=first.store, port=first.port) as second, Client(second.address) as ps:
            ps.create("n0", value=np.zeros(4, np.float32))
            before = _files(second.store)
            calls: list[Callable[[], object]] = [
                lambda: old.assign("a", np.full(4, 2.0, np.float32)),
                lambda: old.assign("a", np.full(4, 2.0, np.float32), use_locking=False),
                lambda: old.assign_add("a", np.ones(4, np.float32)),
                lambda: old.read("a"),
                lambda: old.info("a"),
                lambda: old.create("b", value=np.zeros(4, np.float32)),
                lambda: old.create("c", dtype="float32"),
                lambda: old.delete("a"),
                old.list,
                lambda: old.assign_many({"a": np.ones(4, np.float32)}, atomic=True),
            ]
            for call in calls:
                with pytest.raises(UnavailableError, match="the store was removed"):
                    call()
            assert _files(second.store) == before, "the old client touched the new store's files"
            for i in range(1, 8):  # the counter that once collided with the ghost store's segment ids
                ps.create(f"n{i}", value=np.full(4, i, np.float32))
            assert sorted(v.name for v in ps.list()) == [f"n{i}" for i in range(8)]
            np.testing.assert_array_equal(ps.read("n7"), np.full(4, 7, np.float32))
    finally:
        old.close()
        first.kill()


def test_server_serving_a_store_another_server_removed_answers_unavailable() -> None:
    """A server attached to a store whose creator stopped (and removed it) answers UNAVAILABLE."""
    with ServerProcess() as first:
        second = ServerProcess(store=first.store)
        try:
            with Client(second.address) as ps:
                ps.create("x", value=np.zeros(4, np.float32))
                assert first.stop() == 0
                with pytest.raises(UnavailableError, match="the store was removed"):
                    ps.assign("x", np.ones(4, np.float32))
        finally:
            second.stop()


def test_handle_on_a_store_removed_by_hand_never_touches_the_new_one() -> None:
    """A store removed by `rm -r` (no removal byte) and made again: the old handle's lookups that miss,
    segment allocations, lock files and periodic checks all say StoreGoneError, and it creates nothing."""
    path = fresh_store_path()
    old = Store.open(path, max_total_bytes=1 << 20)
    new: Store | None = None
    try:
        slot = old.insert("a", Descriptor(F32.code, False, (4,), 0, 0))
        shutil.rmtree(path)
        new = Store.open(path, max_total_bytes=1 << 20)
        new.insert("b", Descriptor(F32.code, False, (4,), 0, 0))
        before = _files(path)
        with pytest.raises(StoreGoneError):
            old.find("missing")
        with pytest.raises(StoreGoneError):
            old.insert("c", Descriptor(F32.code, False, (4,), 0, 0))
        with pytest.raises(StoreGoneError):
            old.spare_segment(slot, 16)
        failures: list[BaseException] = []

        def take_a_lock_in_a_new_thread() -> None:
            try:
                old.locks.acquire(0, exclusive=True)
            except StoreGoneError as exc:
                failures.append(exc)

        thread = threading.Thread(target=take_a_lock_in_a_new_thread)
        thread.start()
        thread.join()
        assert len(failures) == 1, "a new thread's lock descriptor must not open the new store's lock file"
        assert old.find("a") == slot  # cached: no system call until the periodic check comes due...
        old._next_check = 0.0  # ...which it does now
        with pytest.raises(StoreGoneError):
            old.find("a")
        assert _files(path) == before
        assert new.names() == ["b"]
    finally:
        old.close()
        if new is not None:
            new.destroy()
        remove_store(path)
