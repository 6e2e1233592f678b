"""Broker middlewares (docs/middleware.md, "Middleware"): the first registered is outermost in
every chain (call, local_action, remote_action, emit, broadcast, local_event) and lifecycle
hooks run in order (``stopped`` in reverse); action properties that travel in INFO; ``mcall``;
service dependencies. Brokers run in-process, and two of them over loopback TCP where a
chain or a property must cross the wire."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio

import nerve
from nerve.errors import (
    BrokerOptionsError,
    ClientError,
    ForbiddenError,
    NerveError,
    RequestTimeoutError,
    ServiceNotFoundError,
    ServiceSchemaError,
)
from nerve.middleware import ActionInfo, CallOptions, EventInfo, EventOptions

pytestmark = pytest.mark.anyio

_ns = itertools.count(1)


def namespace() -> str:
    """A fresh namespace: in-process brokers of one test never meet those of another."""
    return f"mw-{next(_ns)}"


async def wait_until(pred: Callable[[], bool], timeout: float = 5.0) -> None:
    with trio.fail_after(timeout):
        while not pred():
            await trio.sleep(0.005)


@asynccontextmanager
async def tcp_pair(server_kw: dict[str, Any], client_kw: dict[str, Any],
                   wait_for: str | None = None) -> AsyncIterator[tuple[nerve.Broker, nerve.Broker]]:
    """A server broker and a client broker on loopback TCP (the client dials the server)."""
    async with nerve.Broker(transport="tcp://127.0.0.1:0", heartbeat_interval=0.2, **server_kw) as server:
        async with nerve.Broker(transport="tcp://127.0.0.1:0", peers=[server.address],
                                heartbeat_interval=0.2, **client_kw) as client:
            if wait_for is not None:
                await client.wait_for_services(wait_for, timeout=5)
            yield server, client


class Echo(nerve.Service):
    name = "echo"

    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []

    @nerve.action
    async def hello(self, ctx: nerve.Context) -> dict[str, Any]:
        self.seen.append({"params": ctx.params, "meta": dict(ctx.meta), "caller_node": ctx.node_id})
        return {"node": self.broker.node_id, "params": ctx.params, "meta": dict(ctx.meta)}

    @nerve.action
    async def slow(self, ctx: nerve.Context) -> str:
        await trio.sleep(float(ctx.params.get("seconds", 1.0)))
        return "slow done"


class Recorder(nerve.Middleware):
    """Every wrapping hook: logs ``<tag>><hook>`` on the way in and ``<tag><<hook>`` out."""

    def __init__(self, tag: str, log: list[str]) -> None:
        self.tag = tag
        self.log = log
        self.infos: list[Any] = []
        self.endpoints: list[Any] = []

    def _enter_exit(self, hook: str) -> tuple[Callable[[], None], Callable[[], None]]:
        return (lambda: self.log.append(f"{self.tag}>{hook}"),
                lambda: self.log.append(f"{self.tag}<{hook}"))

    def call(self, next: Any) -> Any:
        enter, leave = self._enter_exit("call")

        async def handler(action: str, params: Any, opts: CallOptions) -> Any:
            enter()
            try:
                return await next(action, params, opts)
            finally:
                leave()

        return handler

    def local_action(self, next: Any, action: ActionInfo) -> Any:
        enter, leave = self._enter_exit("local_action")
        self.infos.append(action)

        async def handler(ctx: nerve.Context) -> Any:
            enter()
            self.endpoints.append(("local", ctx.endpoint, ctx.node_id))
            try:
                return await next(ctx)
            finally:
                leave()

        return handler

    def remote_action(self, next: Any, action: ActionInfo) -> Any:
        enter, leave = self._enter_exit("remote_action")
        self.infos.append(action)

        async def handler(ctx: nerve.Context) -> Any:
            enter()
            self.endpoints.append(("remote", ctx.endpoint, ctx.node_id))
            try:
                return await next(ctx)
            finally:
                leave()

        return handler

    def emit(self, next: Any) -> Any:
        enter, leave = self._enter_exit("emit")

        async def handler(event: str, data: Any, opts: EventOptions) -> None:
            enter()
            try:
                await next(event, data, opts)
            finally:
                leave()

        return handler

    def broadcast(self, next: Any) -> Any:
        enter, leave = self._enter_exit("broadcast")

        async def handler(event: str, data: Any, opts: EventOptions) -> None:
            enter()
            try:
                await next(event, data, opts)
            finally:
                leave()

        return handler

    def local_event(self, next: Any, event: EventInfo) -> Any:
        enter, leave = self._enter_exit("local_event")
        self.infos.append(event)

        async def handler(ctx: nerve.Context) -> None:
            enter()
            try:
                await next(ctx)
            finally:
                leave()

        return handler


def of(log: list[str], hook: str) -> list[str]:
    return [entry for entry in log if entry.endswith(hook) and entry[1] in "<>"]


NESTED = ["A>{0}", "B>{0}", "C>{0}", "C<{0}", "B<{0}", "A<{0}"]


def nested(hook: str) -> list[str]:
    return [e.format(hook) for e in NESTED]


def recorders(log: list[str]) -> list[Recorder]:
    return [Recorder("A", log), Recorder("B", log), Recorder("C", log)]


# --- order of the wrapping hooks ----------------------------------------------------------


async def test_call_and_local_action_chains_first_registered_outermost() -> None:
    log: list[str] = []

    class Spy(Echo):
        @nerve.action
        async def hello(self, ctx: nerve.Context) -> dict[str, Any]:
            log.append("handler")
            return {"ok": True}

    async with nerve.Broker("mw-order-local", namespace=namespace(), services=[Spy()],
                            middlewares=recorders(log)) as b:
        assert await b.call("echo.hello") == {"ok": True}
    assert log == nested("call")[:3] + nested("local_action")[:3] + ["handler"] \
        + nested("local_action")[3:] + nested("call")[3:]


async def test_remote_action_chain_over_tcp_first_registered_outermost() -> None:
    log: list[str] = []
    mws = recorders(log)
    async with tcp_pair({"node_id": "mw-ra-server", "services": [Echo()]},
                        {"node_id": "mw-ra-client", "middlewares": mws}, wait_for="echo") as (server, client):
        res = await client.call("echo.hello", {"x": 1})
        assert res["node"] == "mw-ra-server"
    # The call chain around the remote_action chain; no local_action on the calling node.
    assert log == nested("call")[:3] + nested("remote_action") + nested("call")[3:]
    for mw in mws:
        (kind, endpoint, caller_node), = mw.endpoints
        assert kind == "remote"
        assert endpoint.node_id == "mw-ra-server" and endpoint.name == "echo.hello"
        assert caller_node == "mw-ra-client"
        info, = [i for i in mw.infos if isinstance(i, ActionInfo) and i.name == "echo.hello"]
        assert (info.service, info.node_id, info.local) == ("echo", "mw-ra-server", False)


async def test_remote_action_is_not_run_for_a_local_endpoint() -> None:
    log: list[str] = []
    async with nerve.Broker("mw-ra-local", namespace=namespace(), services=[Echo()],
                            middlewares=recorders(log)) as b:
        await b.call("echo.hello")
    assert of(log, "remote_action") == []
    assert of(log, "local_action") == nested("local_action")


async def test_local_action_runs_for_local_and_remote_callers() -> None:
    log: list[str] = []
    mw = Recorder("A", log)
    async with tcp_pair({"node_id": "mw-la-server", "services": [Echo()], "middlewares": [mw]},
                        {"node_id": "mw-la-client"}, wait_for="echo") as (server, client):
        await server.call("echo.hello", {"from": "local"})
        await client.call("echo.hello", {"from": "remote"})
        # A nested call from the server's own handler is a local call too.
    assert of(log, "local_action") == ["A>local_action", "A<local_action"] * 2
    callers = [(kind, caller) for kind, _, caller in mw.endpoints]
    assert callers == [("local", "mw-la-server"), ("local", "mw-la-client")]
    # ctx.endpoint in local_action: the endpoint that serves the call, whoever called.
    for _, endpoint, _ in mw.endpoints:
        assert endpoint is not None, "local_action must see ctx.endpoint (docs/middleware.md)"
        assert (endpoint.name, endpoint.node_id, endpoint.local) == ("echo.hello", "mw-la-server", True)
    info, = [i for i in mw.infos if isinstance(i, ActionInfo) and i.name == "echo.hello"]
    assert (info.service, info.node_id, info.local) == ("echo", "mw-la-server", True)


class Listener(nerve.Service):
    name = "listener"

    def __init__(self, log: list[str], done: trio.Event) -> None:
        self.log = log
        self.done = done

    @nerve.event("thing.happened")
    async def on_thing(self, ctx: nerve.Context) -> None:
        self.log.append("handler")
        self.done.set()


@pytest.mark.parametrize("how", ["emit", "broadcast"])
async def test_emit_broadcast_and_local_event_chains(how: str) -> None:
    log: list[str] = []
    done = trio.Event()
    mws = recorders(log)
    async with nerve.Broker(f"mw-ev-{how}", namespace=namespace(), services=[Listener(log, done)],
                            middlewares=mws) as b:
        await getattr(b, how)("thing.happened", {"n": 1})
        with trio.fail_after(5):
            await done.wait()
        await wait_until(lambda: len(of(log, "local_event")) == 6)
    other = "broadcast" if how == "emit" else "emit"
    assert of(log, other) == []
    assert of(log, how) == nested(how)
    # The handler runs in the handler pool, maybe before emit / broadcast has returned.
    assert [e for e in log if not e.endswith(how)] == \
        nested("local_event")[:3] + ["handler"] + nested("local_event")[3:]
    info, = [i for i in mws[0].infos if isinstance(i, EventInfo)]
    assert (info.name, info.group, info.service) == ("thing.happened", "listener", "listener")


@pytest.mark.parametrize("how", ["emit", "broadcast"])
async def test_ctx_emit_and_broadcast_go_through_the_chain(how: str) -> None:
    log: list[str] = []
    seen: list[EventOptions] = []
    done = trio.Event()

    class Watch(nerve.Middleware):
        def emit(self, next: Any) -> Any:
            async def handler(event: str, data: Any, opts: EventOptions) -> None:
                seen.append(opts)
                await next(event, data, opts)
            return handler

        broadcast = emit

    class Trigger(nerve.Service):
        name = "trigger"

        @nerve.action
        async def fire(self, ctx: nerve.Context) -> None:
            await getattr(ctx, how)("thing.happened", {"n": 2}, meta={"extra": 1})

    async with nerve.Broker(f"mw-ctxev-{how}", namespace=namespace(), middlewares=[Watch()],
                            services=[Trigger(), Listener(log, done)]) as b:
        await b.call("trigger.fire", meta={"tenant": "t1"})
        with trio.fail_after(5):
            await done.wait()
    opts, = seen
    assert opts.parent_ctx is not None and opts.parent_ctx.action == "trigger.fire"
    assert opts.meta == {"extra": 1}


async def test_event_middleware_can_change_data_and_swallow() -> None:
    got: list[Any] = []
    done = trio.Event()

    class Rewrite(nerve.Middleware):
        def emit(self, next: Any) -> Any:
            async def handler(event: str, data: Any, opts: EventOptions) -> None:
                if data == "drop":
                    return
                await next(event, {"wrapped": data}, opts)
            return handler

    class L(nerve.Service):
        name = "l"

        @nerve.event("e")
        async def on_e(self, ctx: nerve.Context) -> None:
            got.append(ctx.params)
            done.set()

    async with nerve.Broker("mw-ev-rewrite", namespace=namespace(), middlewares=[Rewrite()],
                            services=[L()]) as b:
        await b.emit("e", "drop")
        await b.emit("e", 7)
        with trio.fail_after(5):
            await done.wait()
        await trio.sleep(0.05)
    assert got == [{"wrapped": 7}]


async def test_remote_event_goes_through_local_event_on_the_receiving_node() -> None:
    log: list[str] = []
    done = trio.Event()
    async with tcp_pair({"node_id": "mw-rev-server", "services": [Listener(log, done)],
                         "middlewares": recorders(log)},
                        {"node_id": "mw-rev-client"}, wait_for="listener") as (server, client):
        await client.emit("thing.happened", 1)
        with trio.fail_after(5):
            await done.wait()
        await wait_until(lambda: len(of(log, "local_event")) == 6)
    assert log == nested("local_event")[:3] + ["handler"] + nested("local_event")[3:]


# --- hooks a middleware does not override ---------------------------------------------------


async def test_a_hook_not_overridden_is_not_called_nor_in_the_chain(monkeypatch: pytest.MonkeyPatch) -> None:
    called: list[str] = []

    def spy(hook: str) -> Any:
        def wrapper(self: Any, next: Any, *extra: Any) -> Any:
            called.append(hook)
            return next
        return wrapper

    for hook in ("call", "local_action", "remote_action", "emit", "broadcast", "local_event"):
        monkeypatch.setattr(nerve.Middleware, hook, spy(hook))

    async def lifecycle_spy(self: Any, arg: Any) -> None:
        called.append("lifecycle")

    for hook in ("started", "stopped", "service_started", "service_stopped"):
        monkeypatch.setattr(nerve.Middleware, hook, lifecycle_spy)
    monkeypatch.setattr(nerve.Middleware, "created", lambda self, broker: called.append("created"))

    class OnlyCall(nerve.Middleware):
        def __init__(self) -> None:
            self.calls = 0

        def call(self, next: Any) -> Any:
            async def handler(action: str, params: Any, opts: CallOptions) -> Any:
                self.calls += 1
                return await next(action, params, opts)
            return handler

    mw = OnlyCall()
    async with tcp_pair({"node_id": "mw-nov-server", "services": [Echo()]},
                        {"node_id": "mw-nov-client", "middlewares": [mw]},
                        wait_for="echo") as (server, client):
        await client.call("echo.hello")
        await client.emit("nothing")
        await client.broadcast("nothing")
        # No remote_action hook: the remote call takes the flat lane (no chain, no Context).
        assert not client.middlewares.wraps_remote
        assert client.middlewares.wraps_call
    assert mw.calls == 1
    assert called == []


async def test_no_middleware_serves_with_the_bare_pipeline() -> None:
    class Plain(nerve.Service):
        name = "plain"

        @nerve.action
        async def ping(self, ctx: nerve.Context) -> str:
            return "pong"

    svc = Plain()
    async with nerve.Broker("mw-bare", namespace=namespace(), services=[svc]) as b:
        ep, = b.registry.actions["plain.ping"]
        spec = ep.spec
        assert spec is not None
        # No middleware and no guard / hook / pipe: serve is the handler itself (no frame of ours).
        assert spec.serve == svc.ping
        assert await b.call("plain.ping") == "pong"


# --- options errors -------------------------------------------------------------------------


def test_a_non_middleware_in_middlewares_is_refused() -> None:
    class Duck:
        def call(self, next: Any) -> Any:
            return next

    with pytest.raises(BrokerOptionsError, match="not a nerve.Middleware"):
        nerve.Broker("mw-bad-1", namespace=namespace(), middlewares=[Duck()])  # type: ignore[list-item]
    with pytest.raises(BrokerOptionsError):
        nerve.Broker("mw-bad-2", namespace=namespace(), middlewares=[nerve.Middleware, ])  # type: ignore[list-item]


@pytest.mark.parametrize("hook", ["call", "local_action", "emit", "broadcast", "local_event"])
def test_a_hook_returning_a_non_callable_is_refused_when_the_chain_is_built(hook: str) -> None:
    def bad(self: Any, next: Any, *extra: Any) -> Any:
        return None

    Bad = type("Bad", (nerve.Middleware,), {hook: bad})
    done = trio.Event()
    with pytest.raises(BrokerOptionsError, match=hook):
        nerve.Broker(f"mw-badhook-{hook}", namespace=namespace(), middlewares=[Bad()],
                     services=[Echo(), Listener([], done)])


async def test_a_remote_action_hook_returning_a_non_callable_is_refused() -> None:
    class Bad(nerve.Middleware):
        def remote_action(self, next: Any, action: ActionInfo) -> Any:
            return "not a handler"

    async with tcp_pair({"node_id": "mw-badra-server", "services": [Echo()]},
                        {"node_id": "mw-badra-client", "middlewares": [Bad()]},
                        wait_for="echo") as (server, client):
        with pytest.raises(BrokerOptionsError, match="remote_action"):
            await client.call("echo.hello")


# --- call middlewares: options and short circuits ---------------------------------------------


async def test_a_call_middleware_can_add_meta_and_change_params() -> None:
    class Tenant(nerve.Middleware):
        def call(self, next: Any) -> Any:
            async def handler(action: str, params: Any, opts: CallOptions) -> Any:
                opts.meta = {**(opts.meta or {}), "tenant": "acme"}
                return await next(action, {**(params or {}), "added": True}, opts)
            return handler

    echo = Echo()
    async with nerve.Broker("mw-meta", namespace=namespace(), services=[echo], middlewares=[Tenant()]) as b:
        mine: dict[str, Any] = {"user": 1}
        res = await b.call("echo.hello", {"q": 1}, meta=mine)
    assert res["meta"] == {"user": 1, "tenant": "acme"}
    assert res["params"] == {"q": 1, "added": True}
    assert mine == {"user": 1}  # the middleware replaced the dict: the caller's is its own


async def test_a_call_middleware_can_change_the_timeout() -> None:
    class Tight(nerve.Middleware):
        def call(self, next: Any) -> Any:
            async def handler(action: str, params: Any, opts: CallOptions) -> Any:
                opts.timeout = 0.05
                return await next(action, params, opts)
            return handler

    async with tcp_pair({"node_id": "mw-to-server", "services": [Echo()]},
                        {"node_id": "mw-to-client", "middlewares": [Tight()]},
                        wait_for="echo") as (server, client):
        start = trio.current_time()
        with pytest.raises(RequestTimeoutError):
            await client.call("echo.slow", {"seconds": 2}, timeout=30)
        assert trio.current_time() - start < 1.0


async def test_a_call_middleware_can_pick_the_node() -> None:
    class Route(nerve.Middleware):
        def call(self, next: Any) -> Any:
            async def handler(action: str, params: Any, opts: CallOptions) -> Any:
                opts.node_id = "mw-route-server"
                return await next(action, params, opts)
            return handler

    async with tcp_pair({"node_id": "mw-route-server", "services": [Echo()]},
                        {"node_id": "mw-route-client", "services": [Echo()], "middlewares": [Route()]},
                        wait_for="echo") as (server, client):
        await wait_until(lambda: len(client.registry.actions.get("echo.hello", [])) == 2)
        # Without the middleware the local endpoint would be preferred.
        assert (await client.call("echo.hello"))["node"] == "mw-route-server"


async def test_a_call_middleware_can_short_circuit() -> None:
    class Cache(nerve.Middleware):
        def __init__(self) -> None:
            self.store: dict[str, Any] = {"echo.hello": "cached", "nowhere.at.all": "also cached"}

        def call(self, next: Any) -> Any:
            async def handler(action: str, params: Any, opts: CallOptions) -> Any:
                if action in self.store:
                    return self.store[action]
                return await next(action, params, opts)
            return handler

    echo = Echo()
    async with nerve.Broker("mw-short", namespace=namespace(), services=[echo], middlewares=[Cache()]) as b:
        assert await b.call("echo.hello") == "cached"
        # Even an action that exists nowhere: the handler never looks.
        assert await b.call("nowhere.at.all") == "also cached"
        assert b.statistics().calls == 0
    assert echo.seen == []


async def test_a_call_middleware_sees_nested_calls_with_their_parent() -> None:
    seen: list[tuple[str, Any]] = []

    class Watch(nerve.Middleware):
        def call(self, next: Any) -> Any:
            async def handler(action: str, params: Any, opts: CallOptions) -> Any:
                seen.append((action, opts.parent_ctx.action if opts.parent_ctx else None))
                return await next(action, params, opts)
            return handler

    class Outer(nerve.Service):
        name = "outer"

        @nerve.action
        async def go(self, ctx: nerve.Context) -> Any:
            return await ctx.call("echo.hello")

    async with nerve.Broker("mw-nested", namespace=namespace(), services=[Echo(), Outer()],
                            middlewares=[Watch()]) as b:
        await b.call("outer.go")
    assert seen == [("outer.go", None), ("echo.hello", "outer.go")]


async def test_errors_raised_by_a_call_middleware_reach_the_caller() -> None:
    class Refuse(nerve.Middleware):
        def call(self, next: Any) -> Any:
            async def handler(action: str, params: Any, opts: CallOptions) -> Any:
                raise ClientError("no calls today", 418, "TEAPOT")
            return handler

    async with nerve.Broker("mw-refuse", namespace=namespace(), services=[Echo()],
                            middlewares=[Refuse()]) as b:
        with pytest.raises(ClientError) as info:
            await b.call("echo.hello")
    assert info.value.code == 418


async def test_remote_action_middleware_can_change_meta_and_timeout_per_attempt() -> None:
    class PerAttempt(nerve.Middleware):
        def remote_action(self, next: Any, action: ActionInfo) -> Any:
            async def handler(ctx: nerve.Context) -> Any:
                ctx.meta["via"] = ctx.endpoint.node_id
                if action.name == "echo.slow":
                    ctx.timeout = 0.05
                return await next(ctx)
            return handler

    async with tcp_pair({"node_id": "mw-rmeta-server", "services": [Echo()]},
                        {"node_id": "mw-rmeta-client", "middlewares": [PerAttempt()]},
                        wait_for="echo") as (server, client):
        res = await client.call("echo.hello")
        assert res["meta"] == {"via": "mw-rmeta-server"}
        with pytest.raises(RequestTimeoutError):
            await client.call("echo.slow", {"seconds": 2})


# --- lifecycle ------------------------------------------------------------------------------


class Life(nerve.Middleware):
    def __init__(self, tag: str, log: list[str]) -> None:
        self.tag = tag
        self.log = log

    def created(self, broker: Any) -> None:
        self.log.append(f"{self.tag}.created:{broker.node_id}")

    async def started(self, broker: Any) -> None:
        await trio.lowlevel.checkpoint()
        self.log.append(f"{self.tag}.started")

    def stopped(self, broker: Any) -> None:  # type: ignore[override]  # sync is allowed
        self.log.append(f"{self.tag}.stopped")

    def service_started(self, service: Any) -> None:  # type: ignore[override]
        if service.name != "$node":
            self.log.append(f"{self.tag}.service_started:{service.name}")

    async def service_stopped(self, service: Any) -> None:
        if service.name != "$node":
            self.log.append(f"{self.tag}.service_stopped:{service.name}")


async def test_lifecycle_hooks_in_order_stopped_in_reverse() -> None:
    log: list[str] = []

    class Svc(nerve.Service):
        name = "svc"

        async def started(self) -> None:
            log.append("svc.started")

        async def stopped(self) -> None:
            log.append("svc.stopped")

    b = nerve.Broker("mw-life", namespace=namespace(), services=[Svc()],
                     middlewares=[Life("A", log), Life("B", log)])
    assert log == ["A.created:mw-life", "B.created:mw-life"]
    log.clear()
    async with b:
        assert log == ["A.started", "B.started", "svc.started",
                       "A.service_started:svc", "B.service_started:svc"]
        log.clear()
    assert log.index("svc.stopped") < log.index("A.service_stopped:svc")
    assert log.index("svc.stopped") < log.index("B.service_stopped:svc")
    assert [e for e in log if e.endswith(".stopped")][-2:] == ["B.stopped", "A.stopped"]
    assert log[-2:] == ["B.stopped", "A.stopped"]  # after every service stopped


async def test_service_hooks_for_services_added_and_removed_at_run_time() -> None:
    log: list[str] = []
    async with nerve.Broker("mw-life-add", namespace=namespace(), middlewares=[Life("A", log)]) as b:
        log.clear()
        b.add_service(Echo())
        await wait_until(lambda: "A.service_started:echo" in log)
        await b.remove_service("echo")
        assert log == ["A.service_started:echo", "A.service_stopped:echo"]


async def test_a_failing_stopped_hook_does_not_stop_the_others() -> None:
    log: list[str] = []

    class Boom(nerve.Middleware):
        async def stopped(self, broker: Any) -> None:
            raise RuntimeError("boom")

    async with nerve.Broker("mw-life-boom", namespace=namespace(),
                            middlewares=[Life("A", log), Boom(), Life("C", log)]):
        log.clear()
    assert log[-2:] == ["C.stopped", "A.stopped"]


# --- properties that travel in INFO ---------------------------------------------------------


class Catalog(nerve.Service):
    name = "catalog"
    version = 2
    properties = {"team": "shop", "cache": False, "rest": "GET /items"}

    @nerve.action(cache={"ttl": 30, "keys": ["id"]}, rest="GET /items/:id", visibility="public")
    async def item(self, ctx: nerve.Context) -> dict[str, Any]:
        return {"id": ctx.params.get("id")}

    @nerve.action
    async def plain(self, ctx: nerve.Context) -> str:
        return "plain"


EXPECTED_ITEM = {"team": "shop", "cache": {"ttl": 30, "keys": ["id"]}, "rest": "GET /items/:id",
                 "visibility": "public"}
EXPECTED_PLAIN = {"team": "shop", "cache": False, "rest": "GET /items"}


async def test_properties_merged_and_seen_by_local_action() -> None:
    infos: dict[str, ActionInfo] = {}

    class Look(nerve.Middleware):
        def local_action(self, next: Any, action: ActionInfo) -> Any:
            infos[action.name] = action
            return next

    async with nerve.Broker("mw-props-local", namespace=namespace(), services=[Catalog()],
                            middlewares=[Look()]):
        pass
    assert infos["v2.catalog.item"].properties == EXPECTED_ITEM
    assert infos["v2.catalog.plain"].properties == EXPECTED_PLAIN
    assert infos["v2.catalog.item"].service == "v2.catalog"


async def test_properties_travel_in_info_to_a_middleware_on_another_node() -> None:
    infos: dict[str, ActionInfo] = {}

    class Look(nerve.Middleware):
        def remote_action(self, next: Any, action: ActionInfo) -> Any:
            infos[action.name] = action
            return next

    async with tcp_pair({"node_id": "mw-props-server", "services": [Catalog()]},
                        {"node_id": "mw-props-client", "middlewares": [Look()]},
                        wait_for="v2.catalog") as (server, client):
        assert await client.call("v2.catalog.item", {"id": 5}) == {"id": 5}
        assert await client.call("v2.catalog.plain") == "plain"
        listed = await client.call("$node.actions")
    item = infos["v2.catalog.item"]
    assert (item.node_id, item.local, item.service) == ("mw-props-server", False, "v2.catalog")
    assert item.properties == EXPECTED_ITEM
    assert infos["v2.catalog.plain"].properties == EXPECTED_PLAIN
    # $node.actions shows them too (as Moleculer's ``action`` definition of the entry).
    entry, = [a for a in listed if a["name"] == "v2.catalog.item"]
    assert {k: v for k, v in entry["action"].items() if k in EXPECTED_ITEM} == EXPECTED_ITEM


async def test_node_actions_shows_local_properties() -> None:
    async with nerve.Broker("mw-props-node", namespace=namespace(), services=[Catalog()]) as b:
        listed = await b.call("$node.actions")
    entry, = [a for a in listed if a["name"] == "v2.catalog.item"]
    assert {k: v for k, v in entry["action"].items() if k in EXPECTED_ITEM} == EXPECTED_ITEM


def test_non_json_properties_are_refused() -> None:
    with pytest.raises(ServiceSchemaError, match="JSON"):
        class A(nerve.Service):
            name = "a"

            @nerve.action(thing=object())
            async def x(self, ctx: nerve.Context) -> None: ...

    with pytest.raises(ServiceSchemaError, match="JSON"):
        class B(nerve.Service):
            name = "b"

            @nerve.action(when=complex(1, 2))
            async def x(self, ctx: nerve.Context) -> None: ...

    class C(nerve.Service):
        name = "c"
        properties = {"f": lambda: 1}

        @nerve.action
        async def x(self, ctx: nerve.Context) -> None: ...

    with pytest.raises(ServiceSchemaError, match="JSON"):
        nerve.Broker("mw-props-bad", namespace=namespace(), services=[C()])


@pytest.mark.parametrize("key", ["params", "rawName"])
def test_property_names_info_uses_itself_are_refused(key: str) -> None:
    # INFO's action definition holds the name, rawName and params schema beside the
    # properties: a property of one of those names would not be the same on every node.
    with pytest.raises(ServiceSchemaError, match=key):
        nerve.action(**{key: {"x": "number"}})

    class S(nerve.Service):
        name = "reserved"
        properties = {key: 1}

        @nerve.action
        async def x(self, ctx: nerve.Context) -> None: ...

    with pytest.raises(ServiceSchemaError, match=key):
        nerve.Broker("mw-props-reserved", namespace=namespace(), services=[S()])

    class T(nerve.Service):
        name = "reserved2"
        properties = {"name": "shadow"}

        @nerve.action
        async def x(self, ctx: nerve.Context) -> None: ...

    with pytest.raises(ServiceSchemaError, match="name"):
        nerve.Broker("mw-props-reserved2", namespace=namespace(), services=[T()])


# --- mcall ------------------------------------------------------------------------------------


class Work(nerve.Service):
    name = "work"

    def __init__(self) -> None:
        self.cancelled: list[str] = []
        self.finished: list[str] = []
        self.contexts: list[nerve.Context] = []

    @nerve.action
    async def double(self, ctx: nerve.Context) -> int:
        self.contexts.append(ctx)
        return int(ctx.params["n"]) * 2

    @nerve.action
    async def fail(self, ctx: nerve.Context) -> None:
        await trio.sleep(float(ctx.params.get("after", 0)))
        raise ClientError("failed on purpose", 400, "NOPE", {"who": ctx.params.get("who")})

    @nerve.action
    async def slow(self, ctx: nerve.Context) -> str:
        try:
            await trio.sleep(float(ctx.params.get("seconds", 5)))
        except trio.Cancelled:
            self.cancelled.append(ctx.params.get("tag", "slow"))
            raise
        self.finished.append(ctx.params.get("tag", "slow"))
        return "slow"

    @nerve.action
    async def meta(self, ctx: nerve.Context) -> dict[str, Any]:
        self.contexts.append(ctx)
        return dict(ctx.meta)

    @nerve.action
    async def fan(self, ctx: nerve.Context) -> Any:
        self.contexts.append(ctx)
        results = await ctx.mcall({"a": ("work.meta", {}), "b": {"action": "work.meta", "params": {},
                                                                "options": {"meta": {"b": 1}}}})
        return {"results": results, "meta_after": dict(ctx.meta)}


async def test_mcall_list_and_dict_forms() -> None:
    async with nerve.Broker("mw-mcall", namespace=namespace(), services=[Work()]) as b:
        assert await b.mcall([("work.double", {"n": 1}),
                              {"action": "work.double", "params": {"n": 2}},
                              ["work.double", {"n": 3}]]) == [2, 4, 6]
        assert await b.mcall({"x": ("work.double", {"n": 10}),
                              "y": {"action": "work.double", "params": {"n": 20},
                                    "options": {"timeout": 5, "meta": {"m": 1}}}}) == {"x": 20, "y": 40}
        assert await b.mcall([]) == []
        assert await b.mcall({}) == {}
        res = await b.mcall([{"action": "work.meta", "options": {"meta": {"k": "v"}}}])
        assert res == [{"k": "v"}]


async def test_mcall_keeps_the_order_of_the_calls_not_of_their_answers() -> None:
    async with nerve.Broker("mw-mcall-order", namespace=namespace(), services=[Work()]) as b:
        res = await b.mcall([("work.slow", {"seconds": 0.1, "tag": "a"}), ("work.double", {"n": 1})])
        assert res == ["slow", 2]
        res2 = await b.mcall({"z": ("work.slow", {"seconds": 0.1}), "a": ("work.double", {"n": 1})})
        assert list(res2) == ["z", "a"]


async def test_mcall_settled_shapes() -> None:
    async with nerve.Broker("mw-mcall-settled", namespace=namespace(), services=[Work()]) as b:
        res = await b.mcall([("work.double", {"n": 4}), ("work.fail", {"who": "second"}),
                             ("work.slow", {"seconds": 0.05, "tag": "s"})], settled=True)
        assert res[0] == {"status": "fulfilled", "value": 8}
        assert res[1]["status"] == "rejected" and set(res[1]) == {"status", "reason"}
        assert isinstance(res[1]["reason"], ClientError) and res[1]["reason"].data == {"who": "second"}
        assert res[2] == {"status": "fulfilled", "value": "slow"}
        named = await b.mcall({"ok": ("work.double", {"n": 1}), "bad": ("nowhere.x", {})}, settled=True)
        assert named["ok"] == {"status": "fulfilled", "value": 2}
        assert named["bad"]["status"] == "rejected"
        assert isinstance(named["bad"]["reason"], NerveError)


async def test_mcall_first_failure_cancels_the_others() -> None:
    work = Work()
    async with nerve.Broker("mw-mcall-cancel", namespace=namespace(), services=[work]) as b:
        start = trio.current_time()
        with pytest.raises(ClientError) as info:
            await b.mcall([("work.slow", {"seconds": 5, "tag": "sibling"}),
                           ("work.fail", {"after": 0.05, "who": "first"}),
                           ("work.fail", {"after": 0.5, "who": "later"})])
        elapsed = trio.current_time() - start
    assert info.value.data == {"who": "first"}
    assert elapsed < 1.0
    assert work.cancelled == ["sibling"]
    assert work.finished == []


async def test_mcall_first_failure_cancels_a_remote_wait_too() -> None:
    async with tcp_pair({"node_id": "mw-mcall-rs", "services": [Work()]},
                        {"node_id": "mw-mcall-rc"}, wait_for="work") as (server, client):
        start = trio.current_time()
        with pytest.raises(ClientError):
            await client.mcall({"slow": ("work.slow", {"seconds": 5}),
                                "fail": ("work.fail", {"after": 0.05})})
        assert trio.current_time() - start < 1.0


async def test_mcall_bad_call_specs_are_refused() -> None:
    async with nerve.Broker("mw-mcall-bad", namespace=namespace(), services=[Work()]) as b:
        for bad in ([42], [{"params": {}}], [("work.double", {}, "not options")]):
            with pytest.raises(BrokerOptionsError):
                await b.mcall(bad)


async def test_ctx_mcall_inherits_meta_and_parent_ids() -> None:
    work = Work()
    async with nerve.Broker("mw-ctx-mcall", namespace=namespace(), services=[work]) as b:
        res = await b.call("work.fan", meta={"tenant": "t1"})
    # "a" may run after "b" merged its meta back into the parent's (siblings run concurrently).
    assert res["results"]["a"]["tenant"] == "t1"
    assert res["results"]["b"] == {"tenant": "t1", "b": 1}
    assert res["meta_after"] == {"tenant": "t1", "b": 1}  # the children's meta merged back
    parent, *children = work.contexts
    assert parent.action == "work.fan" and len(children) == 2
    for child in children:
        assert child.parent_id == parent.id
        assert child.request_id == parent.request_id
        assert child.level == parent.level + 1
        assert child.caller == "work"


# --- dependencies -----------------------------------------------------------------------------


class Other(nerve.Service):
    name = "other"

    @nerve.action
    async def value(self, ctx: nerve.Context) -> int:
        return 42


class Dependent(nerve.Service):
    name = "dependent"
    dependencies = ["other"]

    def __init__(self, release: trio.Event | None = None) -> None:
        self.events: list[str] = []
        self.release = release
        self.in_started = trio.Event()

    async def started(self) -> None:
        self.events.append("started")
        # Its dependency is reachable from started(): that is the point of waiting.
        self.events.append(f"other.value={await self.broker.call('other.value')}")
        self.in_started.set()
        if self.release is not None:
            await self.release.wait()
        self.events.append("started done")

    @nerve.action
    async def use(self, ctx: nerve.Context) -> int:
        return int(await ctx.call("other.value")) + 1


async def test_started_runs_only_once_dependencies_appear_and_peers_see_it_after() -> None:
    release = trio.Event()
    dep = Dependent(release)
    first = nerve.Broker("mw-dep-1", transport="tcp://127.0.0.1:0", services=[dep],
                         heartbeat_interval=0.2, dependency_timeout=10)
    first_started = trio.Event()
    stop_first = trio.Event()

    async def run_first() -> None:
        async with first:
            first_started.set()
            await stop_first.wait()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run_first)
        await wait_until(lambda: first.address is not None)
        await trio.sleep(0.2)
        assert dep.events == []  # "other" is nowhere yet
        assert not first_started.is_set()  # start() waits for the dependents
        async with nerve.Broker("mw-dep-2", transport="tcp://127.0.0.1:0", peers=[first.address],
                                heartbeat_interval=0.2, services=[Other()]) as second:
            with trio.fail_after(5):
                await dep.in_started.wait()
            assert dep.events == ["started", "other.value=42"]
            # The second node knows the first, but not its service still starting.
            await wait_until(lambda: "mw-dep-1" in second.registry.nodes)
            await trio.sleep(0.2)
            assert "dependent.use" not in second.registry.actions
            release.set()
            with trio.fail_after(5):
                await first_started.wait()
            await second.wait_for_services("dependent", timeout=5)
            assert await second.call("dependent.use") == 43
            assert dep.events == ["started", "other.value=42", "started done"]
            stop_first.set()


async def test_dependency_timeout_fails_the_broker_start() -> None:
    b = nerve.Broker("mw-dep-timeout", namespace=namespace(), services=[Dependent()],
                     dependency_timeout=0.2)
    start = trio.current_time()
    with pytest.raises(RequestTimeoutError) as info:
        async with b:
            pytest.fail("the broker must not start without its dependencies")
    assert trio.current_time() - start < 2
    assert "other" in str(info.value)
    with pytest.raises(BrokerOptionsError, match="not running"):
        await b.call("other.value")


async def test_dependencies_met_locally_start_at_once() -> None:
    dep = Dependent()
    async with nerve.Broker("mw-dep-local", namespace=namespace(), services=[dep, Other()],
                            dependency_timeout=2) as b:
        assert dep.events == ["started", "other.value=42", "started done"]
        assert await b.call("dependent.use") == 43


def _named(name: str, deps: list[str], log: list[str]) -> nerve.Service:
    class Named(nerve.Service):
        async def started(self) -> None:
            log.append(f"started {self.name}")

        async def stopped(self) -> None:
            log.append(f"stopped {self.name}")

        @nerve.action
        async def x(self, ctx: nerve.Context) -> str:
            return self.name

    svc = Named()
    svc.name = name
    svc.dependencies = deps
    return svc


async def test_several_services_waiting_on_dependencies_all_wake() -> None:
    log: list[str] = []
    ns = namespace()
    first = nerve.Broker("mw-deps-many", namespace=ns, dependency_timeout=5,
                         services=[_named("d1", ["s1"], log), _named("d2", ["s2"], log)])
    async with trio.open_nursery() as nursery:
        done = trio.Event()

        async def run() -> None:
            async with first:
                done.set()
                await trio.sleep_forever()

        nursery.start_soon(run)
        await trio.sleep(0.2)
        async with nerve.Broker("mw-deps-provider", namespace=ns,
                                services=[_named("s1", [], log), _named("s2", [], log)]):
            with trio.fail_after(3):
                await done.wait()
        assert sorted(x for x in log if x.startswith("started d")) == ["started d1", "started d2"]
        nursery.cancel_scope.cancel()


async def test_a_chain_of_local_dependencies_starts_in_order_and_unstarted_services_are_not_callable() -> None:
    log: list[str] = []
    b = nerve.Broker("mw-deps-chain", namespace=namespace(), dependency_timeout=0.5,
                     services=[_named("a", ["b"], log), _named("b", ["c"], log)])
    with pytest.raises(RequestTimeoutError):
        async with b:
            pass
    assert log == []  # "c" never came: neither b nor a (which waits for b) started
    async with nerve.Broker("mw-deps-late", namespace=namespace(), dependency_timeout=5) as b2:
        b2.add_service(_named("late", ["s9"], log))
        await trio.sleep(0.1)
        with pytest.raises(ServiceNotFoundError):
            await b2.call("late.x")
        assert "late" not in [s["name"] for s in b2.describe_services()]
        b2.add_service(_named("s9", [], log))  # a local dependency added later wakes the waiter
        await b2.wait_for_services("late", timeout=3)
        assert await b2.call("late.x") == "late"
        assert log == ["started s9", "started late"]


async def test_a_service_removed_while_it_waits_never_starts_nor_stops_and_stop_does_not_wait_for_it() -> None:
    log: list[str] = []
    async with nerve.Broker("mw-deps-rm", namespace=namespace(), dependency_timeout=30,
                            graceful_stop_timeout=10) as b:
        b.add_service(_named("dep2", ["s9"], log))
        b.add_service(_named("dep3", ["never"], log))
        await trio.sleep(0.1)
        await b.remove_service("dep2")
        b.add_service(_named("s9", [], log))
        await trio.sleep(0.3)
        assert log == ["started s9"]
        start = trio.current_time()
    assert trio.current_time() - start < 2  # dep3's wait did not hold up the graceful stop
    assert log == ["started s9", "stopped s9"]  # dep3 never started: nothing to stop


async def test_a_call_middleware_that_refuses_fails_the_request_stream_feeder_at_once() -> None:
    class Refuse(nerve.Middleware):
        def call(self, next: Any) -> Any:
            async def handler(action: str, params: Any, opts: nerve.CallOptions) -> Any:
                raise ForbiddenError("nope")
            return handler

    async with nerve.Broker("mw-refuse", namespace=namespace(), services=[Echo()], middlewares=[Refuse()]) as b:
        stream = b.create_stream()
        fed: list[BaseException] = []

        async def feed() -> None:
            try:
                while True:
                    await stream.send(b"x" * 1000)
            except nerve.errors.StreamError as exc:
                fed.append(exc)

        with trio.fail_after(3):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(feed)
                with pytest.raises(ForbiddenError):
                    await b.call("echo.hello", stream=stream)
        assert fed and "nope" in str(fed[0])


async def test_event_properties_reach_local_event_middlewares_and_travel_in_info() -> None:
    seen: list[dict[str, Any]] = []

    class Watch(nerve.Middleware):
        def local_event(self, next: Any, event: EventInfo) -> Any:
            seen.append(dict(event.properties))
            return next

    class Sub(nerve.Service):
        name = "sub"

        @nerve.event("thing.happened", bulkhead={"concurrency": 1}, tag="x")
        async def on_thing(self, ctx: nerve.Context) -> None:
            pass

    with pytest.raises(ServiceSchemaError):
        nerve.event("bad", when=object())
    async with nerve.Broker("mw-evprops", services=[Sub()], middlewares=[Watch()],
                            transport="tcp://127.0.0.1:0") as a:
        assert seen == [{"bulkhead": {"concurrency": 1}, "tag": "x"}]
        async with nerve.Broker("mw-evprops-2", transport="tcp://127.0.0.1:0", peers=[a.address]) as b:
            await b.wait_for_services("sub")
            node = b.registry.nodes["mw-evprops"]
            (svc,) = [s for s in node.services if s["name"] == "sub"]
            assert svc["events"]["thing.happened"] == {"name": "thing.happened", "group": "sub",
                                                       "bulkhead": {"concurrency": 1}, "tag": "x"}


async def test_an_endpoint_kept_off_by_a_middleware_stays_off_across_a_new_info_that_describes_it_as_before() -> None:
    async with nerve.Broker("mw-avail-1", transport="tcp://127.0.0.1:0", services=[Echo()]) as a:
        async with nerve.Broker("mw-avail-2", transport="tcp://127.0.0.1:0", peers=[a.address]) as b:
            await b.wait_for_services("echo")
            (ep,) = b.registry.actions["echo.hello"]
            ep.available = False
            a.add_service(Other())  # a new INFO from a: its endpoints are rebuilt
            await b.wait_for_services("other")
            (ep2,) = b.registry.actions["echo.hello"]
            # described as before: the same endpoint object, with what middlewares set on it
            assert ep2 is ep and ep2.available is False
            assert all(e.available for e in b.registry.actions["other.value"])


async def test_a_service_added_to_a_running_broker_is_reachable_only_once_started() -> None:
    release = trio.Event()
    log: list[str] = []

    class Slow(nerve.Service):
        name = "slowstart"

        async def started(self) -> None:
            await release.wait()
            log.append("started")

        @nerve.action
        async def x(self, ctx: nerve.Context) -> str:
            return "ok"

    async with nerve.Broker("mw-add-slow", namespace=namespace()) as b:
        b.add_service(Slow())
        await trio.sleep(0.1)
        with pytest.raises(ServiceNotFoundError):
            await b.call("slowstart.x")
        with trio.move_on_after(0.2) as waited:
            await b.wait_for_services("slowstart")
        assert waited.cancelled_caught  # not available while its started() runs
        release.set()
        await b.wait_for_services("slowstart", timeout=2)
        assert await b.call("slowstart.x") == "ok" and log == ["started"]



async def test_a_dependent_removed_while_its_started_runs_is_stopped_and_the_broker_starts() -> None:
    log: list[str] = []
    holder: dict[str, nerve.Broker] = {}

    class Dep(nerve.Service):
        name = "deprm"
        dependencies = ["other"]

        async def started(self) -> None:
            log.append("started deprm")
            await holder["b"].remove_service("deprm")  # removed while its started() runs

        async def stopped(self) -> None:
            log.append("stopped deprm")

    b = nerve.Broker("mw-deprm", namespace=namespace(), services=[Other(), Dep()], dependency_timeout=2)
    holder["b"] = b
    async with b:
        assert "deprm" not in b.services
        with pytest.raises(ServiceNotFoundError):
            await b.call("deprm.x")
    assert log == ["started deprm", "stopped deprm"]


class Selective(nerve.Middleware):
    """Wraps remote_action for ``echo.slow`` only; leaves ``echo.hello``'s chain bare."""

    def __init__(self) -> None:
        self.wrapped: list[str] = []

    def remote_action(self, next: Any, action: ActionInfo) -> Any:
        if action.name != "echo.slow":
            return next

        async def counted(ctx: nerve.Context) -> Any:
            self.wrapped.append(ctx.action or "")
            return await next(ctx)

        return counted


async def test_a_remote_chain_left_bare_keeps_the_flat_lane() -> None:
    """A remote_action hook that returns ``next`` (a tracer with no SDK) adds nothing per call:
    that endpoint's calls take the flat lane (no Context built); a wrapped one does not."""
    mw = Selective()
    built: list[str] = []
    real_context = nerve.Context.__init__

    def spy(self: nerve.Context, broker: Any, **kw: Any) -> None:
        if broker.node_id == "mw-bare-client":  # the server builds one per REQ it serves
            built.append(kw.get("action") or "")
        real_context(self, broker, **kw)

    async with tcp_pair({"node_id": "mw-bare-server", "services": [Echo()]},
                        {"node_id": "mw-bare-client", "middlewares": [mw]}, wait_for="echo") as (_, client):
        nerve.Context.__init__ = spy  # type: ignore[method-assign]
        try:
            for _ in range(3):
                assert (await client.call("echo.hello", {"x": 1}))["params"] == {"x": 1}
            assert await client.call("echo.slow", {"seconds": 0}) == "slow done"
        finally:
            nerve.Context.__init__ = real_context  # type: ignore[method-assign]
        hello, = client.registry.actions["echo.hello"]
        slow, = client.registry.actions["echo.slow"]
        assert hello.bare and not slow.bare
    assert mw.wrapped == ["echo.slow"]
    assert "echo.hello" not in built and "echo.slow" in built  # the client built a Context for slow only


class TraceFlag(nerve.Service):
    """A call tree whose root sets Moleculer's tracing flag: nested calls and events carry it."""

    name = "flag"

    def __init__(self) -> None:
        self.seen: list[Any] = []

    @nerve.action
    async def root(self, ctx: nerve.Context) -> Any:
        ctx.tracing = ctx.params.get("tracing")
        return await ctx.call("flag.mid", node_id=ctx.params["next"])

    @nerve.action
    async def mid(self, ctx: nerve.Context) -> Any:
        await ctx.emit("flag.happened")
        return {"mid": ctx.tracing, "leaf": await ctx.call("flag.leaf", node_id=ctx.broker.node_id)}

    @nerve.action
    async def leaf(self, ctx: nerve.Context) -> Any:
        return ctx.tracing

    @nerve.event("flag.happened")
    async def happened(self, ctx: nerve.Context) -> None:
        self.seen.append(ctx.tracing)


@pytest.mark.parametrize("flag", [True, False, None])
async def test_moleculer_tracing_flag_travels_with_the_call_tree(flag: bool | None) -> None:
    a_svc, b_svc = TraceFlag(), TraceFlag()
    async with tcp_pair({"node_id": "flag-b", "services": [b_svc]},
                        {"node_id": "flag-a", "services": [a_svc]}, wait_for="flag") as (b, a):
        await wait_until(lambda: len(a.registry.actions.get("flag.mid", ())) == 2
                         and len(b.registry.actions.get("flag.mid", ())) == 2)
        out = await a.call("flag.root", {"tracing": flag, "next": "flag-b"}, node_id="flag-a")
        assert out == {"mid": flag, "leaf": flag}
        await wait_until(lambda: len(a_svc.seen) + len(b_svc.seen) == 1)
        assert a_svc.seen + b_svc.seen == [flag]
