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
        own = kwargs.get("extra")
        kwargs["extra"] = {**self.extra, **own} if own else self.extra  # type: ignore[dict-item]
        return msg, kwargs

    def bind(self, **fields: Any) -> NodeLogger:
        """A logger with the same fields and these."""
        return NodeLogger(self.logger, {**self.extra, **fields})  # type: ignore[dict-item]


def node_logger(name: str, node_id: str) -> NodeLogger:
    """The logger ``name`` (``nerve.broker``, ``nerve.transit``, ...) for node ``node_id``."""
    return NodeLogger(logging.getLogger(name), {"node_id": node_id})


def call_fields(ctx: Any) -> dict[str, Any]:
    """The fields of a record about the call or event ``ctx`` (a :class:`~nerve.Context`)."""
    fields = {"service": ctx.service, "request_id": ctx.request_id, "caller": ctx.caller,
              "caller_node": ctx.node_id}
    if ctx.action is not None:
        fields["action"] = ctx.action
    if ctx.event is not None:
        fields["event"] = ctx.event
    return fields


def log_handler_failure(logger: NodeLogger, ctx: Any, exc: BaseException) -> None:
    """An action handler of this node raised ``exc`` for ``ctx``: log it once (see above)."""
    from nerve.errors import NerveError

    who = f"{ctx.caller or 'a caller'} on {ctx.node_id or 'this node'}"
    fields = call_fields(ctx)
    if not isinstance(exc, NerveError):
        logger.error("action %s failed for %s (request %s)", ctx.action, who, ctx.request_id,
                     exc_info=exc, extra=fields)
    elif isinstance(exc.code, int) and exc.code >= 500:
        logger.warning("action %s failed for %s (request %s): %s %s: %s", ctx.action, who, ctx.request_id,
                       exc.code, type(exc).__name__, exc, extra=fields)
    elif logger.isEnabledFor(logging.DEBUG):
        logger.debug("action %s answered %s (request %s) with %s %s: %s", ctx.action, who, ctx.request_id,
                     exc.code, type(exc).__name__, exc, extra=fields)


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ``time``, ``level``, ``logger``, ``message``, nerve's
    fields present on the record (:data:`FIELDS`) and ``exc`` (the formatted traceback) if
    any. ``nerve --log-format json`` uses it; so can any application."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {"time": round(record.created, 6), "level": record.levelname,
                               "logger": record.name, "message": record.getMessage()}
        for name in FIELDS:
            value = record.__dict__.get(name)
            if value is not None:
                out[name] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=repr)  # ASCII: a peer's lone surrogate cannot break the stream
