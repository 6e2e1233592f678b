"""Services: classes whose ``@action`` methods answer calls and ``@event`` methods handle events.

A handler is ``async def name(self, ctx)`` or ``async def name(self, ctx, params: Struct)``
(checked when the class is defined and when the service is added). Typed handlers get their
params validated by msgspec; a mismatch is a :class:`nerve.errors.ValidationError` (422)
naming the field. This module only describes services; the broker runs them.
"""

from __future__ import annotations

import inspect
import re
import typing
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar, overload

import msgspec

from nerve.errors import ServiceSchemaError, ValidationError

__all__ = ["Service", "action", "event", "ActionSpec", "EventSpec", "specs_of"]

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])

_ACTION_ATTR = "__nerve_action__"
_EVENT_ATTR = "__nerve_event__"


@dataclass(frozen=True)
class _ActionMark:
    name: str | None
    guards: tuple[Any, ...] = ()
    interceptors: tuple[Any, ...] = ()
    pipes: tuple[Any, ...] = ()
    hooks: dict[str, Any] | None = None
    fallback: Any = None
    properties: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class _EventMark:
    name: str
    group: str | None
    properties: dict[str, Any] = field(default_factory=dict)


@overload
def action(fn: F, /) -> F: ...
@overload
def action(*, name: str | None = None, guards: Iterable[Any] = (), interceptors: Iterable[Any] = (),
           pipes: Iterable[Any] = (), hooks: dict[str, Any] | None = None, fallback: Any = None,
           **properties: Any) -> Callable[[F], F]: ...


def action(fn: F | None = None, /, *, name: str | None = None, guards: Iterable[Any] = (),
           interceptors: Iterable[Any] = (), pipes: Iterable[Any] = (), hooks: dict[str, Any] | None = None,
           fallback: Any = None, **properties: Any) -> F | Callable[[F], F]:
    """Mark a method of a :class:`Service` as an action (``@action`` or ``@action(name=...)``).

    ``guards``, ``interceptors`` and ``pipes`` run around this action (after the service's);
    ``hooks`` are its before / after / error hooks; ``fallback`` (a callable or a method
    name) answers in place of an error. Any other keyword is a property of the action: it
    travels in INFO and middlewares on every node see it (``ActionInfo.properties``), e.g.
    ``@action(bulkhead={"concurrency": 2})``. See ``docs/middleware.md``.
    """
    _check_properties(properties, "action properties")
    if hooks is not None:
        _check_hooks(hooks, per_action=False)
    if fallback is not None and not (callable(fallback) or isinstance(fallback, str)):
        raise ServiceSchemaError(f"fallback must be a callable or a method name, not {fallback!r}")
    the_mark = _ActionMark(name, _checked("guards", guards, "can_activate"),
                           _checked("interceptors", interceptors, "intercept"),
                           _checked("pipes", pipes, "transform"), hooks, fallback, dict(properties))

    def mark(f: F) -> F:
        if not inspect.iscoroutinefunction(f):
            raise ServiceSchemaError(f"action {getattr(f, '__qualname__', f)} must be an 'async def': "
                                     f"{_ACTION_FORMS}")
        setattr(f, _ACTION_ATTR, the_mark)
        return f  # type: ignore[return-value]  # mypy narrows F in iscoroutinefunction

    return mark(fn) if fn is not None else mark


_HOOK_KINDS = ("before", "after", "error")

_ACTION_FORMS = "an action is 'async def name(self, ctx)' or 'async def name(self, ctx, params: Struct)'"
_EVENT_FORMS = "an event handler is 'async def name(self, ctx)' or 'async def name(self, ctx, data: Struct)'"

#: keys of an action's definition in INFO that are not properties (a remote node cannot tell
#: a property of these names from the definition's own)
_DEFINITION_KEYS = ("name", "rawName", "params")


def _check_properties(properties: Any, what: str, reserved: tuple[str, ...] = _DEFINITION_KEYS) -> None:
    """Properties travel in INFO: JSON-serializable, and no key INFO uses itself."""
    try:
        msgspec.json.encode(properties)
    except (TypeError, ValueError) as exc:
        raise ServiceSchemaError(f"{what} must be JSON-serializable (they travel in INFO): {exc}") from None
    clash = [k for k in reserved if k in properties]
    if clash:
        raise ServiceSchemaError(f"{what}: {clash[0]!r} is not a property name (INFO's action "
                                 f"definitions use it; typed params replace a 'params' schema)")


def _checked(what: str, items: Iterable[Any], method: str) -> tuple[Any, ...]:
    """Guards / interceptors / pipes: objects with ``method``, or plain callables."""
    if isinstance(items, (str, bytes)) or not isinstance(items, Iterable):
        raise ServiceSchemaError(f"{what}= takes a list, not {items!r}")
    out = tuple(items)
    for item in out:
        if not (callable(getattr(item, method, None)) or callable(item)):
            raise ServiceSchemaError(f"{what}: {item!r} has no {method}() and is not callable")
    return out


def _check_hooks(hooks: Any, *, per_action: bool) -> None:
    """``{"before": ..., "after": ..., "error": ...}``; on a service, each maps action names
    (or ``*``) to a hook or a list of hooks; on an action, each is a hook or a list."""
    if not isinstance(hooks, dict):
        raise ServiceSchemaError(f"hooks must be a dict of before / after / error, not {hooks!r}")
    for kind, value in hooks.items():
        if kind not in _HOOK_KINDS:
            raise ServiceSchemaError(f"unknown hook kind {kind!r} (before, after, error)")
        targets = value.values() if per_action and isinstance(value, dict) else [value]
        if per_action and not isinstance(value, dict):
            raise ServiceSchemaError(f"a service's {kind} hooks map action names (or '*') to hooks")
        for target in targets:
            for hook in (target if isinstance(target, (list, tuple)) else [target]):
                if not (callable(hook) or isinstance(hook, str)):
                    raise ServiceSchemaError(f"{kind} hook {hook!r} is neither callable nor a method name")


def event(name: str, *, group: str | None = None, **properties: Any) -> Callable[[F], F]:
    """Mark a method of a :class:`Service` as the handler of event ``name``.

    ``group`` defaults to the service's name: an ``emit`` reaches one handler per group.
    ``name`` may use ``*`` (one dot-separated segment) and ``**`` (any) wildcards. Any other
    keyword is a property of the subscription (JSON-serializable; it travels in INFO and
    ``local_event`` middlewares see it in ``EventInfo.properties``, e.g. ``bulkhead={...}``).
    """
    _check_properties(properties, f"event {name!r} properties", reserved=("name", "group"))

    def mark(f: F) -> F:
        if not inspect.iscoroutinefunction(f):
            raise ServiceSchemaError(f"event handler {getattr(f, '__qualname__', f)} must be an 'async def': "
                                     f"{_EVENT_FORMS}")
        setattr(f, _EVENT_ATTR, _EventMark(name, group, dict(properties)))
        return f  # type: ignore[return-value]  # mypy narrows F in iscoroutinefunction

    return mark


_MISSING = re.compile(r"Object missing required field `(.*)`", re.DOTALL)


def _validation_error(action: str, exc: msgspec.ValidationError, what: str = "parameters") -> ValidationError:
    """``data.field`` is the path of the offending field (``"b"``, ``"point.x"``,
    ``"items[2].x"``; for a missing field, the missing field's own path), or ``None`` when the
    params as a whole are wrong (not an object)."""
    text = str(exc)
    path = None
    if " - at `$" in text:
        reason, _, where = text.partition(" - at `$")
        path = where.rstrip("`").lstrip(".") or None
    else:
        reason = text
    missing = _MISSING.fullmatch(reason)
    if missing is not None:
        path = f"{path}.{missing.group(1)}" if path else missing.group(1)
    return ValidationError(
        f"invalid {what} for '{action}': {text}",
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
    mark: _ActionMark | None = None
    #: the action's properties over its service's (they travel in INFO)
    properties: dict[str, Any] = field(default_factory=dict)
    #: ``async (ctx) -> result``: the whole serving pipeline, built by the broker's Server
    serve: Any = None
    #: the ActionInfo middlewares see
    info: Any = None
    #: the meter's slot of this action when the broker counts metrics (the two places that
    #: run ``serve``, ``nerve._calls`` and the transit, count inline: no frame of its own)
    slot: Any = None

    def convert_params(self, params: Any) -> Any:
        if self.params_type is None:
            return params
        try:
            return msgspec.convert(params, self.params_type, strict=False)
        except msgspec.ValidationError as exc:
            raise _validation_error(self.name, exc) from None

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.properties)
        out.update(name=self.name, rawName=self.raw_name)
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
    #: ``async (ctx) -> None``: the serving pipeline, built by the broker's Server
    serve: Any = None
    #: the subscription's properties (they travel in INFO)
    properties: dict[str, Any] = field(default_factory=dict)

    def convert_data(self, data: Any) -> Any:
        """``data`` as the handler's annotated type (as actions convert params); a mismatch
        is a :class:`nerve.errors.ValidationError` naming the field."""
        if self.data_type is None:
            return data
        try:
            return msgspec.convert(data, self.data_type, strict=False)
        except msgspec.ValidationError as exc:
            raise _validation_error(self.name, exc, "data") from None

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.properties)
        out.update(name=self.name, group=self.group)
        return out


_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


def _unwrap_descriptor(raw: Any) -> tuple[Any, bool]:
    """(the function under a class attribute, whether it is called with an instance or
    class first): a staticmethod's function is called with ``ctx`` first."""
    if isinstance(raw, staticmethod):
        return raw.__func__, False
    if isinstance(raw, classmethod):
        return raw.__func__, True
    return raw, True


def _handler_shape(fn: Callable[..., Any], bound: bool, where: str, forms: str) -> inspect.Parameter | None:
    """Check that ``fn`` can be called as the broker calls handlers (``(ctx)``, or ``(ctx,
    params)`` when it has a parameter after ``ctx``); that parameter, or None.

    ``bound``: the first parameter is ``self`` (or ``cls``) and the broker does not pass it."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError) as exc:
        raise ServiceSchemaError(f"{where}: cannot read its signature ({exc}); {forms}") from None
    params = list(sig.parameters.values())
    if bound:
        if params and params[0].kind in _POSITIONAL:
            params = params[1:]
        elif not (params and params[0].kind is inspect.Parameter.VAR_POSITIONAL):
            raise ServiceSchemaError(f"{where} takes no 'self' (nor ctx); {forms}")
    positional = [p for p in params if p.kind in _POSITIONAL]
    var_positional = [p for p in params if p.kind is inspect.Parameter.VAR_POSITIONAL]
    required_kw = [p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY and p.default is p.empty]
    if not positional and not var_positional:
        raise ServiceSchemaError(f"{where} takes no 'ctx' argument; {forms}")
    if len(positional) > 2:
        raise ServiceSchemaError(f"{where} takes {len(positional) - 2} argument(s) too many "
                                 f"({', '.join(p.name for p in positional[2:])}); {forms}")
    if required_kw:
        raise ServiceSchemaError(f"{where}: keyword-only argument {required_kw[0]!r} has no default "
                                 f"(the broker never passes it); {forms}")
    if len(positional) == 2:
        return positional[1]
    if len(positional) == 1 and var_positional:
        return var_positional[0]  # (self, ctx, *args): the params go in args
    if not positional and var_positional and any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        # a decorator's (self, *args, **kwargs) without functools.wraps: called (ctx, params),
        # as it always was, so the handler it wraps gets its params
        return var_positional[0]
    return None


def _inspect_handler(raw: Any, where: str, forms: str) -> tuple[Any, bool]:
    """(params type or None, whether the handler takes a params argument), from the class
    attribute ``raw`` (a function, staticmethod or classmethod)."""
    fn, bound = _unwrap_descriptor(raw)
    param = _handler_shape(fn, bound, where, forms)
    if param is None:
        return None, False
    if param.kind is inspect.Parameter.VAR_POSITIONAL:
        return None, True
    try:
        hints = typing.get_type_hints(fn)
    except Exception as exc:  # unresolved forward references
        raise ServiceSchemaError(f"{where}: cannot resolve annotations: {exc}") from exc
    return hints.get(param.name), True


def _check_handlers(cls: type) -> None:
    """The signatures of the actions and event handlers ``cls`` defines itself."""
    for attr, raw in vars(cls).items():
        fn, bound = _unwrap_descriptor(raw)
        if isinstance(getattr(fn, _ACTION_ATTR, None), _ActionMark):
            _handler_shape(fn, bound, f"action {cls.__qualname__}.{attr}", _ACTION_FORMS)
        if isinstance(getattr(fn, _EVENT_ATTR, None), _EventMark):
            _handler_shape(fn, bound, f"event handler {cls.__qualname__}.{attr}", _EVENT_FORMS)


class Service:
    """Base class of services. Set ``name`` (and optionally ``version``) on the subclass.

    ``started`` / ``stopped`` are called by the broker around the service's life.
    """

    name: str = ""
    version: str | int | None = None
    settings: dict[str, Any] = {}
    metadata: dict[str, Any] = {}
    dependencies: list[str] = []
    #: merged under every action's properties (they travel in INFO)
    properties: dict[str, Any] = {}
    #: Moleculer's action hooks: ``{"before": {"*": hook, "name": [hooks]}, "after": ..., "error": ...}``
    hooks: dict[str, Any] = {}
    #: run around every action of the service, before the action's own
    guards: list[Any] = []
    interceptors: list[Any] = []
    pipes: list[Any] = []

    broker: Any = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _check_handlers(cls)

    @property
    def full_name(self) -> str:
        """The name calls use: ``name``, prefixed by the version (``v2.math``, ``beta.math``)."""
        if self.version is None:
            return self.name
        v = self.version
        return f"v{v}.{self.name}" if isinstance(v, int) else f"{v}.{self.name}"

    async def started(self) -> None:
        """Called when the broker starts (or when the service is added to a running broker)."""

    async def stopped(self) -> None:
        """Called when the broker stops or the service is removed."""

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


def specs_of(svc: Service) -> tuple[list[ActionSpec], list[EventSpec]]:
    """The actions and events ``svc`` defines, checked (the broker registers them). A function,
    not a method, so it takes no name a service's own actions might use."""
    if not svc.name or not isinstance(svc.name, str):
        raise ServiceSchemaError(f"{type(svc).__name__} has no 'name'")
    if svc.hooks:
        _check_hooks(svc.hooks, per_action=True)
    for what, method in (("guards", "can_activate"), ("interceptors", "intercept"), ("pipes", "transform")):
        _checked(f"{type(svc).__name__}.{what}", getattr(svc, what), method)
    _check_properties(svc.properties, f"{type(svc).__name__}.properties")
    actions: list[ActionSpec] = []
    events: list[EventSpec] = []
    seen: set[str] = set()
    for attr in dir(type(svc)):
        fn = getattr(type(svc), attr, None)
        if fn is None:
            continue
        mark = getattr(fn, _ACTION_ATTR, None)
        if isinstance(mark, _ActionMark):
            raw = mark.name or attr
            full = f"{svc.full_name}.{raw}"
            if full in seen:
                raise ServiceSchemaError(f"action {full!r} is defined twice")
            seen.add(full)
            tp, wants = _inspect_handler(inspect.getattr_static(type(svc), attr),
                                         f"action {type(svc).__qualname__}.{attr}", _ACTION_FORMS)
            props = {**svc.properties, **mark.properties}
            actions.append(ActionSpec(full, raw, svc, getattr(svc, attr), tp, wants, mark, props))
        emark = getattr(fn, _EVENT_ATTR, None)
        if isinstance(emark, _EventMark):
            if any(e.name == emark.name for e in events):
                # INFO keys a service's events by name (as Moleculer does): one per name.
                raise ServiceSchemaError(
                    f"service {svc.full_name!r} subscribes to event {emark.name!r} twice")
            tp, wants = _inspect_handler(inspect.getattr_static(type(svc), attr),
                                         f"event handler {type(svc).__qualname__}.{attr}", _EVENT_FORMS)
            events.append(EventSpec(emark.name, emark.group or svc.full_name, svc,
                                    getattr(svc, attr), tp, wants, properties=dict(emark.properties)))
    return actions, events
