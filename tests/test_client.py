"""The client's own contract over both transports: one validation path, usage errors, lossless conversion,
its dtype cache, credentials, deadlines and retries."""

from __future__ import annotations

import numpy as np
import pytest

from tensorps.client import Client, InvalidArgumentError, NotFoundError

# ---- one validation path for both transports ---------------------------------------------------


def _bool_bytes(*raw: int) -> np.ndarray:  # type: ignore[type-arg]
    return np.array(raw, np.uint8).view(np.bool_)


def test_bool_bytes_other_than_0_and_1_are_refused(ps: Client, name: str) -> None:
    """A bool array holding byte 2 is refused by create and every write, over gRPC and shm:// alike."""
    bad = _bool_bytes(1, 2, 0)
    with pytest.raises(InvalidArgumentError, match=r"byte 2 at element \[1\]"):
        ps.create(name, value=bad)
    with pytest.raises(NotFoundError):
        ps.info(name)
    ps.create(name, value=np.array([True, False, True]))
    for use_locking in (True, False):
        with pytest.raises(InvalidArgumentError, match=r"byte 2 at element \[1\]"):
            ps.assign(name, bad, use_locking=use_locking)
        with pytest.raises(InvalidArgumentError):
            ps.assign(name, _bool_bytes(7, 0, 0), validate_shape=False, use_locking=use_locking)
    assert ps.info(name).version == 1
    assert ps.read(name).tolist() == [True, False, True]


def test_streamed_bool_values_are_checked_too(ps: Client, name: str) -> None:
    """A bool value large enough to be streamed is checked as a small one is."""
    raw = np.zeros(5 << 20, np.uint8)
    raw[-1] = 3
    with pytest.raises(InvalidArgumentError, match=rf"byte 3 at element \[{raw.size - 1}\]"):
        ps.create(name, value=raw.view(np.bool_))
    ps.create(name, value=np.zeros(raw.size, np.bool_))
    with pytest.raises(InvalidArgumentError, match="byte 3"):
        ps.assign(name, raw.view(np.bool_))
    assert not ps.read(name).any()
