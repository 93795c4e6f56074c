"""Every call's outcome, seen from the outermost server interceptor: metrics, and a log line per refusal.

The observer wraps the handler that the inner interceptors (token auth) and the services produce, so it
sees the final status of every call, refusals by the token check included: the status an aborted handler
set (context.abort), OK for a handler that returned, CANCELLED for a call its client or the idle watch
cancelled. Calls that gRPC itself refuses before any handler runs (an unknown method, more than
--max-concurrent-rpcs in flight) do not reach it.

Refusals (bad input, a missing or wrong token, a read-only token that writes, a limit) are logged at INFO
with the peer and the server's reason; other failures (NOT_FOUND, FAILED_PRECONDITION, ...) at DEBUG, as
they are a client's everyday answers.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, TypeAlias

import grpc

from tensorps.server.metrics import Metrics

if TYPE_CHECKING:
    Handler: TypeAlias = grpc.RpcMethodHandler[Any, Any]

log = logging.getLogger("tensorps.server.calls")

REFUSALS = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    }
)


def _size(message: Any) -> int:
    """A message's bytes: our services take and give raw bytes; others (health) protobuf messages."""
    if isinstance(message, bytes | bytearray | memoryview):
        return len(message)
    size = getattr(message, "ByteSize", None)
    return int(size()) if size is not None else 0


class _Call:
    """One call being observed: its bytes each way and its end."""

    __slots__ = ("context", "method", "observer", "received", "sent", "started")

    def __init__(self, observer: CallObserver, method: str, context: grpc.ServicerContext) -> None:
        self.observer = observer
        self.method = method
        self.context = context
        self.started = time.perf_counter()
        self.received = 0
        self.sent = 0

    def finish(self, failed: bool) -> None:
        code: grpc.StatusCode | None = self.context.code()  # type: ignore[attr-defined]
        if code is None:
            if failed:
                code = grpc.StatusCode.UNKNOWN
            elif not self.context.is_active():
                code = grpc.StatusCode.CANCELLED
            else:
                code = grpc.StatusCode.OK
        self.observer.finished(self, code)

    def requests(self, messages: Iterator[Any]) -> Iterator[Any]:
        for message in messages:
            self.received += _size(message)
            yield message

    def replies(self, replies: Iterator[Any]) -> Iterator[Any]:
        failed = True
        try:
            for reply in replies:
                self.sent += _size(reply)
                yield reply
            failed = False
        finally:
            self.finish(failed)


class CallObserver(grpc.ServerInterceptor):  # type: ignore[type-arg]
    """The outermost interceptor: counts calls into `metrics` (None: --metrics-port off) and logs refusals."""

    def __init__(self, metrics: Metrics | None) -> None:
        self.metrics = metrics
        # method -> (the handler as produced, its wrapper): without a token check the services hand out
        # the same handler for every call, so each is wrapped once.
        self._wrapped: dict[str, tuple[Handler, Handler]] = {}

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Handler | None],
        details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = continuation(details)
        if handler is None:
            return None
        method: str = details.method
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self._wrap(handler, method)
        self._wrapped[method] = (handler, wrapped)
        return wrapped

    def finished(self, call: _Call, code: grpc.StatusCode) -> None:
        seconds = time.perf_counter() - call.started
        service, _, name = call.method.lstrip("/").rpartition("/")
        if self.metrics is not None:
            self.metrics.call(service, name, code.name, seconds, received=call.received, sent=call.sent)
        if code is grpc.StatusCode.OK:
            return
        level = logging.INFO if code in REFUSALS else logging.DEBUG
        if not log.isEnabledFor(level):
            return
        raw = call.context.details()  # type: ignore[attr-defined]
        reason = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw or "")
        peer = call.context.peer()
        verb = "refused" if code in REFUSALS else "failed"
        log.log(
            level,
            "%s %s from %s: %s: %s",
            verb,
            name,
            peer,
            code.name,
            reason,
            extra={"peer": peer, "method": name, "service": service, "code": code.name, "reason": reason},
        )

    def _wrap(self, handler: Handler, method: str) -> Handler:
        if handler.request_streaming and handler.response_streaming:
            inner_ss = handler.stream_stream
            assert inner_ss is not None

            def stream_stream(requests: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
                call = _Call(self, method, context)
                try:
                    replies = inner_ss(call.requests(requests), context)
                except BaseException:
                    call.finish(True)
                    raise
                return call.replies(replies)

            return handler._replace(stream_stream=stream_stream)  # type: ignore[attr-defined,no-any-return]
        if handler.response_streaming:
            inner_us = handler.unary_stream
            assert inner_us is not None

            def unary_stream(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                call = _Call(self, method, context)
                call.received = _size(request)
                try:
                    replies = inner_us(request, context)
                except BaseException:
                    call.finish(True)
                    raise
                return call.replies(replies)

            return handler._replace(unary_stream=unary_stream)  # type: ignore[attr-defined,no-any-return]
        if handler.request_streaming:
            inner_su = handler.stream_unary
            assert inner_su is not None

            def stream_unary(requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
                call = _Call(self, method, context)
                failed = True
                try:
                    reply = inner_su(call.requests(requests), context)
                    call.sent = _size(reply)
                    failed = False
                    return reply
                finally:
                    call.finish(failed)

            return handler._replace(stream_unary=stream_unary)  # type: ignore[attr-defined,no-any-return]
        inner_uu = handler.unary_unary
        assert inner_uu is not None

        def unary_unary(request: Any, context: grpc.ServicerContext) -> Any:
            call = _Call(self, method, context)
            call.received = _size(request)
            failed = True
            try:
                reply = inner_uu(request, context)
                call.sent = _size(reply)
                failed = False
                return reply
            finally:
                call.finish(failed)

        return handler._replace(unary_unary=unary_unary)  # type: ignore[attr-defined,no-any-return]
