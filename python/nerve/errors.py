"""nerve's exception tree and its wire form.

Every error nerve raises is a :class:`NerveError`. Errors cross the wire as Moleculer's plain
error object ``{name, message, code, type, data, retryable, nodeID, stack}``; known names map
to the classes here and back, unknown names come back as :class:`RemoteError`.
"""

from __future__ import annotations

import traceback
from typing import Any, ClassVar

__all__ = [
    "NerveError",
    "RetryableError",
    "ServerError",
    "ClientError",
    "ValidationError",
    "ServiceNotFoundError",
    "ServiceNotAvailableError",
    "RequestTimeoutError",
    "RequestSkippedError",
    "RequestRejectedError",
    "QueueIsFullError",
    "MaxCallLevelError",
    "GracefulStopTimeoutError",
    "ProtocolVersionMismatchError",
    "InvalidPacketDataError",
    "ServiceSchemaError",
    "BrokerOptionsError",
    "BrokerDisconnectedError",
    "RemoteError",
    "ProtocolError",
    "FrameError",
    "FlowError",
    "PacketError",
    "StreamError",
    "StreamIdleTimeoutError",
    "StreamClosedError",
    "SerializationError",
    "ForbiddenError",
    "CircuitBreakerOpenError",
    "request_timeout",
    "error_from_wire",
    "error_to_wire",
]


class NerveError(Exception):
    """Root of every nerve error; carries Moleculer's error fields.

    ``code`` is HTTP-like (500 by default), ``type`` a short upper-case tag, ``data`` any
    serializable detail, ``retryable`` whether a retry may succeed, ``node_id`` the node
    that raised it and ``stack`` the remote stack trace (text) when it came over the wire.
    """

    wire_name: ClassVar[str] = "MoleculerError"
    default_code: ClassVar[int] = 500
    default_type: ClassVar[str | None] = None
    default_retryable: ClassVar[bool] = False

    def __init__(
        self,
        message: str = "",
        code: int | None = None,
        type: str | None = None,
        data: Any = None,
        *,
        retryable: bool | None = None,
        node_id: str | None = None,
        stack: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = self.default_code if code is None else code
        self.type = self.default_type if type is None else type
        self.data = data
        self.retryable = self.default_retryable if retryable is None else retryable
        self.node_id = node_id
        self.stack = stack

    @property
    def name(self) -> str:
        return self.wire_name

    def __str__(self) -> str:
        return self.message

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r}, code={self.code}, type={self.type!r})"

    def __reduce__(self) -> Any:
        return (_rebuild, (type(self), self.__dict__.copy()))


def _rebuild(cls: type[NerveError], state: dict[str, Any]) -> NerveError:
    exc = cls.__new__(cls)
    Exception.__init__(exc, state.get("message", ""))
    exc.__dict__.update(state)
    return exc


class RetryableError(NerveError):
    wire_name = "MoleculerRetryableError"
    default_retryable = True


class ServerError(RetryableError):
    wire_name = "MoleculerServerError"


class ClientError(NerveError):
    wire_name = "MoleculerClientError"
    default_code = 400


class ValidationError(ClientError):
    """Bad parameters: code 422; ``data`` lists the fields and reasons."""

    wire_name = "ValidationError"
    default_code = 422
    default_type = "VALIDATION_ERROR"


class ServiceNotFoundError(RetryableError):
    wire_name = "ServiceNotFoundError"
    default_code = 404
    default_type = "SERVICE_NOT_FOUND"


class ServiceNotAvailableError(RetryableError):
    wire_name = "ServiceNotAvailableError"
    default_code = 404
    default_type = "SERVICE_NOT_AVAILABLE"


class RequestTimeoutError(RetryableError):
    wire_name = "RequestTimeoutError"
    default_code = 504
    default_type = "REQUEST_TIMEOUT"


class RequestSkippedError(RequestTimeoutError):
    """The call's budget was spent before it could be sent (a timeout, never retried)."""

    wire_name = "RequestSkippedError"
    default_code = 514
    default_type = "REQUEST_SKIPPED"
    default_retryable = False


class RequestRejectedError(RetryableError):
    """The node that was handling the call went away."""

    wire_name = "RequestRejectedError"
    default_code = 503
    default_type = "REQUEST_REJECTED"


class QueueIsFullError(RetryableError):
    wire_name = "QueueIsFullError"
    default_code = 429
    default_type = "QUEUE_FULL"


class ForbiddenError(ClientError):
    """A guard refused the call (403, not retryable)."""

    wire_name = "ForbiddenError"
    default_code = 403
    default_type = "FORBIDDEN"


class CircuitBreakerOpenError(RetryableError):
    """The circuit of the chosen endpoint is open: the call failed fast, nothing was sent."""

    wire_name = "CircuitBreakerOpenError"
    default_code = 503
    default_type = "CIRCUIT_BREAKER_OPEN"


def request_timeout(action: str | None, node_id: str | None, *, by: str | None = None) -> RequestTimeoutError:
    """The one RequestTimeoutError nerve raises (Moleculer's message): ``action`` timed out on
    ``node_id``; ``by`` is the node that saw it (default ``node_id``)."""
    return RequestTimeoutError(
        f"Request is timed out when call '{action}' action on '{node_id}' node.",
        data={"action": action, "nodeID": node_id}, node_id=by or node_id)


class MaxCallLevelError(NerveError):
    wire_name = "MaxCallLevelError"
    default_type = "MAX_CALL_LEVEL"


class GracefulStopTimeoutError(NerveError):
    wire_name = "GracefulStopTimeoutError"
    default_type = "GRACEFUL_STOP_TIMEOUT"


class ProtocolVersionMismatchError(NerveError):
    wire_name = "ProtocolVersionMismatchError"
    default_type = "PROTOCOL_VERSION_MISMATCH"


class InvalidPacketDataError(NerveError):
    wire_name = "InvalidPacketDataError"
    default_type = "INVALID_PACKET_DATA"


class ServiceSchemaError(NerveError):
    wire_name = "ServiceSchemaError"
    default_type = "SERVICE_SCHEMA_ERROR"


class BrokerOptionsError(NerveError):
    wire_name = "BrokerOptionsError"
    default_type = "BROKER_OPTIONS_ERROR"


class BrokerDisconnectedError(RetryableError):
    wire_name = "BrokerDisconnectedError"
    default_code = 502
    default_type = "BAD_GATEWAY"


class RemoteError(NerveError):
    """An error whose name nerve does not know; keeps the remote ``name``."""

    def __init__(self, message: str = "", code: int | None = None, type: str | None = None,
                 data: Any = None, *, name: str = "Error", **kw: Any) -> None:
        super().__init__(message, code, type, data, **kw)
        self.remote_name = name

    @property
    def name(self) -> str:
        return self.remote_name


# --- nerve's own protocol and stream errors -------------------------------------------


class ProtocolError(NerveError):
    """A peer broke the protocol (or we were asked to)."""

    wire_name = "ProtocolError"
    default_type = "PROTOCOL_ERROR"

    def __init__(self, message: str = "", reason: str | None = None, **kw: Any) -> None:
        super().__init__(message, **kw)
        self.reason = reason


class FrameError(ProtocolError):
    """A malformed frame: ``reason`` is one of ``bad_checksum``, ``length_below_header``,
    ``length_above_maximum``, ``unknown_type``, ``payload_too_large``, ``bad_stream_header``."""

    wire_name = "FrameError"
    default_type = "FRAME_ERROR"


class FlowError(ProtocolError):
    """A stream broke flow control: window exceeded, duplicate or out-of-range chunk."""

    wire_name = "FlowError"
    default_type = "FLOW_ERROR"


class PacketError(ProtocolError, InvalidPacketDataError):
    """A packet that does not match the model; ``field`` names the offending field."""

    wire_name = "InvalidPacketDataError"
    default_type = "INVALID_PACKET_DATA"

    def __init__(self, message: str = "", field: str | None = None, **kw: Any) -> None:
        super().__init__(message, reason="invalid_packet", **kw)
        self.field = field


class StreamError(RetryableError):
    """A stream failed (peer gone, aborted, or closed early by its consumer)."""

    wire_name = "StreamError"
    default_type = "STREAM_ERROR"
    default_retryable = False


class StreamIdleTimeoutError(StreamError):
    wire_name = "StreamIdleTimeoutError"
    default_code = 504
    default_type = "STREAM_IDLE_TIMEOUT"


class StreamClosedError(StreamError):
    wire_name = "StreamClosedError"
    default_type = "STREAM_CLOSED"


class SerializationError(NerveError):
    """A value could not be serialized (for example a handler's result)."""

    wire_name = "SerializationError"
    default_type = "SERIALIZATION_ERROR"


def _all_classes() -> dict[str, type[NerveError]]:
    found: dict[str, type[NerveError]] = {}
    stack: list[type[NerveError]] = [NerveError]
    while stack:
        cls = stack.pop()
        found.setdefault(cls.wire_name, cls)
        stack.extend(cls.__subclasses__())
    found["MoleculerError"] = NerveError
    found["InvalidPacketDataError"] = InvalidPacketDataError
    return found


_BY_NAME = _all_classes()


def error_to_wire(exc: BaseException, node_id: str | None = None) -> dict[str, Any]:
    """Moleculer's plain error object for ``exc`` (any exception)."""
    if isinstance(exc, NerveError):
        stack = exc.stack or "".join(traceback.format_exception(exc))
        return {
            "name": exc.name,
            "message": exc.message,
            "nodeID": exc.node_id or node_id,
            "code": exc.code,
            "type": exc.type,
            "retryable": exc.retryable,
            "stack": stack,
            "data": exc.data,
        }
    return {
        "name": type(exc).__name__,
        "message": str(exc),
        "nodeID": node_id,
        "code": 500,
        "type": None,
        "retryable": False,
        "stack": "".join(traceback.format_exception(exc)),
        "data": None,
    }


def error_from_wire(plain: Any, sender: str | None = None) -> NerveError:
    """Rebuild an exception from its wire form; unknown names give :class:`RemoteError`."""
    if not isinstance(plain, dict):
        return RemoteError(str(plain), node_id=sender, name="Error")
    name = plain.get("name") or "Error"
    message = plain.get("message")
    message = "" if message is None else str(message)
    code = plain.get("code")
    code = code if isinstance(code, int) and not isinstance(code, bool) else None
    type_ = plain.get("type")
    type_ = type_ if isinstance(type_, str) else None
    retryable = plain.get("retryable")
    kw: dict[str, Any] = {
        "node_id": plain.get("nodeID") or sender,
        "stack": plain.get("stack") if isinstance(plain.get("stack"), str) else None,
    }
    if isinstance(retryable, bool):
        kw["retryable"] = retryable
    cls = _BY_NAME.get(name) if isinstance(name, str) else None
    if cls is None:
        exc: NerveError = RemoteError(message, code if code is not None else 500, type_, plain.get("data"),
                                      name=str(name), **kw)
    else:
        exc = cls.__new__(cls)
        NerveError.__init__(exc, message, code, type_, plain.get("data"), **kw)
        if isinstance(exc, ProtocolError):
            exc.reason = None
        if isinstance(exc, PacketError):
            exc.field = None
    return exc
