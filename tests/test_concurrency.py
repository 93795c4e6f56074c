"""TensorFlow's concurrency cases (assign_op_test.py) against a real server over gRPC."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from support import ServerProcess
from tensorps.client import Client

SHAPE = (1024, 1024)


def test_20_locked_assign_adds_of_ones_give_exactly_20(server: ServerProcess, name: str) -> None:
    """20 threads doing locked AssignAdd of ones on a [1024,1024] float32 variable lose no update."""
    with Client(server.address, channels=4) as ps:
        ps.create(name, value=np.zeros(SHAPE, np.float32))
        ones = np.ones(SHAPE, np.float32)
        with ThreadPoolExecutor(20) as pool:
            list(pool.map(lambda _: ps.assign_add(name, ones, use_locking=True, read_value=False), range(20)))
        np.testing.assert_array_equal(ps.read(name), np.full(SHAPE, 20, np.float32))
        assert ps.info(name).version == 21


def test_20_locked_assigns_leave_a_uniform_value(server: ServerProcess, name: str) -> None:
    """20 threads of locked Assign of ones*i: the result is one of them entirely; each call gets its own."""
    with Client(server.address, channels=4) as ps:
        ps.create(name, value=np.zeros(SHAPE, np.float32))

        def assign(i: int) -> bool:
            out = ps.assign(name, np.full(SHAPE, i, np.float32))
            return bool(np.all(out == i))

        with ThreadPoolExecutor(20) as pool:
            assert all(pool.map(assign, range(1, 21)))
        final = ps.read(name)
        assert final.min() == final.max()
        assert 1 <= final[0, 0] <= 20


def test_20_unlocked_assigns_stay_in_range(server: ServerProcess, name: str) -> None:
    """Unlocked concurrent Assigns may interleave elements, but every element is one of the values written."""
    with Client(server.address, channels=4) as ps:
        ps.create(name, value=np.zeros(SHAPE, np.float32))
        with ThreadPoolExecutor(20) as pool:
            list(
                pool.map(
                    lambda i: ps.assign(
                        name, np.full(SHAPE, i, np.float32), use_locking=False, read_value=False
                    ),
                    range(1, 21),
                )
            )
        final = ps.read(name)
        assert final.min() >= 1 and final.max() <= 20
        assert np.all(final == np.round(final))
        assert ps.info(name).shape == SHAPE


def test_20_unlocked_assign_adds_stay_in_range(server: ServerProcess, name: str) -> None:
    """Unlocked AssignAdds may lose updates (TF: undefined) but never exceed the total or change the shape."""
    with Client(server.address, channels=4) as ps:
        ps.create(name, value=np.zeros(SHAPE, np.float32))
        ones = np.ones(SHAPE, np.float32)
        with ThreadPoolExecutor(20) as pool:
            list(pool.map(lambda _: ps.assign_add(name, ones, read_value=False), range(20)))
        final = ps.read(name)
        assert final.min() >= 1 and final.max() <= 20
        assert ps.info(name).version == 21


def test_locked_reads_never_see_a_torn_write(server: ServerProcess, name: str) -> None:
    """Readers racing locked writers always see one complete written value."""
    with Client(server.address, channels=4) as ps:
        ps.create(name, value=np.zeros(SHAPE, np.float32))

        def write(i: int) -> None:
            ps.assign(name, np.full(SHAPE, i, np.float32), read_value=False)

        def read(_: int) -> bool:
            value = ps.read(name)
            return bool(value.min() == value.max())

        with ThreadPoolExecutor(8) as pool:
            writes = pool.map(write, range(1, 41))
            reads = pool.map(read, range(40))
            list(writes)
            assert all(reads)


def test_writes_to_other_variables_run_concurrently(server: ServerProcess, name: str) -> None:
    """Many variables written from many threads each end with their own last value."""
    with Client(server.address, channels=4) as ps:
        names = [f"{name}/{i}" for i in range(32)]
        for n in names:
            ps.create(n, dtype="int64", shape=(256,))

        def work(i: int) -> None:
            for step in range(10):
                ps.assign(names[i], np.full(256, i * 100 + step, np.int64), read_value=False)

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(work, range(len(names))))
        for i, n in enumerate(names):
            np.testing.assert_array_equal(ps.read(n), np.full(256, i * 100 + 9))


def test_local_and_remote_clients_share_locks_and_values(server: ServerProcess, name: str) -> None:
    """Locked adds from shm:// clients and gRPC clients interleave without losing one; each sees the other."""
    with Client(server.address, channels=4) as remote, Client(f"shm://{server.store}") as local:
        local.create(name, value=np.zeros(SHAPE, np.float32))
        np.testing.assert_array_equal(remote.read(name), np.zeros(SHAPE))
        ones = np.ones(SHAPE, np.float32)

        def add(i: int) -> None:
            client = local if i % 2 else remote
            client.assign_add(name, ones, use_locking=True, read_value=False)

        with ThreadPoolExecutor(20) as pool:
            list(pool.map(add, range(20)))
        np.testing.assert_array_equal(local.read(name), np.full(SHAPE, 20, np.float32))
        np.testing.assert_array_equal(remote.read(name), np.full(SHAPE, 20, np.float32))


def test_shm_client_of_a_missing_store_is_not_found() -> None:
    """Client("shm://...") of a directory without a store fails with NotFoundError."""
    from tensorps.client import NotFoundError

    with pytest.raises(NotFoundError):
        Client("shm:///dev/shm/tensorps-test-does-not-exist")
