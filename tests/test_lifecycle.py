"""Broker lifecycle: what ``async with Broker()`` leaves behind, and clear errors for misuse."""

from __future__ import annotations

import pytest
import trio

import nerve
from nerve.errors import BrokerOptionsError, ServiceSchemaError

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize("transport", [None, "tcp://127.0.0.1:0"])
async def test_an_exception_in_the_body_propagates_unchanged(transport: str | None) -> None:
    with pytest.raises(ValueError, match="boom"):
        async with nerve.Broker("lc-exc", transport=transport):
            raise ValueError("boom")


async def test_cancellation_stops_the_broker_promptly() -> None:
    with trio.move_on_after(0.2) as scope:
        async with nerve.Broker("lc-cancel", transport="tcp://127.0.0.1:0"):
            await trio.sleep(10)
    assert scope.cancelled_caught


async def test_misuse_gets_clear_errors() -> None:
    broker = nerve.Broker("lc-misuse")
    with pytest.raises(BrokerOptionsError, match="not running"):
        await broker.call("x.y")
    async with broker:
        with pytest.raises(BrokerOptionsError, match="already started"):
            await broker.start()
    with pytest.raises(BrokerOptionsError):
        nerve.Broker(peers=["tcp://127.0.0.1:1"])  # peers need a tcp transport
    with pytest.raises(BrokerOptionsError):
        nerve.Broker(transport="udp://x")
    with pytest.raises(BrokerOptionsError):
        nerve.Broker(serializer="pickle")
    with pytest.raises(BrokerOptionsError):
        nerve.Broker(protocol_version="3")


async def test_bad_services_are_refused_when_registered() -> None:
    class NoName(nerve.Service):
        pass

    with pytest.raises(ServiceSchemaError):
        nerve.Broker(services=[NoName()])

    with pytest.raises(ServiceSchemaError):
        class SyncAction(nerve.Service):
            name = "sync"

            @nerve.action  # type: ignore[type-var]
            def add(self, ctx: nerve.Context) -> int:
                return 1

    class Twice(nerve.Service):
        name = "twice"

    async with nerve.Broker("lc-dup", services=[Twice()]) as b:
        with pytest.raises(ServiceSchemaError):
            b.add_service(Twice())


async def test_node_ids_must_be_unique_in_one_process() -> None:
    async with nerve.Broker("lc-same"):
        with pytest.raises(BrokerOptionsError, match="already used"):
            async with nerve.Broker("lc-same"):
                pass
