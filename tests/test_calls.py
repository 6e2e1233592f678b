"""Calls: local and remote (in-process transport), typed params, errors across the wire,
serialization failures, call levels, services coming and going, and the ``$node`` service."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
import trio

import nerve
from nerve.errors import (
    ClientError,
    MaxCallLevelError,
    NerveError,
    RemoteError,
    SerializationError,
    ServiceNotFoundError,
    ValidationError,
)

pytestmark = pytest.mark.anyio


class AddParams(msgspec.Struct):
    a: int
    b: int


class AddResult(msgspec.Struct):
    total: int
    node: str


class Math(nerve.Service):
    name = "math"

    @nerve.action
    async def add(self, ctx: nerve.Context, params: AddParams) -> AddResult:
        return AddResult(total=params.a + params.b, node=self.broker.node_id)

    @nerve.action(name="whoami")
    async def who(self, ctx: nerve.Context) -> dict[str, Any]:
        return {"node": self.broker.node_id, "params": ctx.params, "level": ctx.level,
                "from": ctx.node_id}


class Failing(nerve.Service):
    name = "failing"

    def __init__(self) -> None:
        self.calls = 0

    @nerve.action
    async def raise_client(self, ctx: nerve.Context) -> None:
        raise ClientError("bad", 400, "BAD_THING", {"x": 1})

    @nerve.action
    async def raise_value(self, ctx: nerve.Context) -> None:
        raise ValueError("plain value error")

    @nerve.action
    async def unserializable(self, ctx: nerve.Context) -> Any:
        self.calls += 1
        return object()

    @nerve.action
    async def ok(self, ctx: nerve.Context) -> str:
        self.calls += 1
        return "fine"


class Recursive(nerve.Service):
    """``deep`` calls itself (through ``other`` if given) until something stops it."""

    name = "rec"

    def __init__(self, target: str = "rec.deep") -> None:
        self.levels: list[int] = []
        self.target = target

    @nerve.action
    async def deep(self, ctx: nerve.Context) -> int:
        self.levels.append(ctx.level)
        return await ctx.call(self.target)


class Recursive2(Recursive):
    name = "rec2"


# --- local and remote calls -------------------------------------------------------------


async def test_local_call_runs_on_the_same_broker_without_transit() -> None:
    async with nerve.Broker("calls-local", services=[Math()]) as b:
        res = await b.call("math.whoami", {"q": 1})
        assert res == {"node": "calls-local", "params": {"q": 1}, "level": 1, "from": "calls-local"}
        assert b.transit.requests_sent == 0
        assert b.transit.requests_received == 0


async def test_remote_call_over_the_in_process_transport() -> None:
    async with nerve.Broker("calls-r-client") as client, \
            nerve.Broker("calls-r-server", services=[Math()]) as server:
        await client.wait_for_services("math")
        res = await client.call("math.whoami", {"q": [1, "two"]})
        assert res == {"node": "calls-r-server", "params": {"q": [1, "two"]}, "level": 1,
                       "from": "calls-r-client"}
        assert client.transit.requests_sent == 1
        assert server.transit.requests_received == 1


@pytest.mark.parametrize("remote", [False, True], ids=["local", "remote"])
async def test_typed_params_and_struct_result(remote: bool) -> None:
    async with nerve.Broker("calls-t-client", services=[] if remote else [Math()]) as client, \
            nerve.Broker("calls-t-server", services=[Math()] if remote else []):
        await client.wait_for_services("math")
        res = await client.call("math.add", {"a": 2, "b": 40})
        # A Struct result comes back as a plain dict, on both paths.
        assert type(res) is dict
        assert res == {"total": 42, "node": "calls-t-server" if remote else "calls-t-client"}


@pytest.mark.parametrize("remote", [False, True], ids=["local", "remote"])
@pytest.mark.parametrize(
    "params, field",
    [({"a": "not a number", "b": 1}, "a"), ({"a": 1, "b": [1]}, "b"), ({"a": 1}, "b")],
    ids=["wrong-type-a", "wrong-type-b", "missing-b"],
)
async def test_typed_params_are_validated(remote: bool, params: dict[str, Any], field: str | None) -> None:
    async with nerve.Broker("calls-v-client", services=[] if remote else [Math()]) as client, \
            nerve.Broker("calls-v-server", services=[Math()] if remote else []):
        await client.wait_for_services("math")
        with pytest.raises(ValidationError) as info:
            await client.call("math.add", params)
        exc = info.value
        assert exc.code == 422
        assert exc.type == "VALIDATION_ERROR"
        assert isinstance(exc.data, dict)
        assert exc.data["field"] == field
        assert isinstance(exc.data["reason"], str) and exc.data["reason"]
        if params == {"a": 1}:
            assert exc.data["reason"] == "Object missing required field `b`"
        else:
            assert "Expected" in exc.data["reason"]


@pytest.mark.parametrize("remote", [False, True], ids=["local", "remote"])
async def test_unknown_action_is_service_not_found(remote: bool) -> None:
    async with nerve.Broker("calls-u-client") as client, \
            nerve.Broker("calls-u-server", services=[Math()]):
        await client.wait_for_services("math")
        with pytest.raises(ServiceNotFoundError) as info:
            await client.call("math.nope" if remote else "nothing.here")
        assert info.value.code == 404
        assert info.value.type == "SERVICE_NOT_FOUND"


async def test_node_id_on_a_node_without_the_action_is_a_clear_not_found() -> None:
    async with nerve.Broker("calls-n-client") as client, \
            nerve.Broker("calls-n-a", services=[Math()]), \
            nerve.Broker("calls-n-b", services=[Failing()]):
        await client.wait_for_services("math", "failing")
        # The action exists (on calls-n-a) but not on calls-n-b.
        with pytest.raises(ServiceNotFoundError) as info:
            await client.call("math.whoami", node_id="calls-n-b")
        exc = info.value
        assert exc.code == 404
        assert "calls-n-b" in exc.message and "math.whoami" in exc.message
        assert exc.data["nodeID"] == "calls-n-b"
        # An unknown node too.
        with pytest.raises(ServiceNotFoundError) as info:
            await client.call("math.whoami", node_id="no-such-node")
        assert "no-such-node" in info.value.message
        # And the right node answers.
        res = await client.call("math.whoami", node_id="calls-n-a")
        assert res["node"] == "calls-n-a"


# --- errors across the wire -------------------------------------------------------------


async def test_remote_client_error_keeps_every_field_and_the_remote_stack() -> None:
    async with nerve.Broker("calls-e-client") as client, \
            nerve.Broker("calls-e-server", services=[Failing()]):
        await client.wait_for_services("failing")
        with pytest.raises(ClientError) as info:
            await client.call("failing.raise_client")
        exc = info.value
        assert type(exc) is ClientError
        assert exc.message == "bad" and str(exc) == "bad"
        assert exc.code == 400
        assert exc.type == "BAD_THING"
        assert exc.data == {"x": 1}
        assert exc.retryable is False
        assert exc.node_id == "calls-e-server"
        assert isinstance(exc.stack, str)
        assert "Traceback" in exc.stack
        assert "raise_client" in exc.stack  # the remote handler's frame
        assert "test_calls.py" in exc.stack


async def test_remote_plain_exception_is_remote_error_with_its_name() -> None:
    async with nerve.Broker("calls-p-client") as client, \
            nerve.Broker("calls-p-server", services=[Failing()]):
        await client.wait_for_services("failing")
        with pytest.raises(RemoteError) as info:
            await client.call("failing.raise_value")
        exc = info.value
        assert exc.name == "ValueError"
        assert exc.message == "plain value error"
        assert exc.code == 500
        assert exc.node_id == "calls-p-server"
        assert isinstance(exc.stack, str) and "raise_value" in exc.stack


async def test_unserializable_result_gives_serialization_error_and_node_keeps_serving() -> None:
    svc = Failing()
    async with nerve.Broker("calls-s-client") as client, \
            nerve.Broker("calls-s-server", services=[svc]):
        await client.wait_for_services("failing")
        with trio.fail_after(5):
            with pytest.raises(SerializationError) as info:
                await client.call("failing.unserializable")
        assert info.value.node_id == "calls-s-server"
        with trio.fail_after(5):
            assert await client.call("failing.ok") == "fine"
            with pytest.raises(SerializationError):
                await client.call("failing.unserializable")
            assert await client.call("failing.ok") == "fine"
        assert svc.calls == 4


# --- call levels ------------------------------------------------------------------------


async def test_max_call_level_stops_local_recursion() -> None:
    svc = Recursive()
    async with nerve.Broker("calls-l-local", services=[svc], max_call_level=5) as b:
        with trio.fail_after(5), pytest.raises(MaxCallLevelError) as info:
            await b.call("rec.deep")
        assert svc.levels == [1, 2, 3, 4, 5]
        assert info.value.data["level"] == 6


async def test_max_call_level_stops_recursion_across_nodes() -> None:
    one, two = Recursive("rec2.deep"), Recursive2("rec.deep")
    async with nerve.Broker("calls-l-a", services=[one], max_call_level=6) as a, \
            nerve.Broker("calls-l-b", services=[two], max_call_level=6):
        await a.wait_for_services("rec", "rec2")
        with trio.fail_after(5), pytest.raises(MaxCallLevelError):
            await a.call("rec.deep")
        assert sorted(one.levels + two.levels) == [1, 2, 3, 4, 5, 6]
        assert one.levels == [1, 3, 5] and two.levels == [2, 4, 6]


# --- services coming and going ----------------------------------------------------------


async def test_add_and_remove_service_on_a_running_broker_are_seen_by_peers() -> None:
    async with nerve.Broker("calls-a-client") as client, nerve.Broker("calls-a-server") as server:
        with pytest.raises(ServiceNotFoundError):
            await client.call("math.whoami")
        server.add_service(Math())
        await client.wait_for_services("math", timeout=5)
        res = await client.call("math.whoami")
        assert res["node"] == "calls-a-server"
        await server.remove_service("math")
        with trio.fail_after(5):
            while client.registry.actions.get("math.whoami"):
                await trio.sleep(0.01)
        with pytest.raises(ServiceNotFoundError):
            await client.call("math.whoami")
        with pytest.raises(ServiceNotFoundError):
            await server.call("math.whoami")
        with pytest.raises(ServiceNotFoundError):
            await server.remove_service("math")


# --- $node ------------------------------------------------------------------------------


async def test_node_service_actions() -> None:
    async with nerve.Broker("calls-node-a", services=[Math()]) as a, \
            nerve.Broker("calls-node-b", services=[Failing()]) as b:
        await a.wait_for_services("failing")
        await b.wait_for_services("math")

        nodes = await a.call("$node.list")
        ids = {n["id"]: n for n in nodes}
        assert set(ids) == {"calls-node-a", "calls-node-b"}
        assert ids["calls-node-a"]["local"] is True and ids["calls-node-b"]["local"] is False
        assert all(n["available"] for n in nodes)

        services = {s["fullName"]: s for s in await a.call("$node.services")}
        assert services["math"]["nodes"] == ["calls-node-a"]
        assert services["failing"]["nodes"] == ["calls-node-b"]
        assert sorted(services["$node"]["nodes"]) == ["calls-node-a", "calls-node-b"]

        actions = {x["name"]: x for x in await a.call("$node.actions")}
        assert actions["math.add"]["endpoints"] == [{"nodeID": "calls-node-a", "local": True}]
        assert actions["failing.ok"]["endpoints"] == [{"nodeID": "calls-node-b", "local": False}]
        assert {e["nodeID"] for e in actions["$node.health"]["endpoints"]} == {"calls-node-a", "calls-node-b"}

        health = await a.call("$node.health")
        assert health["nodeID"] == "calls-node-a"
        remote_health = await a.call("$node.health", node_id="calls-node-b")
        assert remote_health["nodeID"] == "calls-node-b"
        assert remote_health["nerve"]["transit"]["requests_received"] >= 1
        assert remote_health["nerve"]["requests_served"] >= 1 and remote_health["nerve"]["node_id"] == "calls-node-b"


class Listener(nerve.Service):
    name = "listener"

    @nerve.event("user.created", group="audit")
    async def on_user(self, ctx: nerve.Context) -> None:
        pass

    @nerve.event("order.*")
    async def on_order(self, ctx: nerve.Context) -> None:
        pass


async def test_node_events_lists_subscriptions_of_every_node() -> None:
    async with nerve.Broker("calls-ev-a", services=[Listener()]) as a, \
            nerve.Broker("calls-ev-b", services=[Listener()]):
        await a.wait_for_services("listener")
        with trio.fail_after(5):
            while len({ep.node_id for ep in a.registry.events}) < 2:
                await trio.sleep(0.01)
        events = {(e["name"], e["group"]): e for e in await a.call("$node.events")}
        assert set(events) == {("user.created", "audit"), ("order.*", "listener")}
        for entry in events.values():
            assert sorted(ep["nodeID"] for ep in entry["endpoints"]) == ["calls-ev-a", "calls-ev-b"]


async def test_call_errors_are_nerve_errors() -> None:
    async with nerve.Broker("calls-x") as b:
        with pytest.raises(NerveError):
            await b.call("no.such.action")


async def test_a_request_for_a_removed_action_answers_service_not_found() -> None:
    """A REQ that reaches a node after it removed the action (the caller's registry is not yet
    updated) is answered with ServiceNotFoundError, never left hanging."""
    async with nerve.Broker("calls-rr-client") as client, \
            nerve.Broker("calls-rr-server", services=[Math()]) as server:
        await client.wait_for_services("math")
        ep = client.registry.select_action("math.whoami")
        await server.remove_service("math")
        pending = client.transit.send_request(ep, "manual-1", {}, {}, {}, 1, "manual-1", None, None)
        with trio.fail_after(5):
            await pending.wait()
        del client.transit.pending["manual-1"]
        assert isinstance(pending.error, ServiceNotFoundError)
        assert pending.error.node_id == "calls-rr-server"


class Busy(nerve.Service):
    name = "busy"

    def __init__(self) -> None:
        self.release = trio.Event()

    @nerve.action
    async def wait(self, ctx: nerve.Context) -> str:
        await self.release.wait()
        return "done"


async def test_a_full_node_answers_queue_is_full_and_keeps_serving() -> None:
    from nerve.errors import QueueIsFullError

    busy = Busy()
    async with nerve.Broker("qf-client") as client, \
            nerve.Broker("qf-server", services=[busy], max_pending_requests=5):
        await client.wait_for_services("busy")
        results: list[Any] = []

        async def one() -> None:
            try:
                results.append(await client.call("busy.wait"))
            except QueueIsFullError as exc:
                results.append(exc)

        async with trio.open_nursery() as nursery:
            for _ in range(8):
                nursery.start_soon(one)
            await trio.sleep(0.1)
            full = [r for r in results if isinstance(r, QueueIsFullError)]
            assert len(full) == 3 and all(e.retryable and e.code == 429 for e in full)
            busy.release.set()
        assert results.count("done") == 5


@pytest.mark.parametrize("transport", ["local", "tcp"])
async def test_ping_measures_a_round_trip(transport: str) -> None:
    from nerve.errors import BrokerDisconnectedError

    kw: dict[str, Any] = {"transport": "tcp://127.0.0.1:0"} if transport == "tcp" else {}
    async with nerve.Broker("ping-a", **kw) as a:
        peer_kw = dict(kw, peers=[a.address]) if transport == "tcp" else {}
        async with nerve.Broker("ping-b", **peer_kw) as b:
            with trio.fail_after(5):
                while "ping-a" not in b.transport.connected():
                    await trio.sleep(0.01)
            rtt = await b.ping("ping-a")
            assert 0 <= rtt < 1.0
            with pytest.raises(BrokerDisconnectedError):
                await b.ping("nobody")


def test_version_is_the_installed_distributions() -> None:
    from importlib.metadata import version

    assert nerve.__version__ == version("nerve") and nerve.__version__[0].isdigit()
