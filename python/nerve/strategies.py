"""Moleculer's load-balancing strategies beyond round-robin and random: lowest CPU usage, lowest
latency (measured with pings) and sharding by a key of the call on a consistent-hash ring.

A strategy only chooses among the candidates the registry hands it (never an empty list) and
does no I/O in ``select``; the latency strategy pings from ``run``, a task the broker owns.

The hooks a strategy may have, besides ``select(key, endpoints, ctx)``:

- ``bind(registry)``: called once by the registry that uses it (the CPU strategy reads
  ``registry.nodes[node_id].cpu`` from there);
- ``async run(broker)``: run in the broker's nursery while the broker runs;
- ``needs_context = True``: the call path passes ``ctx`` (``.params``, ``.meta``), not None.
"""

from __future__ import annotations

import hashlib
import math
import random
from bisect import bisect_left
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import msgspec
import trio

from nerve.errors import NerveError, RequestTimeoutError

if TYPE_CHECKING:
    from nerve.registry import Node, Registry

__all__ = ["CpuUsageStrategy", "LatencyStrategy", "ShardStrategy", "HashRing"]


class _Endpoint(Protocol):
    @property
    def node_id(self) -> str: ...

    @property
    def local(self) -> bool: ...


E = TypeVar("E", bound=_Endpoint)


class _NodeList(Protocol):
    def available_nodes(self) -> list[Node]: ...


class _PingingBroker(Protocol):
    """What ``LatencyStrategy.run`` uses of a broker."""

    @property
    def registry(self) -> _NodeList: ...

    async def ping(self, node_id: str, timeout: float = ...) -> float: ...


def _sample(rng: random.Random, endpoints: Sequence[E], sample_count: int) -> list[E]:
    """``sample_count`` distinct candidates in random order (all of them if there are no more,
    or if ``sample_count`` is 0 or less), so that ties do not always go to the first one."""
    n = len(endpoints)
    count = n if sample_count <= 0 or sample_count > n else sample_count
    return rng.sample(endpoints, count)


def _number(value: Any) -> float | None:
    """A usable measure, or None (unknown, not a number, NaN)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        return None
    return float(value)


class CpuUsageStrategy:
    """The candidate whose node has the lowest CPU usage, among ``sample_count`` random ones.

    The usage is the ``cpu`` of the node's last heartbeat (``Node.cpu``). A sampled candidate
    below ``low_cpu_usage`` percent is taken at once; a node of unknown usage is never preferred
    to a known one; if no sampled candidate's usage is known, the choice is random.
    ``sample_count <= 0`` looks at every candidate.
    """

    def __init__(self, sample_count: int = 3, low_cpu_usage: float = 10, *, seed: int | None = None) -> None:
        self.sample_count = sample_count
        self.low_cpu_usage = low_cpu_usage
        self._random = random.Random(seed)
        self._registry: Registry | None = None

    def bind(self, registry: Registry) -> None:
        """Called by the registry this strategy serves (it reads the nodes' CPU there)."""
        self._registry = registry

    def cpu(self, node_id: str) -> float | None:
        """The node's last reported CPU usage in percent, or None if unknown."""
        node = self._registry.nodes.get(node_id) if self._registry is not None else None
        return None if node is None else _number(node.cpu)

    def select(self, key: str, endpoints: Sequence[E], ctx: Any) -> E:
        """The endpoint of the node with the lowest CPU among a random sample (see the class)."""
        best: E | None = None
        best_cpu = math.inf
        for ep in _sample(self._random, endpoints, self.sample_count):
            cpu = self.cpu(ep.node_id)
            if cpu is None:
                continue
            if cpu < self.low_cpu_usage:
                return ep
            if cpu < best_cpu:
                best, best_cpu = ep, cpu
        if best is not None:
            return best
        return endpoints[self._random.randrange(len(endpoints))]


class LatencyStrategy:
    """The candidate whose node answers pings fastest, among ``sample_count`` random ones.

    ``run(broker)`` pings every available remote node at once when the broker starts and then
    every ``ping_interval`` seconds (at most ``max_concurrent_pings`` at a time); a node that
    appears in between is pinged within a second. A node's latency is the mean of its last
    ``collect_count`` round trips; a ping unanswered within ``ping_timeout`` counts as a round
    trip of ``ping_timeout`` (so a node that stops answering drifts to the back); a node gone
    from the registry is forgotten. The local node's latency is 0 (it is never pinged).

    ``select`` takes at once a sampled candidate under ``lowest_latency`` milliseconds, else
    the lowest measured one; if none of the sampled candidates is measured, a random one.
    """

    #: How often ``run`` looks for nodes that have not been measured yet (seconds).
    discovery_interval = 1.0

    def __init__(self, sample_count: int = 5, lowest_latency: float = 10, ping_interval: float = 10,
                 collect_count: int = 5, *, ping_timeout: float = 2.0, max_concurrent_pings: int = 5,
                 seed: int | None = None) -> None:
        if ping_interval <= 0 or collect_count < 1 or ping_timeout <= 0 or max_concurrent_pings < 1:
            raise ValueError("need ping_interval > 0, collect_count >= 1, ping_timeout > 0, "
                             "max_concurrent_pings >= 1")
        self.sample_count = sample_count
        self.lowest_latency = lowest_latency
        self.ping_interval = ping_interval
        self.collect_count = collect_count
        self.ping_timeout = min(ping_timeout, ping_interval)
        self.max_concurrent_pings = max_concurrent_pings
        self._random = random.Random(seed)
        self._history: dict[str, deque[float]] = {}
        self._mean: dict[str, float] = {}

    # --- measurements -------------------------------------------------------------------

    def record(self, node_id: str, seconds: float) -> None:
        """Add one round-trip time (seconds) to the node's moving average."""
        history = self._history.get(node_id)
        if history is None:
            history = self._history[node_id] = deque(maxlen=self.collect_count)
        history.append(seconds)
        self._mean[node_id] = sum(history) / len(history)

    def latency(self, node_id: str) -> float | None:
        """Mean round trip to the node in seconds over its last pings, or None if not measured."""
        return self._mean.get(node_id)

    def forget(self, node_id: str) -> None:
        """Drop what was measured of ``node_id`` (it left)."""
        self._history.pop(node_id, None)
        self._mean.pop(node_id, None)

    # --- choice -------------------------------------------------------------------------

    def select(self, key: str, endpoints: Sequence[E], ctx: Any) -> E:
        """The endpoint of the node with the lowest measured latency among a random sample."""
        low = self.lowest_latency / 1000.0
        best: E | None = None
        best_latency = math.inf
        for ep in _sample(self._random, endpoints, self.sample_count):
            latency = 0.0 if ep.local else self._mean.get(ep.node_id)
            if latency is None:
                continue
            if latency < low:
                return ep
            if latency < best_latency:
                best, best_latency = ep, latency
        if best is not None:
            return best
        return endpoints[self._random.randrange(len(endpoints))]

    # --- pinging ------------------------------------------------------------------------

    async def run(self, broker: _PingingBroker) -> None:
        """Measure the remote nodes until cancelled (the broker runs this while it runs)."""
        limiter = trio.CapacityLimiter(self.max_concurrent_pings)
        next_round = trio.current_time()
        while True:
            live = {n.id for n in broker.registry.available_nodes() if not n.local}
            for gone in [node_id for node_id in self._history if node_id not in live]:
                self.forget(gone)
            if trio.current_time() >= next_round:
                next_round = trio.current_time() + self.ping_interval
                targets = sorted(live)
            else:
                targets = sorted(live.difference(self._history))
            if targets:
                async with trio.open_nursery() as nursery:
                    for node_id in targets:
                        nursery.start_soon(self._ping, broker, node_id, limiter)
            await trio.sleep(max(0.0, min(self.discovery_interval, next_round - trio.current_time())))

    async def _ping(self, broker: _PingingBroker, node_id: str, limiter: trio.CapacityLimiter) -> None:
        async with limiter:
            try:
                elapsed = await broker.ping(node_id, timeout=self.ping_timeout)
            except RequestTimeoutError:
                elapsed = self.ping_timeout
            except NerveError:  # not reachable right now: measured at a later tick
                return
        self.record(node_id, elapsed)


def _hash(text: str, ring_size: int) -> int:
    return int.from_bytes(hashlib.md5(text.encode("utf-8", "surrogatepass")).digest()[:8], "big") % ring_size


class HashRing:
    """A consistent-hash ring of node ids, ``vnodes`` points each, on ``[0, ring_size)``.

    A key belongs to the node owning the first point at or after the key's hash (wrapping
    round). A node's points depend only on its own id, so removing a node moves only the keys
    it owned (to the next points along), and adding one moves only keys to the newcomer.
    """

    __slots__ = ("nodes", "ring_size", "_positions", "_owners")

    def __init__(self, node_ids: Iterable[str], *, vnodes: int = 10, ring_size: int = 2**32) -> None:
        if vnodes < 1 or ring_size < 1:
            raise ValueError("need vnodes >= 1 and ring_size >= 1")
        self.nodes = tuple(sorted(set(node_ids)))
        if not self.nodes:
            raise ValueError("a ring needs at least one node")
        self.ring_size = ring_size
        points = sorted((_hash(f"{node_id}#{i}", ring_size), node_id)
                        for node_id in self.nodes for i in range(vnodes))
        self._positions = [p for p, _ in points]
        self._owners = [n for _, n in points]

    def node_for(self, key: str) -> str:
        """The node ``key`` maps to: the first virtual node clockwise from its hash."""
        i = bisect_left(self._positions, _hash(key, self.ring_size))
        return self._owners[i if i < len(self._owners) else 0]

    def shares(self) -> dict[str, float]:
        """The fraction of the ring each node owns (for checks and diagnostics)."""
        owned = dict.fromkeys(self.nodes, 0)
        prev = self._positions[-1] - self.ring_size
        for pos, owner in zip(self._positions, self._owners):
            owned[owner] += pos - prev
            prev = pos
        return {node_id: width / self.ring_size for node_id, width in owned.items()}


def _lookup(source: Any, path: str) -> Any:
    """``source[path]``, else the dotted ``path`` through mappings and msgspec Structs."""
    if isinstance(source, Mapping) and path in source:
        return source[path]
    for part in path.split("."):
        if isinstance(source, Mapping):
            source = source.get(part)
        elif isinstance(source, msgspec.Struct):
            source = getattr(source, part, None)
        else:
            return None
        if source is None:
            return None
    return source


class ShardStrategy:
    """The same key goes to the same node: a consistent-hash ring of the candidates' nodes.

    The key is ``ctx.params[shard_key]`` (a dotted path reaches into nested params), or
    ``ctx.meta[name]`` for ``shard_key="#name"``, or ``shard_key(ctx)`` if it is callable. A
    call without a key (or without a context) goes round-robin. While the candidates' nodes
    stay the same a key always lands on the same node; when a node leaves, only its keys move.
    One ring is kept per set of candidate nodes (the last 64 sets) and the node of the last
    ``cache_size`` keys is remembered.
    """

    needs_context = True
    max_rings = 64

    def __init__(self, shard_key: str | Callable[[Any], Any] = "user_id", vnodes: int = 10,
                 ring_size: int = 2**32, cache_size: int = 1000) -> None:
        if vnodes < 1 or ring_size < 1 or cache_size < 0:
            raise ValueError("need vnodes >= 1, ring_size >= 1 and cache_size >= 0")
        self.shard_key = shard_key
        self.vnodes = vnodes
        self.ring_size = ring_size
        self.cache_size = cache_size
        self._rings: OrderedDict[tuple[str, ...], HashRing] = OrderedDict()
        self._cache: OrderedDict[tuple[tuple[str, ...], str], str] = OrderedDict()
        self._counters: dict[str, int] = {}

    def key_of(self, ctx: Any) -> str | None:
        """The shard key of a call, as text, or None if it has none."""
        if ctx is None or not self.shard_key:
            return None
        if callable(self.shard_key):
            value = self.shard_key(ctx)
        elif self.shard_key.startswith("#"):
            value = _lookup(getattr(ctx, "meta", None), self.shard_key[1:])
        else:
            value = _lookup(getattr(ctx, "params", None), self.shard_key)
        return None if value is None else str(value)

    def ring(self, node_ids: Iterable[str]) -> HashRing:
        """The consistent-hash ring over ``endpoints``' nodes (cached while they stay the same)."""
        nodes = tuple(sorted(set(node_ids)))
        ring = self._rings.get(nodes)
        if ring is None:
            ring = self._rings[nodes] = HashRing(nodes, vnodes=self.vnodes, ring_size=self.ring_size)
            if len(self._rings) > self.max_rings:
                self._rings.popitem(last=False)
        else:
            self._rings.move_to_end(nodes)
        return ring

    def node_for(self, key: str, node_ids: Iterable[str]) -> str:
        """The node that ``key`` belongs to among ``node_ids``."""
        nodes = tuple(sorted(set(node_ids)))
        entry = (nodes, key)
        found = self._cache.get(entry)
        if found is not None:
            self._cache.move_to_end(entry)
            return found
        found = self.ring(nodes).node_for(key)
        if self.cache_size:
            self._cache[entry] = found
            if len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return found

    def select(self, key: str, endpoints: Sequence[E], ctx: Any) -> E:
        """The endpoint the call's shard key maps to on the ring (round-robin without a key)."""
        shard = self.key_of(ctx)
        if shard is None:
            n = self._counters.get(key, 0)
            self._counters[key] = n + 1
            return endpoints[n % len(endpoints)]
        node_id = self.node_for(shard, (ep.node_id for ep in endpoints))
        for ep in endpoints:
            if ep.node_id == node_id:
                return ep
        raise AssertionError("the ring holds only the candidates' nodes")  # pragma: no cover
