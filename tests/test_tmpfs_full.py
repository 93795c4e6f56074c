"""A store on a small tmpfs of its own (a private mount namespace): a full tmpfs never means SIGBUS."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from support import ServerProcess
from tensorps.client import Client, ResourceExhaustedError


def _can_mount_tmpfs(directory: Path) -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = ["unshare", "--mount", "mount", "-t", "tmpfs", "-o", "size=1m", "tensorps-probe", str(directory)]
    return subprocess.run(probe, capture_output=True, check=False).returncode == 0


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[list[str]]:
    """A wrapper that runs a command with a 16 MiB tmpfs at tmp_path/shm, seen by that command only.

    The tmpfs goes away with the last process of the namespace: nothing is left on the machine.
    """
    mountpoint = tmp_path / "shm"
    mountpoint.mkdir()
    if not _can_mount_tmpfs(mountpoint):
        pytest.skip("needs unshare and the right to mount a tmpfs in a mount namespace")
    script = 'mount -t tmpfs -o size=16m tensorps-test "$0" && exec "$@"'
    yield ["unshare", "--mount", "sh", "-c", script, str(mountpoint)]


def test_a_table_that_does_not_fit_refuses_to_start(small_tmpfs: list[str], tmp_path: Path) -> None:
    """The default table (65536 variables, ~113 MiB) on a 16 MiB tmpfs: a clear startup error, exit 1."""
    store = str(tmp_path / "shm" / "store")
    server = ServerProcess("--stripes", "8", store=store, wrapper=small_tmpfs, wait=False)
    code = server.proc.wait(30)
    server.stop()
    log = "\n".join(server.log)
    assert code == 1, log
    assert "no room for its variable table" in log and "Traceback" not in log, log


def test_creates_on_a_full_tmpfs_never_kill_a_worker(small_tmpfs: list[str], tmp_path: Path) -> None:
    """With segments filling the tmpfs, creates that touch new pages of the reserved table still work."""
    store = str(tmp_path / "shm" / "store")
    # Tables of ~7 MiB (variables) and ~3 MiB (request ids of 8 stripes); a budget beyond the tmpfs.
    flags = ["--max-variables", "4096", "--stripes", "8", "--max-total-bytes", "64M"]
    server = ServerProcess(*flags, store=store, wrapper=small_tmpfs, workers=1)
    with server, Client(server.address, timeout=10) as ps:
        filled = 0
        with pytest.raises(ResourceExhaustedError):
            while filled < 64:  # 1 MiB each: the tmpfs (16 MiB) is full long before
                ps.create(f"fill{filled}", value=np.zeros(1 << 18, np.float32))
                filled += 1
        assert filled > 0
        for i in range(300):  # declared only: no segment, but a table slot each
            ps.create(f"declared{i}", dtype="float32", shape=(4,))
        assert len(ps.list()) == filled + 300
    log = "\n".join(server.log)
    assert "SIGBUS" not in log and "restarting" not in log, log
