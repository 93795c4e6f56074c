"""Bearer-token authentication: a server interceptor over a reloadable token file.

Token file: one token per line, optionally followed by `read-only` (or `ro`); blank lines and lines starting
with '#' are ignored. Read-only tokens may call Read, ReadStream, GetVariable, ListVariables,
GetServerInfo, and Batch/BatchStream without writes; other calls get PERMISSION_DENIED. The health and
reflection services stay open, so that orchestrators can probe and generic clients (grpcurl) can discover
the protocol without a token.
"""

from __future__ import annotations

import functools
import hmac
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc

from tensorps.server.reflection import OPEN_SERVICES

log = logging.getLogger("tensorps.server")

_OPEN_PREFIXES = tuple(f"/{service}/" for service in OPEN_SERVICES)
_READ_ONLY_METHODS = frozenset(
    f"/tensorps.v1.ParameterServer/{m}"
    for m in ("Read", "ReadStream", "GetVariable", "ListVariables", "GetServerInfo")
)


# Read-only tokens may call these, which then refuse any write they carry (PERMISSION_DENIED).
_CONTENT_CHECKED_METHODS = frozenset(f"/tensorps.v1.ParameterServer/{m}" for m in ("Batch", "BatchStream"))


class TokenFileError(Exception):
    """The token file is missing, unreadable or malformed."""


@dataclass(frozen=True)
class Token:
    secret: bytes
    read_only: bool


def load_tokens(path: str) -> tuple[Token, ...]:
    try:
        with open(path, encoding="utf-8") as handle:
            lines = handle.read().splitlines()
    except OSError as exc:
        raise TokenFileError(f"cannot read token file {path}: {exc.strerror}") from None
    tokens = []
    for number, line in enumerate(lines, 1):
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        if len(words) > 2 or (len(words) == 2 and words[1] not in ("read-only", "ro")):
            raise TokenFileError(f"{path}:{number}: expected 'TOKEN' or 'TOKEN read-only'")
        tokens.append(Token(words[0].encode(), read_only=len(words) == 2))
    if not tokens:
        raise TokenFileError(f"token file {path} holds no token")
    return tuple(tokens)


def _abort_handler(
    handler: grpc.RpcMethodHandler[Any, Any], code: grpc.StatusCode, message: str
) -> grpc.RpcMethodHandler[Any, Any]:
    """A handler of the same cardinality as `handler` that fails with `code` and changes nothing."""

    def abort(request: Any, context: grpc.ServicerContext) -> Any:
        context.abort(code, message)

    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(abort)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(abort)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(abort)
    return grpc.unary_unary_rpc_method_handler(abort)


class TokenAuth(grpc.ServerInterceptor):  # type: ignore[type-arg]
    """Checks `authorization: Bearer <token>` on every call but health checks and reflection."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._tokens = load_tokens(path)
        self._lock = threading.Lock()

    def reload(self, *, announce: bool = True) -> bool:
        """Re-read the token file (on SIGHUP); returns whether it read well.

        A missing, unreadable or malformed file keeps the previous tokens, with one line in the log. The
        supervisor reloads quietly (announce=False) and signals the workers only if the file reads well,
        so that every process keeps the same tokens either way.
        """
        try:
            tokens = load_tokens(self.path)
        except TokenFileError as exc:
            log.error("keeping the previous tokens: %s", exc)
            return False
        with self._lock:
            self._tokens = tokens
        if announce:
            log.info("reloaded %d token(s) from %s", len(tokens), self.path)
        return True

    def _match(self, presented: bytes) -> Token | None:
        # Compare against every token, in constant time each, so timing reveals neither token nor position.
        found = None
        for token in self._tokens:
            if hmac.compare_digest(token.secret, presented):
                found = token
        return found

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler[Any, Any] | None],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = continuation(details)
        method: str = details.method
        if handler is None or method.startswith(_OPEN_PREFIXES):
            return handler
        header = ""
        for key, value in details.invocation_metadata or ():
            if key == "authorization" and isinstance(value, str):
                header = value
        scheme, _, presented = header.partition(" ")
        token = self._match(presented.strip().encode()) if scheme.lower() == "bearer" else None
        if token is None:
            return _abort_handler(handler, grpc.StatusCode.UNAUTHENTICATED, "missing or invalid bearer token")
        if token.read_only and method in _CONTENT_CHECKED_METHODS:
            kind = "unary_unary" if handler.unary_unary is not None else "stream_stream"
            behaviour: Any = getattr(handler, kind)
            return handler._replace(  # type: ignore[attr-defined,no-any-return]
                **{kind: functools.partial(behaviour, read_only=True)}
            )
        if token.read_only and method not in _READ_ONLY_METHODS:
            return _abort_handler(
                handler, grpc.StatusCode.PERMISSION_DENIED, f"a read-only token may not call {method}"
            )
        return handler
