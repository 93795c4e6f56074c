"""The connection options every command takes, with the TENSORPS_* variables the examples use.

--target (TENSORPS_TARGET, default localhost:50051; shm://STORE for a store on this host), --token
(TENSORPS_TOKEN) or --token-file (TENSORPS_TOKEN_FILE: the server's token-file format, first token),
--ca-file (TENSORPS_CA_FILE: TLS), --client-cert and --client-key (TENSORPS_CLIENT_CERT, TENSORPS_CLIENT_KEY:
mutual TLS), --timeout (TENSORPS_TIMEOUT, seconds per call), --json.

They may stand before or after the command (`tensorps --json ls`, `tensorps ls --json`).
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass

import grpc

from tensorps.cli.exits import CommandError
from tensorps.client import Client

DEFAULT_TARGET = "localhost:50051"
DEFAULT_TIMEOUT = 30.0


def _env(name: str) -> str | None:
    return os.environ.get(name) or None


def _seconds(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 < seconds < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds: {text!r}")
    return seconds


def add_connection_options(parser: argparse.ArgumentParser, *, defaults: bool) -> None:
    """The options on `parser`; with defaults=False they default to nothing, so that an option given after
    the command overrides the one given before it and no other."""

    def default(value: object) -> object:
        return value if defaults else argparse.SUPPRESS

    timeout_env = _env("TENSORPS_TIMEOUT")
    group = parser.add_argument_group("connection")
    group.add_argument(
        "--target",
        default=default(_env("TENSORPS_TARGET") or DEFAULT_TARGET),
        help="host:port; a cluster as host:port,host:port,... or cluster://host:port (one member); or "
        f"shm://STORE: a server's store on this host [TENSORPS_TARGET; {DEFAULT_TARGET}]",
    )
    group.add_argument(
        "--token", default=default(_env("TENSORPS_TOKEN")), help="bearer token [TENSORPS_TOKEN]"
    )
    group.add_argument(
        "--token-file",
        default=default(_env("TENSORPS_TOKEN_FILE")),
        help="read the bearer token from this file (first token) [TENSORPS_TOKEN_FILE]",
    )
    group.add_argument(
        "--ca-file", default=default(_env("TENSORPS_CA_FILE")), help="CA to trust: use TLS [TENSORPS_CA_FILE]"
    )
    group.add_argument(
        "--client-cert",
        default=default(_env("TENSORPS_CLIENT_CERT")),
        help="client certificate (PEM) for mutual TLS; needs --client-key [TENSORPS_CLIENT_CERT]",
    )
    group.add_argument(
        "--client-key",
        default=default(_env("TENSORPS_CLIENT_KEY")),
        help="private key (PEM) of --client-cert [TENSORPS_CLIENT_KEY]",
    )
    group.add_argument(
        "--timeout",
        type=_seconds,
        # A string default goes through `type` too: a bad TENSORPS_TIMEOUT is a usage error (exit 2).
        default=default(timeout_env or DEFAULT_TIMEOUT),
        help=f"seconds for each call [TENSORPS_TIMEOUT; {DEFAULT_TIMEOUT:g}]",
    )
    group.add_argument(
        "--json",
        action="store_true",
        default=default(False),
        help='print one JSON document (errors too: {"error": ...}) for scripts',
    )


def read_file(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except OSError as exc:
        raise CommandError(f"cannot read the {what} {path}: {exc.strerror}") from None


def read_token(path: str) -> str:
    """The first token of a token file ('TOKEN [read-only]' lines, '#' comments)."""
    for line in read_file(path, "token file").decode("utf-8", "replace").splitlines():
        words = line.split()
        if words and not words[0].startswith("#"):
            return words[0]
    raise CommandError(f"no token in {path}")


@dataclass(frozen=True)
class Connection:
    """Where and how to connect, with the files read."""

    target: str
    token: str | None
    root_certificates: bytes | None
    certificate_chain: bytes | None
    private_key: bytes | None
    timeout: float

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Connection:
        token = read_token(args.token_file) if args.token_file else args.token
        return cls(
            target=args.target,
            token=token,
            root_certificates=read_file(args.ca_file, "CA file") if args.ca_file else None,
            certificate_chain=read_file(args.client_cert, "client certificate") if args.client_cert else None,
            private_key=read_file(args.client_key, "client key") if args.client_key else None,
            timeout=args.timeout,
        )

    @property
    def local(self) -> bool:
        return self.target.startswith("shm://")

    @property
    def tls(self) -> bool:
        return self.root_certificates is not None or self.certificate_chain is not None

    def client(self, *, channels: int = 2) -> Client:
        return Client(
            self.target,
            token=self.token,
            root_certificates=self.root_certificates,
            certificate_chain=self.certificate_chain,
            private_key=self.private_key,
            timeout=self.timeout,
            channels=channels,
        )

    def channel(self) -> grpc.Channel:
        """A plain gRPC channel to the target (for the health service), with the same TLS settings."""
        if not self.tls:
            return grpc.insecure_channel(self.target)
        if (self.certificate_chain is None) != (self.private_key is None):
            # grpc aborts the whole process on a certificate without its key: refuse it here.
            raise CommandError("--client-cert and --client-key go together")
        credentials = grpc.ssl_channel_credentials(
            self.root_certificates, self.private_key, self.certificate_chain
        )
        return grpc.secure_channel(self.target, credentials)
