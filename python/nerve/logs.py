"""Logs: stdlib ``logging`` with a node's identity and a call's as structured fields.

Theory of operation. nerve configures no handler (the application does). Every record a
node writes carries ``node_id`` as an attribute of the ``LogRecord``; records about a call or
an event also carry ``service``, ``action`` (or ``event``), ``request_id``, ``caller`` (the
calling service) and ``caller_node``; records about another node carry ``peer``. A JSON formatter (python-json-logger, structlog's
``ProcessorFormatter``, or a ``logging.Formatter`` with ``%(node_id)s``) picks them up with no
parsing of messages. The messages themselves stay readable on their own.

:class:`NodeLogger` is a ``LoggerAdapter`` that merges its fields with a call's ``extra=``
(the stdlib adapter replaces them); ``broker.logger`` and ``service.logger`` are ones, and
``logger.bind(field=value)`` makes a child with more fields.

What is logged at INFO: a node's start and stop, peers joining and leaving. An exception
raised by an action handler is logged once, on the node that ran it: at ERROR with its
traceback when it is not a :class:`~nerve.NerveError` (a bug), at WARNING in one line for a
``NerveError`` with a 5xx code, at DEBUG for the others (a 4xx is the caller's mistake,
answered to the caller, not the operator's concern).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, MutableMapping
from typing import Any

__all__ = ["FIELDS", "JsonFormatter", "NodeLogger", "node_logger"]

#: The record attributes nerve sets (a formatter may list them).
FIELDS = ("node_id", "service", "action", "event", "request_id", "caller", "caller_node", "peer")


class NodeLogger(logging.LoggerAdapter):  # type: ignore[type-arg]
    """A logger whose records carry fixed fields (``extra``), merged with each call's."""

    def __init__(self, logger: logging.Logger, extra: Mapping[str, Any]) -> None:
        super().__init__(logger, dict(extra))

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, MutableMapping[str, Any]]:
        """Merge this logger's fields with the call's ``extra=`` (the call's win)."""
        own = kwargs.get("extra")
        kwargs["extra"] = {**self.extra, **own} if own else self.extra  # type: ignore[dict-item]
        return msg, kwargs

    def bind(self, **fields: Any) -> NodeLogger:
        """A logger with the same fields and these."""
        return NodeLogger(self.logger, {**self.extra, **fields})  # type: ignore[dict-item]


def node_logger(name: str, node_id: str) -> NodeLogger:
    """The logger ``name`` (``nerve.broker``, ``nerve.transit``, ...) for node ``node_id``."""
    return NodeLogger(logging.getLogger(name), {"node_id": node_id})


#: A value a peer controls is cut to this many characters in a record (message and fields).
MAX_FIELD = 128


def _cut(value: Any) -> Any:
    if isinstance(value, str) and len(value) > MAX_FIELD:
        return value[:MAX_FIELD] + "..."
    return value


def call_fields(ctx: Any) -> dict[str, Any]:
    """The fields of a record about the call or event ``ctx`` (a :class:`~nerve.Context`);
    values a peer sent are cut to :data:`MAX_FIELD` characters."""
    fields = {"service": ctx.service, "request_id": _cut(ctx.request_id), "caller": _cut(ctx.caller),
              "caller_node": ctx.node_id}
    if ctx.action is not None:
        fields["action"] = _cut(ctx.action)
    if ctx.event is not None:
        fields["event"] = _cut(ctx.event)
    return fields


def log_handler_failure(logger: NodeLogger, ctx: Any, exc: BaseException) -> None:
    """An action handler of this node raised ``exc`` for ``ctx``: log it once (see above).
    Peers' strings (caller, request id) are shown with ``repr`` and cut, so a peer can forge
    no line and flood no record. An exception already logged by a nested local call of this
    node, passing through its caller's handler, is not logged again."""
    from nerve.errors import NerveError, RequestTimeoutError

    try:
        if getattr(exc, "__nerve_logged__", False):
            return
        exc.__nerve_logged__ = True  # type: ignore[attr-defined]
    except AttributeError:  # an exception class with __slots__: log it each time
        pass
    fields = call_fields(ctx)
    who = f"{fields['caller'] or 'a caller'!r} on {ctx.node_id or 'this node'!r}"
    action, request = fields.get("action"), fields["request_id"]
    if isinstance(exc, RequestTimeoutError):  # cut by the caller's budget: slow, not broken
        logger.warning("action %r ran out of the budget of %s (request %r): %s", action, who, request,
                       _cut(str(exc)), extra=fields)
    elif not isinstance(exc, NerveError):
        logger.error("action %r failed for %s (request %r)", action, who, request,
                     exc_info=exc, extra=fields)
    elif isinstance(exc.code, int) and exc.code >= 500:
        logger.warning("action %r failed for %s (request %r): %s %s: %s", action, who, request,
                       exc.code, type(exc).__name__, _cut(str(exc)), extra=fields)
    elif logger.isEnabledFor(logging.DEBUG):
        logger.debug("action %r answered %s (request %r) with %s %s: %s", action, who, request,
                     exc.code, type(exc).__name__, _cut(str(exc)), extra=fields)


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ``time``, ``level``, ``logger``, ``message``, nerve's
    fields present on the record (:data:`FIELDS`) and ``exc`` (the formatted traceback) if
    any. ``nerve --log-format json`` uses it; so can any application."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as one line of JSON (see the class)."""
        out: dict[str, Any] = {"time": round(record.created, 6), "level": record.levelname,
                               "logger": record.name, "message": record.getMessage()}
        for name in FIELDS:
            value = record.__dict__.get(name)
            if value is not None:
                out[name] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=repr)  # ASCII: a peer's lone surrogate cannot break the stream
