"""The API boundary: arguments and options are checked here, once, for both transports."""

from __future__ import annotations

import math
import re

import numpy as np

from tensorps.client import codec
from tensorps.client.codec import CodecError
from tensorps.client.errors import InvalidArgumentError, UsageError

_TOKEN = re.compile(r"[\x20-\x7e]*")  # what gRPC accepts in a header value (else INTERNAL at every call)
_PEM = {
    "root_certificates": re.compile(rb"-----BEGIN (?:[A-Z0-9]+ )*CERTIFICATE-----"),
    "certificate_chain": re.compile(rb"-----BEGIN (?:[A-Z0-9]+ )*CERTIFICATE-----"),
    "private_key": re.compile(rb"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY-----"),
}


def check_name(name: object) -> str:
    """A variable name: a str (else UsageError: nothing is sent), valid as the server checks names."""
    if not isinstance(name, str):
        raise UsageError(f"a variable name must be a str, not {type(name).__name__} ({name!r:.60})")
    try:
        codec.validate_name(name)
    except CodecError as exc:
        raise InvalidArgumentError(str(exc)) from None
    return name


def check_flag(value: object, what: str) -> bool:
    # A str such as "no" would otherwise be truthy on one transport and a protobuf TypeError on the other.
    if isinstance(value, bool | np.bool_):
        return bool(value)
    raise UsageError(f"{what} must be a bool, not {type(value).__name__} ({value!r:.60})")


def check_options(
    *,
    token: object,
    root_certificates: object,
    certificate_chain: object,
    private_key: object,
    timeout: object,
    channels: object,
    wait_for_ready: object,
) -> None:
    """Client options, checked before any reaches gRPC: grpcio aborts the whole Python process on a
    certificate chain without its private key (and the other way round), and fails late on the rest."""
    if token is not None and not (isinstance(token, str) and _TOKEN.fullmatch(token)):
        raise UsageError("token must be a str of printable ASCII characters")
    pems = {"root_certificates": root_certificates, "certificate_chain": certificate_chain}
    pems["private_key"] = private_key
    for what, pem in pems.items():
        if pem is None:
            continue
        if not isinstance(pem, bytes):
            raise UsageError(f"{what} must be PEM bytes (open(path, 'rb').read()), not {type(pem).__name__}")
        if not _PEM[what].search(pem):
            kind = "PRIVATE KEY" if what == "private_key" else "CERTIFICATE"
            raise UsageError(f"{what} is not PEM: it has no '-----BEGIN ...{kind}-----' line")
        if b"ENCRYPTED PRIVATE KEY" in pem or b"Proc-Type: 4,ENCRYPTED" in pem:
            raise UsageError(f"{what} is encrypted; gRPC needs an unencrypted private key")
    if (certificate_chain is None) != (private_key is None):
        given, missing = ("private_key", "certificate_chain")
        if private_key is None:
            given, missing = missing, given
        raise UsageError(f"{given} was given without {missing}: mutual TLS needs both")
    if timeout is not None and not (
        isinstance(timeout, int | float) and not isinstance(timeout, bool) and 0 < timeout < math.inf
    ):
        raise UsageError(f"timeout must be a positive number of seconds or None, not {timeout!r:.60}")
    if not (isinstance(channels, int) and not isinstance(channels, bool) and channels >= 1):
        raise UsageError(f"channels must be an int of at least 1, not {channels!r:.60}")
    check_flag(wait_for_ready, "wait_for_ready")
