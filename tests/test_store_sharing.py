"""Several server processes over one store: shared variables, clean removal, large tensors."""

from __future__ import annotations

import os

import numpy as np
import pytest

from support import ServerProcess
from tensorps.client import Client, InvalidArgumentError


def test_two_servers_on_two_ports_share_one_store() -> None:
    """A second server attached with the same --store sees the first's writes, and the other way round."""
    with (
        ServerProcess(workers=1) as first,
        ServerProcess("--stripes", "8", workers=1, store=first.store) as second,
    ):
        assert any("attached to store" in line for line in second.log)
        assert any("the existing store keeps --stripes 64 (not 8)" in line for line in second.log)
        with Client(first.address) as a, Client(second.address) as b:
            a.create("shared", value=np.arange(5, dtype=np.int32))
            np.testing.assert_array_equal(b.read("shared"), np.arange(5))
            b.assign_add("shared", np.ones(5, np.int32), use_locking=True)
            np.testing.assert_array_equal(a.read("shared"), np.arange(1, 6))
            b.delete("shared")
            assert a.list() == []
        second.stop()
        assert os.path.exists(first.store), "a server that only attached must leave the store"
    assert not os.path.exists(first.store), "the server that created the store removes it"


def test_keep_store_leaves_the_variables_for_the_next_server() -> None:
    """--keep-store leaves the store on shutdown; a new server on it serves the same variables."""
    with ServerProcess("--keep-store") as first, Client(first.address) as ps:
        ps.create("kept", value=np.full(3, 7, np.int64))
    try:
        assert os.path.exists(first.store)
        with ServerProcess(store=first.store) as second, Client(second.address) as ps:
            np.testing.assert_array_equal(ps.read("kept"), [7, 7, 7])
    finally:
        from support import remove_store

        remove_store(first.store)


def test_one_gib_round_trip(server: ServerProcess, name: str) -> None:
    """A 1 GiB float32 tensor goes in and comes out intact through the chunked streams."""
    count = 1 << 28
    value = np.arange(count, dtype=np.float32)
    with Client(server.address, timeout=300) as ps:
        ps.create(name, dtype="float32", shape=(count,))
        info = ps.assign(name, value, read_value=False)
        assert info.version == 1
        out = ps.read(name)
        assert out.shape == (count,)
        assert np.array_equal(out, value)
        del out
        ps.delete(name)


def test_read_follows_a_variable_that_grew_elsewhere(server: ServerProcess, name: str) -> None:
    """A client that last saw a small variable still reads it after another client made it 80 MiB."""
    with Client(server.address, timeout=60) as a, Client(server.address, timeout=60) as b:
        a.create(name, value=np.zeros(4, np.float32))
        assert a.read(name).shape == (4,)
        big = np.arange(20 << 20, dtype=np.float32)
        b.assign(name, big, validate_shape=False, read_value=False)
        assert np.array_equal(a.read(name), big)


def test_large_initial_value_is_created_atomically(server: ServerProcess, name: str) -> None:
    """A create with a streamed 80 MiB value is one operation: version 1; a second create changes nothing."""
    from tensorps.client import AlreadyExistsError

    big = np.arange(20 << 20, dtype=np.float32)
    with Client(server.address, timeout=60) as ps:
        info = ps.create(name, value=big)
        assert info.initialized and info.version == 1 and info.shape == big.shape
        with pytest.raises(AlreadyExistsError):
            ps.create(name, value=np.zeros(20 << 20, np.float32))
        assert ps.info(name).version == 1
        assert np.array_equal(ps.read(name), big)
        with pytest.raises(InvalidArgumentError):
            ps.create(f"{name}.x", shape=(2,), value=big)
