"""The packet fields this node reads since issue 13, fed garbage by a peer: a REQ's and an
EVENT's ``tracing`` flag, an EVENT's ``headers``. Wrong types, huge values, nesting and
non-UTF-8 keys: the call or event is served (the field ignored), nothing else happens, and the
node carries on. Sent as real frames through the transit, with metrics and tracing on."""

from __future__ import annotations

import itertools
from typing import Any

import msgspec
import pytest
import trio
from opentelemetry.sdk.trace import TracerProvider

import nerve
from nerve.packets import Event, PacketType, Request
from nerve.tracing import Tracing

pytestmark = pytest.mark.anyio

GARBAGE: list[Any] = [
    None, 0, 1, -1, 2**63, 1.5, "true", "", "x" * 1_000_000, [True], {"a": True}, {"": None},
    [[[[[[[[[[True]]]]]]]]]], b"\xff\xfe", {"k": "\u0000"},
]
_ids = itertools.count()


class Seen(nerve.Service):
    name = "seen"

    def __init__(self) -> None:
        self.calls: list[Any] = []
        self.events: list[tuple[Any, Any]] = []

    @nerve.action
    async def it(self, ctx: nerve.Context) -> str:
        self.calls.append(ctx.tracing)
        return "ok"

    @nerve.event("seen.happened")
    async def happened(self, ctx: nerve.Context) -> None:
        self.events.append((ctx.tracing, ctx.headers))


@pytest.mark.parametrize("value", GARBAGE, ids=lambda v: type(v).__name__)
async def test_garbage_tracing_flags_and_event_headers_are_ignored(value: Any) -> None:
    svc = Seen()
    ns = f"hf-{next(_ids)}"
    async with nerve.Broker("hf-srv", namespace=ns, services=[svc], metrics=True,
                            middlewares=[Tracing(tracer_provider=TracerProvider())]) as srv:
        async with nerve.Broker("hf-peer", namespace=ns) as peer:
            await peer.wait_for_services("seen", timeout=5)
            encode = srv.serializer.encode
            # Raw frames as the peer would send them (bypassing its own broker's checks).
            srv.transit.on_frame("hf-peer", int(PacketType.REQ), encode(Request(
                sender="hf-peer", id="hf-1", action="seen.it", params={}, meta={}, headers={},
                tracing=value, level=1)))
            event = Event(sender="hf-peer", event="seen.happened", data={}, tracing=value, headers=value,
                          groups=["seen"], broadcast=False, level=1)
            if value is not None and not isinstance(value, dict):
                # headers of the wrong type: the packet is malformed, a protocol error of this
                # frame (on TCP it ends that peer's connection); the event is not served
                with pytest.raises(nerve.errors.NerveError, match="headers"):
                    srv.transit.on_frame("hf-peer", int(PacketType.EVENT), encode(event))
                event = msgspec.structs.replace(event, headers={})
            srv.transit.on_frame("hf-peer", int(PacketType.EVENT), encode(event))
            with trio.fail_after(5):
                while not (svc.calls and svc.events):
                    await trio.sleep(0.01)
            # the node carries on: a normal call and a scrape
            assert await peer.call("seen.it") == "ok"
            assert b"moleculer_request_total" in srv.metrics.exposition()
    expected_flag = value if isinstance(value, bool) else None
    assert svc.calls[0] is expected_flag
    tracing, headers = svc.events[0]
    assert tracing is expected_flag
    assert isinstance(headers, dict)
    assert headers == (value if isinstance(value, dict) else {})


async def test_a_non_utf8_header_key_is_a_protocol_error_of_that_frame_only() -> None:
    """msgpack with a str key that is not UTF-8: the frame is refused (ProtocolError), the node
    goes on serving."""
    svc = Seen()
    async with nerve.Broker("hf-srv2", namespace="hf-utf8", services=[svc]) as srv:
        async with nerve.Broker("hf-peer2", namespace="hf-utf8") as peer:
            await peer.wait_for_services("seen", timeout=5)
            good = srv.serializer.encode(Event(sender="hf-peer2", event="seen.happened", data={},
                                               headers={"KEY": 1}, groups=["seen"], broadcast=False))
            bad = good.replace(b"KEY", b"\xff\xfe\xfd")
            with pytest.raises(nerve.errors.NerveError):
                srv.transit.on_frame("hf-peer2", int(PacketType.EVENT), bad)
            assert await peer.call("seen.it") == "ok"
    assert svc.events == []
