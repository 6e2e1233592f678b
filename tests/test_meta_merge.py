"""DESIGN section 3, meta: a nested call starts with a copy of the caller's meta merged with the
call's ``meta=``; when it settles (result or error) the callee's final meta is merged back into
the caller's with ``dict.update`` (keys added or overwritten, never deleted). At top level,
``broker.call(meta=m)`` merges back into ``m``.

The model test runs random call trees spread over three brokers and compares every handler's
entry meta and the root caller's final meta with a pure-Python model of those rules.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import nerve
from nerve.errors import ClientError, NerveError

pytestmark = pytest.mark.anyio


# --- example tests ----------------------------------------------------------------------


class Inner(nerve.Service):
    name = "inner"

    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []

    @nerve.action
    async def touch(self, ctx: nerve.Context) -> str:
        self.seen.append(dict(ctx.meta))
        ctx.meta.pop("shared", None)  # deleting in the callee never deletes in the caller
        ctx.meta["inner"] = "set by inner"
        ctx.meta["overwrite"] = "inner"
        return "ok"

    @nerve.action
    async def fail(self, ctx: nerve.Context) -> None:
        self.seen.append(dict(ctx.meta))
        ctx.meta["failed_key"] = "set before raising"
        ctx.meta["overwrite"] = "inner-failed"
        raise ClientError("inner failed", 409, "INNER", {"k": 1})


class Outer(nerve.Service):
    name = "outer"

    def __init__(self) -> None:
        self.snapshots: dict[str, dict[str, Any]] = {}

    @nerve.action
    async def run(self, ctx: nerve.Context) -> dict[str, Any]:
        target = ctx.params["target"]
        ctx.meta["outer"] = 1
        ctx.meta["shared"] = "outer"
        ctx.meta["overwrite"] = "outer"
        before = dict(ctx.meta)
        try:
            await ctx.call(target, meta={"opt": "call option", "shared": "from option"})
        except NerveError as exc:
            self.snapshots["error"] = {"name": exc.name, "message": exc.message}
        self.snapshots["before"] = before
        self.snapshots["after"] = dict(ctx.meta)
        return dict(ctx.meta)


class _PassRemote(nerve.Middleware):
    """A remote_action middleware: remote calls take the Context lane, not the flat one."""

    def remote_action(self, next: Any, action: Any) -> Any:
        async def handler(ctx: nerve.Context) -> Any:
            return await next(ctx)
        return handler


@pytest.mark.parametrize("remote", [False, True, "context-lane"], ids=["local", "remote", "remote-context-lane"])
async def test_nested_call_meta_is_a_merged_copy_and_merges_back_on_result(remote: bool | str) -> None:
    inner, outer = Inner(), Outer()
    mws = [_PassRemote()] if remote == "context-lane" else []
    async with nerve.Broker("meta-a", services=[outer] + ([] if remote else [inner]), middlewares=mws) as a, \
            nerve.Broker("meta-b", services=[inner] if remote else []):
        await a.wait_for_services("inner", "outer")
        top = {"top": True, "overwrite": "top"}
        res = await a.call("outer.run", {"target": "inner.touch"}, meta=top)
        # The callee started from a copy of the caller's meta merged with meta=.
        assert inner.seen == [{"top": True, "outer": 1, "shared": "from option",
                               "overwrite": "outer", "opt": "call option"}]
        # The option itself did not touch the caller's meta before the call...
        assert outer.snapshots["before"] == {"top": True, "outer": 1, "shared": "outer",
                                             "overwrite": "outer"}
        # ...the callee's final meta was merged back: added/overwritten, never deleted.
        # ("shared" was deleted by the callee, so the caller keeps its own value.)
        expected_after = {"top": True, "outer": 1, "shared": "outer", "overwrite": "inner",
                          "opt": "call option", "inner": "set by inner"}
        assert outer.snapshots["after"] == expected_after
        assert res == expected_after
        # Top level: merged back into the very dict given as meta=.
        assert top == expected_after


@pytest.mark.parametrize("remote", [False, True], ids=["local", "remote"])
async def test_meta_merges_back_on_error(remote: bool) -> None:
    inner, outer = Inner(), Outer()
    async with nerve.Broker("meta-ea", services=[outer] + ([] if remote else [inner])) as a, \
            nerve.Broker("meta-eb", services=[inner] if remote else []):
        await a.wait_for_services("inner", "outer")
        top: dict[str, Any] = {}
        await a.call("outer.run", {"target": "inner.fail"}, meta=top)
        assert outer.snapshots["error"] == {"name": "MoleculerClientError", "message": "inner failed"}
        assert outer.snapshots["after"]["failed_key"] == "set before raising"
        assert outer.snapshots["after"]["overwrite"] == "inner-failed"
        assert top["failed_key"] == "set before raising"

        # And at top level, a failing call merges into the caller's dict too.
        top2 = {"mine": 1, "overwrite": "caller"}
        with pytest.raises(ClientError):
            await a.call("inner.fail", meta=top2)
        assert top2 == {"mine": 1, "overwrite": "inner-failed", "failed_key": "set before raising"}


@pytest.mark.parametrize("remote", [False, True], ids=["local", "remote"])
async def test_top_level_meta_none_and_isolation(remote: bool) -> None:
    inner = Inner()
    async with nerve.Broker("meta-ia", services=[] if remote else [inner]) as a, \
            nerve.Broker("meta-ib", services=[inner] if remote else []):
        await a.wait_for_services("inner")
        assert await a.call("inner.touch") == "ok"  # meta=None: nothing to merge into
        assert inner.seen[-1] == {}
        m = {"shared": "keep me"}
        await a.call("inner.touch", meta=m)
        # The callee deleted "shared" in its own copy; the caller keeps it.
        assert m == {"shared": "keep me", "inner": "set by inner", "overwrite": "inner"}
        # Two calls never share a meta dict.
        m2 = {"x": 1}
        await a.call("inner.touch", meta=m2)
        assert inner.seen[-1] == {"x": 1}
        assert m2 == {"x": 1, "inner": "set by inner", "overwrite": "inner"}


# --- the model test ---------------------------------------------------------------------

KEYS = ["k0", "k1", "k2", "k3", "k4"]
N_BROKERS = 3


@dataclass
class TNode:
    id: int
    broker: int
    deletes: list[str]
    sets: dict[str, int]
    post: dict[str, int]
    raises: bool
    children: list[tuple[TNode, dict[str, int] | None]] = field(default_factory=list)


_small_meta = st.dictionaries(st.sampled_from(KEYS), st.integers(0, 999), max_size=3)


@st.composite
def call_trees(draw: st.DrawFn, depth: int = 1, counter: Any = None) -> TNode:
    counter = counter if counter is not None else itertools.count()
    node = TNode(
        id=next(counter),
        broker=draw(st.integers(0, N_BROKERS - 1)),
        deletes=draw(st.lists(st.sampled_from(KEYS), max_size=2, unique=True)),
        sets=draw(_small_meta),
        post=draw(_small_meta),
        raises=depth > 1 and draw(st.booleans()),
    )
    if depth < 4:
        n_children = draw(st.integers(0, 3))
        for _ in range(n_children):
            child = draw(call_trees(depth + 1, counter))
            option = draw(st.none() | _small_meta)
            node.children.append((child, option))
    return node


def all_nodes(root: TNode) -> dict[int, TNode]:
    out = {root.id: root}
    for child, _ in root.children:
        out.update(all_nodes(child))
    return out


def model(node: TNode, entry: dict[str, Any], observed: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """The final meta of ``node``'s context, given its meta on entry (pure rules of DESIGN §3)."""
    observed[node.id] = dict(entry)
    meta = dict(entry)
    for k in node.deletes:
        meta.pop(k, None)
    meta.update(node.sets)
    for child, option in node.children:
        child_entry = dict(meta)
        child_entry.update(option or {})
        meta.update(model(child, child_entry, observed))  # on result and on error alike
    meta.update(node.post)
    return meta


class TreeService(nerve.Service):
    def __init__(self, index: int, tree: dict[int, TNode], observed: dict[int, dict[str, Any]],
                 failures: list[str]) -> None:
        self.name = f"tree{index}"
        self.tree = tree
        self.observed = observed
        self.failures = failures

    @nerve.action
    async def run(self, ctx: nerve.Context) -> int:
        node = self.tree[ctx.params["id"]]
        self.observed[node.id] = dict(ctx.meta)
        for k in node.deletes:
            ctx.meta.pop(k, None)
        ctx.meta.update(node.sets)
        for child, option in node.children:
            try:
                await ctx.call(f"tree{child.broker}.run", {"id": child.id}, meta=option)
            except ClientError as exc:
                if not (child.raises and exc.message == f"node {child.id} fails"):
                    self.failures.append(f"unexpected {exc!r} from node {child.id}")
            except NerveError as exc:
                self.failures.append(f"unexpected {exc!r} from node {child.id}")
            else:
                if child.raises:
                    self.failures.append(f"node {child.id} should have failed")
        ctx.meta.update(node.post)
        if node.raises:
            raise ClientError(f"node {node.id} fails", 418, "TREE")
        return node.id


async def run_tree(root: TNode, root_meta: dict[str, Any]) -> tuple[dict[str, Any], dict[int, dict[str, Any]], list[str]]:
    tree = all_nodes(root)
    observed: dict[int, dict[str, Any]] = {}
    failures: list[str] = []
    brokers = [nerve.Broker(f"meta-tree-{i}", services=[TreeService(i, tree, observed, failures)])
               for i in range(N_BROKERS)]
    with trio.fail_after(10):
        async with brokers[0] as b0, brokers[1], brokers[2]:
            await b0.wait_for_services(*(f"tree{i}" for i in range(N_BROKERS)))
            for b in brokers[1:]:
                await b.wait_for_services(*(f"tree{i}" for i in range(N_BROKERS)))
            meta = dict(root_meta)
            assert await b0.call(f"tree{root.broker}.run", {"id": root.id}, meta=meta) == root.id
    return meta, observed, failures


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(root=call_trees(), root_meta=_small_meta)
def test_meta_model_over_random_call_trees(root: TNode, root_meta: dict[str, int]) -> None:
    expected_observed: dict[int, dict[str, Any]] = {}
    expected_final = dict(root_meta)
    expected_final.update(model(root, dict(root_meta), expected_observed))

    final, observed, failures = trio.run(run_tree, root, root_meta)

    assert failures == []
    assert observed == expected_observed
    assert final == expected_final


def test_model_sanity() -> None:
    """The model itself follows the rules on a hand-computed tree (so the property is not vacuous)."""
    leaf = TNode(2, 1, deletes=["a"], sets={"b": 2}, post={}, raises=True)
    mid = TNode(1, 2, deletes=[], sets={"a": 5}, post={"c": 3}, raises=False, children=[(leaf, {"d": 4})])
    root = TNode(0, 0, deletes=["z"], sets={}, post={"a": 9}, raises=False, children=[(mid, None)])
    observed: dict[int, dict[str, Any]] = {}
    final = model(root, {"z": 0}, observed)
    assert observed == {0: {"z": 0}, 1: {}, 2: {"a": 5, "d": 4}}
    assert final == {"a": 9, "b": 2, "c": 3, "d": 4}
