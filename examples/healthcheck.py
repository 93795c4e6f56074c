"""Ask a server's standard gRPC health service whether it is serving; the Docker image's HEALTHCHECK.

    python -m tensorps.examples.healthcheck --target 127.0.0.1:50051    # exit 0 if SERVING, else 1

Exit codes follow Docker's HEALTHCHECK convention: 0 healthy, 1 unhealthy. The check never waits for a
connection: a dead port is an immediate failure, so a check costs at most --timeout seconds.

TLS: --ca-file (TENSORPS_CA_FILE) trusts a CA; against a mutual-TLS server (--tls-client-ca) add a client
certificate and its key, --client-cert and --client-key (TENSORPS_CLIENT_CERT, TENSORPS_CLIENT_KEY), which
is how the Docker image's HEALTHCHECK gets them.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

DEFAULT_TARGET = "localhost:50051"


def default_target() -> str:
    return os.environ.get("TENSORPS_TARGET") or DEFAULT_TARGET


def _channel(
    target: str,
    root_certificates: bytes | None,
    certificate_chain: bytes | None,
    private_key: bytes | None,
) -> grpc.Channel:
    if root_certificates is None and certificate_chain is None and private_key is None:
        return grpc.insecure_channel(target)
    if (certificate_chain is None) != (private_key is None):
        # grpc aborts the whole process on a certificate without its key: refuse it here.
        raise ValueError("a client certificate needs its private key, and a key its certificate")
    credentials = grpc.ssl_channel_credentials(root_certificates, private_key, certificate_chain)
    return grpc.secure_channel(target, credentials)


def check(
    target: str,
    *,
    service: str = "",
    timeout: float = 3.0,
    root_certificates: bytes | None = None,
    certificate_chain: bytes | None = None,
    private_key: bytes | None = None,
) -> tuple[bool, str]:
    """(serving, description) for one health check of `service` ("" is the whole server).

    Over TLS when any of `root_certificates` (the CA to trust; None: the system's) or a client
    `certificate_chain` and `private_key` (for a mutual-TLS server) are given.
    """
    with _channel(target, root_certificates, certificate_chain, private_key) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as exc:
            code: grpc.StatusCode = exc.code()
            details: str = exc.details() or ""
            return False, f"{code.name}: {details}" if details else code.name
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return reply.status == health_pb2.HealthCheckResponse.SERVING, status


def wait_until_serving(
    target: str,
    timeout: float,
    *,
    interval: float = 0.2,
    give_up: Callable[[], str | None] | None = None,
    root_certificates: bytes | None = None,
) -> tuple[bool, str]:
    """Poll until the server answers SERVING or `timeout` seconds pass; (serving, last description).

    `give_up` may return a reason to stop early (for example: the server process has exited).
    """
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        serving, description = check(
            target, timeout=max(0.1, min(2.0, remaining)), root_certificates=root_certificates
        )
        if serving:
            return True, description
        reason = give_up() if give_up is not None else None
        if reason is not None:
            return False, reason
        if time.monotonic() + interval > deadline:
            return False, description
        time.sleep(interval)


def _read(path: str | None) -> bytes | None:
    if not path:
        return None
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except OSError as exc:
        raise OSError(f"cannot read {path}: {exc.strerror}") from None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tensorps.examples.healthcheck",
        description="Exit 0 if the tensorps server at --target answers SERVING on grpc.health.v1, else 1.",
    )
    parser.add_argument(
        "--target", default=default_target(), help="host:port (default: $TENSORPS_TARGET or %(default)s)"
    )
    parser.add_argument("--service", default="", help="service name to check ('' is the whole server)")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for the answer")
    parser.add_argument("--quiet", action="store_true", help="print nothing, only set the exit code")
    parser.add_argument(
        "--ca-file",
        default=os.environ.get("TENSORPS_CA_FILE"),
        help="CA to trust: check over TLS (default: $TENSORPS_CA_FILE; plaintext if no TLS option is set)",
    )
    parser.add_argument(
        "--client-cert",
        default=os.environ.get("TENSORPS_CLIENT_CERT"),
        help="client certificate chain (PEM) for a mutual-TLS server; needs --client-key "
        "(default: $TENSORPS_CLIENT_CERT)",
    )
    parser.add_argument(
        "--client-key",
        default=os.environ.get("TENSORPS_CLIENT_KEY"),
        help="private key (PEM) of --client-cert (default: $TENSORPS_CLIENT_KEY)",
    )
    args = parser.parse_args(argv)
    try:
        trust, chain, key = (_read(path) for path in (args.ca_file, args.client_cert, args.client_key))
        serving, description = check(
            args.target,
            service=args.service,
            timeout=args.timeout,
            root_certificates=trust,
            certificate_chain=chain,
            private_key=key,
        )
    except (OSError, ValueError) as exc:
        serving, description = False, f"cannot check: {exc}"
    if not args.quiet:
        print(f"{args.target}: {description}", file=sys.stdout if serving else sys.stderr)
    return 0 if serving else 1


if __name__ == "__main__":
    sys.exit(main())
