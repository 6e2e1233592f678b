"""A nerve node for the live fuzzer's tests, in its own process: typed actions, a request-stream
reader, a response-stream producer and an event handler.

Prints one JSON line ``{"nodeID", "address", "pid"}`` once serving; stops on SIGTERM.
``--fragile`` adds ``fragile.*`` actions with deliberate defects (a process exit, a frozen
event loop) so the tests can check that the fuzzer's oracles and minimizer catch them.
``--break-cancel MODE`` plants a defect in the node's handling of CANCEL frames (see
:func:`break_cancel`), so the tests can check that the fuzzer's cancel cases reach it.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from typing import Any

import msgspec
import trio

import nerve


class EchoParams(msgspec.Struct):
    text: str
    n: int = 1


class Fuzz(nerve.Service):
    name = "fuzz"

    @nerve.action
    async def echo(self, ctx: nerve.Context, params: EchoParams) -> dict[str, Any]:
        return {"text": params.text[:64], "n": params.n}

    @nerve.action
    async def slow(self, ctx: nerve.Context) -> int:
        """Answers after ``ms`` milliseconds (default 200, at most 500): a handler in flight."""
        ms = ctx.params.get("ms", 200) if isinstance(ctx.params, dict) else 200
        ms = min(max(ms, 0), 500) if isinstance(ms, int) and not isinstance(ms, bool) else 200
        await trio.sleep(ms / 1000)
        return ms

    @nerve.action
    async def upload(self, ctx: nerve.Context) -> int:
        size = 0
        if ctx.stream is not None:
            async for chunk in ctx.stream:
                size += len(chunk)
        return size

    @nerve.action
    async def download(self, ctx: nerve.Context) -> nerve.PacketStream:
        size = int(ctx.params.get("size", 4096)) if isinstance(ctx.params, dict) else 4096

        async def chunks() -> Any:
            left = min(size, 1 << 20)
            while left > 0:
                n = min(left, 16384)
                yield b"d" * n
                left -= n

        return nerve.PacketStream.from_iterable(chunks())

    @nerve.event("fuzz.*")
    async def on_fuzz(self, ctx: nerve.Context) -> None:
        pass


class Fragile(nerve.Service):
    """Deliberate defects: an action that ends the process and one that freezes the loop."""

    name = "fragile"

    @nerve.action
    async def exit(self, ctx: nerve.Context) -> None:
        os._exit(3)

    @nerve.action
    async def freeze(self, ctx: nerve.Context) -> None:
        end = time.monotonic() + 3600
        while time.monotonic() < end:
            pass


BREAK_MODES = ("raise", "exit-queued", "exit-running", "exit-stream", "exit-noffer", "exit-long",
               "exit-utf8", "leak")


def break_cancel(mode: str) -> None:
    """Plant a defect where the node handles a CANCEL frame (monkeypatched, in this process only):

    ``raise``        ``_cancel_id`` raises a RuntimeError for every CANCEL (the node survives it:
                     the connection that sent it is dropped, which a valid CANCEL must not cause)
    ``exit-queued``  the process exits (71) when a CANCEL names a handler still queued
    ``exit-running`` ... (72) when it names a handler running now
    ``exit-stream``  ... (73) when it names a stream handler serving its request stream
    ``exit-noffer``  ... (74) on a CANCEL from a peer whose HELLO did not offer ``cancel``
    ``exit-long``    ... (75) on a CANCEL payload over 256 bytes
    ``exit-utf8``    ... (76) on a CANCEL payload that is not UTF-8
    ``leak``         a CANCEL that finds its handler leaves one request of that peer counted for ever
    """
    from nerve import _dispatch, transit
    from nerve.transports import tcp

    def die(code: int, why: str) -> None:
        print(f"PlantedCancelError: {why}", file=sys.stderr, flush=True)  # the crash signature
        os._exit(code)

    original_id = tcp._cancel_id

    def cancel_id(node: str, payload: bytes) -> str:
        if mode == "raise":
            raise RuntimeError("planted: _cancel_id failed")
        if mode == "exit-long" and len(payload) > 256:
            die(75, "a CANCEL over 256 bytes")
        if mode == "exit-utf8":
            try:
                bytes(payload).decode("utf-8")
            except UnicodeDecodeError:
                die(76, "a CANCEL that is not UTF-8")
        return original_id(node, payload)

    tcp._cancel_id = cancel_id  # type: ignore[assignment]

    original_cancel = _dispatch.HandlerPool.cancel

    def pool_cancel(self: _dispatch.HandlerPool, key: Any) -> bool:
        if mode == "exit-running" and key in self._running:
            die(72, "a CANCEL of a running handler")
        if mode == "exit-queued" and key not in self._running and any(item[3] == key for item in self._queue):
            die(71, "a CANCEL of a queued handler")
        return original_cancel(self, key)

    _dispatch.HandlerPool.cancel = pool_cancel  # type: ignore[method-assign]

    original_on_cancel = transit.Transit.on_cancel

    def on_cancel(self: transit.Transit, sender: str, call_id: str) -> None:
        if mode == "exit-stream" and (sender, call_id) in self.serving:
            die(73, "a CANCEL of a stream handler")
        if mode == "exit-noffer":
            conn = getattr(self.transport, "connections", {}).get(sender)
            if conn is not None and not conn.cancels:
                die(74, "a CANCEL from a peer that did not offer cancel")
        found = (sender, call_id) in self.serving or (sender, call_id) in self.handlers._running \
            or any(item[3] == (sender, call_id) for item in self.handlers._queue)
        original_on_cancel(self, sender, call_id)
        if mode == "leak" and found:
            self.peer_requests[sender] = self.peer_requests.get(sender, 0) + 1

    transit.Transit.on_cancel = on_cancel  # type: ignore[method-assign]


async def main(args: argparse.Namespace) -> None:
    if args.break_cancel:
        break_cancel(args.break_cancel)
    services: list[nerve.Service] = [Fuzz()]
    if args.fragile:
        services.append(Fragile())
    middlewares: list[nerve.Middleware] = []
    if args.tracing:
        # The SDK records every span (they are dropped at export): a peer's headers reach the
        # propagator, and every served call opens and ends a span.
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult

        from nerve.tracing import Tracing

        class Drop(SpanExporter):
            def export(self, spans: object) -> SpanExportResult:
                return SpanExportResult.SUCCESS

        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(Drop()))
        middlewares.append(Tracing(tracer_provider=provider))
    async with nerve.Broker(args.node_id, transport="tcp://127.0.0.1:0", services=services,
                            secret=args.secret, heartbeat_interval=1.0, heartbeat_timeout=15.0,
                            stream_idle_timeout=5.0, max_peer_requests=args.max_peer_requests,
                            metrics=args.metrics, middlewares=middlewares) as broker:
        print(json.dumps({"nodeID": broker.node_id, "address": broker.address, "pid": os.getpid()}), flush=True)
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for _ in signals:
                break


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--node-id", default="fuzz-target")
    p.add_argument("--secret", default=None)
    p.add_argument("--fragile", action="store_true")
    p.add_argument("--max-peer-requests", type=int, default=None,
                   help="requests one peer may have served at once (a small value makes a count "
                        "left behind by a cancelled call visible to the fuzzer)")
    p.add_argument("--metrics", action="store_true", help="count metrics (the metered paths are fuzzed too)")
    p.add_argument("--tracing", action="store_true", help="trace with the OpenTelemetry SDK (spans dropped)")
    p.add_argument("--break-cancel", choices=BREAK_MODES, default=None,
                   help="plant a defect in the handling of CANCEL frames (see break_cancel)")
    trio.run(main, p.parse_args())
