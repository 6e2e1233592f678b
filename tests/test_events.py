"""DESIGN section 3, events: ``emit`` reaches one handler per group (balanced), ``broadcast``
every handler on every node, ``broadcast_local`` this broker only; wildcards match as in
Moleculer; handler errors are logged and counted, never sent back; meta flows into events."""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

import pytest
import trio

import nerve
from nerve.errors import ServiceSchemaError

pytestmark = pytest.mark.anyio

Record = tuple[str, str, str, Any]  # (group or pattern, node, event name, data)


async def wait_until(pred: Any, timeout: float = 3.0, *, fail: bool = True) -> None:
    """Poll ``pred``; on timeout raise TooSlowError (or, with ``fail=False``, just return so
    that the caller's assertion shows what was seen)."""
    with trio.move_on_after(timeout):
        while not pred():
            await trio.sleep(0.005)
        return
    if fail:
        raise trio.TooSlowError(f"condition not met after {timeout}s")


async def settle() -> None:
    """Give any (wrongly) extra deliveries the time to show up."""
    await trio.sleep(0.05)


def group_service(service_name: str, group: str, log: list[Record]) -> nerve.Service:
    class G(nerve.Service):
        name = service_name

        @nerve.event("order.created", group=group)
        async def on_order(self, ctx: nerve.Context) -> None:
            log.append((group, self.broker.node_id, ctx.event, ctx.params))

    return G()


async def wait_for_event_endpoints(broker: nerve.Broker, event: str, count: int) -> None:
    await wait_until(lambda: len(broker.registry.event_endpoints(event)) >= count)


class Cluster:
    """An emitter with no handlers, and four nodes: g1 on n1..n3, g2 on n2..n4."""

    def __init__(self, prefix: str) -> None:
        self.log: list[Record] = []
        p = prefix
        self.brokers = [
            nerve.Broker(f"{p}-emitter"),
            nerve.Broker(f"{p}-n1", services=[group_service("s1", "g1", self.log)]),
            nerve.Broker(f"{p}-n2", services=[group_service("s1", "g1", self.log),
                                              group_service("s2", "g2", self.log)]),
            nerve.Broker(f"{p}-n3", services=[group_service("s1", "g1", self.log),
                                              group_service("s2", "g2", self.log)]),
            nerve.Broker(f"{p}-n4", services=[group_service("s2", "g2", self.log)]),
        ]

    async def __aenter__(self) -> Cluster:
        self._started = []
        for b in self.brokers:
            await b.__aenter__()
            self._started.append(b)
        for b in self.brokers:
            await wait_for_event_endpoints(b, "order.created", 6)
        return self

    async def __aexit__(self, *exc: Any) -> None:
        for b in reversed(self._started):
            await b.__aexit__(*exc)


async def test_emit_reaches_exactly_one_handler_per_group_balanced() -> None:
    async with Cluster("ev-emit") as c:
        emitter = c.brokers[0]
        n = 30
        for i in range(n):
            await emitter.emit("order.created", {"i": i})
        await wait_until(lambda: len(c.log) >= 2 * n)
        await settle()
        assert len(c.log) == 2 * n
        for group, nodes in (("g1", ["ev-emit-n1", "ev-emit-n2", "ev-emit-n3"]),
                             ("g2", ["ev-emit-n2", "ev-emit-n3", "ev-emit-n4"])):
            got = [r for r in c.log if r[0] == group]
            # Every event exactly once per group...
            assert sorted(r[3]["i"] for r in got) == list(range(n))
            # ...spread round-robin over the group's nodes.
            per_node = Counter(r[1] for r in got)
            assert set(per_node) == set(nodes)
            assert sorted(per_node.values()) == [n // 3] * 3


async def test_emit_from_a_node_with_handlers_prefers_local_but_still_one_per_group() -> None:
    async with Cluster("ev-local") as c:
        n2 = c.brokers[2]
        for i in range(6):
            await n2.emit("order.created", {"i": i})
        await wait_until(lambda: len(c.log) >= 12)
        await settle()
        assert len(c.log) == 12
        assert Counter((r[0], r[1]) for r in c.log) == {("g1", "ev-local-n2"): 6, ("g2", "ev-local-n2"): 6}


async def test_emit_with_groups_limits_the_groups() -> None:
    async with Cluster("ev-groups") as c:
        emitter = c.brokers[0]
        for i in range(6):
            await emitter.emit("order.created", {"i": i}, groups=["g1"])
        await wait_until(lambda: len(c.log) >= 6)
        await settle()
        assert {r[0] for r in c.log} == {"g1"}
        assert sorted(r[3]["i"] for r in c.log) == list(range(6))

        del c.log[:]
        await emitter.emit("order.created", {"i": 99}, groups="g2")
        await emitter.emit("order.created", {"i": 100}, groups=["g1", "g2"])
        await emitter.emit("order.created", {"i": 101}, groups=["nobody"])
        await wait_until(lambda: len(c.log) >= 3)
        await settle()
        assert sorted((r[0], r[3]["i"]) for r in c.log) == [("g1", 100), ("g2", 99), ("g2", 100)]


async def test_broadcast_reaches_every_handler_on_every_node_once() -> None:
    async with Cluster("ev-bc") as c:
        emitter = c.brokers[0]
        await emitter.broadcast("order.created", {"i": 1})
        await wait_until(lambda: len(c.log) >= 6)
        await settle()
        assert sorted((r[0], r[1]) for r in c.log) == [
            ("g1", "ev-bc-n1"), ("g1", "ev-bc-n2"), ("g1", "ev-bc-n3"),
            ("g2", "ev-bc-n2"), ("g2", "ev-bc-n3"), ("g2", "ev-bc-n4"),
        ]
        # From a node with handlers: its own handlers too, once each.
        del c.log[:]
        await c.brokers[3].broadcast("order.created", {"i": 2})
        await wait_until(lambda: len(c.log) >= 6)
        await settle()
        assert len(c.log) == 6
        assert len({(r[0], r[1]) for r in c.log}) == 6
        # With groups: only those groups' handlers, on every node.
        del c.log[:]
        await emitter.broadcast("order.created", {"i": 3}, groups=["g2"])
        await wait_until(lambda: len(c.log) >= 3)
        await settle()
        assert sorted((r[0], r[1]) for r in c.log) == [
            ("g2", "ev-bc-n2"), ("g2", "ev-bc-n3"), ("g2", "ev-bc-n4")]


async def test_broadcast_local_stays_on_this_broker() -> None:
    async with Cluster("ev-bl") as c:
        n3 = c.brokers[3]
        await n3.broadcast_local("order.created", {"i": 1})
        await wait_until(lambda: len(c.log) >= 2)
        await settle()
        assert sorted((r[0], r[1]) for r in c.log) == [("g1", "ev-bl-n3"), ("g2", "ev-bl-n3")]
        # An emitter without handlers reaches nobody.
        del c.log[:]
        await c.brokers[0].broadcast_local("order.created", {"i": 2})
        await settle()
        assert c.log == []
        assert all(b.statistics().transit.events_received == 0 for b in c.brokers)


# --- wildcards --------------------------------------------------------------------------

PATTERNS = ["user.created", "user.*", "user.**", "**", "*", "user.*.updated", "us?r.created"]


def pattern_service(pattern: str, index: int, log: list[Record]) -> nerve.Service:
    class P(nerve.Service):
        name = f"pattern{index}"

        @nerve.event(pattern)
        async def on_any(self, ctx: nerve.Context) -> None:
            log.append((pattern, self.broker.node_id, ctx.event, ctx.params))

    return P()


# Moleculer's utils.match, evaluated by hand for these names.
EXPECTED_MATCHES = {
    "user.created": {"user.created", "user.*", "user.**", "**", "us?r.created"},
    "user.profile.updated": {"user.**", "**", "user.*.updated"},
    "user.a.b.updated": {"user.**", "**"},
    "user": {"**", "*"},
    "order.created": {"**"},
    "users.created": {"**"},
}


@pytest.mark.parametrize("remote", [False, True], ids=["local", "remote"])
async def test_wildcard_subscriptions_match_like_moleculer(remote: bool) -> None:
    log: list[Record] = []
    services = [pattern_service(p, i, log) for i, p in enumerate(PATTERNS)]
    async with nerve.Broker("ev-wc-emitter", services=[] if remote else services) as emitter, \
            nerve.Broker("ev-wc-listener", services=services if remote else []):
        await wait_for_event_endpoints(emitter, "user.created", 5)
        for mode in ("emit", "broadcast"):
            for name in EXPECTED_MATCHES:
                del log[:]
                await getattr(emitter, mode)(name, {"n": name})
                expected = EXPECTED_MATCHES[name]
                await wait_until(lambda: len([r for r in log if r[2] == name]) >= len(expected))
                await settle()
                got = [r[0] for r in log if r[2] == name]
                assert sorted(got) == sorted(expected), (mode, name)
                assert all(r[3] == {"n": name} for r in log if r[2] == name)


async def test_every_matching_handler_of_one_service_gets_an_emit() -> None:
    """In Moleculer an emit is balanced per (event subscription, group): a service with two
    subscriptions that both match an event gets it in each of them (once per subscription)."""
    log: list[Record] = []

    class Multi(nerve.Service):
        name = "multi"

        @nerve.event("user.created")
        async def exact(self, ctx: nerve.Context) -> None:
            log.append(("user.created", self.broker.node_id, ctx.event, ctx.params))

        @nerve.event("user.*")
        async def star(self, ctx: nerve.Context) -> None:
            log.append(("user.*", self.broker.node_id, ctx.event, ctx.params))

    async with nerve.Broker("ev-multi-emitter") as emitter, \
            nerve.Broker("ev-multi-a", services=[Multi()]), nerve.Broker("ev-multi-b", services=[Multi()]):
        await wait_for_event_endpoints(emitter, "user.created", 4)
        for i in range(4):
            await emitter.emit("user.created", i)
        await wait_until(lambda: len(log) >= 8, 1.0, fail=False)
        await settle()
        got = Counter(r[0] for r in log)
        assert got == {"user.created": 4, "user.*": 4}
        assert Counter(r[1] for r in log) == {"ev-multi-a": 4, "ev-multi-b": 4}


async def test_two_subscriptions_to_one_event_in_one_service_are_rejected_or_all_visible() -> None:
    """A service subscribing to one event twice (in different groups) must either be rejected
    when registered (Moleculer keys a service's events by name) or work the same for peers as
    locally: a peer must not see only one of the two subscriptions while the node has both."""
    log: list[Record] = []

    class TwoGroups(nerve.Service):
        name = "twogroups"

        @nerve.event("thing.done", group="first")
        async def first(self, ctx: nerve.Context) -> None:
            log.append(("first", self.broker.node_id, ctx.event, ctx.params))

        @nerve.event("thing.done", group="second")
        async def second(self, ctx: nerve.Context) -> None:
            log.append(("second", self.broker.node_id, ctx.event, ctx.params))

    try:
        node = nerve.Broker("ev-two-node", services=[TwoGroups()])
    except ServiceSchemaError:
        return  # rejected up front: consistent
    async with nerve.Broker("ev-two-emitter") as emitter, node:
        await emitter.wait_for_services("twogroups")
        local_view = sorted((ep.group, ep.node_id) for ep in node.registry.event_endpoints("thing.done"))
        assert local_view == [("first", "ev-two-node"), ("second", "ev-two-node")]
        remote_view = sorted((ep.group, ep.node_id) for ep in emitter.registry.event_endpoints("thing.done"))
        assert remote_view == local_view
        await emitter.emit("thing.done", 1)
        await wait_until(lambda: len(log) >= 2, 1.0, fail=False)
        await settle()
        assert sorted(r[0] for r in log) == ["first", "second"]


# --- handler errors ---------------------------------------------------------------------


class Boom(nerve.Service):
    name = "boom"

    @nerve.event("thing.happened", group="breaks")
    async def breaks(self, ctx: nerve.Context) -> None:
        raise RuntimeError("event handler exploded")


class Works(nerve.Service):
    name = "works"

    def __init__(self, log: list[Record]) -> None:
        self.log = log

    @nerve.event("thing.happened", group="works")
    async def works(self, ctx: nerve.Context) -> None:
        self.log.append(("works", self.broker.node_id, ctx.event, ctx.params))


@pytest.mark.parametrize("mode", ["emit", "broadcast"])
async def test_handler_error_is_logged_counted_and_not_sent_back(
        mode: str, caplog: pytest.LogCaptureFixture) -> None:
    log: list[Record] = []
    async with nerve.Broker("ev-err-emitter") as emitter, \
            nerve.Broker("ev-err-node", services=[Boom(), Works(log)]) as node:
        await wait_for_event_endpoints(emitter, "thing.happened", 2)
        frames_back: list[tuple[str, int]] = []
        original = emitter.transit.on_frame

        def spy(sender: str, kind: int, payload: bytes) -> None:
            frames_back.append((sender, kind))
            original(sender, kind, payload)

        emitter.transit.on_frame = spy  # type: ignore[method-assign]
        with caplog.at_level(logging.ERROR, logger="nerve"):
            await getattr(emitter, mode)("thing.happened", {"x": 1})  # does not raise
            await wait_until(lambda: node.statistics().event_handler_errors >= 1 and log)
            await getattr(emitter, mode)("thing.happened", {"x": 2})
            await wait_until(lambda: node.statistics().event_handler_errors >= 2 and len(log) >= 2)
            await settle()
        assert node.statistics().event_handler_errors == 2
        assert [r[3] for r in log] == [{"x": 1}, {"x": 2}]  # the other handler still ran
        assert frames_back == []  # nothing came back to the emitter
        assert emitter.statistics().event_handler_errors == 0
        errors = [r for r in caplog.records if r.exc_info and "event handler exploded" in str(r.exc_info[1])]
        assert len(errors) == 2
        # The node keeps serving events.
        await emitter.emit("thing.happened", {"x": 3}, groups="works")
        await wait_until(lambda: len(log) >= 3)


async def test_local_handler_error_does_not_reach_the_emitter() -> None:
    log: list[Record] = []
    async with nerve.Broker("ev-lerr", services=[Boom(), Works(log)]) as b:
        await b.emit("thing.happened", 1)
        await b.broadcast_local("thing.happened", 2)
        await wait_until(lambda: len(log) >= 2 and b.statistics().event_handler_errors >= 2)
        await settle()
        assert b.statistics().event_handler_errors == 2
        assert sorted(r[3] for r in log) == [1, 2]


# --- meta -------------------------------------------------------------------------------


class MetaSink(nerve.Service):
    name = "sink"

    def __init__(self, log: list[Record]) -> None:
        self.log = log

    @nerve.event("meta.child")
    async def child(self, ctx: nerve.Context) -> None:
        self.log.append(("child", self.broker.node_id, ctx.event, dict(ctx.meta)))

    @nerve.event("meta.bchild", group="other")
    async def bchild(self, ctx: nerve.Context) -> None:
        self.log.append(("bchild", self.broker.node_id, ctx.event, dict(ctx.meta)))


class MetaSource(nerve.Service):
    name = "source"

    @nerve.action
    async def fire(self, ctx: nerve.Context) -> None:
        ctx.meta["set_in_handler"] = True
        await ctx.emit("meta.child", meta={"opt": "emit", "shared": "from emit"})
        await ctx.broadcast("meta.bchild", meta={"opt": "broadcast"})

    @nerve.event("meta.parent")
    async def parent(self, ctx: nerve.Context) -> None:
        await ctx.emit("meta.child", meta={"from_event": 1})


@pytest.mark.parametrize("remote", [False, True], ids=["local", "remote"])
async def test_event_handlers_get_parent_meta_merged_with_emit_meta(remote: bool) -> None:
    log: list[Record] = []
    sink = MetaSink(log)
    async with nerve.Broker("ev-meta-a", services=[MetaSource()] + ([] if remote else [sink])) as a, \
            nerve.Broker("ev-meta-b", services=[sink] if remote else []):
        await wait_for_event_endpoints(a, "meta.child", 1)
        await a.wait_for_services("sink")
        caller_meta = {"top": 1, "shared": "caller"}
        await a.call("source.fire", meta=caller_meta)
        await wait_until(lambda: len(log) >= 2)
        by_kind = {r[0]: r[3] for r in log}
        assert by_kind["child"] == {"top": 1, "shared": "from emit", "set_in_handler": True, "opt": "emit"}
        assert by_kind["bchild"] == {"top": 1, "shared": "caller", "set_in_handler": True, "opt": "broadcast"}

        # An event handler emitting onward passes its own meta along too.
        del log[:]
        await a.emit("meta.parent", meta={"root": "yes"})
        await wait_until(lambda: len(log) >= 1)
        assert log[0][3] == {"root": "yes", "from_event": 1}

        # And a top-level emit carries exactly its meta.
        del log[:]
        await a.broadcast("meta.child", meta={"only": "this"})
        await wait_until(lambda: len(log) >= 1)
        assert log[0][3] == {"only": "this"}
