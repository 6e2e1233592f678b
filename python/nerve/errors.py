"""nerve's exception tree and its wire form.

Every error nerve raises is a :class:`NerveError`. Errors cross the wire as Moleculer's plain
error object ``{name, message, code, type, data, retryable, nodeID, stack}``; this module
owns that mapping and never does I/O.

Wire names
----------
Every :class:`NerveError` subclass is registered, when its ``class`` statement runs, under its
*wire name*: the class's ``wire_name`` if its body sets one, else its class name. The wire
name is the error packet's ``name``; the receiving node looks the name up here and rebuilds
that class, so an application's own errors keep their class across the wire as long as both
nodes import the module that defines it::

    class InsufficientFunds(NerveError):
        # the account cannot cover the amount
        default_code = 402
        default_type = "INSUFFICIENT_FUNDS"

    raise InsufficientFunds("balance too low", data={"balance": 3})  # name "InsufficientFunds"

The rules of the registry:

* nerve's own and Moleculer's names (``MoleculerError``, ``ValidationError``,
  ``RequestTimeoutError``... every class of this module) belong to this module. A class of
  another module that claims one (by ``wire_name`` or by its class name) is refused with
  ``TypeError`` when it is defined, unless the name is its own ancestor's: then it *travels as
  that ancestor* and is not registered (``class OrderInvalid(ValidationError): wire_name =
  "ValidationError"`` reaches a Moleculer node, or a node that does not know it, as a
  ``ValidationError``).
* Two classes of applications claiming one name (two libraries may): the first keeps it, and
  a warning names both (set ``wire_name`` on one of them); the second still travels by that
  name, and errors of that name arriving here are rebuilt as the first. A class redefined
  under the same qualified name in the same module (a reloaded module), or in ``__main__``
  and in the module a script is also imported as, replaces the first. The registry holds
  applications' classes weakly: a class that no longer exists frees its name.
* The receiving side builds the class *without calling its* ``__init__`` (nor a ``__new__``
  of its own): ``message``, ``code``, ``type``, ``data``, ``retryable``, ``node_id`` and
  ``stack`` are set from the wire, so a class whose ``__init__`` takes other arguments
  still comes back. Attributes an ``__init__`` sets travel only in ``data``; give them a
  class-level default if code reads them on the caller's side.
* A name nobody registered comes back as :class:`RemoteError`, whose ``name`` is the
  sender's. A name is text a peer chose: it only ever selects a registered
  :class:`NerveError` subclass, nothing else is looked up or imported.

:func:`registered_errors` lists the registry. Where a builtin exception means the same, a
class also subclasses it (:class:`RequestTimeoutError` is a ``TimeoutError``,
:class:`ValidationError` a ``ValueError``, :class:`ForbiddenError` a ``PermissionError``,
:class:`ServiceNotFoundError` a ``LookupError``, :class:`BrokerNotRunningError` a
``RuntimeError``).
"""

from __future__ import annotations

import logging
import traceback
import weakref
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
    "BrokerNotRunningError",
    "BrokerDisconnectedError",
    "RemoteError",
    "ProtocolError",
    "FrameError",
    "FlowError",
    "PacketError",
    "StreamError",
    "StreamIdleTimeoutError",
    "StreamClosedError",
    "StreamOverflowError",
    "SerializationError",
    "ForbiddenError",
    "CircuitBreakerOpenError",
    "request_timeout",
    "registered_errors",
    "error_from_wire",
    "error_to_wire",
]

#: wire name -> class, for the classes of this module (Moleculer's names and nerve's own)
_BUILTIN: dict[str, type[NerveError]] = {}
#: wire name -> class, for the classes of applications (held weakly: see the module's docstring)
_USER: weakref.WeakValueDictionary[str, type[NerveError]] = weakref.WeakValueDictionary()


class NerveError(Exception):
    """Root of every nerve error; carries Moleculer's error fields.

    ``code`` is HTTP-like (500 by default), ``type`` a short upper-case tag, ``data`` any
    serializable detail, ``retryable`` whether a retry may succeed, ``node_id`` the node
    that raised it and ``stack`` the remote stack trace (text) when it came over the wire.
    ``name`` is the class's wire name (see the module's docstring); a subclass sets
    ``default_code`` / ``default_type`` / ``default_retryable``, and ``wire_name`` if it
    travels under a name other than its class name.
    """

    wire_name: ClassVar[str] = "MoleculerError"
    default_code: ClassVar[int] = 500
    default_type: ClassVar[str | None] = None
    default_retryable: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "wire_name" not in vars(cls):
            cls.wire_name = cls.__name__
        _register(cls)

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
        """The error's name on the wire (the class's ``wire_name``)."""
        return self.wire_name

    def __str__(self) -> str:
        return self.message

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r}, code={self.code}, type={self.type!r})"

    def __reduce__(self) -> Any:
        return (_rebuild, (type(self), self.__dict__.copy()))


def _register(cls: type[NerveError]) -> None:
    """Give ``cls`` its wire name (the rules are in the module's docstring)."""
    name = cls.wire_name
    if not isinstance(name, str) or not name:
        raise TypeError(f"{cls.__qualname__}.wire_name must be a non-empty str, not {name!r}")
    owner = _BUILTIN.get(name) or _USER.get(name)
    if owner is None or owner is cls:
        pass
    elif owner in cls.__mro__:
        return  # travels as its ancestor, which keeps the name
    elif owner.__module__ == __name__:
        raise TypeError(
            f"{cls.__module__}.{cls.__qualname__}: the wire name {name!r} is nerve's "
            f"(nerve.errors.{owner.__qualname__}); set wire_name = '...' to a name of your own, "
            f"or subclass {owner.__qualname__} to travel as it")
    elif owner.__qualname__ == cls.__qualname__ and "__main__" in (owner.__module__, cls.__module__):
        pass  # a script's module imported again under its own name: the same class, the later wins
    elif (owner.__module__, owner.__qualname__) != (cls.__module__, cls.__qualname__):
        # Two libraries may pick one name and neither author can prevent it: the first keeps
        # it (received errors of that name become it), the later one still travels by it.
        logging.getLogger("nerve.errors").warning(
            "%s.%s: the wire name %r is already %s.%s's; errors of that name arriving here are "
            "rebuilt as the first (set wire_name = '...' on one of them)",
            cls.__module__, cls.__qualname__, name, owner.__module__, owner.__qualname__)
        return
    if cls.__module__ == __name__:
        _BUILTIN[name] = cls
    else:
        _USER[name] = cls


_BUILTIN[NerveError.wire_name] = NerveError


def registered_errors() -> dict[str, type[NerveError]]:
    """The registry of wire names: ``{name: class}``, nerve's and Moleculer's first, then the
    applications' classes that exist now (a copy: change it by defining classes)."""
    return {**_BUILTIN, **_USER}


def _blank(cls: type[NerveError], message: str) -> NerveError:
    """An instance of ``cls`` made without running an ``__init__`` or ``__new__`` of Python
    code: only the builtin exception's own ``__new__`` (``TimeoutError``'s is ``OSError``'s)."""
    base = next(b for b in cls.__mro__ if b.__module__ == "builtins")
    exc: NerveError = base.__new__(cls)  # type: ignore[call-overload]
    exc.args = (message,)
    return exc


def _rebuild(cls: type[NerveError], state: dict[str, Any]) -> NerveError:
    exc = _blank(cls, state.get("message", ""))
    exc.__dict__.update(state)
    return exc


class RetryableError(NerveError):
    """Moleculer's ``MoleculerRetryableError``: a failure a retry may cure (``retryable``)."""

    wire_name = "MoleculerRetryableError"
    default_retryable = True


class ServerError(RetryableError):
    """Moleculer's ``MoleculerServerError``: the server failed (500, retryable)."""

    wire_name = "MoleculerServerError"


class ClientError(NerveError):
    """Moleculer's ``MoleculerClientError``: the request was wrong (400, not retryable)."""

    wire_name = "MoleculerClientError"
    default_code = 400


# Builtin bases: a class also subclasses the builtin exception that means the same thing,
# so ``except TimeoutError`` / ``except ValueError`` ... catch it. Not given where it would
# mislead or where nerve's own code catches the builtin around I/O (``except OSError`` in
# the transports): a queue that is full is not a ``BlockingIOError``, a closed stream not a
# ``BrokenPipeError``.


class ValidationError(ClientError, ValueError):
    """Bad parameters: code 422; ``data`` holds ``field`` (the path of the offending field,
    e.g. ``"b"`` or ``"point.x"``) and ``reason``. Also a ``ValueError``."""

    wire_name = "ValidationError"
    default_code = 422
    default_type = "VALIDATION_ERROR"


class ServiceNotFoundError(RetryableError, LookupError):
    """No node offers the action (or not the node asked for): 404, retryable. Also a
    ``LookupError``: a name was looked up in the registry and is not there."""

    wire_name = "ServiceNotFoundError"
    default_code = 404
    default_type = "SERVICE_NOT_FOUND"


class ServiceNotAvailableError(RetryableError):
    """The action is known but no endpoint of it can take the call now: 404, retryable.
    (Not a ``LookupError``: the name was found.)"""

    wire_name = "ServiceNotAvailableError"
    default_code = 404
    default_type = "SERVICE_NOT_AVAILABLE"


class RequestTimeoutError(RetryableError, TimeoutError):
    """The call's deadline passed before an answer came: 504, retryable. Also a
    ``TimeoutError`` (so an ``OSError``: ``errno`` and ``strerror`` are ``None``)."""

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
    """The serving node's queue (a bulkhead) is full: 429, retryable. No builtin base: a
    ``BlockingIOError`` is an ``OSError`` the TCP transport reads as "socket full"."""

    wire_name = "QueueIsFullError"
    default_code = 429
    default_type = "QUEUE_FULL"


class ForbiddenError(ClientError, PermissionError):
    """A guard refused the call (403, not retryable). Also a ``PermissionError``."""

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
    """A call chain went deeper than the broker's ``max_call_level``. (Not a
    ``RecursionError``: that one is about the interpreter's stack.)"""

    wire_name = "MaxCallLevelError"
    default_type = "MAX_CALL_LEVEL"


class GracefulStopTimeoutError(NerveError, TimeoutError):
    """Stopping did not finish (handlers still running) within the grace period. Also a
    ``TimeoutError``."""

    wire_name = "GracefulStopTimeoutError"
    default_type = "GRACEFUL_STOP_TIMEOUT"


class ProtocolVersionMismatchError(NerveError):
    """A peer speaks another version of Moleculer's protocol."""

    wire_name = "ProtocolVersionMismatchError"
    default_type = "PROTOCOL_VERSION_MISMATCH"


class InvalidPacketDataError(NerveError):
    """Moleculer's name for a packet that does not match its model (nerve raises
    :class:`PacketError`, which travels under this name)."""

    wire_name = "InvalidPacketDataError"
    default_type = "INVALID_PACKET_DATA"


class ServiceSchemaError(NerveError):
    """A service is defined wrongly (no name, a bad handler signature, a bad hook, guard or
    property...): raised when the class is defined or the service is added."""

    wire_name = "ServiceSchemaError"
    default_type = "SERVICE_SCHEMA_ERROR"


class BrokerOptionsError(NerveError):
    """A broker option is wrong (a bad address, transport, TLS file...)."""

    wire_name = "BrokerOptionsError"
    default_type = "BROKER_OPTIONS_ERROR"


class BrokerNotRunningError(BrokerOptionsError, RuntimeError):
    """The broker is not running (use ``async with Broker(...)``). A ``RuntimeError`` (it was
    used at the wrong time), and a :class:`BrokerOptionsError`, which nerve raised before."""

    wire_name = "BrokerNotRunningError"
    default_type = "BROKER_NOT_RUNNING"


class BrokerDisconnectedError(RetryableError):
    """The node to call is not connected (or the transport is down): 502, retryable."""

    wire_name = "BrokerDisconnectedError"
    default_code = 502
    default_type = "BAD_GATEWAY"


class RemoteError(NerveError):
    """An error whose name nerve does not know; keeps the remote ``name``."""

    #: not a wire name of its own: RemoteError travels under the name it carries
    wire_name = "MoleculerError"

    def __init__(self, message: str = "", code: int | None = None, type: str | None = None,
                 data: Any = None, *, name: str = "Error", **kw: Any) -> None:
        super().__init__(message, code, type, data, **kw)
        self.remote_name = name

    @property
    def name(self) -> str:
        """The name the remote node gave the error."""
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


class StreamIdleTimeoutError(StreamError, TimeoutError):
    """Nothing moved on a stream for its ``idle_timeout`` (no data, no credit, or a peer that
    does not read): 504. Also a ``TimeoutError``."""

    wire_name = "StreamIdleTimeoutError"
    default_code = 504
    default_type = "STREAM_IDLE_TIMEOUT"


class StreamOverflowError(StreamError):
    """A producer without flow control (a moleculer.js node: Moleculer's streams have none)
    got further ahead of its reader than the node's ``max_stream_buffer`` bytes, or than its
    reorder bound: the stream fails rather than grow."""

    wire_name = "StreamOverflowError"
    default_type = "STREAM_OVERFLOW"


class StreamClosedError(StreamError):
    """The stream was closed (or aborted) before this operation. No builtin base: a
    ``BrokenPipeError`` / ``ConnectionError`` is an ``OSError``, which the transports catch
    around socket I/O, and a stream is often closed by its own consumer, not the network."""

    wire_name = "StreamClosedError"
    default_type = "STREAM_CLOSED"


class SerializationError(NerveError):
    """A value could not be serialized (for example a handler's result)."""

    wire_name = "SerializationError"
    default_type = "SERIALIZATION_ERROR"


def error_to_wire(exc: BaseException, node_id: str | None = None) -> dict[str, Any]:
    """Moleculer's plain error object for ``exc`` (any exception); a :class:`NerveError`
    goes under its wire name, any other exception under its class name."""
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
    """Rebuild an exception from its wire form: the class registered under its ``name``
    (built without calling its ``__init__``); unknown names give :class:`RemoteError`."""
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
    stack = plain.get("stack")
    node_id = plain.get("nodeID") or sender
    stack = stack if isinstance(stack, str) else None
    cls = (_BUILTIN.get(name) or _USER.get(name)) if isinstance(name, str) else None
    if cls is None:
        return RemoteError(message, code if code is not None else 500, type_, plain.get("data"),
                           name=str(name), node_id=node_id, stack=stack,
                           retryable=retryable if isinstance(retryable, bool) else None)
    exc = _blank(cls, message)
    exc.message = message
    exc.code = cls.default_code if code is None else code
    exc.type = cls.default_type if type_ is None else type_
    exc.data = plain.get("data")
    exc.retryable = retryable if isinstance(retryable, bool) else cls.default_retryable
    exc.node_id = node_id
    exc.stack = stack
    if isinstance(exc, ProtocolError):
        exc.reason = None
    if isinstance(exc, PacketError):
        exc.field = None
    return exc
