"""The registry: known nodes, their services, action and event endpoints, and balancing.

It is a plain data structure updated by the transit (INFO, DISCONNECT, node loss) and the
broker (local services); it does no I/O. Strategies pick one endpoint among candidates.
"""

from __future__ import annotations

import functools
import random
import re
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from nerve.errors import ServiceNotAvailableError, ServiceNotFoundError
from nerve.statistics import RegistryStatistics

if TYPE_CHECKING:
    from nerve.context import Context
    from nerve.service import ActionSpec, EventSpec

__all__ = [
    "Node",
    "ActionEndpoint",
    "EventEndpoint",
    "Strategy",
    "RoundRobinStrategy",
    "RandomStrategy",
    "Registry",
    "match_event",
]


#: Offline nodes the registry remembers (for ``$node.list``); older ones are forgotten.
MAX_OFFLINE_NODES = 256
#: Seconds a node that left stays listed (Moleculer's cleanOfflineNodesTimeout: 10 minutes).
DEFAULT_FORGET_OFFLINE_AFTER = 600.0


@dataclass
class Node:
    id: str
    local: bool = False
    available: bool = True
    instance_id: str | None = None
    seq: int = 0
    hostname: str | None = None
    ip_list: list[str] = field(default_factory=list)
    client: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    services: list[dict[str, Any]] = field(default_factory=list)
    address: str | None = None
    cpu: float | None = None
    last_seen: float = field(default_factory=time.monotonic)
    #: when it went offline (the registry's monotonic clock)
    offline_since: float = 0.0

    def describe(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "available": self.available,
            "local": self.local,
            "instanceID": self.instance_id,
            "seq": self.seq,
            "hostname": self.hostname,
            "ipList": self.ip_list,
            "client": self.client,
            "cpu": self.cpu,
            "address": self.address,
        }


@dataclass(eq=False)
class ActionEndpoint:
    name: str
    node_id: str
    local: bool
    service: str
    spec: ActionSpec | None = None
    definition: dict[str, Any] = field(default_factory=dict)
    #: False while a middleware (the circuit breaker) wants calls kept off this endpoint:
    #: selection skips it while another endpoint is available
    available: bool = True
    #: the remote_action chain for this endpoint, built on its first call (``nerve._calls``)
    handler: Any = None
    #: that chain is the bare send (no middleware wrapped it): calls take the flat lane
    bare: bool = False
    #: the meter's slot of calls to this endpoint's action (metrics on), set on first use
    slot: Any = None

    def __repr__(self) -> str:
        return f"<ActionEndpoint {self.name}@{self.node_id}>"


@dataclass(eq=False)
class EventEndpoint:
    name: str
    group: str
    node_id: str
    local: bool
    service: str
    spec: EventSpec | None = None

    def __repr__(self) -> str:
        return f"<EventEndpoint {self.name}/{self.group}@{self.node_id}>"


class Strategy(Protocol):
    """Picks one endpoint among candidates (never empty).

    Optional: ``bind(registry)`` is called once with the registry that uses the strategy;
    ``async run(broker)`` runs in the broker's nursery while it runs; ``needs_context = True``
    makes calls pass an object with ``.params`` and ``.meta`` as ``ctx`` (else it may be None).
    """

    def select(self, key: str, endpoints: list[Any], ctx: Context | None) -> Any:
        """Pick one of ``endpoints`` (never empty) for the action or event ``key``; ``ctx`` is
        the call's context when the strategy needs it (``needs_context``)."""


class RoundRobinStrategy:
    """Each candidate in turn (the default)."""

    def __init__(self) -> None:
        self._counters: dict[str, int] = {}

    def select(self, key: str, endpoints: list[Any], ctx: Context | None) -> Any:
        """The next endpoint of ``endpoints`` in turn (one counter per action or event)."""
        n = self._counters.get(key, 0)
        self._counters[key] = n + 1
        return endpoints[n % len(endpoints)]


class RandomStrategy:
    """Picks an endpoint at random (``seed``: a reproducible sequence)."""
    def __init__(self, seed: int | None = None) -> None:
        self._random = random.Random(seed)

    def select(self, key: str, endpoints: list[Any], ctx: Context | None) -> Any:
        """A random endpoint of ``endpoints``."""
        return endpoints[self._random.randrange(len(endpoints))]


class _Glob:
    """A pattern with several wildcards, matched by simulating its automaton: time linear in
    the name for a given pattern. (As a backtracking regex, ``**.**.**...x`` against a long
    name takes exponential time, and patterns come from peers' INFO and HTTP clients.)"""

    __slots__ = ("tokens", "end")

    def __init__(self, pattern: str) -> None:
        tokens: list[str] = []
        i = 0
        while i < len(pattern):
            if pattern.startswith("**", i):
                if not tokens or tokens[-1] != "**":
                    if tokens and tokens[-1] == "*":
                        tokens[-1] = "**"  # '***' and '*' next to '**' add nothing
                    else:
                        tokens.append("**")
                i += 2
                continue
            c = pattern[i]
            if c == "*" and tokens and tokens[-1] in ("*", "**"):
                i += 1
                continue
            tokens.append(c)
            i += 1
        self.tokens = tokens
        self.end = len(tokens)

    def _close(self, states: set[int]) -> set[int]:
        tokens = self.tokens
        todo = list(states)
        while todo:
            i = todo.pop()
            if i < self.end and tokens[i] in ("*", "**") and i + 1 not in states:
                states.add(i + 1)
                todo.append(i + 1)
        return states

    def match(self, name: str) -> bool:
        tokens, end = self.tokens, self.end
        states = self._close({0})
        for ch in name:
            nxt: set[int] = set()
            for i in states:
                if i == end:
                    continue
                t = tokens[i]
                if t == "**" or (t == "*" and ch != "."):
                    nxt.add(i)
                elif t == ch or (t == "?" and ch != "."):
                    nxt.add(i + 1)
            if not nxt:
                return False
            states = self._close(nxt)
        return end in states


_MAX_PATTERN = 1024


@functools.lru_cache(maxsize=4096)
def _pattern(pattern: str) -> re.Pattern[str] | _Glob | None:
    if "*" not in pattern and "?" not in pattern:
        return None
    if pattern.count("*") + pattern.count("?") > 1 or len(pattern) > _MAX_PATTERN:
        return _Glob(pattern)
    out = []
    for c in pattern:
        if c == "*":
            out.append("[^.]*")
        elif c == "?":
            out.append("[^.]")
        else:
            out.append(re.escape(c))
    return re.compile("".join(out) + r"\Z")


def match_event(name: str, pattern: str) -> bool:
    """Moleculer's event-name matching: ``*`` is one segment's worth, ``**`` anything, ``?``
    one character of a segment. Linear in the name's length, whatever the pattern."""
    rx = _pattern(pattern)
    if rx is None:
        return name == pattern
    if isinstance(rx, _Glob):
        return rx.match(name)
    return rx.match(name) is not None


class Registry:
    def __init__(self, local_node_id: str, *, strategy: Strategy | None = None,
                 prefer_local: bool = True) -> None:
        self.local_node_id = local_node_id
        self.strategy: Strategy = strategy or RoundRobinStrategy()
        bind = getattr(self.strategy, "bind", None)
        if callable(bind):
            bind(self)
        self.prefer_local = prefer_local
        #: seconds a node that left stays listed as offline (None: until MAX_OFFLINE_NODES
        #: pushes it out)
        self.forget_offline_after: float | None = DEFAULT_FORGET_OFFLINE_AFTER
        self.nodes: dict[str, Node] = {local_node_id: Node(local_node_id, local=True)}
        self.actions: dict[str, list[ActionEndpoint]] = {}
        self.events: list[EventEndpoint] = []
        self._event_cache: dict[str, list[EventEndpoint]] = {}

    # --- local services ---------------------------------------------------------------

    def add_local(self, service_name: str, actions: list[ActionSpec], events: list[EventSpec]) -> None:
        for a in actions:
            self.actions.setdefault(a.name, []).append(
                ActionEndpoint(a.name, self.local_node_id, True, service_name, a, a.describe()))
        for e in events:
            self.events.append(EventEndpoint(e.name, e.group, self.local_node_id, True, service_name, e))
        self._event_cache.clear()

    def remove_local(self, service_name: str) -> None:
        self._remove(lambda ep: ep.local and ep.service == service_name)

    # --- remote nodes -----------------------------------------------------------------

    def update_node(self, node_id: str, *, services: list[dict[str, Any]], instance_id: str | None,
                    seq: int | None, hostname: str | None = None, ip_list: list[str] | None = None,
                    client: dict[str, Any] | None = None, metadata: dict[str, Any] | None = None,
                    address: str | None = None) -> bool:
        """Replace a remote node's description; returns True if the node is new or was offline."""
        node = self.nodes.get(node_id)
        fresh = node is None or not node.available
        if node is None:
            node = self.nodes[node_id] = Node(node_id)
        node.available = True
        node.instance_id = instance_id
        node.seq = seq or 0
        node.hostname = hostname
        node.ip_list = list(ip_list or [])
        node.client = dict(client or {})
        node.metadata = dict(metadata or {})
        node.services = services
        if address is not None:
            node.address = address
        node.last_seen = time.monotonic()
        # An action the INFO describes as before keeps its endpoint object: what middlewares
        # hold or set on it (a circuit breaker's ``available``, the cached remote_action chain)
        # stays valid. A changed definition gets a fresh endpoint.
        previous = {(ep.name, ep.service): ep for eps in self.actions.values()
                    for ep in eps if ep.node_id == node_id}
        self._remove(lambda ep: ep.node_id == node_id)
        for svc in services:
            if not isinstance(svc, dict):
                continue
            sname = str(svc.get("fullName") or svc.get("name") or "")
            for aname, adef in (svc.get("actions") or {}).items():
                if isinstance(adef, dict) and adef.get("protected"):
                    continue
                definition = adef if isinstance(adef, dict) else {}
                endpoint = previous.get((aname, sname))
                if endpoint is None or endpoint.definition != definition:
                    endpoint = ActionEndpoint(aname, node_id, False, sname, None, definition)
                self.actions.setdefault(aname, []).append(endpoint)
            for ename, edef in (svc.get("events") or {}).items():
                group = (edef.get("group") if isinstance(edef, dict) else None) or sname
                self.events.append(EventEndpoint(ename, group, node_id, False, sname))
        self._event_cache.clear()
        return fresh

    def node_gone(self, node_id: str) -> bool:
        """Mark a remote node unavailable and drop its endpoints and description; True if it
        was available. At most ``MAX_OFFLINE_NODES`` offline nodes are remembered (the ones
        seen longest ago are forgotten), so nodes that come and go never grow the registry
        without bound."""
        node = self.nodes.get(node_id)
        if node is None or node.local:
            return False
        was = node.available
        if was:
            node.offline_since = time.monotonic()
        node.available = False
        node.services = []
        node.metadata = {}
        node.client = {}
        node.ip_list = []
        node.hostname = None
        node.cpu = None
        self._remove(lambda ep: ep.node_id == node_id)
        offline = [n for n in self.nodes.values() if not n.available and not n.local]
        if len(offline) > MAX_OFFLINE_NODES:
            offline.sort(key=lambda n: n.last_seen)
            for old in offline[:len(offline) - MAX_OFFLINE_NODES]:
                del self.nodes[old.id]
        self.forget_offline()
        return was

    def forget_offline(self) -> list[str]:
        """Forget the nodes offline for longer than ``forget_offline_after`` seconds (as
        Moleculer's ``cleanOfflineNodesTimeout``); returns their ids. Called as nodes go and
        when the node list is read, so no task of its own is needed."""
        after = self.forget_offline_after
        if after is None:
            return []
        now = time.monotonic()
        gone = [n.id for n in self.nodes.values()
                if not n.available and not n.local and now - n.offline_since >= after]
        for node_id in gone:
            del self.nodes[node_id]
        return gone

    def _remove(self, pred: Any) -> None:
        for name in list(self.actions):
            kept = [ep for ep in self.actions[name] if not pred(ep)]
            if kept:
                self.actions[name] = kept
            else:
                del self.actions[name]
        self.events = [ep for ep in self.events if not pred(ep)]
        self._event_cache.clear()

    # --- lookups ----------------------------------------------------------------------

    def select_action(self, name: str, *, node_id: str | None = None,
                      exclude: frozenset[str] | set[str] = frozenset(),
                      ctx: Context | None = None) -> ActionEndpoint:
        endpoints = self.actions.get(name)
        if not endpoints:
            raise ServiceNotFoundError(f"Service '{name}' is not found.", data={"action": name, "nodeID": node_id})
        if node_id is not None:
            for ep in endpoints:
                if ep.node_id == node_id:
                    return ep
            raise ServiceNotFoundError(f"Service '{name}' is not found on '{node_id}' node.",
                                       data={"action": name, "nodeID": node_id})
        if len(endpoints) == 1 and not exclude:
            return endpoints[0]
        candidates = endpoints
        if exclude:
            others = [ep for ep in endpoints if ep.node_id not in exclude]
            candidates = others or endpoints
        if not all(ep.available for ep in candidates):
            candidates = [ep for ep in candidates if ep.available] or candidates
        if self.prefer_local:
            local = [ep for ep in candidates if ep.local]
            if local:
                candidates = local
        if not candidates:  # pragma: no cover - endpoints is non-empty
            raise ServiceNotAvailableError(f"Service '{name}' is not available.", data={"action": name})
        if len(candidates) == 1:
            return candidates[0]
        return self.strategy.select(name, candidates, ctx)

    def event_endpoints(self, event: str) -> list[EventEndpoint]:
        found = self._event_cache.get(event)
        if found is None:
            found = [ep for ep in self.events if match_event(event, ep.name)]
            self._event_cache[event] = found
        return found

    def pick_per_group(self, event: str, groups: list[str] | None,
                       ctx: Context | None, *, local_only: bool = False) -> list[EventEndpoint]:
        """One endpoint per (subscription, group), as Moleculer balances events: balanced,
        local preferred, limited to ``groups`` if given (and to local endpoints if asked)."""
        lists: dict[tuple[str, str], list[EventEndpoint]] = {}
        for ep in self.event_endpoints(event):
            if groups is not None and ep.group not in groups:
                continue
            if local_only and not ep.local:
                continue
            lists.setdefault((ep.name, ep.group), []).append(ep)
        chosen = []
        for (name, group), eps in lists.items():
            if self.prefer_local and not local_only:
                local = [ep for ep in eps if ep.local]
                eps = local or eps
            chosen.append(eps[0] if len(eps) == 1 else self.strategy.select(f"{name}\0{group}", eps, ctx))
        return chosen

    def statistics(self) -> RegistryStatistics:
        """A snapshot of what the registry knows (services: those with an action or an event)."""
        action_eps = [ep for eps in self.actions.values() for ep in eps]
        instances = {(ep.node_id, ep.service) for ep in action_eps}
        instances.update((ep.node_id, ep.service) for ep in self.events)
        return RegistryStatistics(
            nodes=len(self.nodes), nodes_online=sum(1 for n in self.nodes.values() if n.available),
            services=len({name for _, name in instances}), service_endpoints=len(instances),
            actions=sum(1 for eps in self.actions.values() if eps), action_endpoints=len(action_eps),
            events=len({ep.name for ep in self.events}), event_endpoints=len(self.events))

    def available_nodes(self) -> list[Node]:
        return [n for n in self.nodes.values() if n.available]
