"""A traced nerve node in its own process, for the multi-process tracing test.

The OpenTelemetry SDK is configured globally (an in-memory exporter) before the broker is
created, and the broker has ``Tracing()`` with no arguments, as an application would do it.
Roles: ``c`` serves ``leaf.answer``; ``b`` serves ``relay.go``, which calls ``leaf.answer``;
``a`` calls ``relay.go`` once, prints the answer and stops. Prints one JSON line
``{"nodeID", "address"}`` once serving, and ``{"spans": [...]}`` as it exits (``b`` and ``c``
on SIGTERM).
"""

from __future__ import annotations

import argparse
import json
import signal
from typing import Any

import trio
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import nerve
from nerve.tracing import Tracing


class Leaf(nerve.Service):
    name = "leaf"

    @nerve.action
    async def answer(self, ctx: nerve.Context) -> dict[str, Any]:
        return {"node": self.broker.node_id, "traceparent": ctx.headers.get("traceparent")}


class Relay(nerve.Service):
    name = "relay"

    @nerve.action
    async def go(self, ctx: nerve.Context) -> dict[str, Any]:
        await self.broker.wait_for_services("leaf", timeout=20)
        leaf = await ctx.call("leaf.answer")
        return {"node": self.broker.node_id, "leaf": leaf}


def dump(exporter: InMemorySpanExporter) -> list[dict[str, Any]]:
    out = []
    for span in exporter.get_finished_spans():
        assert span.context is not None
        out.append({
            "name": span.name,
            "kind": span.kind.name,
            "trace_id": format(span.context.trace_id, "032x"),
            "span_id": format(span.context.span_id, "016x"),
            "parent_span_id": format(span.parent.span_id, "016x") if span.parent else None,
            "parent_is_remote": span.parent.is_remote if span.parent else None,
            "service": span.resource.attributes.get("service.name"),
            "status": span.status.status_code.name,
        })
    return out


async def main(args: argparse.Namespace) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": args.node_id}))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)  # before the broker: its chains see the SDK
    roles: dict[str, list[nerve.Service]] = {"a": [], "b": [Relay()], "c": [Leaf()]}
    services = roles[args.role]
    try:
        async with nerve.Broker(args.node_id, transport="tcp://127.0.0.1:0", peers=args.peer,
                                services=services, middlewares=[Tracing()],
                                heartbeat_interval=0.2, heartbeat_timeout=3.0) as broker:
            print(json.dumps({"nodeID": broker.node_id, "address": broker.address}), flush=True)
            if args.role == "a":
                await broker.wait_for_services("relay", timeout=20)
                result = await broker.call("relay.go", timeout=20)
                print(json.dumps({"result": result}), flush=True)
                return
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for _ in signals:
                    break
    finally:
        print(json.dumps({"spans": dump(exporter)}), flush=True)


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--node-id", required=True)
    p.add_argument("--role", choices=("a", "b", "c"), required=True)
    p.add_argument("--peer", action="append", default=[])
    trio.run(main, p.parse_args())
