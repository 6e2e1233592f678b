"""Calls: the one place a call is made (``broker.call``, ``ctx.call``, ``mcall``).

Theory of operation. A call goes through these steps, outermost first:

    call middlewares (first registered outermost; they see CallOptions)
      -> fallback (call option: answers in place of the final error)
        -> retries (retryable errors, exponential backoff, another node preferred)
          -> endpoint choice (registry: node_id=, prefer local, circuit state, strategy)
            -> local: the action's serving pipeline (nerve._serving), in the caller's task
               remote: remote_action middlewares -> REQ through the transit -> RES
      -> meta merge: the callee's final meta is merged into the caller's dict (result or error)

Timeouts, all in one table (the earliest wins; "budget" is what travels in the REQ):

    =====================  ===============================  ================================
    source                 bounds                           fails with
    =====================  ===============================  ================================
    ``timeout=`` (or the   the wait for the answer (after   RequestTimeoutError (retryable),
    broker's                a request stream has ended)      raised here or by the callee
    ``request_timeout``)
    the caller's cancel    the whole call, retries too      the caller's own Cancelled
    scope                                                   (a remote timeout at the same
                                                            instant yields to it)
    the budget left        sending: nothing left at send    RequestSkippedError (not
                           time                             retried)
    the REQ's budget       the callee's handler (its        RequestTimeoutError answered by
                           worker's cancel scope)           the callee
    ``idle_timeout=``      the gap between two chunks of    StreamIdleTimeoutError
                           the call's streams
    =====================  ===============================  ================================

A remote call with no remote_action middleware and no request stream takes a flat lane: no
Context is built, and its timeout is an entry in the transit's deadline queue, not a cancel
scope (the 64-in-flight RPC figure depends on it).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from time import perf_counter
from typing import TYPE_CHECKING, Any

import msgspec
import trio

from nerve.context import Context
from nerve.errors import (
    BrokerNotRunningError,
    MaxCallLevelError,
    NerveError,
    RequestTimeoutError,
    StreamError,
    request_timeout,
)
from nerve.middleware import ActionInfo, CallOptions, Chain, maybe_await
from nerve.streams import PacketStream
from nerve.transit import yield_to_own_deadline

if TYPE_CHECKING:
    from nerve._dispatch import HandlerPool
    from nerve.registry import ActionEndpoint, Registry
    from nerve.service import ActionSpec
    from nerve.transit import Transit

__all__ = ["Caller"]

log = logging.getLogger("nerve.broker")

_INF = float("inf")


class _CallView:
    """What a strategy with ``needs_context`` sees of a call without a Context."""

    __slots__ = ("action", "params", "meta")

    def __init__(self, action: str, params: Any, meta: dict[str, Any]) -> None:
        self.action = action
        self.params = params
        self.meta = meta


class Caller:
    """Makes calls for one broker. ``options`` is the broker (read for its call settings:
    request_timeout, retries, retry_delay, retry_max_delay, retry_factor, max_call_level,
    stream_idle_timeout, node_id); ``running`` tells whether calls may be made now."""

    def __init__(self, options: Any, registry: Registry, transit: Transit, handlers: HandlerPool,
                 chain: Chain, next_id: Callable[[], str], running: Callable[[], bool],
                 action_failed: Callable[[Context, BaseException], None]) -> None:
        self.options = options
        self.node_id: str = options.node_id
        self.registry = registry
        self.transit = transit
        self.handlers = handlers
        self.chain = chain
        self.next_id = next_id
        self.running = running
        self.action_failed = action_failed
        #: counters (nerve.statistics.BrokerStatistics): calls made, of them failed; local
        #: handler runs, of them failed
        self.calls = 0
        self.calls_failed = 0
        self.served = 0
        self.served_failed = 0
        self._context_for_strategy = bool(getattr(registry.strategy, "needs_context", False))
        self._wrapped: Any = chain.wrap_call(self._from_options) if chain.wraps_call else None
        #: no call middleware: ``Broker.call`` goes straight to :meth:`attempts` when it can
        self.direct = self._wrapped is None

    async def call(self, action: str, params: Any, meta: dict[str, Any] | None,
                   headers: dict[str, Any] | None, timeout: float | None, retries: int | None,
                   node_id: str | None, stream: PacketStream | None, idle_timeout: float | None,
                   parent_ctx: Context | None, fallback: Any) -> Any:
        """``broker.call`` (see its docstring for the meaning of each option)."""
        if self._wrapped is not None or not self.running():
            try:
                if not self.running():
                    raise BrokerNotRunningError("the broker is not running (use 'async with Broker(...)')")
                opts = CallOptions(meta=meta, headers=headers, timeout=timeout, retries=retries, node_id=node_id,
                                   stream=stream, parent_ctx=parent_ctx, fallback=fallback,
                                   idle_timeout=idle_timeout)
                return await self._wrapped(action, params, opts)
            except BaseException as exc:
                if stream is not None and not stream.taken:
                    # A middleware (or the stopped broker) ended the call before it took its
                    # request stream: whoever feeds that stream learns now.
                    stream.abort_untaken(exc if isinstance(exc, NerveError) else
                                         StreamError("the call ended before it took its request stream"))
                raise
        return await self._call(action, params, meta, headers, timeout, retries, node_id, stream,
                                idle_timeout, parent_ctx, fallback)

    async def _from_options(self, action: str, params: Any, opts: CallOptions) -> Any:
        return await self._call(action, params, opts.meta, opts.headers, opts.timeout, opts.retries,
                                opts.node_id, opts.stream, opts.idle_timeout, opts.parent_ctx, opts.fallback)

    async def _call(self, action: str, params: Any, meta: dict[str, Any] | None,
                    headers: dict[str, Any] | None, timeout: float | None, retries: int | None,
                    node_id: str | None, stream: PacketStream | None, idle_timeout: float | None,
                    parent_ctx: Context | None, fallback: Any) -> Any:
        if fallback is None:
            return await self.attempts(action, params, meta, headers, timeout, retries, node_id, stream,
                                        idle_timeout, parent_ctx)
        try:
            return await self.attempts(action, params, meta, headers, timeout, retries, node_id, stream,
                                        idle_timeout, parent_ctx)
        except Exception as exc:
            if callable(fallback):
                return await maybe_await(fallback(parent_ctx, exc))
            return fallback

    async def attempts(self, action: str, params: Any, meta: dict[str, Any] | None,
                        headers: dict[str, Any] | None, timeout: float | None, retries: int | None,
                        node_id: str | None, stream: PacketStream | None, idle_timeout: float | None,
                        parent: Context | None) -> Any:
        options = self.options
        if parent is not None:
            level = parent.level + 1
            if level > options.max_call_level:
                raise MaxCallLevelError(f"Request level is reached, the limit is '{options.max_call_level}'.",
                                        data={"level": level, "action": action}, node_id=self.node_id)
            base_meta = dict(parent.meta)
            if meta:
                base_meta.update(meta)
            merge_into: dict[str, Any] | None = parent.meta
            request_id: str | None = parent.request_id
            parent_id: str | None = parent.id
            caller: str | None = parent.service
            tracing: bool | None = parent.tracing
        else:
            level = 1
            base_meta = dict(meta) if meta else {}
            merge_into = meta
            request_id = parent_id = caller = tracing = None
        if timeout is None:
            timeout = options.request_timeout
        elif not 0 < timeout < _INF:  # 0, negative, inf or nan: no timeout
            timeout = None
        if retries is None:
            retries = options.retries
        if params is None:
            params = {}  # as Moleculer: a call without params has empty params
        if idle_timeout is not None and stream is not None:
            stream.idle_timeout = idle_timeout
        self.calls += 1
        attempt = 0
        tried: set[str] = set()
        try:
            while True:
                call_id = self.next_id()
                call_meta = dict(base_meta) if retries else base_meta
                call_headers = dict(headers) if headers else {}
                endpoint_node = None
                try:
                    view = _CallView(action, params, call_meta) if self._context_for_strategy else None
                    ep = self.registry.select_action(action, node_id=node_id, exclude=tried, ctx=view)  # type: ignore[arg-type]
                    endpoint_node = ep.node_id
                    if ep.local:
                        ctx = self._context(ep, action, call_id, request_id, parent_id, level, caller,
                                            params, call_meta, call_headers)
                        ctx.tracing = tracing
                        self.served += 1
                        slot = ep.spec.slot  # type: ignore[union-attr]
                        if slot is not None:  # metrics on: counted inline (see nerve._metering)
                            slot.total += 1
                            slot.active += 1
                            started = perf_counter()
                        try:
                            result = await self._call_local(ep.spec, ctx, timeout, stream)  # type: ignore[arg-type]
                        except BaseException as exc:
                            if slot is not None:
                                slot.failed(exc)
                            if isinstance(exc, Exception):
                                self.served_failed += 1
                                self.action_failed(ctx, exc)
                            raise
                        finally:
                            if slot is not None:
                                slot.active -= 1
                                slot.observe(perf_counter() - started)
                            if merge_into is not None:
                                merge_into.update(ctx.meta)
                    elif stream is None and (not self.chain.wraps_remote or self._bare_remote(ep)):
                        # The flat lane, inline (each coroutine frame costs the 64-in-flight
                        # figure): no Context; the timeout is an entry in the transit's deadline
                        # queue, not a cancel scope.
                        transit = self.transit
                        pending = transit.send_request(ep, call_id, params, call_meta, call_headers, level,
                                                       request_id or call_id, parent_id, caller, timeout=timeout,
                                                       tracing=tracing, targeted=node_id is not None)
                        if timeout is None:
                            due, expiry = _INF, None
                        else:
                            due = trio.current_time() + timeout
                            expiry = transit.expire_at(pending, due, action)
                        try:
                            if pending.settled:
                                await trio.lowlevel.checkpoint()
                            else:
                                pending.task = trio.lowlevel.current_task()
                                await trio.lowlevel.wait_task_rescheduled(pending.abort)
                        finally:
                            transit.done_waiting(call_id, pending, expiry)
                        if isinstance(pending.error, RequestTimeoutError):
                            await yield_to_own_deadline(due)
                        if pending.meta and merge_into is not None:
                            merge_into.update(pending.meta)
                        if pending.error is not None:
                            raise pending.error
                        result = pending.result
                    else:
                        ctx = self._context(ep, action, call_id, request_id, parent_id, level, caller,
                                            params, call_meta, call_headers)
                        ctx.tracing = tracing
                        ctx.stream = stream
                        ctx.timeout = timeout
                        ctx.targeted = node_id is not None
                        if stream is not None:
                            self.chain.watch(ctx, stream)
                        handler = ep.handler
                        if handler is None:
                            handler = ep.handler = self._remote_handler(ep)
                        try:
                            result = await handler(ctx)
                        finally:
                            # As the flat lane: what the callee answered with (nothing if it
                            # never answered), not what we sent.
                            if merge_into is not None and ctx.reply_meta:
                                merge_into.update(ctx.reply_meta)
                    if idle_timeout is not None and isinstance(result, PacketStream):
                        result.idle_timeout = idle_timeout
                    return result
                except NerveError as exc:
                    if (not exc.retryable or attempt >= retries
                            or (stream is not None and stream.taken)):
                        if stream is not None and not stream.taken:
                            # The call failed before it took its request stream: a task feeding
                            # that stream would otherwise wait for ever.
                            stream.abort_untaken(exc)
                        raise
                    delay = min(options.retry_delay * options.retry_factor ** attempt, options.retry_max_delay)
                    log.debug("retrying %s after %r (attempt %d, in %.3fs)", action, exc, attempt + 1, delay,
                              extra={"node_id": self.node_id, "action": action, "request_id": request_id})
                    attempt += 1
                    if endpoint_node is not None:
                        tried.add(endpoint_node)
                    await trio.sleep(delay)
        except BaseException as exc:
            if isinstance(exc, Exception):
                self.calls_failed += 1
            if stream is not None and not stream.taken:
                # Cancelled (or failed) before the call took its request stream: a task
                # feeding that stream learns now rather than waiting for ever.
                stream.abort_untaken(StreamError("the call ended before it took its request stream"))
            raise

    def _context(self, ep: ActionEndpoint, action: str, call_id: str, request_id: str | None,
                 parent_id: str | None, level: int, caller: str | None, params: Any,
                 meta: dict[str, Any], headers: dict[str, Any]) -> Context:
        ctx = Context(self.options, id=call_id, request_id=request_id, parent_id=parent_id, level=level,
                      caller=caller, params=params, meta=meta, headers=headers, action=action,
                      node_id=self.node_id, service=ep.service)
        ctx.endpoint = ep
        return ctx

    # --- remote -----------------------------------------------------------------------------

    def _bare_remote(self, ep: ActionEndpoint) -> bool:
        """True when every remote_action middleware left ``ep``'s chain as it was (a tracer
        with no SDK behind it): its calls may take the flat lane."""
        if ep.handler is None:
            ep.handler = self._remote_handler(ep)
        return ep.bare

    def _remote_handler(self, ep: ActionEndpoint) -> Any:
        """The remote_action chain of ``ep``, built on its first call (an INFO that changes the
        node's services makes new endpoints, so new chains)."""
        transit = self.transit
        definition = ep.definition
        properties = {k: v for k, v in definition.items() if k not in ("name", "rawName", "params")}
        info = ActionInfo(ep.name, ep.service, ep.node_id, False, properties)

        async def send(ctx: Context) -> Any:
            the_ep = ctx.endpoint or ep
            stream = ctx.stream
            timeout = ctx.timeout
            if stream is None:
                pending = transit.send_request(the_ep, ctx.id, ctx.params, ctx.meta, ctx.headers, ctx.level,
                                               ctx.request_id, ctx.parent_id, ctx.caller, timeout=timeout,
                                               tracing=ctx.tracing, targeted=ctx.targeted)
                due = _INF if timeout is None else trio.current_time() + timeout
                await transit.wait_response(ctx.id, pending, due, the_ep.name)
                if isinstance(pending.error, RequestTimeoutError):
                    await yield_to_own_deadline(due)
            else:
                ctx.stream = None  # the handler's view: a caller's context has no incoming stream
                pending = await transit.request(the_ep, ctx, timeout=timeout, stream=stream)
            if pending.meta:
                ctx.reply_meta = pending.meta
                ctx.meta.update(pending.meta)
            if pending.error is not None:
                raise pending.error
            return pending.result

        handler = self.chain.wrap_remote_action(send, info)
        ep.bare = handler is send
        return handler

    # --- local ------------------------------------------------------------------------------

    async def _call_local(self, spec: ActionSpec, ctx: Context, timeout: float | None,
                          stream: PacketStream | None) -> Any:
        serve = spec.serve
        if stream is None:
            if timeout is None:
                result = await serve(ctx)
            else:
                with trio.move_on_after(timeout) as scope:
                    result = await serve(ctx)
                if scope.cancelled_caught:
                    raise request_timeout(spec.name, self.node_id)
        else:
            reader = stream.pipe()
            ctx.stream = reader
            self.chain.watch(ctx, stream)
            self.chain.watch(ctx, reader)
            if stream.has_source:
                self.handlers.start_soon(stream.pump)
            result = None
            try:
                with trio.CancelScope() as scope:
                    if timeout is not None:
                        stream.add_closed_callback(
                            lambda: setattr(scope, "deadline", trio.current_time() + timeout))
                    result = await serve(ctx)
            finally:
                if isinstance(result, PacketStream):
                    result.add_closed_callback(lambda: finish_reader(reader))
                else:
                    finish_reader(reader)
                    if not stream.producer_done:
                        stream.abort_untaken(StreamError("the call ended before its request stream did"))
            if scope.cancelled_caught:
                raise request_timeout(spec.name, self.node_id)
        if isinstance(result, PacketStream):
            if result.size is not None:  # a file's: the reader can show progress
                ctx.meta.setdefault("size", result.size)
            return self.local_response_stream(result, ctx)
        if isinstance(result, msgspec.Struct):
            return msgspec.to_builtins(result)
        return result

    def local_response_stream(self, result: PacketStream, ctx: Context | None = None) -> PacketStream:
        reader = result.pipe()
        self.chain.watch(ctx, result)
        self.chain.watch(ctx, reader)
        if result.has_source:
            self.handlers.start_soon(result.pump)
        return reader


def finish_reader(reader: PacketStream) -> None:
    """The handler returned: a request stream it did not read to the end is stopped."""
    reader.end_reading(StreamError("the handler returned before reading the whole stream"))
