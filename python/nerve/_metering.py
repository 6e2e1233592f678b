"""Metering: per-action and per-event counters and latency histograms, in plain Python.

Theory of operation. When a broker is created with ``metrics=``, it owns one :class:`Meter`.
The hot paths bump slots of it inline, with no coroutine frame of their own: a served action
is counted where its ``serve`` is awaited (the transit's ``_serve`` for a peer, the caller's
local branch in ``nerve._calls``; ``spec.slot``), the transit stamps each REQ it sends and
settles it when the call stops waiting, and each event handler (not a hot path) is wrapped
once, outermost, by ``nerve._serving``. A slot is a handful of integers and a fixed list of histogram
buckets; observing a duration is one ``bisect``. Nothing here knows Prometheus:
``nerve.metrics`` reads the slots when scraped (so a scrape costs the hot path nothing, and
the counters are exact).

Label values come from this node's own code: its services, actions and subscriptions, the
actions it calls (keyed by the name it called, the service label being that name's prefix,
never a peer's INFO) and the events it emits. Those a caller or a peer can vary are bounded:
at most :data:`MAX_SLOTS` remote actions and emitted event names (more are counted under
``other``), :data:`MAX_ERROR_KINDS` error kinds per slot, every value cut to
:data:`MAX_LABEL` characters. A peer cannot grow the label space.
"""

from __future__ import annotations

import weakref
from bisect import bisect_left
from typing import Any

__all__ = ["BUCKETS", "CANCELLED", "CallSlot", "error_kind", "MAX_LABEL", "MAX_SLOTS", "EventSlot", "Meter", "MAX_ERROR_KINDS", "TimedSlot"]

#: Histogram bucket upper bounds in seconds (Prometheus' ``le``), +Inf implied.
BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
#: Distinct (error name, code, type) label sets kept per slot.
MAX_ERROR_KINDS = 32
#: Distinct remote actions, and event names emitted / broadcast, kept per node.
MAX_SLOTS = 1000
#: Longest label value kept (longer ones are cut).
MAX_LABEL = 200
_OTHER = ("other", "", "")
#: the error kind of a call its caller stopped waiting for (cancelled)
CANCELLED = ("Cancelled", "", "")


class TimedSlot:
    """Counts, an ``active`` gauge, errors by kind and a latency histogram."""

    __slots__ = ("total", "active", "errors", "buckets", "sum")

    def __init__(self) -> None:
        self.total = 0
        self.active = 0
        self.errors: dict[tuple[str, str, str], int] = {}
        self.buckets = [0] * (len(BUCKETS) + 1)
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.buckets[bisect_left(BUCKETS, seconds)] += 1
        self.sum += seconds

    def failed(self, exc: BaseException | None) -> None:
        self.failed_as(error_kind(exc))

    def failed_as(self, kind: tuple[str, str, str]) -> None:
        errors = self.errors
        if kind not in errors and len(errors) >= MAX_ERROR_KINDS:
            kind = _OTHER
        errors[kind] = errors.get(kind, 0) + 1

    @property
    def error_total(self) -> int:
        return sum(self.errors.values())


class CallSlot(TimedSlot):
    """One action, served here (``local``) or called on other nodes (``remote``)."""

    __slots__ = ()


class EventSlot(TimedSlot):
    """One local event subscription (event, group, service)."""

    __slots__ = ()


def error_kind(exc: BaseException | None) -> tuple[str, str, str]:
    """(name, code, type) of an error as labels: a NerveError's wire name, code and type."""
    if exc is None:
        return ("Error", "", "")
    name = getattr(exc, "wire_name", None) or type(exc).__name__
    code = getattr(exc, "code", None)
    kind = getattr(exc, "type", None)
    return (str(name)[:64], str(code) if isinstance(code, int) else "",
            str(kind)[:64] if isinstance(kind, str) else "")


class Meter:
    """The slots of one broker (see the module's docstring)."""

    def __init__(self) -> None:
        #: (service, action) -> slot, for handlers run here
        self.local: dict[tuple[str, str], CallSlot] = {}
        #: (service, action) -> slot, for calls this node sent to others
        self.remote: dict[tuple[str, str], CallSlot] = {}
        self._remote_by_name: dict[str, CallSlot] = {}
        #: (event, service, group) -> slot, for event handlers run here
        self.events: dict[tuple[str, str, str], EventSlot] = {}
        #: event name -> emits / broadcasts made here
        self.emitted: dict[str, int] = {}
        self.broadcast: dict[str, int] = {}
        # streams of calls on this node (chunks counted as they pass, by Chain.watch)
        self.streams_opened = 0
        self.stream_bytes_sent = 0
        self.stream_bytes_received = 0
        self.stream_chunks_sent = 0
        self.stream_chunks_received = 0
        self._credit_wait_closed = 0.0
        self._open: weakref.WeakValueDictionary[int, Any] = weakref.WeakValueDictionary()

    def local_slot(self, service: str, action: str) -> CallSlot:
        key = (service, action)
        slot = self.local.get(key)
        if slot is None:
            slot = self.local[key] = CallSlot()
        return slot

    def remote_slot(self, action: str) -> CallSlot:
        """The slot of calls to ``action`` on other nodes (the name this node called)."""
        slot = self._remote_by_name.get(action)
        if slot is None:
            if len(self._remote_by_name) >= MAX_SLOTS:
                key = ("other", "other")
            else:
                name = action[:MAX_LABEL]
                key = (name.rpartition(".")[0], name)
            slot = self.remote.get(key)
            if slot is None:
                slot = self.remote[key] = CallSlot()
            if len(self._remote_by_name) < MAX_SLOTS:
                self._remote_by_name[action] = slot
        return slot

    def event_slot(self, event: str, service: str, group: str) -> EventSlot:
        key = (event, service, group)
        slot = self.events.get(key)
        if slot is None:
            slot = self.events[key] = EventSlot()
        return slot

    def count_emit(self, event: str, broadcast: bool) -> None:
        table = self.broadcast if broadcast else self.emitted
        count = table.get(event)
        if count is not None:
            table[event] = count + 1
        elif len(table) < MAX_SLOTS and len(event) <= MAX_LABEL:
            table[event] = 1
        else:
            table["other"] = table.get("other", 0) + 1

    # --- streams --------------------------------------------------------------------------

    def stream_watched(self, stream: Any) -> None:
        """A stream of a call on this node (``Chain.watch``): counted as opened; the time its
        producer waits for credit is read while it is open and kept when it closes."""
        key = id(stream)
        if self._open.get(key) is stream:
            return
        self._open[key] = stream
        self.streams_opened += 1
        self.stream_bytes_received += stream.bytes_received  # chunks that came before the watch
        self.stream_chunks_received += stream.chunks_received

        def on_closed() -> None:
            if self._open.pop(key, None) is stream:
                self._credit_wait_closed += stream.credit_wait

        stream.add_closed_callback(on_closed)

    def stream_sent(self, nbytes: int) -> None:
        self.stream_bytes_sent += nbytes
        self.stream_chunks_sent += 1

    def stream_received(self, nbytes: int) -> None:
        self.stream_bytes_received += nbytes
        self.stream_chunks_received += 1

    def credit_wait(self) -> float:
        """Seconds producers of this node's streams spent waiting for credit, so far."""
        return self._credit_wait_closed + sum(s.credit_wait for s in list(self._open.values()))
