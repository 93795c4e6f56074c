"""Shared fixtures: one real server for the suite, a client per test, unique variable names."""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Iterator

import pytest
from pki import Pki, make_pki

from support import STORES, ServerProcess
from tensorps.client import Client

_names = itertools.count()

SLOW = os.environ.get("TENSORPS_SLOW") == "1"
CHAOS = os.environ.get("TENSORPS_CHAOS") == "1"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip_slow = pytest.mark.skip(reason="slow profile: set TENSORPS_SLOW=1")
    skip_chaos = pytest.mark.skip(
        reason="chaos profile: set TENSORPS_CHAOS=1 (TENSORPS_CHAOS_SECONDS, TENSORPS_CHAOS_SEED; make chaos)"
    )
    for item in items:
        if "chaos" in item.keywords and not CHAOS:
            item.add_marker(skip_chaos)
        elif "slow" in item.keywords and not SLOW:
            item.add_marker(skip_slow)


@pytest.fixture(scope="session")
def server() -> Iterator[ServerProcess]:
    """One server process (2 workers) shared by the semantics tests."""
    with ServerProcess(workers=2) as proc:
        yield proc
    assert proc.proc.returncode == 0, "\n".join(proc.log)
    assert not os.path.exists(proc.store), "the server left its store behind"


@pytest.fixture(params=["remote", "local"])
def ps(server: ServerProcess, request: pytest.FixtureRequest) -> Iterator[Client]:
    """A client of the shared server: over gRPC, and on the same host through shm:// (same semantics)."""
    target = server.address if request.param == "remote" else f"shm://{server.store}"
    with Client(target, timeout=60) as client:
        yield client


@pytest.fixture
def name(request: pytest.FixtureRequest) -> str:
    """A variable name no other test uses."""
    return f"t{next(_names)}/" + re.sub(r"[^A-Za-z0-9_.]", "_", request.node.name)[:60]


@pytest.fixture(autouse=True, scope="session")
def _no_leaked_stores() -> Iterator[None]:
    """Every store a test created is gone at the end (servers remove theirs; tests clean up the rest)."""
    yield
    leaked = [path for path in STORES if os.path.exists(path)]
    assert not leaked, f"stores left behind: {leaked}"


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """Test certificates: a CA, a server certificate for localhost/127.0.0.1, good and rogue clients."""
    return make_pki(tmp_path_factory.mktemp("pki"))
