"""Lock holders that stop or fork (DESIGN §5 locks): waits end at the call's deadline, children let go."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from support import ServerProcess, fresh_store_path
from tensorps.client import Client, DeadlineExceededError, TensorPSError
from tensorps.server.commits import orphans
from tensorps.server.locks import LockTimeout, stripe_of
from tensorps.server.store import Store

HOLDER = str(Path(__file__).with_name("lock_holder.py"))
STRIPES = 64  # the server's default


def _hold(store: str, name: str, mode: str = "hold") -> tuple[subprocess.Popen[str], list[str]]:
    """A same-host process holding `name`'s stripe, and the words of its "held ..." line."""
    holder = subprocess.Popen([sys.executable, HOLDER, mode, store, name], stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None
    words = holder.stdout.readline().split()
    assert words[:1] == ["held"], words
    return holder, words[1:]


def _end(process: subprocess.Popen[str]) -> None:
    process.send_signal(signal.SIGCONT)
    process.kill()
    process.communicate()


def test_acquire_with_a_timeout_raises_lock_timeout() -> None:
    """StripedLocks.acquire(timeout=...) gives up with LockTimeout while another descriptor holds the lock."""
    store = Store.open(fresh_store_path())
    holder = None
    try:
        holder, _ = _hold(store.path, "x")
        stripe = store.locks.stripe("x")
        started = time.monotonic()
        with pytest.raises(LockTimeout):
            store.locks.acquire(stripe, exclusive=False, timeout=0.3)
        assert 0.3 <= time.monotonic() - started < 1.5
        _end(holder)
        holder = None
        store.locks.acquire(stripe, exclusive=True, timeout=5)  # granted once the holder is gone
        store.locks.release(stripe)
    finally:
        if holder is not None:
            _end(holder)
        store.destroy()


@pytest.fixture
def one_worker() -> Iterator[ServerProcess]:
    """A server with one worker: every call and every health check shares its 16 threads."""
    with ServerProcess(workers=1) as server:
        yield server


def test_a_stopped_holder_costs_callers_their_deadline_not_a_thread(one_worker: ServerProcess) -> None:
    """A SIGSTOPped stripe holder: calls with a timeout get DEADLINE_EXCEEDED naming the variable, health
    still answers, other stripes still serve, and the stripe works again once the holder is gone."""
    server = one_worker
    assert stripe_of("x", STRIPES) != stripe_of("y", STRIPES)
    with Client(server.address, timeout=10) as ps:
        ps.create("x", value=np.zeros(4, np.float32))
        ps.create("y", value=np.zeros(4, np.float32))
    holder, _ = _hold(server.store, "x")
    try:
        holder.send_signal(signal.SIGSTOP)
        started = time.monotonic()
        with Client(server.address, timeout=3) as ps, pytest.raises(DeadlineExceededError) as raised:
            ps.assign("x", np.ones(4, np.float32))
        assert "timed out waiting for the lock of variable 'x'" in str(raised.value)
        assert time.monotonic() - started < 6
        errors: list[BaseException] = []

        def call(write: bool) -> None:
            with Client(server.address, timeout=2) as client:
                try:
                    if write:
                        client.assign("x", np.ones(4, np.float32))
                    else:
                        client.read("x")
                except TensorPSError as exc:
                    errors.append(exc)

        # Two waves of 12 callers: more than the worker's 16 threads in all, so with unbounded waits the
        # second wave (and health) would find every thread parked.
        for _wave in range(2):
            callers = [threading.Thread(target=call, args=(i % 2 == 0,)) for i in range(12)]
            for caller in callers:
                caller.start()
            for caller in callers:
                caller.join(30)
        # On a loaded machine a few may miss the server's answer and see their own timer's instead.
        assert len(errors) == 24 and all(isinstance(e, DeadlineExceededError) for e in errors), errors
        assert server.healthy()
        with Client(server.address, timeout=5) as ps:
            ps.assign("y", np.ones(4, np.float32))
            np.testing.assert_array_equal(ps.read("y"), np.ones(4))
    finally:
        _end(holder)
    with Client(server.address, timeout=10) as ps:
        np.testing.assert_array_equal(ps.assign("x", np.full(4, 2, np.float32)), np.full(4, 2))


def test_a_forked_child_does_not_keep_a_dead_holders_stripe(one_worker: ServerProcess) -> None:
    """A same-host process forks (a data loader, say) while holding locks, then dies: they are all free."""
    server = one_worker
    with Client(server.address, timeout=10) as ps:
        ps.create("x", value=np.zeros(4, np.float32))
    holder, words = _hold(server.store, "x", mode="fork")
    child, record = int(words[0]), words[1]
    try:
        holder.kill()
        holder.communicate()
        with Client(server.address, timeout=5) as ps:
            np.testing.assert_array_equal(ps.assign("x", np.ones(4, np.float32)), np.ones(4))
        # The dead holder's commit record is an orphan (lockable) for whoever recovers it.
        directory = os.open(server.store, os.O_RDONLY | os.O_DIRECTORY)
        try:
            assert record in [name for name, _state, _entries in orphans(directory)]
        finally:
            os.close(directory)
        assert Path(f"/proc/{child}").exists(), "the child should still run: it must hold no lock"
    finally:
        if holder.poll() is None:
            _end(holder)
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)
