"""The serving pipeline of one action (docs/middleware.md, "Guards, interceptors, pipes",
"Hooks" and fallbacks): interceptors -> guards -> pipes -> params validation -> hooks ->
handler, the service's before the action's; Moleculer's hook order; guard refusals as
ForbiddenError across the wire; call and action fallbacks."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import msgspec
import pytest
import trio

import nerve
from nerve.errors import (
    ClientError,
    ForbiddenError,
    NerveError,
    RequestTimeoutError,
    ServiceNotFoundError,
    ServiceSchemaError,
    ValidationError,
)

pytestmark = pytest.mark.anyio

_ns = itertools.count(1)


def namespace() -> str:
    """A fresh namespace: in-process brokers of one test never meet those of another."""
    return f"pipeline-{next(_ns)}"


@asynccontextmanager
async def local(*services: nerve.Service, **kw: Any) -> AsyncIterator[nerve.Broker]:
    async with nerve.Broker(f"pl-{next(_ns)}", namespace=namespace(), services=services, **kw) as b:
        yield b


@asynccontextmanager
async def tcp_pair(*services: nerve.Service, **client_kw: Any) -> AsyncIterator[tuple[nerve.Broker, nerve.Broker]]:
    """A server with ``services`` and a client, on loopback TCP; the client knows them."""
    async with nerve.Broker(f"pl-server-{next(_ns)}", transport="tcp://127.0.0.1:0", services=services,
                            heartbeat_interval=0.2) as server:
        async with nerve.Broker(f"pl-client-{next(_ns)}", transport="tcp://127.0.0.1:0",
                                peers=[server.address], heartbeat_interval=0.2, **client_kw) as client:
            await client.wait_for_services(*(s.full_name for s in services), timeout=5)
            yield server, client


# --- hooks --------------------------------------------------------------------------------


def make_hooked(log: list[str]) -> nerve.Service:
    def tag(name: str) -> Any:
        def before(ctx: nerve.Context) -> None:
            log.append(f"before:{name}")

        async def after(ctx: nerve.Context, result: Any) -> Any:
            log.append(f"after:{name}")
            return [*result, name] if isinstance(result, list) else result

        def error(ctx: nerve.Context, err: Exception) -> Any:
            log.append(f"error:{name}")
            raise err

        return before, after, error

    sb_star, sa_star, se_star = tag("svc*")
    sb_one, sa_one, se_one = tag("svc:act")
    sb_two, sa_two, se_two = tag("svc:act#2")
    ab, aa, ae = tag("action")

    class Hooked(nerve.Service):
        name = "hooked"
        hooks = {
            "before": {"*": sb_star, "act": [sb_one, sb_two], "fails": [sb_one]},
            "after": {"*": [sa_star], "act": [sa_one, sa_two]},
            "error": {"*": se_star, "fails": [se_one, se_two]},
        }

        @nerve.action(hooks={"before": ab, "after": [aa], "error": ae})
        async def act(self, ctx: nerve.Context) -> list[str]:
            log.append("handler")
            return []

        @nerve.action(hooks={"error": [ae]})
        async def fails(self, ctx: nerve.Context) -> None:
            log.append("handler")
            raise ClientError("nope", 400, "NOPE")

        @nerve.action
        async def other(self, ctx: nerve.Context) -> list[str]:
            log.append("handler")
            return []

    return Hooked()


async def test_hooks_run_in_moleculer_order() -> None:
    log: list[str] = []
    async with local(make_hooked(log)) as b:
        result = await b.call("hooked.act")
        assert log == ["before:svc*", "before:svc:act", "before:svc:act#2", "before:action", "handler",
                       "after:action", "after:svc:act", "after:svc:act#2", "after:svc*"]
        # after hooks run in that order and each gets the previous one's result
        assert result == ["action", "svc:act", "svc:act#2", "svc*"]
        log.clear()
        assert await b.call("hooked.other") == ["svc*"]
        assert log == ["before:svc*", "handler", "after:svc*"]
        log.clear()
        with pytest.raises(ClientError):
            await b.call("hooked.fails")
        assert log == ["before:svc*", "before:svc:act", "handler",
                       "error:action", "error:svc:act", "error:svc:act#2", "error:svc*"]


async def test_hooks_by_method_name_and_their_results() -> None:
    class Users(nerve.Service):
        name = "users"
        hooks = {
            "before": {"*": "stamp", "create": ["trim"]},
            "after": {"*": "redact"},
            "error": {"create": "translate"},
        }

        def __init__(self) -> None:
            self.log: list[str] = []

        def stamp(self, ctx: nerve.Context) -> None:
            self.log.append("stamp")
            ctx.params = {**ctx.params, "stamped": True}

        async def trim(self, ctx: nerve.Context) -> None:
            self.log.append("trim")
            ctx.params = {**ctx.params, "name": ctx.params["name"].strip()}

        async def redact(self, ctx: nerve.Context, result: Any) -> Any:
            return {k: ("***" if k == "password" else v) for k, v in result.items()}

        def translate(self, ctx: nerve.Context, err: Exception) -> Any:
            return {"error": type(err).__name__}

        @nerve.action
        async def create(self, ctx: nerve.Context) -> dict[str, Any]:
            if ctx.params["name"] == "bad":
                raise ValueError("bad name")
            return {**ctx.params, "password": "hunter2"}

    svc = Users()
    async with local(svc) as b:
        assert await b.call("users.create", {"name": "  ann "}) == {
            "name": "ann", "stamped": True, "password": "***"}
        assert svc.log == ["stamp", "trim"]
        # The error hook recovers: its value is the answer (and after hooks do not run on it).
        assert await b.call("users.create", {"name": "bad"}) == {"error": "ValueError"}


async def test_error_hooks_pass_a_rethrown_error_on_and_the_first_value_wins() -> None:
    seen: list[tuple[str, str]] = []

    def translate(ctx: nerve.Context, err: Exception) -> Any:
        seen.append(("translate", str(err)))
        raise ClientError(f"translated: {err}", 409, "CONFLICT")

    async def recover(ctx: nerve.Context, err: Exception) -> Any:
        seen.append(("recover", str(err)))
        return {"recovered": getattr(err, "code", None)}

    def never(ctx: nerve.Context, err: Exception) -> Any:
        seen.append(("never", str(err)))
        return "never"

    class S(nerve.Service):
        name = "s"
        hooks = {"error": {"*": [never], "rethrow": []}}

        @nerve.action(hooks={"error": [translate, recover]})
        async def chain(self, ctx: nerve.Context) -> None:
            raise ValueError("boom")

        @nerve.action(hooks={"error": [translate]})
        async def rethrow(self, ctx: nerve.Context) -> None:
            raise ValueError("boom")

    async with local(S()) as b:
        assert await b.call("s.chain") == {"recovered": 409}
        assert seen == [("translate", "boom"), ("recover", "translated: boom")]
        seen.clear()
    async with tcp_pair(S()) as (server, client):
        # translate rethrew a new error; "never" (service "*", last in the error order) got it
        # and answered a value, which the remote caller gets.
        assert await client.call("s.rethrow") == "never"
        assert seen == [("translate", "boom"), ("never", "translated: boom")]


async def test_a_rethrown_error_reaches_the_caller_across_the_wire() -> None:
    def translate(ctx: nerve.Context, err: Exception) -> Any:
        raise ClientError(f"translated: {err}", 409, "CONFLICT", {"was": type(err).__name__})

    class S(nerve.Service):
        name = "s2"

        @nerve.action(hooks={"error": translate})
        async def boom(self, ctx: nerve.Context) -> None:
            raise ValueError("boom")

    async with tcp_pair(S()) as (server, client):
        with pytest.raises(ClientError) as info:
            await client.call("s2.boom")
    assert (info.value.code, info.value.type, info.value.data) == (409, "CONFLICT", {"was": "ValueError"})


async def test_errors_in_before_and_after_hooks_reach_the_error_hooks() -> None:
    got: list[str] = []

    def fail_before(ctx: nerve.Context) -> None:
        if ctx.params.get("fail") == "before":
            raise ClientError("before failed", 400)

    def fail_after(ctx: nerve.Context, result: Any) -> Any:
        if ctx.params.get("fail") == "after":
            raise ClientError("after failed", 400)
        return result

    def catch(ctx: nerve.Context, err: Exception) -> Any:
        got.append(str(err))
        return "caught"

    class S(nerve.Service):
        name = "s3"
        hooks = {"before": {"*": fail_before}, "after": {"*": fail_after}, "error": {"*": catch}}

        def __init__(self) -> None:
            self.ran = 0

        @nerve.action
        async def act(self, ctx: nerve.Context) -> str:
            self.ran += 1
            return "ok"

    svc = S()
    async with local(svc) as b:
        assert await b.call("s3.act", {}) == "ok"
        assert await b.call("s3.act", {"fail": "before"}) == "caught"
        assert svc.ran == 1  # a failing before hook stops the call before the handler
        assert await b.call("s3.act", {"fail": "after"}) == "caught"
        assert svc.ran == 2
    assert got == ["before failed", "after failed"]


def test_bad_hook_specs_are_refused() -> None:
    with pytest.raises(ServiceSchemaError, match="hook kind"):
        @nerve.action(hooks={"around": lambda ctx: None})
        async def a(self: Any, ctx: nerve.Context) -> None: ...

    with pytest.raises(ServiceSchemaError, match="neither callable nor a method name"):
        @nerve.action(hooks={"before": [42]})
        async def b(self: Any, ctx: nerve.Context) -> None: ...

    with pytest.raises(ServiceSchemaError):
        @nerve.action(hooks=["before"])  # type: ignore[arg-type]
        async def c(self: Any, ctx: nerve.Context) -> None: ...

    def service(hooks: Any) -> nerve.Service:
        class S(nerve.Service):
            name = "bad-hooks"

            @nerve.action
            async def act(self, ctx: nerve.Context) -> None: ...

            def real(self, ctx: nerve.Context) -> None: ...

        S.hooks = hooks
        return S()

    for hooks, match in [
        ({"before": "real"}, "map action names"),  # a service's hooks map names to hooks
        ({"before": {"*": 3.5}}, "neither callable"),
        ({"whenever": {"*": "real"}}, "hook kind"),
        ({"before": {"act": "missing_method"}}, "missing_method"),
        ({"after": {"*": ["real", "nope"]}}, "nope"),
        ("before", "dict"),
    ]:
        with pytest.raises(ServiceSchemaError, match=match):
            nerve.Broker(f"pl-badhooks-{next(_ns)}", namespace=namespace(), services=[service(hooks)])

    class Own(nerve.Service):
        name = "own"

        @nerve.action(hooks={"before": "not_here"})
        async def act(self, ctx: nerve.Context) -> None: ...

    with pytest.raises(ServiceSchemaError, match="not_here"):
        nerve.Broker("pl-badhooks-own", namespace=namespace(), services=[Own()])


async def test_a_service_hook_for_an_unknown_action_is_harmless() -> None:
    class S(nerve.Service):
        name = "s4"
        hooks = {"before": {"no_such_action": "x"}}

        def x(self, ctx: nerve.Context) -> None: ...

        @nerve.action
        async def act(self, ctx: nerve.Context) -> str:
            return "ok"

    async with local(S()) as b:
        assert await b.call("s4.act") == "ok"


# --- interceptors, guards, pipes ----------------------------------------------------------


class Point(msgspec.Struct):
    x: int
    y: int


class Log:
    """Objects and callables of every kind, each logging its name when it runs."""

    def __init__(self) -> None:
        self.entries: list[str] = []

    def guard(self, name: str, allow: bool = True, *, asynchronous: bool = False,
              as_object: bool = False) -> Any:
        entries = self.entries

        if asynchronous:
            async def check(ctx: nerve.Context) -> bool:
                await trio.lowlevel.checkpoint()
                entries.append(f"guard:{name}")
                return allow
        else:
            def check(ctx: nerve.Context) -> bool:  # type: ignore[misc]
                entries.append(f"guard:{name}")
                return allow
        if as_object:
            return type(f"Guard_{name}", (), {"can_activate": staticmethod(check)})()
        check.__qualname__ = f"guard_{name}"
        return check

    def interceptor(self, name: str, *, as_object: bool = False) -> Any:
        entries = self.entries

        async def intercept(ctx: nerve.Context, next: Any) -> Any:
            entries.append(f">interceptor:{name}")
            result = await next()
            entries.append(f"<interceptor:{name}")
            return {"via": name, "inner": result}

        if as_object:
            return type(f"Interceptor_{name}", (), {"intercept": staticmethod(intercept)})()
        return intercept

    def pipe(self, name: str, change: Any, *, asynchronous: bool = False, as_object: bool = False) -> Any:
        entries = self.entries

        if asynchronous:
            async def transform(params: Any, ctx: nerve.Context) -> Any:
                await trio.lowlevel.checkpoint()
                entries.append(f"pipe:{name}")
                return change(params)
        else:
            def transform(params: Any, ctx: nerve.Context) -> Any:  # type: ignore[misc]
                entries.append(f"pipe:{name}")
                return change(params)
        if as_object:
            return type(f"Pipe_{name}", (), {"transform": staticmethod(transform)})()
        return transform


def make_layered(log: Log, *, allow: bool = True) -> nerve.Service:
    def strings_to_ints(params: Any) -> Any:
        return {k: int(v) for k, v in params.items()}

    def shift(params: Any) -> Any:
        return {**params, "x": params["x"] + 100}

    def before(ctx: nerve.Context) -> None:
        log.entries.append("hook:before")

    def after(ctx: nerve.Context, result: Any) -> Any:
        log.entries.append("hook:after")
        return result

    class Layered(nerve.Service):
        name = "layered"
        interceptors = [log.interceptor("svc", as_object=True)]
        guards = [log.guard("svc", asynchronous=True, as_object=True)]
        pipes = [log.pipe("svc", strings_to_ints, as_object=True)]
        hooks = {"before": {"*": before}, "after": {"*": after}}

        @nerve.action(interceptors=[log.interceptor("act")],
                      guards=[log.guard("act", allow)],
                      pipes=[log.pipe("act", shift, asynchronous=True)])
        async def move(self, ctx: nerve.Context, params: Point) -> dict[str, int]:
            log.entries.append("handler")
            return {"x": params.x, "y": params.y}

    return Layered()


async def test_interceptors_guards_pipes_validation_hooks_handler_in_order() -> None:
    log = Log()
    async with local(make_layered(log)) as b:
        res = await b.call("layered.move", {"x": "1", "y": "2"})
    # Pipes turned the strings into ints (the service's first), then shifted x, before the
    # typed handler validated them.
    assert res == {"via": "svc", "inner": {"via": "act", "inner": {"x": 101, "y": 2}}}
    assert log.entries == [">interceptor:svc", ">interceptor:act", "guard:svc", "guard:act",
                           "pipe:svc", "pipe:act", "hook:before", "handler", "hook:after",
                           "<interceptor:act", "<interceptor:svc"]


async def test_params_are_validated_after_the_pipes_and_before_the_hooks() -> None:
    log = Log()
    async with local(make_layered(log)) as b:
        with pytest.raises(ValidationError) as info:
            await b.call("layered.move", {"x": "1"})
        assert info.value.code == 422
        assert "y" in str(info.value)
        # The pipes ran; the hooks and the handler did not.
        assert log.entries == [">interceptor:svc", ">interceptor:act", "guard:svc", "guard:act",
                               "pipe:svc", "pipe:act"]


async def test_a_before_hook_may_change_typed_params_after_validation() -> None:
    def fill(ctx: nerve.Context) -> None:
        ctx.params = {**ctx.params, "y": ctx.params["x"] * 10}

    class S(nerve.Service):
        name = "fill"

        @nerve.action(hooks={"before": fill})
        async def act(self, ctx: nerve.Context, params: Point) -> int:
            return params.x + params.y

    async with local(S()) as b:
        assert await b.call("fill.act", {"x": 2, "y": 0}) == 22
        with pytest.raises(ValidationError):
            await b.call("fill.act", {"x": 2})  # validated before the hook could fill y


async def test_a_refusing_guard_raises_forbidden_locally() -> None:
    log = Log()
    async with local(make_layered(log, allow=False)) as b:
        with pytest.raises(ForbiddenError) as info:
            await b.call("layered.move", {"x": 1, "y": 2})
    err = info.value
    assert (err.code, err.retryable, err.type) == (403, False, ForbiddenError.default_type)
    assert err.data["action"] == "layered.move"
    assert "guard_act" in err.data["guard"]
    # Interceptors saw it go by; nothing after the refusing guard ran.
    assert log.entries == [">interceptor:svc", ">interceptor:act", "guard:svc", "guard:act"]


async def test_a_refusal_crosses_the_wire_as_forbidden_403_not_retried() -> None:
    log = Log()
    async with tcp_pair(make_layered(log, allow=False), retries=3, retry_delay=0.01) as (server, client):
        with pytest.raises(ForbiddenError) as info:
            await client.call("layered.move", {"x": 1, "y": 2})
        err = info.value
        assert (err.code, err.retryable) == (403, False)
        assert err.node_id == server.node_id
        assert err.data["action"] == "layered.move"
        # Not retried: the guard was asked once.
        assert log.entries.count("guard:act") == 1


async def test_a_service_guard_refuses_before_the_action_guard_is_asked() -> None:
    log = Log()

    class S(nerve.Service):
        name = "gs"
        guards = [log.guard("svc", False)]

        @nerve.action(guards=[log.guard("act", True, as_object=True)])
        async def act(self, ctx: nerve.Context) -> str:
            return "ran"

    async with local(S()) as b:
        with pytest.raises(ForbiddenError):
            await b.call("gs.act")
    assert log.entries == ["guard:svc"]


async def test_guards_see_the_callers_meta_and_errors_they_raise_keep_their_class() -> None:
    class Token:
        async def can_activate(self, ctx: nerve.Context) -> bool:
            if ctx.meta.get("token") == "explode":
                raise ClientError("bad token", 401, "UNAUTHORIZED")
            return ctx.meta.get("token") == "secret"

    class S(nerve.Service):
        name = "tok"

        @nerve.action(guards=[Token()])
        async def act(self, ctx: nerve.Context) -> str:
            return "in"

    async with tcp_pair(S()) as (server, client):
        assert await client.call("tok.act", meta={"token": "secret"}) == "in"
        with pytest.raises(ForbiddenError):
            await client.call("tok.act", meta={"token": "wrong"})
        with pytest.raises(ClientError) as info:
            await client.call("tok.act", meta={"token": "explode"})
        assert not isinstance(info.value, ForbiddenError)
        assert (info.value.code, info.value.type) == (401, "UNAUTHORIZED")


async def test_an_interceptor_can_answer_without_calling_next_and_catch_errors() -> None:
    ran: list[str] = []

    async def cache(ctx: nerve.Context, next: Any) -> Any:
        if ctx.params.get("cached"):
            return "from cache"
        return await next()

    async def shield(ctx: nerve.Context, next: Any) -> Any:
        try:
            return await next()
        except ForbiddenError:
            return "refused, softly"

    class S(nerve.Service):
        name = "ic"

        @nerve.action(interceptors=[shield, cache], guards=[lambda ctx: ctx.params.get("ok", True)])
        async def act(self, ctx: nerve.Context) -> str:
            ran.append("handler")
            return "handler"

    async with local(S()) as b:
        assert await b.call("ic.act", {"cached": True}) == "from cache"
        assert ran == []
        assert await b.call("ic.act", {}) == "handler"
        assert await b.call("ic.act", {"ok": False}) == "refused, softly"  # guards are inside interceptors


async def test_interceptors_run_for_remote_callers_too() -> None:
    log = Log()
    async with tcp_pair(make_layered(log)) as (server, client):
        res = await client.call("layered.move", {"x": "5", "y": "6"})
    assert res == {"via": "svc", "inner": {"via": "act", "inner": {"x": 105, "y": 6}}}
    assert log.entries[0] == ">interceptor:svc" and log.entries[-1] == "<interceptor:svc"


def test_bad_guards_interceptors_pipes_are_refused() -> None:
    with pytest.raises(ServiceSchemaError, match="guards"):
        nerve.action(guards=[42])
    with pytest.raises(ServiceSchemaError, match="interceptors"):
        nerve.action(interceptors=["not callable"])
    with pytest.raises(ServiceSchemaError, match="pipes"):
        nerve.action(pipes=object())  # type: ignore[arg-type]
    with pytest.raises(ServiceSchemaError, match="list"):
        nerve.action(guards="can_activate")  # type: ignore[arg-type]

    class S(nerve.Service):
        name = "bad-guards"
        guards = [object()]

        @nerve.action
        async def act(self, ctx: nerve.Context) -> None: ...

    with pytest.raises(ServiceSchemaError, match="guards"):
        nerve.Broker("pl-badguards", namespace=namespace(), services=[S()])


# --- fallback -----------------------------------------------------------------------------


class Flaky(nerve.Service):
    name = "flaky"

    def __init__(self) -> None:
        self.fallback_calls: list[tuple[str, str]] = []

    @nerve.action
    async def boom(self, ctx: nerve.Context) -> None:
        raise ClientError("boom", 400, "BOOM")

    @nerve.action
    async def ok(self, ctx: nerve.Context) -> str:
        return "ok"

    @nerve.action
    async def slow(self, ctx: nerve.Context) -> str:
        await trio.sleep(5)
        return "slow"

    @nerve.action(fallback="soft_landing", cache=False)
    async def guarded(self, ctx: nerve.Context) -> str:
        raise ClientError("boom inside", 400, "BOOM")

    @nerve.action(fallback="soft_landing", guards=[lambda ctx: False])
    async def refused(self, ctx: nerve.Context) -> str:
        return "never"

    async def soft_landing(self, ctx: nerve.Context, err: Exception) -> dict[str, Any]:
        self.fallback_calls.append((self.broker.node_id, type(err).__name__))
        return {"fallback": True, "error": str(err), "node": self.broker.node_id, "action": ctx.action}


async def test_call_fallback_value() -> None:
    async with local(Flaky()) as b:
        assert await b.call("flaky.boom", fallback="plan b") == "plan b"
        assert await b.call("flaky.ok", fallback="plan b") == "ok"
        assert await b.call("nowhere.at.all", fallback={"empty": []}) == {"empty": []}
        assert await b.call("flaky.slow", timeout=0.05, fallback=0) == 0


async def test_call_fallback_callables_get_the_parent_ctx_and_the_error() -> None:
    got: list[tuple[Any, Exception]] = []

    def sync_fallback(ctx: Any, err: Exception) -> str:
        got.append((ctx, err))
        return "sync"

    async def async_fallback(ctx: Any, err: Exception) -> str:
        await trio.lowlevel.checkpoint()
        got.append((ctx, err))
        return "async"

    class Caller(nerve.Service):
        name = "caller"

        @nerve.action
        async def nested(self, ctx: nerve.Context) -> Any:
            return await ctx.call("flaky.boom", fallback=async_fallback)

    async with tcp_pair(Flaky()) as (server, client):
        client.add_service(Caller())
        assert await client.call("flaky.boom", fallback=sync_fallback) == "sync"
        (ctx, err), = got
        assert ctx is None and isinstance(err, ClientError) and err.type == "BOOM"
        got.clear()
        await client.wait_for_services("caller")
        assert await client.call("caller.nested") == "async"
        (ctx, err), = got
        assert isinstance(ctx, nerve.Context) and ctx.action == "caller.nested"
        assert isinstance(err, ClientError)
        got.clear()
        assert await client.call("flaky.slow", timeout=0.05, fallback=sync_fallback) == "sync"
        assert isinstance(got[0][1], RequestTimeoutError)


async def test_call_fallback_runs_after_retries() -> None:
    attempts: list[int] = []

    class Retry(nerve.Service):
        name = "retry"

        @nerve.action
        async def busy(self, ctx: nerve.Context) -> None:
            attempts.append(1)
            raise RequestTimeoutError("busy")

    async with local(Retry(), retry_delay=0.001) as b:
        assert await b.call("retry.busy", retries=2, fallback="gave up") == "gave up"
    assert len(attempts) == 3


async def test_a_failing_fallback_callable_raises_its_own_error() -> None:
    def bad(ctx: Any, err: Exception) -> Any:
        raise ClientError("fallback failed too", 418)

    async with local(Flaky()) as b:
        with pytest.raises(ClientError) as info:
            await b.call("flaky.boom", fallback=bad)
    assert info.value.code == 418


async def test_action_fallback_method_answers_on_the_serving_node() -> None:
    flaky = Flaky()
    async with tcp_pair(flaky) as (server, client):
        res = await client.call("flaky.guarded")
        assert res == {"fallback": True, "error": "boom inside", "node": server.node_id,
                       "action": "flaky.guarded"}
        # The fallback is outside the guards: it answers a refusal too.
        res = await client.call("flaky.refused")
        assert res["fallback"] is True and "Forbidden" in res["error"]
    assert flaky.fallback_calls == [(server.node_id, "ClientError"), (server.node_id, "ForbiddenError")]


async def test_action_fallback_callable_and_locally() -> None:
    def plain(ctx: nerve.Context, err: Exception) -> str:
        return f"plain: {err}"

    class S(nerve.Service):
        name = "fbc"

        @nerve.action(fallback=plain)
        async def act(self, ctx: nerve.Context) -> None:
            raise ValueError("oops")

    async with local(S()) as b:
        assert await b.call("fbc.act") == "plain: oops"


def test_bad_action_fallbacks_are_refused() -> None:
    with pytest.raises(ServiceSchemaError, match="fallback"):
        nerve.action(fallback=42)

    class S(nerve.Service):
        name = "fb-missing"

        @nerve.action(fallback="no_such_method")
        async def act(self, ctx: nerve.Context) -> None: ...

    with pytest.raises(ServiceSchemaError, match="no_such_method"):
        nerve.Broker("pl-fb-missing", namespace=namespace(), services=[S()])


async def test_an_unknown_action_without_fallback_still_fails() -> None:
    async with local() as b:
        with pytest.raises(ServiceNotFoundError):
            await b.call("nowhere.at.all")


async def test_an_interceptor_that_runs_the_rest_twice_pipes_from_the_same_params() -> None:
    seen: list[int] = []

    async def twice(ctx: nerve.Context, next: Any) -> Any:
        await next()
        return await next()

    def double(params: Any, ctx: nerve.Context) -> Any:
        return {"n": params["n"] * 2}

    class Retrying(nerve.Service):
        name = "retrying"

        @nerve.action(interceptors=[twice], pipes=[double])
        async def run(self, ctx: nerve.Context) -> int:
            seen.append(ctx.params["n"])
            return int(ctx.params["n"])

    async with nerve.Broker("pipe-twice", services=[Retrying()]) as b:
        assert await b.call("retrying.run", {"n": 1}) == 2
    assert seen == [2, 2]
