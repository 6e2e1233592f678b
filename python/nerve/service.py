"""Services: classes whose ``@action`` methods answer calls and ``@event`` methods handle events.

Typed handlers (``async def add(self, ctx, params: AddParams) -> AddResult``) get their
params validated by msgspec; a mismatch is a :class:`nerve.errors.ValidationError` (422)
naming the field. This module only describes services; the broker runs them.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar, overload

import msgspec

from nerve.errors import ServiceSchemaError, ValidationError

__all__ = ["Service", "action", "event", "ActionSpec", "EventSpec"]

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])

_ACTION_ATTR = "__nerve_action__"
_EVENT_ATTR = "__nerve_event__"


@dataclass(frozen=True)
class _ActionMark:
    name: str | None
    params_schema: dict[str, Any] | None = None


@dataclass(frozen=True)
class _EventMark:
    name: str
    group: str | None


@overload
def action(fn: F, /) -> F: ...
@overload
def action(*, name: str | None = None) -> Callable[[F], F]: ...


def action(fn: F | None = None, /, *, name: str | None = None) -> F | Callable[[F], F]:
    """Mark a method of a :class:`Service` as an action (``@action`` or ``@action(name=...)``)."""

    def mark(f: F) -> F:
        if not inspect.iscoroutinefunction(f):
            raise ServiceSchemaError(f"action {getattr(f, '__qualname__', f)} must be an 'async def'")
        setattr(f, _ACTION_ATTR, _ActionMark(name))
        return f  # type: ignore[return-value]  # mypy narrows F in iscoroutinefunction

    return mark(fn) if fn is not None else mark


def event(name: str, *, group: str | None = None) -> Callable[[F], F]:
    """Mark a method of a :class:`Service` as the handler of event ``name``.

    ``group`` defaults to the service's name: an ``emit`` reaches one handler per group.
    ``name`` may use ``*`` (one dot-separated segment) and ``**`` (any) wildcards.
    """

    def mark(f: F) -> F:
        if not inspect.iscoroutinefunction(f):
            raise ServiceSchemaError(f"event handler {getattr(f, '__qualname__', f)} must be an 'async def'")
        setattr(f, _EVENT_ATTR, _EventMark(name, group))
        return f  # type: ignore[return-value]  # mypy narrows F in iscoroutinefunction

    return mark


def _validation_error(action: str, exc: msgspec.ValidationError) -> ValidationError:
    text = str(exc)
    path = None
    if " - at `$" in text:
        reason, _, where = text.partition(" - at `$")
        path = where.rstrip("`").lstrip(".") or None
    else:
        reason = text
    return ValidationError(
        f"invalid parameters for '{action}': {text}",
        data={"action": action, "field": path, "reason": reason},
    )


@dataclass
class ActionSpec:
    """A bound action: its full name, handler and (optional) params type."""

    name: str
    raw_name: str
    service: Service
    handler: Callable[..., Awaitable[Any]]
    params_type: Any = None
    wants_params: bool = False

    def convert_params(self, params: Any) -> Any:
        if self.params_type is None:
            return params
        try:
            return msgspec.convert(params, self.params_type, strict=False)
        except msgspec.ValidationError as exc:
            raise _validation_error(self.name, exc) from None

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "rawName": self.raw_name}
        if self.params_type is not None:
            try:
                out["params"] = msgspec.json.schema(self.params_type)
            except (TypeError, ValueError):
                pass
        return out


@dataclass
class EventSpec:
    name: str
    group: str
    service: Service
    handler: Callable[..., Awaitable[Any]]
    data_type: Any = None
    wants_data: bool = False

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "group": self.group}


def _inspect_handler(fn: Callable[..., Any]) -> tuple[Any, bool]:
    """(params type or None, whether the handler takes a third argument)."""
    sig = inspect.signature(fn)
    params = list(sig.parameters.values())[2:]  # self, ctx
    if not params:
        return None, False
    if len(params) > 1:
        raise ServiceSchemaError(f"{fn.__qualname__}: handlers take (self, ctx) or (self, ctx, params)")
    try:
        hints = typing.get_type_hints(fn)
    except Exception as exc:  # unresolved forward references
        raise ServiceSchemaError(f"{fn.__qualname__}: cannot resolve annotations: {exc}") from exc
    tp = hints.get(params[0].name)
    return tp, True


class Service:
    """Base class of services. Set ``name`` (and optionally ``version``) on the subclass.

    ``started`` / ``stopped`` are called by the broker around the service's life.
    """

    name: str = ""
    version: str | int | None = None
    settings: dict[str, Any] = {}
    metadata: dict[str, Any] = {}
    dependencies: list[str] = []

    broker: Any = None

    @property
    def full_name(self) -> str:
        if self.version is None:
            return self.name
        v = self.version
        return f"v{v}.{self.name}" if isinstance(v, int) else f"{v}.{self.name}"

    async def started(self) -> None:
        """Called when the broker starts (or when the service is added to a running broker)."""

    async def stopped(self) -> None:
        """Called when the broker stops or the service is removed."""

    def _specs(self) -> tuple[list[ActionSpec], list[EventSpec]]:
        if not self.name or not isinstance(self.name, str):
            raise ServiceSchemaError(f"{type(self).__name__} has no 'name'")
        actions: list[ActionSpec] = []
        events: list[EventSpec] = []
        seen: set[str] = set()
        for attr in dir(type(self)):
            fn = getattr(type(self), attr, None)
            if fn is None:
                continue
            mark = getattr(fn, _ACTION_ATTR, None)
            if isinstance(mark, _ActionMark):
                raw = mark.name or attr
                full = f"{self.full_name}.{raw}"
                if full in seen:
                    raise ServiceSchemaError(f"action {full!r} is defined twice")
                seen.add(full)
                tp, wants = _inspect_handler(fn)
                actions.append(ActionSpec(full, raw, self, getattr(self, attr), tp, wants))
            emark = getattr(fn, _EVENT_ATTR, None)
            if isinstance(emark, _EventMark):
                if any(e.name == emark.name for e in events):
                    # INFO keys a service's events by name (as Moleculer does): one per name.
                    raise ServiceSchemaError(
                        f"service {self.full_name!r} subscribes to event {emark.name!r} twice")
                tp, wants = _inspect_handler(fn)
                events.append(EventSpec(emark.name, emark.group or self.full_name, self,
                                        getattr(self, attr), tp, wants))
        return actions, events

    def describe(self, actions: list[ActionSpec], events: list[EventSpec]) -> dict[str, Any]:
        """The service's entry in an INFO packet, as Moleculer describes services."""
        out: dict[str, Any] = {
            "name": self.name,
            "version": self.version,
            "fullName": self.full_name,
            "settings": dict(self.settings),
            "metadata": dict(self.metadata),
            "dependencies": list(self.dependencies) or None,
            "actions": {a.name: a.describe() for a in actions},
            "events": {e.name: e.describe() for e in events},
        }
        return out

