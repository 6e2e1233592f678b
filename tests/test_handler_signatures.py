"""Handler signatures are checked when a Service class is defined and when a service is added:
an action or event handler the broker could not call is refused with a ServiceSchemaError that
names it and says what is expected; every form that works is accepted and called right."""

from __future__ import annotations

import functools
from typing import Any

import msgspec
import pytest

import nerve
from nerve.errors import ServiceSchemaError
from nerve.service import _ACTION_ATTR, _ActionMark, specs_of

pytestmark = pytest.mark.anyio

ACTION_FORMS = r"async def name\(self, ctx\)' or 'async def name\(self, ctx, params: Struct\)"
EVENT_FORMS = r"async def name\(self, ctx\)' or 'async def name\(self, ctx, data: Struct\)"


class Point(msgspec.Struct):
    x: int
    y: int


# --- refused when the class is defined -----------------------------------------------------


def test_an_action_without_ctx_is_refused_when_the_class_is_defined() -> None:
    with pytest.raises(ServiceSchemaError, match=r"action .*NoCtx\.add takes no 'ctx'") as info:
        class NoCtx(nerve.Service):
            name = "no-ctx"

            @nerve.action
            async def add(self) -> int:
                return 1
    assert "async def name(self, ctx)" in str(info.value)
    assert "async def name(self, ctx, params: Struct)" in str(info.value)


def test_an_action_without_self_is_refused() -> None:
    with pytest.raises(ServiceSchemaError, match=r"NoSelf\.add takes no 'self'"):
        class NoSelf(nerve.Service):
            name = "no-self"

            @nerve.action
            async def add() -> int:  # type: ignore[misc]
                return 1


def test_a_sync_action_is_refused_with_the_expected_form() -> None:
    with pytest.raises(ServiceSchemaError, match=rf"must be an 'async def': .*{ACTION_FORMS}"):
        class Sync(nerve.Service):
            name = "sync"

            @nerve.action  # type: ignore[type-var]
            def add(self, ctx: nerve.Context) -> int:
                return 1


def test_a_sync_event_handler_is_refused_with_the_expected_form() -> None:
    with pytest.raises(ServiceSchemaError, match=rf"must be an 'async def': .*{EVENT_FORMS}"):
        class Sync(nerve.Service):
            name = "sync"

            @nerve.event("thing.happened")  # type: ignore[type-var]
            def on_thing(self, ctx: nerve.Context) -> None:
                pass


@pytest.mark.parametrize(("source", "match"), [
    ("async def add(self, ctx, params, extra): ...", r"1 argument\(s\) too many \(extra\)"),
    ("async def add(self, ctx, params, extra=1): ...", r"1 argument\(s\) too many \(extra\)"),
    ("async def add(self, ctx, *, flag): ...", r"keyword-only argument 'flag' has no default"),
    ("async def add(self): ...", r"takes no 'ctx'"),
    ("async def add(self, *, ctx): ...", r"takes no 'ctx'"),
])
def test_bad_action_signatures(source: str, match: str) -> None:
    ns: dict[str, Any] = {}
    exec(source, ns)
    with pytest.raises(ServiceSchemaError, match=rf"action .*Bad\.add.*{match}.*{ACTION_FORMS}"):
        type("Bad", (nerve.Service,), {"name": "bad", "add": nerve.action(ns["add"])})


def test_an_event_handler_without_ctx_is_refused() -> None:
    with pytest.raises(ServiceSchemaError, match=rf"event handler .*NoCtx\.on_thing takes no 'ctx'.*{EVENT_FORMS}"):
        class NoCtx(nerve.Service):
            name = "no-ctx"

            @nerve.event("thing.happened")
            async def on_thing(self) -> None:
                pass


def test_a_staticmethod_action_is_called_with_ctx_first() -> None:
    # @staticmethod over @action: the function is called as (ctx); without ctx it is refused.
    with pytest.raises(ServiceSchemaError, match="takes no 'ctx'"):
        class Static(nerve.Service):
            name = "static"

            @staticmethod
            @nerve.action
            async def add() -> int:
                return 1


# --- refused when the service is added -------------------------------------------------------


def test_a_mark_set_after_the_class_is_checked_when_the_service_is_added() -> None:
    class Late(nerve.Service):
        name = "late"

    async def add(self: Any) -> int:
        return 1

    setattr(add, _ACTION_ATTR, _ActionMark(None))
    Late.add = add  # type: ignore[attr-defined]  # __init_subclass__ has run already
    with pytest.raises(ServiceSchemaError, match=rf"action .*Late\.add takes no 'ctx'.*{ACTION_FORMS}"):
        specs_of(Late())
    with pytest.raises(ServiceSchemaError, match="takes no 'ctx'"):
        nerve.Broker("sig-late", services=[Late()])


# --- every working form is accepted and called right ------------------------------------


def _logged(fn: Any) -> Any:
    @functools.wraps(fn)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        return await fn(*args, **kwargs)
    return wrapper


class Forms(nerve.Service):
    name = "forms"

    @nerve.action
    async def plain(self, ctx: nerve.Context) -> Any:
        return ["plain", ctx.params]

    @nerve.action
    async def typed(self, ctx: nerve.Context, params: Point) -> Any:
        return ["typed", params.x + params.y]

    @nerve.action
    async def untyped(self, ctx, params):  # type: ignore[no-untyped-def]
        return ["untyped", params]

    @nerve.action
    async def defaulted(self, ctx: nerve.Context, params: Any = None) -> Any:
        return ["defaulted", params]

    @nerve.action
    async def keywords(self, ctx: nerve.Context, *, flag: bool = True, **extra: Any) -> Any:
        return ["keywords", flag, extra]

    @nerve.action
    async def star(self, *args: Any) -> Any:
        return ["star", len(args)]

    @nerve.action
    async def ctx_star(self, ctx: nerve.Context, *args: Any) -> Any:
        return ["ctx_star", list(args)]

    @nerve.action
    @_logged
    async def wrapped(self, ctx: nerve.Context, params: Point) -> Any:
        return ["wrapped", params.x]

    @staticmethod
    @nerve.action
    async def static(ctx: nerve.Context) -> Any:
        return ["static", ctx.params]

    @classmethod
    @nerve.action
    async def klass(cls, ctx: nerve.Context, params: Point) -> Any:
        return ["klass", cls.__name__, params.y]

    @nerve.event("forms.happened")
    async def on_plain(self, ctx: nerve.Context) -> None:
        pass

    @nerve.event("forms.typed")
    async def on_typed(self, ctx: nerve.Context, data: Point) -> None:
        pass


def test_working_forms_are_described_right() -> None:
    actions, events = specs_of(Forms())
    shape = {a.raw_name: (a.params_type, a.wants_params) for a in actions}
    assert shape == {
        "plain": (None, False), "typed": (Point, True), "untyped": (None, True),
        "defaulted": (Any, True), "keywords": (None, False), "star": (None, False),
        "ctx_star": (None, True), "wrapped": (Point, True), "static": (None, False),
        "klass": (Point, True),
    }
    assert {e.name: (e.data_type, e.wants_data) for e in events} == {
        "forms.happened": (None, False), "forms.typed": (Point, True)}


async def test_working_forms_are_called_right() -> None:
    async with nerve.Broker("sig-forms", services=[Forms()]) as b:
        p = {"x": 1, "y": 2}
        assert await b.call("forms.plain", p) == ["plain", p]
        assert await b.call("forms.typed", p) == ["typed", 3]
        assert await b.call("forms.untyped", p) == ["untyped", p]
        assert await b.call("forms.defaulted", p) == ["defaulted", p]
        assert await b.call("forms.keywords", p) == ["keywords", True, {}]
        assert await b.call("forms.star", p) == ["star", 1]
        assert await b.call("forms.ctx_star", p) == ["ctx_star", [p]]
        assert await b.call("forms.wrapped", p) == ["wrapped", 1]
        assert await b.call("forms.static", p) == ["static", p]
        assert await b.call("forms.klass", p) == ["klass", "Forms", 2]


def test_a_subclass_inherits_checked_handlers() -> None:
    class More(Forms):
        name = "more"

        @nerve.action
        async def extra(self, ctx: nerve.Context) -> int:
            return 1

    names = {a.raw_name for a in specs_of(More())[0]}
    assert {"plain", "typed", "extra"} <= names


async def test_a_decorator_without_wraps_still_gets_the_params() -> None:
    """``async def wrapper(self, *args, **kwargs)`` (no functools.wraps) is called with
    ``(ctx, params)`` as before, so the wrapped ``(self, ctx, params)`` handler gets both."""
    import trio

    import nerve

    def logged(fn: Any) -> Any:
        async def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
            return await fn(self, *args, **kwargs)
        return wrapper

    class Math(nerve.Service):
        name = "wrapped-math"

        @nerve.action
        @logged
        async def add(self, ctx: nerve.Context, params: dict[str, int]) -> int:
            return params["a"] + params["b"]

    async with nerve.Broker("sig-wrapped", services=[Math()]) as b:
        with trio.fail_after(5):
            assert await b.call("wrapped-math.add", {"a": 1, "b": 2}) == 3
