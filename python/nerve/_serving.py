"""Serving: the one place a handler of this node is run, for a local caller or a remote one.

Theory of operation. When a service is registered, each of its actions gets one handler,
``spec.serve(ctx)``, built once:

    local_action middlewares (first registered outermost)
      -> the action's fallback (answers in place of an error)
        -> interceptors (service's, then action's)
          -> guards (refusal: ForbiddenError, 403)
            -> pipes (transform params), then params validation (typed handlers)
              -> hooks: before ... handler ... after (error hooks on any error inside)

Layers that are not used are not built: an action with none of them is served by a bare
``handler(ctx[, params])``. Both call paths run ``spec.serve``: a call from this node
(``nerve._calls``) in the caller's task, and a REQ from a peer (the transit admits it, runs it
in a worker of the handler pool under the caller's budget, and answers it).

Events are the same with fewer layers: ``local_event`` middlewares -> the handler, run in the
handler pool (an event has no answer: failures are logged and counted).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from time import perf_counter
from typing import TYPE_CHECKING, Any

import msgspec

from nerve.context import Context
from nerve.errors import ForbiddenError, ServiceSchemaError
from nerve.logs import call_fields, log_handler_failure, node_logger
from nerve.middleware import ActionInfo, Chain, EventInfo, maybe_await

if TYPE_CHECKING:
    from nerve._dispatch import HandlerPool
    from nerve._metering import Meter, TimedSlot
    from nerve.packets import Event
    from nerve.registry import Registry
    from nerve.service import ActionSpec, EventSpec

__all__ = ["Server"]

Handler = Callable[[Context], Awaitable[Any]]


def _method(obj: Any, name: str) -> Callable[..., Any]:
    """``obj.name`` if it is callable, else ``obj`` itself (a guard may be a plain function)."""
    fn = getattr(obj, name, None)
    return fn if callable(fn) else obj  # type: ignore[no-any-return]


def _describe(obj: Any) -> str:
    return getattr(obj, "__qualname__", None) or type(obj).__name__


class Server:
    """Builds and runs this node's handlers. ``node_id`` names this node in ActionInfo."""

    def __init__(self, node_id: str, chain: Chain, handlers: HandlerPool, registry: Registry,
                 meter: Meter | None = None) -> None:
        self.node_id = node_id
        self.meter = meter
        self.chain = chain
        self.handlers = handlers
        self.registry = registry
        self._next_id: Callable[[], str] = lambda: ""
        self.log = node_logger("nerve.broker", node_id)
        #: counters (nerve.statistics.BrokerStatistics)
        self.events_handled = 0
        self.event_handler_errors = 0

    def action_failed(self, ctx: Context, exc: BaseException) -> None:
        """A handler of this node failed (for a local caller or a remote one): logged once."""
        log_handler_failure(self.log, ctx, exc)

    def bind_ids(self, next_id: Callable[[], str]) -> None:
        self._next_id = next_id

    # --- actions ----------------------------------------------------------------------------

    def prepare_action(self, spec: ActionSpec) -> None:
        """Build ``spec.serve``: the whole pipeline of the action (see the module's docstring)."""
        svc = spec.service
        mark = spec.mark
        handler = spec.handler
        before, after, error = self._hooks(spec)
        hooked = bool(before or after or error)
        serve: Handler
        if spec.wants_params:
            convert = spec.convert_params

            async def invoke(ctx: Context) -> Any:
                return await handler(ctx, convert(ctx.params))
            serve = invoke
        else:
            serve = handler  # ``handler(ctx)`` is the pipeline's own signature: no frame of ours
        if hooked:
            serve = _hooked(serve, before, after, error)
            if spec.params_type is not None:
                serve = _validated_first(serve, spec.convert_params)
        pipes = [_method(p, "transform") for p in (*svc.pipes, *(mark.pipes if mark else ()))]
        if pipes:
            serve = _piped(serve, pipes)
        guards = list((*svc.guards, *(mark.guards if mark else ())))
        if guards:
            serve = _guarded(serve, guards, spec.name)
        for ic in reversed((*svc.interceptors, *(mark.interceptors if mark else ()))):
            serve = _intercepted(serve, _method(ic, "intercept"))
        if mark is not None and mark.fallback is not None:
            fb = mark.fallback
            if isinstance(fb, str):
                fb = getattr(svc, fb, None)
                if not callable(fb):
                    raise ServiceSchemaError(f"{spec.name}: fallback {mark.fallback!r} is not a method of the service")
            serve = _with_fallback(serve, fb)
        info = ActionInfo(spec.name, svc.full_name, self.node_id, True, spec.properties)
        wrapped = self.chain.wrap_local_action(serve, info)
        if wrapped is not serve:
            wrapped = self._with_endpoint(wrapped, spec)
        if self.meter is not None:
            spec.slot = self.meter.local_slot(svc.full_name, spec.name)
        spec.serve = wrapped
        spec.info = info

    def _with_endpoint(self, inner: Handler, spec: ActionSpec) -> Handler:
        """``local_action`` middlewares see ``ctx.endpoint`` for a remote caller too (a REQ's
        context is built by the transit, which knows the spec, not the registry's endpoint)."""
        registry = self.registry
        found: list[Any] = []

        async def with_endpoint(ctx: Context) -> Any:
            if ctx.endpoint is None:
                if not found:
                    ep = next((ep for ep in registry.actions.get(spec.name, ()) if ep.spec is spec), None)
                    if ep is None:
                        return await inner(ctx)
                    found.append(ep)
                ctx.endpoint = found[0]
            return await inner(ctx)

        return with_endpoint

    def _hooks(self, spec: ActionSpec) -> tuple[list[Any], list[Any], list[Any]]:
        """Moleculer's order: before — service ``*``, service per action, the action's own;
        after and error — the reverse."""
        svc = spec.service
        own = (spec.mark.hooks if spec.mark else None) or {}
        out: dict[str, list[Any]] = {}
        for kind in ("before", "after", "error"):
            layers = []
            table = svc.hooks.get(kind) or {}
            for key in ("*", spec.raw_name):
                layers.append(_as_list(table.get(key)))
            layers.append(_as_list(own.get(kind)))
            if kind != "before":
                layers.reverse()
            out[kind] = [self._resolve(svc, h, spec.name) for layer in layers for h in layer]
        return out["before"], out["after"], out["error"]

    @staticmethod
    def _resolve(svc: Any, hook: Any, action: str) -> Callable[..., Any]:
        if isinstance(hook, str):
            fn = getattr(svc, hook, None)
            if not callable(fn):
                raise ServiceSchemaError(f"{action}: hook {hook!r} is not a method of {type(svc).__name__}")
            return fn  # type: ignore[no-any-return]
        return hook  # type: ignore[no-any-return]

    # --- events -----------------------------------------------------------------------------

    def prepare_event(self, spec: EventSpec) -> None:
        handler = spec.handler
        if spec.wants_data:
            convert = spec.convert_data

            async def core(ctx: Context) -> None:
                await handler(ctx, convert(ctx.params))
        else:
            async def core(ctx: Context) -> None:
                await handler(ctx)
        info = EventInfo(spec.name, spec.group, spec.service.full_name, spec.properties)
        serve = self.chain.wrap_local_event(core, info)
        if self.meter is not None:
            serve = _metered(serve, self.meter.event_slot(spec.name, spec.service.full_name, spec.group))
        spec.serve = serve

    def spawn_event(self, spec: EventSpec | None, event: str, data: Any, meta: dict[str, Any],
                    parent: Context | None, node_id: str, groups: list[str] | None, broker: Any, *,
                    level: int | None = None, request_id: str | None = None,
                    parent_id: str | None = None, caller: str | None = None,
                    headers: dict[str, Any] | None = None, tracing: bool | None = None,
                    broadcast: bool = False) -> None:
        """Serve one event in the handler pool (no answer: its failure is logged)."""
        if spec is None:
            return
        ctx = Context(
            broker, id=self._next_id(), params=data, meta=meta, headers=headers, event=event, event_groups=groups,
            node_id=node_id, service=spec.service.full_name,
            level=level if level is not None else (parent.level + 1 if parent else 1),
            request_id=request_id or (parent.request_id if parent else None),
            parent_id=parent_id or (parent.id if parent else None),
            caller=caller or (parent.service if parent else None),
        )
        ctx.tracing = tracing if tracing is not None else (parent.tracing if parent else None)
        ctx.event_type = "broadcast" if broadcast else "emit"
        if not broadcast and groups is None:
            ctx.event_groups = [spec.group]  # the group it was picked for
        self.events_handled += 1
        self.handlers.start_soon(self._run_event, spec, ctx)

    async def _run_event(self, spec: EventSpec, ctx: Context) -> None:
        try:
            await spec.serve(ctx)
        except Exception:
            self.event_handler_errors += 1
            self.log.exception("event handler %s.%s for %r failed", spec.service.full_name,
                               getattr(spec.handler, "__name__", "?"), ctx.event, extra=call_fields(ctx))

    def remote_event(self, sender: str, pkt: Event, broker: Any) -> None:
        """An EVENT packet from ``sender``: serve it on the local endpoints it is meant for."""
        groups = pkt.groups if isinstance(pkt.groups, list) else None
        if pkt.broadcast:
            endpoints = [ep for ep in self.registry.event_endpoints(pkt.event)
                         if ep.local and (groups is None or ep.group in groups)]
        else:
            endpoints = self.registry.pick_per_group(pkt.event, groups, None, local_only=True)
        for ep in endpoints:
            self.spawn_event(ep.spec, pkt.event, pkt.data, pkt.meta or {}, None, sender, groups, broker,
                             level=pkt.level if isinstance(pkt.level, int) else 1,
                             request_id=pkt.request_id or None, parent_id=pkt.parent_id or None,
                             caller=pkt.caller or None,
                             headers=dict(pkt.headers) if isinstance(pkt.headers, dict) else None,
                             tracing=pkt.tracing if isinstance(pkt.tracing, bool) else None,
                             broadcast=bool(pkt.broadcast))


def _metered(inner: Handler, slot: TimedSlot) -> Handler:
    """Counts, time and errors of every run of ``inner`` (outermost: it sees what callers see;
    a run cancelled (a budget, a CANCEL) counts as an error named ``Cancelled``)."""
    async def metered(ctx: Context) -> Any:
        slot.total += 1
        slot.active += 1
        started = perf_counter()
        try:
            return await inner(ctx)
        except BaseException as exc:
            slot.failed(exc)
            raise
        finally:
            slot.active -= 1
            slot.observe(perf_counter() - started)

    return metered


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _hooked(inner: Handler, before: list[Any], after: list[Any], error: list[Any]) -> Handler:
    async def hooked(ctx: Context) -> Any:
        try:
            for hook in before:
                await maybe_await(hook(ctx))
            result = await inner(ctx)
            for hook in after:
                result = await maybe_await(hook(ctx, result))
            return result
        except Exception as exc:
            if not error:
                raise
            return await _error_hooks(ctx, exc, error)

    return hooked


def _validated_first(inner: Handler, convert: Callable[[Any], Any]) -> Handler:
    """Typed params are validated before the hooks (a call with bad params runs none of them,
    and error hooks never see the caller's ValidationError); the handler validates them again
    as the before hooks left them."""

    async def validated_first(ctx: Context) -> Any:
        convert(ctx.params)
        return await inner(ctx)

    return validated_first


async def _error_hooks(ctx: Context, exc: Exception, error: list[Any]) -> Any:
    """The first error hook that returns answers; one that raises passes its error on."""
    err: Exception = exc
    for hook in error:
        try:
            return await maybe_await(hook(ctx, err))
        except Exception as again:
            err = again
    raise err


def _piped(inner: Handler, pipes: list[Callable[..., Any]]) -> Handler:
    async def piped(ctx: Context) -> Any:
        params = ctx.params
        for pipe in pipes:
            params = await maybe_await(pipe(params, ctx))
        ctx.params = params
        return await inner(ctx)

    return piped


def _guarded(inner: Handler, guards: list[Any], action: str) -> Handler:
    checks = [(_method(g, "can_activate"), _describe(g)) for g in guards]

    async def guarded(ctx: Context) -> Any:
        for check, name in checks:
            if not await maybe_await(check(ctx)):
                raise ForbiddenError(f"Forbidden: '{action}' refused by the guard {name}.",
                                     data={"action": action, "guard": name})
        return await inner(ctx)

    return guarded


def _intercepted(inner: Handler, intercept: Callable[..., Any]) -> Handler:
    async def intercepted(ctx: Context) -> Any:
        params = ctx.params

        def next_() -> Any:
            ctx.params = params  # each run of the rest starts from the params this layer saw
            return inner(ctx)

        return await intercept(ctx, next_)

    return intercepted


def _with_fallback(inner: Handler, fallback: Callable[..., Any]) -> Handler:
    async def with_fallback(ctx: Context) -> Any:
        try:
            return await inner(ctx)
        except Exception as exc:
            return await maybe_await(fallback(ctx, exc))

    return with_fallback
