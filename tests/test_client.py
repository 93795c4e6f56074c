"""The client's own contract over both transports: one validation path, usage errors, lossless conversion,
its dtype cache, credentials, deadlines and retries."""

from __future__ import annotations

import contextlib
import inspect
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import numpy as np
import pytest
from pki import Pki

import tensorps.client
from support import ServerProcess
from tensorps.client import (
    CancelledError,
    Client,
    DeadlineExceededError,
    InvalidArgumentError,
    NotFoundError,
    TensorPSError,
    UnavailableError,
    UsageError,
    errors,
    wire,
)

# ---- one validation path for both transports ---------------------------------------------------


def _bool_bytes(*raw: int) -> np.ndarray[Any, Any]:
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


def test_values_beyond_the_rank_limit_are_refused(ps: Client, name: str) -> None:
    """A numpy value of rank 33 is refused over both transports (shm:// used to reach the store with it)."""
    value = np.zeros([1] * 33, np.float32)
    with pytest.raises(InvalidArgumentError, match="rank 33"):
        ps.create(name, value=value)
    ps.create(name, dtype="float32")
    with pytest.raises(InvalidArgumentError, match="rank 33"):
        ps.assign(name, value)
    assert ps.info(name).version == 0
    assert ps.assign(name, np.zeros([1] * 32, np.float32), read_value=False).shape == (1,) * 32


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


# ---- Python values convert only losslessly -----------------------------------------------------

DTYPES = [
    "float16",
    "bfloat16",
    "float32",
    "float64",
    "int8",
    "int16",
    "int32",
    "int64",
    "uint8",
    "uint16",
    "uint32",
    "uint64",
    "complex64",
    "complex128",
    "bool",
]
# Significand bits of each floating dtype: 2**bits + 1 is the smallest positive integer it cannot hold.
SIGNIFICAND = {"float16": 11, "bfloat16": 8, "float32": 24, "float64": 53, "complex64": 24, "complex128": 53}
NAN, INF = float("nan"), float("inf")


def conversion_case(dtype: str, source: str) -> tuple[list[Any] | None, Any]:
    """Python values of kind `source` that `dtype` holds exactly (None: the kind never converts, as in
    TF), and one element it cannot hold (None: every value of that kind fits)."""
    if dtype == "bool":
        if source == "bool":
            return [True, False], None
        return None, {"int": 1, "float": 1.0, "complex": 1j}[source]
    if source == "bool":
        return None, True
    if dtype not in SIGNIFICAND:  # an integer dtype
        info = np.iinfo(dtype)
        if source == "int":
            return [int(info.min), int(info.max), 0], int(info.max) + 1
        return None, {"float": 2.0, "complex": 2 + 0j}[source]
    bits = SIGNIFICAND[dtype]
    double = bits == 53
    if source == "int":
        return [2**bits, -(2**bits), 3], 2**bits + 1
    if source == "float":
        lossy = {"float16": 1.0001, "bfloat16": 0.1, "float32": 0.1, "complex64": 0.1}.get(dtype)
        return [0.375, -0.0, NAN, INF, -INF, float(2**bits)] + ([0.1, 1e300] if double else []), lossy
    if dtype.startswith("complex"):
        exact = [1.5 - 0.25j, complex(NAN, 1.0), complex(INF, 0.0)] + ([0.1 + 0.2j] if double else [])
        return exact, None if double else 1 + 0.1j
    return None, 2 + 0j


def same_python(stored: np.ndarray[Any, Any], values: list[Any]) -> bool:
    """The stored elements, as Python numbers, equal the values exactly (NaN matching NaN, part by part)."""
    wide = stored.astype(np.float64) if stored.dtype.kind == "V" else stored
    for got, want in zip(wide.reshape(-1).tolist(), values, strict=True):
        if got == want:
            continue
        parts = [(complex(got).real, complex(want).real), (complex(got).imag, complex(want).imag)]
        if not all(a == b or (np.isnan(a) and np.isnan(b)) for a, b in parts):
            return False
    return True


@pytest.mark.parametrize("source", ["bool", "int", "float", "complex"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_python_values_convert_only_losslessly(ps: Client, name: str, dtype: str, source: str) -> None:
    """Python values are stored exactly as given, or refused naming the first element that would change."""
    exact, lossy = conversion_case(dtype, source)
    ps.create(name, dtype=dtype)
    if exact is not None:
        out = ps.assign(name, exact, validate_shape=False)
        assert out.dtype == ps.info(name).dtype and same_python(out, exact)
        assert same_python(ps.read(name), exact)
        assert same_python(ps.assign(name, exact[0], validate_shape=False), [exact[0]])  # a scalar
    if lossy is None:
        return
    before = ps.info(name)
    filler = True if dtype == "bool" else 0  # a first element that converts
    with pytest.raises(InvalidArgumentError) as err:
        ps.assign(name, [filler, lossy], validate_shape=False)
    assert f"element [1] {lossy!r}" in err.value.message and dtype in err.value.message
    with pytest.raises(InvalidArgumentError, match="without loss"):
        ps.assign(name, [[filler], [lossy]], validate_shape=False)
    assert ps.info(name) == before


def test_the_reported_lossy_conversions_are_refused(ps: Client, name: str) -> None:
    """The cases of the report: 16777217 to float32, [1.0001, 1e-10] to float16, a numpy float64 in a list."""
    ps.create(name, value=np.zeros(1, np.float32))
    with pytest.raises(InvalidArgumentError, match=r"element \[0\] 16777217 is no float32"):
        ps.assign(name, [16777217])
    with pytest.raises(InvalidArgumentError, match=r"element \[0\] is numpy float64 data, which is never"):
        ps.assign(name, [np.float64(1.5)])
    np.testing.assert_array_equal(ps.assign(name, [np.float32(1.5)]), [1.5])  # its own dtype: fine
    half = f"{name}.half"
    ps.create(half, value=np.zeros(2, np.float16))
    with pytest.raises(InvalidArgumentError, match=r"element \[0\] 1.0001 is no float16"):
        ps.assign(half, [1.0001, 1e-10])
    with pytest.raises(InvalidArgumentError, match=r"element \[1\] 1e-10 underflows to 0 in float16"):
        ps.assign(half, [1.0, 1e-10])
    assert ps.read(half).tolist() == [0, 0] and ps.read(name).tolist() == [1.5]


def test_integers_beyond_64_bits_and_numpy_promotion_stay_exact(ps: Client, name: str) -> None:
    """Huge Python ints are compared exactly, also where numpy would first round them to float64."""
    ps.create(name, dtype="float64", shape=(2,))
    assert ps.assign(name, [2**70, 0.5]).tolist() == [2.0**70, 0.5]
    with pytest.raises(InvalidArgumentError, match=rf"element \[0\] {2**53 + 1} is no float64"):
        ps.assign(name, [2**53 + 1, 0.5])  # numpy alone makes 2**53 of it before any check
    with pytest.raises(InvalidArgumentError, match=rf"element \[1\] {2**70 + 1} is no float64"):
        ps.assign(name, [1, 2**70 + 1])
    unsigned = f"{name}.u"
    ps.create(unsigned, dtype="uint64", shape=(2,))
    with pytest.raises(InvalidArgumentError, match=r"element \[0\] -1 is outside the range of uint64"):
        ps.assign(unsigned, [-1, 2**63])  # numpy alone makes float64 of it
    assert ps.assign(unsigned, [2**64 - 1, 2**63]).tolist() == [2**64 - 1, 2**63]


def test_tuples_and_ranges_convert_like_lists(ps: Client, name: str) -> None:
    """Nested tuples and ranges are Python values too, converted by the same rule."""
    ps.create(name, dtype="int16", shape=(2, 3))
    assert ps.assign(name, (range(3), (3, 4, 5))).tolist() == [[0, 1, 2], [3, 4, 5]]
    with pytest.raises(InvalidArgumentError, match=r"element \[1, 2\] 40000 is outside the range of int16"):
        ps.assign(name, (range(3), (3, 4, 40000)))


# ---- a stale dtype cache never fails a call -----------------------------------------------------


def test_a_recreated_variable_takes_python_values_of_its_new_dtype(
    ps: Client, server: ServerProcess, name: str
) -> None:
    """After another client recreates a variable with another dtype, Python values convert for the new one."""
    ps.create(name, value=np.zeros(2, np.float32))
    ps.assign(name, [1.0, 2.0])  # the client now knows the variable as float32
    with Client(server.address, timeout=60) as other:
        other.delete(name)
        other.create(name, dtype="int32", shape=(2,))
        out = ps.assign(name, [1, 2])  # converted for float32 first: the server refuses the dtype
        assert out.dtype == np.int32 and out.tolist() == [1, 2]
        other.delete(name)
        other.create(name, dtype="float32", shape=(2,))
        out = ps.assign(name, [0.5, 1.5])  # no int32 holds 0.5: the stale conversion itself fails
        assert out.dtype == np.float32 and out.tolist() == [0.5, 1.5]
        other.delete(name)
        other.create(name, value=np.zeros(2, np.int64))
        out = ps.assign_add(name, [1, 2], use_locking=True)
        assert out.dtype == np.int64 and out.tolist() == [1, 2]
        assert other.info(name).version == 2  # the initial value, then the add applied once
    with pytest.raises(InvalidArgumentError, match="lhs shape= \\[2\\] rhs shape= \\[3\\]"):
        ps.assign(name, [1, 2, 3])  # a refusal for the current dtype still stands


# ---- every failure is a documented TensorPSError -----------------------------------------------


def test_all_is_exactly_the_public_exports() -> None:
    """tensorps.client's __all__ lists exactly its public names, and every error class is among them."""
    public = {
        key
        for key, value in vars(tensorps.client).items()
        if not key.startswith("_") and not inspect.ismodule(value)
    }
    assert sorted(tensorps.client.__all__) == sorted(public)
    classes = {
        key
        for key, value in vars(errors).items()
        if inspect.isclass(value) and issubclass(value, TensorPSError)
    }
    assert classes <= public


def test_every_status_code_has_its_own_error_class() -> None:
    """Each gRPC status a call can fail with maps to a subclass of TensorPSError named like tf.errors."""
    seen = set()
    for code in grpc.StatusCode:
        if code == grpc.StatusCode.OK:
            continue
        error = errors.from_status(code, "text")
        assert type(error) is not TensorPSError and error.code == code and error.message == "text"
        assert type(error).__name__ in tensorps.client.__all__
        seen.add(type(error))
    assert len(seen) == len(grpc.StatusCode) - 1
    assert UsageError not in seen and not issubclass(UsageError, InvalidArgumentError)


def every_api_call(ps: Client, name: object) -> dict[str, Callable[[], object]]:
    return {
        "create": lambda: ps.create(name, dtype="float32"),  # type: ignore[arg-type]
        "delete": lambda: ps.delete(name),  # type: ignore[arg-type]
        "info": lambda: ps.info(name),  # type: ignore[arg-type]
        "is_initialized": lambda: ps.is_initialized(name),  # type: ignore[arg-type]
        "read": lambda: ps.read(name),  # type: ignore[arg-type]
        "assign": lambda: ps.assign(name, np.zeros(2, np.float32)),  # type: ignore[arg-type]
        "assign_add": lambda: ps.assign_add(name, [1.0, 2.0]),  # type: ignore[arg-type]
        "assign_sub": lambda: ps.assign_sub(name, np.zeros(2, np.float32)),  # type: ignore[arg-type]
    }


@pytest.mark.parametrize("bad_name", [None, 3, b"x", ["x"]], ids=repr)
def test_a_name_that_is_no_str_is_a_usage_error(ps: Client, name: str, bad_name: object) -> None:
    """Every call with a name of the wrong type raises UsageError, over both transports alike."""
    ps.create(name, value=np.zeros(2, np.float32))
    for call_name, call in every_api_call(ps, bad_name).items():
        with pytest.raises(UsageError, match="name must be a str") as err:
            call()
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT, call_name
    with pytest.raises(UsageError):
        ps.list(prefix=None)  # type: ignore[arg-type]
    assert ps.info(name).version == 1


@pytest.mark.parametrize("flag", ["validate_shape", "use_locking", "read_value"])
@pytest.mark.parametrize("bad", ["no", 0, None, 1.0])
def test_flags_must_be_bools(ps: Client, name: str, flag: str, bad: object) -> None:
    """A flag that is not a bool ("no" is truthy) raises UsageError on every write, and nothing changes."""
    ps.create(name, value=np.zeros(2, np.float32))
    ops = ["assign"] if flag == "validate_shape" else ["assign", "assign_add", "assign_sub"]
    for op in ops:
        with pytest.raises(UsageError, match=f"{flag} must be a bool"):
            getattr(ps, op)(name, np.ones(3, np.float32), **{flag: bad})
    assert ps.info(name).version == 1 and ps.read(name).tolist() == [0, 0]
    numpy_bool: dict[str, Any] = {flag: np.True_}  # a numpy bool is a bool
    ps.assign(name, np.ones(2, np.float32), **numpy_bool)


def test_a_closed_client_is_a_usage_error(ps: Client, name: str) -> None:
    """Calls on a closed client raise UsageError, not grpc's or a closed mmap's ValueError."""
    closed = Client(ps.target, timeout=60)
    closed.close()
    closed.close()
    for call in [*every_api_call(closed, name).values(), closed.list, closed.server_info]:
        with pytest.raises(UsageError, match="closed"):
            call()


@pytest.mark.parametrize(
    "options",
    [
        {"timeout": "5"},
        {"timeout": 0},
        {"timeout": -1.0},
        {"timeout": float("nan")},
        {"channels": 0},
        {"channels": 2.5},
        {"wait_for_ready": "yes"},
        {"token": "a\nb"},
        {"token": "caf\u00e9"},
        {"token": 42},
        {"root_certificates": "-----BEGIN CERTIFICATE-----"},
        {"root_certificates": b"not a certificate"},
        {"root_certificates": b""},
    ],
    ids=repr,
)
def test_bad_options_are_usage_errors(ps: Client, options: dict[str, Any]) -> None:
    """Options of the wrong type or value raise UsageError when the client is made, over both transports."""
    with pytest.raises(UsageError):
        Client(ps.target, **options)


def test_a_target_that_is_no_str_is_a_usage_error() -> None:
    """Client(target) and Client.local(store) take a str."""
    with pytest.raises(UsageError):
        Client(50051)  # type: ignore[arg-type]
    with pytest.raises(UsageError):
        Client.local(None)  # type: ignore[arg-type]


def test_an_idle_stream_cancelled_by_the_server_is_a_cancelled_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """A streamed write the server cancels for stalling raises CancelledError, not the bare base class."""
    release = threading.Event()
    real_chunks = wire.data_chunks

    def stalling_chunks(array: Any, size: int) -> Iterator[bytes]:
        chunks = real_chunks(array, size)
        yield next(chunks)
        release.wait(30)  # a client that stops sending mid-stream
        yield from chunks

    with ServerProcess("--stream-idle-timeout", "0.5") as server, Client(server.address, timeout=30) as ps:
        ps.create("big", value=np.zeros(5 << 20, np.uint8))
        monkeypatch.setattr(wire, "data_chunks", stalling_chunks)
        try:
            with pytest.raises(CancelledError) as err:
                ps.assign("big", np.ones(5 << 20, np.uint8))
            assert err.value.code == grpc.StatusCode.CANCELLED
        finally:
            release.set()
        monkeypatch.undo()
        assert not ps.read("big").any()


# ---- credentials are checked before gRPC sees them ---------------------------------------------

_MAKE_CLIENT = """
import sys
from tensorps.client import Client, UsageError
chain, key = (open(p, "rb").read() if p != "-" else None for p in sys.argv[2:4])
try:
    with Client(sys.argv[1], certificate_chain=chain, private_key=key, timeout=5) as ps:
        ps.list()
except UsageError as exc:
    print(type(exc).__name__, exc.message)
"""


@pytest.mark.parametrize("given", ["certificate_chain", "private_key"])
def test_half_a_client_certificate_is_a_usage_error_not_an_abort(ps: Client, pki: Pki, given: str) -> None:
    """A certificate chain without its key (or the reverse) raises UsageError; grpc used to abort Python."""
    chain = pki.write("client.pem", pki.client.cert) if given == "certificate_chain" else "-"
    key = pki.write("client.key", pki.client.key) if given == "private_key" else "-"
    target = ps.target if ps.target.startswith("shm://") else "localhost:1"
    done = subprocess.run(
        [sys.executable, "-c", _MAKE_CLIENT, target, chain, key],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"UsageError {given} was given without"), done.stdout + done.stderr


def test_credentials_that_are_not_pem_are_usage_errors(ps: Client, pki: Pki) -> None:
    """A key passed as the chain, a str instead of bytes or an encrypted key are refused at once."""
    cert, key = pki.client.cert, pki.client.key
    bad: list[dict[str, Any]] = [
        {"certificate_chain": key, "private_key": cert},
        {"certificate_chain": cert.decode(), "private_key": key},
        {"certificate_chain": cert, "private_key": b"-----BEGIN ENCRYPTED PRIVATE KEY-----\n"},
        {"root_certificates": key},
    ]
    for options in bad:
        with pytest.raises(UsageError):
            Client(ps.target, **options)
    Client(ps.target, root_certificates=pki.ca.cert, certificate_chain=cert, private_key=key).close()


# ---- one deadline per call; waiting for a server; reconnecting soon ----------------------------


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def test_one_deadline_covers_every_retry() -> None:
    """A server that drops each connection after 1 s fails a 1.5 s call within 2 s, retries included."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    stop = threading.Event()

    def drop_connections() -> None:  # accepts, says nothing, hangs up a second later: a dying worker
        listener.settimeout(0.1)
        held: list[tuple[float, socket.socket]] = []
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                held.append((time.monotonic() + 1.0, listener.accept()[0]))
            for due, conn in [h for h in held if h[0] <= time.monotonic()]:
                conn.close()
                held.remove((due, conn))
        for _due, conn in held:
            conn.close()

    dropper = threading.Thread(target=drop_connections, daemon=True)
    dropper.start()
    try:
        with Client(f"127.0.0.1:{listener.getsockname()[1]}", timeout=1.5) as ps:
            for call in (lambda: ps.info("x"), lambda: ps.read("x"), ps.list):
                started = time.monotonic()
                with pytest.raises((DeadlineExceededError, UnavailableError)):
                    call()
                assert time.monotonic() - started < 2.0  # not 4 attempts of 1.5 s each plus back-off
    finally:
        stop.set()
        dropper.join(10)
        listener.close()


def test_wait_for_ready_waits_for_a_server_that_starts_late() -> None:
    """With wait_for_ready a call waits for the server to come up; without it, it fails at once."""
    port = _free_port()
    with Client(f"127.0.0.1:{port}", timeout=5) as eager:
        started = time.monotonic()
        with pytest.raises(UnavailableError):
            eager.list()
        assert time.monotonic() - started < 2.0
    servers: list[ServerProcess] = []
    starter = threading.Timer(1.0, lambda: servers.append(ServerProcess(port=port)))
    with Client(f"127.0.0.1:{port}", timeout=60, wait_for_ready=True) as patient:
        starter.start()
        try:
            assert patient.list() == []
        finally:
            starter.join()
            for server in servers:
                server.stop()


def test_a_restarted_server_is_noticed_within_about_a_second() -> None:
    """After a 6 s outage, calls reach the restarted server within 2 s (gRPC's default back-off: 3-8 s)."""
    with ServerProcess() as first:
        port = first.port
        ps = Client(first.address, timeout=5)
        ps.list()
    with ps:
        down = time.monotonic()
        while time.monotonic() - down < 6:
            with pytest.raises(UnavailableError):
                ps.list()
            time.sleep(0.1)
        with ServerProcess(port=port):
            ready = time.monotonic()
            while True:
                try:
                    ps.list()
                    break
                except UnavailableError:
                    time.sleep(0.05)
            assert time.monotonic() - ready < 2.0
