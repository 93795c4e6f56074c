"""The store at model scale: tens of thousands of variables under the common `ulimit -n 1024`."""

from __future__ import annotations

import numpy as np

from support import ServerProcess
from tensorps.client import Client


def _sizes(count: int, big: int) -> list[int]:
    """Mostly small tensors (1 to 1024 float32 elements), plus `big` of up to 4 MiB."""
    rng = np.random.default_rng(11)
    small = [int(n) for n in rng.integers(1, 1025, count - big)]
    return small + [int(n) for n in rng.integers(1 << 18, (1 << 20) + 1, big)]


def test_twenty_thousand_variables_under_ulimit_1024() -> None:
    """20,000 variables of 4 B to 4 MiB, created, written with locked assigns, listed and pulled, by a
    server limited to 1024 open files (each mapping used to keep a descriptor)."""
    sizes = _sizes(20_000, 40)
    names = [f"model/layer{i // 100}/v{i}" for i in range(len(sizes))]
    with (
        ServerProcess("--workers", "1", open_files=1024) as server,
        Client(server.address, timeout=300) as ps,
    ):
        ps.create_many({n: {"dtype": "float32", "shape": (s,)} for n, s in zip(names, sizes, strict=True)})
        for start in range(0, len(names), 5000):
            chunk = names[start : start + 5000]
            values = {
                n: np.full(s, i, np.float32)
                for i, (n, s) in enumerate(zip(chunk, sizes[start:], strict=False))
            }
            infos = ps.assign_many(values, use_locking=True)
            assert all(info.version == 1 for info in infos.values())
        assert len(ps.list(prefix="model/")) == len(names)
        pulled = ps.read_many(prefix="model/")
        assert len(pulled) == len(names)
        for start in range(0, len(names), 5000):
            for i, name in enumerate(names[start : start + 5000]):
                value = pulled[name]
                assert value.shape == (sizes[start + i],) and value[0] == i and value[-1] == i
        assert ps.read_many(names[:3]).keys() == set(names[:3])
    assert not [line for line in server.log if "Too many open files" in line]
