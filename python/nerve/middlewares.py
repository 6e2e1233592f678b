"""Built-in fault-tolerance middlewares: :class:`CircuitBreaker` and :class:`Bulkhead`.

They see calls only through the middleware hooks (``nerve.middleware``) and keep their state
here; the only thing they touch outside is ``ActionEndpoint.available``, which endpoint
selection reads. Fallbacks are not here: they are part of the call path itself.

Theory of operation of a circuit (one per endpoint, that is per action on a node, on the
calling side; Moleculer's ``src/middlewares/circuit-breaker.js``)::

    CLOSED --(>= min_request_count calls settled in the window, failure rate >= threshold)--> OPEN
    OPEN --(half_open_time elapsed)--> HALF_OPEN                    (endpoint available again)
    HALF_OPEN --(the next call is let through: the probe)--> HALF_OPEN_WAIT (unavailable again)
    HALF_OPEN_WAIT --(the probe succeeds)--> CLOSED                 (counters cleared)
    HALF_OPEN_WAIT --(the probe fails, as check() says)--> OPEN
    HALF_OPEN_WAIT --(the probe ends with an error check() ignores, or is cancelled)--> HALF_OPEN
    HALF_OPEN_WAIT --(the probe out for longer than half_open_time)--> HALF_OPEN (anti-stick;
                      the late probe's outcome then only counts)

While OPEN or HALF_OPEN_WAIT the endpoint is marked unavailable, so selection skips it while
another endpoint serves the action; a call that still reaches it (no other endpoint, or
``node_id=``) fails fast with ``CircuitBreakerOpenError`` without being sent. Counters cover
fixed windows of ``window_time`` seconds (boundaries at multiples of ``window_time`` from the
first call this middleware saw) and restart at each boundary; a circuit in which no call
settled for a whole window, and that is neither OPEN nor waiting for its probe, is forgotten
(Moleculer's ``resetStore``). Outcomes of calls that are not the probe only count. There are
no timers: every transition is computed from ``trio.current_time()`` when a call of the action
passes (so the breaker runs on ``trio.testing.MockClock``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import trio

from nerve.errors import BrokerOptionsError, CircuitBreakerOpenError, NerveError, QueueIsFullError, ServiceSchemaError
from nerve.middleware import ActionHandler, ActionInfo, EventHandler, EventInfo, Middleware

if TYPE_CHECKING:
    from nerve.context import Context

__all__ = [
    "Bulkhead",
    "BulkheadStatistics",
    "CircuitBreaker",
    "CircuitStatistics",
    "default_check",
]

log = logging.getLogger("nerve.middlewares")

CircuitState = Literal["closed", "open", "half_open", "half_open_wait"]
CLOSED: CircuitState = "closed"
OPEN: CircuitState = "open"
HALF_OPEN: CircuitState = "half_open"
HALF_OPEN_WAIT: CircuitState = "half_open_wait"


def default_check(err: BaseException) -> bool:
    """Moleculer's default: a failure is a server-side error (``code >= 500``: 5xx, timeouts,
    a node gone); any exception that is not a ``NerveError`` counts too."""
    return not isinstance(err, NerveError) or err.code >= 500


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# --- circuit breaker --------------------------------------------------------------------


@dataclass(frozen=True)
class _BreakerOptions:
    threshold: float
    min_request_count: int
    window_time: float
    half_open_time: float
    check: Callable[[BaseException], bool]

    def problems(self) -> list[str]:
        out = []
        if not (_number(self.threshold) and 0 < self.threshold <= 1):
            out.append(f"threshold must be a number in (0, 1], not {self.threshold!r}")
        if not (isinstance(self.min_request_count, int) and not isinstance(self.min_request_count, bool)
                and self.min_request_count >= 0):
            out.append(f"min_request_count must be an int >= 0, not {self.min_request_count!r}")
        if not (_number(self.window_time) and self.window_time > 0):
            out.append(f"window_time must be a number of seconds > 0, not {self.window_time!r}")
        if not (_number(self.half_open_time) and self.half_open_time >= 0):
            out.append(f"half_open_time must be a number of seconds >= 0, not {self.half_open_time!r}")
        if not callable(self.check):
            out.append(f"check must be a callable, not {self.check!r}")
        return out


_BREAKER_KEYS = ("threshold", "min_request_count", "window_time", "half_open_time")


@dataclass(frozen=True)
class CircuitStatistics:
    """One circuit as :meth:`CircuitBreaker.statistics` sees it: its state, and the calls
    settled and the failures counted in the current window."""

    state: CircuitState
    requests: int
    failures: int


class _Circuit:
    """The state of one endpoint (action on a node); see the module's theory of operation."""

    __slots__ = ("action", "node_id", "endpoint", "options", "state", "count", "failures",
                 "window_start", "window_end", "changed_at", "probe", "alive")

    def __init__(self, action: str, node_id: str, endpoint: Any, options: _BreakerOptions,
                 window_start: float) -> None:
        self.action = action
        self.node_id = node_id
        self.endpoint = endpoint
        self.options = options
        self.state: CircuitState = CLOSED
        self.count = 0
        self.failures = 0
        self.window_start = window_start
        self.window_end = window_start + options.window_time
        self.changed_at = window_start
        self.probe: object | None = None
        #: False once the breaker forgot it (a wrapper's cached reference is then stale)
        self.alive = True

    def _boundaries(self, now: float) -> int:
        """How many window boundaries passed since the current window started."""
        return int((now - self.window_start) // self.options.window_time)

    def forgettable(self, now: float) -> bool:
        """True when this circuit's next ``roll`` would leave it as a fresh one would be: no
        call settled for a whole window and it is neither OPEN nor waiting for its probe."""
        if self.state not in (CLOSED, HALF_OPEN):
            return False
        passed = self._boundaries(now)
        return passed >= 2 or (passed == 1 and (self.count == 0 or self.state == CLOSED))

    def roll(self, now: float) -> None:
        """Move to the window that holds ``now``: counters restart (state kept), and a circuit
        in which no call settled for a whole window is forgotten (back to CLOSED)."""
        passed = self._boundaries(now)
        if passed <= 0:
            return
        if self.forgettable(now) and self.state == HALF_OPEN:
            self._set(CLOSED, now)
        self.window_start += passed * self.options.window_time
        self.window_end = self.window_start + self.options.window_time
        self.count = 0
        self.failures = 0

    def wake(self, now: float) -> None:
        """Timed transitions: OPEN becomes HALF_OPEN once ``half_open_time`` has passed, and so
        does HALF_OPEN_WAIT once its probe has been out for longer than that (the probe's
        outcome then only counts, as in Moleculer)."""
        due = self.changed_at + self.options.half_open_time
        if (self.state == OPEN and now >= due) or (self.state == HALF_OPEN_WAIT and now > due):
            self.probe = None
            self._set(HALF_OPEN, now)

    def admit(self, now: float) -> object | None:
        """Let a call through (returning its probe token if it is the probe) or raise."""
        if self.state == CLOSED:
            return None
        if self.state == HALF_OPEN:
            self.probe = object()
            self._set(HALF_OPEN_WAIT, now)
            return self.probe
        # node_id: the error is about that node, so a caller further up, which receives it
        # relayed by this node, does not count it against this node.
        raise CircuitBreakerOpenError(
            f"Circuit breaker is open on '{self.action}' action on '{self.node_id}' node.",
            data={"action": self.action, "nodeID": self.node_id}, node_id=self.node_id)

    def success(self, now: float, probe: object | None) -> None:
        self.count += 1
        if probe is not None and probe is self.probe:
            self._close(now)
        else:
            self.check_threshold(now)

    def failure(self, now: float, probe: object | None) -> None:
        self.count += 1
        self.failures += 1
        if probe is not None and probe is self.probe:
            self._trip(now)
        else:
            self.check_threshold(now)

    def no_verdict(self, now: float, probe: object | None) -> None:
        """The call ended with an error ``check`` ignores, or was cancelled: not counted; a
        probe that ends so tells nothing, and the next call probes again."""
        if probe is not None and probe is self.probe:
            self.probe = None
            self._set(HALF_OPEN, now)

    def check_threshold(self, now: float) -> None:
        if (self.state == CLOSED and self.count >= self.options.min_request_count
                and self.failures / self.count >= self.options.threshold):
            self._trip(now)

    def _trip(self, now: float) -> None:
        self.probe = None
        self._set(OPEN, now)
        log.warning("circuit breaker opened on %r at %r: %d failures in %d calls",
                    self.action, self.node_id, self.failures, self.count)

    def _close(self, now: float) -> None:
        self.probe = None
        self.count = 0
        self.failures = 0
        self._set(CLOSED, now)
        log.info("circuit breaker closed on %r at %r", self.action, self.node_id)

    def _set(self, state: CircuitState, now: float) -> None:
        self.state = state
        self.changed_at = now
        self.endpoint.available = state in (CLOSED, HALF_OPEN)

    def statistics(self) -> CircuitStatistics:
        return CircuitStatistics(self.state, self.count, self.failures)


class CircuitBreaker(Middleware):
    """Stop calling an endpoint (an action on a node) that keeps failing, and probe it again
    later (Moleculer's circuit breaker; the states are in this module's docstring).

    A circuit opens once at least ``min_request_count`` calls settled within the current
    window of ``window_time`` seconds and at least ``threshold`` of them failed; after
    ``half_open_time`` seconds one probe call is let through. ``check(err)`` says which errors
    count as failures (default :func:`default_check`: ``code >= 500``); an error raised by a
    third node (its ``node_id`` is neither the endpoint's node nor this one) never counts, nor
    does a cancelled call. Other errors are not counted at all, as in Moleculer.

    Wraps the calls this node makes: ``remote_action`` (each attempt sent to another node) and
    ``local_action`` for the calls made on this node itself (calls served for other nodes pass
    through untouched: their callers keep their own circuits). An action turns its circuit off
    with the property ``circuit_breaker={"enabled": False}`` and overrides any numeric option
    the same way, e.g. ``@action(circuit_breaker={"threshold": 0.3})``; remote actions carry
    their properties in INFO, so every caller applies them. Times are in seconds.

    One instance serves one broker; its state is cleared when that broker starts.
    """

    def __init__(self, threshold: float = 0.5, min_request_count: int = 20, window_time: float = 60,
                 half_open_time: float = 10, check: Callable[[BaseException], bool] | None = None) -> None:
        self.options = _BreakerOptions(threshold, min_request_count, window_time, half_open_time,
                                       default_check if check is None else check)
        problems = self.options.problems()
        if problems:
            raise BrokerOptionsError("CircuitBreaker: " + "; ".join(problems))
        self._circuits: dict[tuple[str, str], _Circuit] = {}
        #: the circuits that are not CLOSED, by action: the ones a call of the action may wake
        self._tripped: dict[str, set[_Circuit]] = {}
        self._epoch: float | None = None
        self._next_prune = -math.inf

    # --- hooks ----------------------------------------------------------------------------

    async def started(self, broker: Any) -> None:
        self._circuits.clear()
        self._tripped.clear()
        self._epoch = None
        self._next_prune = -math.inf

    def remote_action(self, next: ActionHandler, action: ActionInfo) -> ActionHandler:
        return self._wrap(next, action, local=False)

    def local_action(self, next: ActionHandler, action: ActionInfo) -> ActionHandler:
        return self._wrap(next, action, local=True)

    # --- introspection --------------------------------------------------------------------

    def statistics(self, action: str, node_id: str) -> CircuitStatistics:
        """The circuit of ``action`` on ``node_id`` (closed and empty if it has none)."""
        circuit = self._circuits.get((action, node_id))
        if circuit is None:
            return CircuitStatistics(CLOSED, 0, 0)
        now = trio.current_time()
        circuit.wake(now)
        circuit.roll(now)
        self._track(circuit)
        return circuit.statistics()

    # --- the wrapper ----------------------------------------------------------------------

    def _options_for(self, action: ActionInfo) -> _BreakerOptions | None:
        """This breaker's options with the action's ``circuit_breaker`` property over them;
        None when the property turns it off. Bad values in the property are logged and
        ignored (they may come from another node's INFO)."""
        override = action.properties.get("circuit_breaker") if action.properties else None
        if override is None:
            return self.options
        if not isinstance(override, Mapping):
            log.warning("action %r: circuit_breaker property %r is not a dict; ignored", action.name, override)
            return self.options
        if override.get("enabled", True) is False:
            return None
        values = {k: override[k] for k in _BREAKER_KEYS if k in override}
        unknown = set(override) - set(_BREAKER_KEYS) - {"enabled"}
        if unknown:
            log.warning("action %r: unknown circuit_breaker options %s ignored", action.name, sorted(unknown))
        if not values:
            return self.options
        merged = _BreakerOptions(**{**self.options.__dict__, **values})
        problems = merged.problems()
        if problems:
            log.warning("action %r: circuit_breaker property ignored: %s", action.name, "; ".join(problems))
            return self.options
        return merged

    def _wrap(self, next: ActionHandler, action: ActionInfo, *, local: bool) -> ActionHandler:
        options = self._options_for(action)
        if options is None:
            return next
        name = action.name
        tripped = self._tripped
        current_time = trio.current_time
        #: the circuit this wrapper saw last, for the fast lane (a closed circuit within its
        #: window, no circuit of the action waiting for a timed transition)
        last: list[_Circuit | None] = [None]

        async def circuit_breaker(ctx: Context) -> Any:
            if local and ctx.node_id is not None and ctx.node_id != ctx.broker.node_id:
                return await next(ctx)  # served for another node: its caller has the circuit
            endpoint = ctx.endpoint
            now = current_time()
            circuit = last[0]
            if (circuit is not None and circuit.alive and circuit.endpoint is endpoint and circuit.state == CLOSED
                    and now < circuit.window_end and name not in tripped):
                probe = None
            else:
                self._wake(name, now)
                circuit = last[0] = self._circuit(name, endpoint, options, now, admitting=True)
                probe = circuit.admit(now)
            try:
                result = await next(ctx)
            except Exception as exc:
                now = current_time()
                circuit = self._circuit(name, endpoint, options, now)
                if circuit.options.check(exc) and _counts_against(exc, endpoint.node_id, ctx.broker.node_id):
                    circuit.failure(now, probe)
                else:
                    circuit.no_verdict(now, probe)
                self._track(circuit)
                raise
            except BaseException:  # cancelled: the outcome is unknown
                now = current_time()
                circuit = self._circuit(name, endpoint, options, now)
                circuit.no_verdict(now, probe)
                self._track(circuit)
                raise
            now = current_time()
            if probe is None and circuit.alive and circuit.state == CLOSED and now < circuit.window_end:
                circuit.count += 1
                circuit.check_threshold(now)
            else:
                circuit = self._circuit(name, endpoint, options, now)
                circuit.success(now, probe)
            if circuit.state != CLOSED:
                self._track(circuit)
            return result

        return circuit_breaker

    def _circuit(self, name: str, endpoint: Any, options: _BreakerOptions, now: float, *,
                 admitting: bool = False) -> _Circuit:
        """The endpoint's circuit, brought to ``now`` (created if it has none). Only a call
        being admitted moves the circuit to a new endpoint object (the registry replaces an
        endpoint when its node sends a new INFO); a settling call may hold the old one."""
        if self._epoch is None:
            self._epoch = now
        if now >= self._next_prune:
            self._prune(now)
        key = (name, endpoint.node_id)
        circuit = self._circuits.get(key)
        if circuit is None:
            start = self._epoch + ((now - self._epoch) // options.window_time) * options.window_time
            circuit = self._circuits[key] = _Circuit(name, endpoint.node_id, endpoint, options, start)
            return circuit
        if admitting and circuit.endpoint is not endpoint:
            circuit.endpoint = endpoint
            endpoint.available = circuit.state in (CLOSED, HALF_OPEN)
        circuit.wake(now)
        circuit.roll(now)
        self._track(circuit)
        return circuit

    def _wake(self, name: str, now: float) -> None:
        tripped = self._tripped.get(name)
        if tripped:
            for circuit in list(tripped):
                circuit.wake(now)
                self._track(circuit)

    def _track(self, circuit: _Circuit) -> None:
        """Keep ``_tripped`` in step with the circuit's state."""
        if circuit.state == CLOSED:
            tripped = self._tripped.get(circuit.action)
            if tripped is not None:
                tripped.discard(circuit)
                if not tripped:
                    del self._tripped[circuit.action]
        else:
            self._tripped.setdefault(circuit.action, set()).add(circuit)

    def _prune(self, now: float) -> None:
        """Forget the circuits their next roll would reset anyway (bounded memory when nodes
        come and go); runs at most once per ``window_time``."""
        self._next_prune = now + self.options.window_time
        for key, circuit in list(self._circuits.items()):
            circuit.wake(now)
            if circuit.forgettable(now):
                circuit.endpoint.available = True
                del self._circuits[key]
                circuit.state = CLOSED
                circuit.alive = False
            self._track(circuit)


def _counts_against(exc: BaseException, endpoint_node: str, this_node: str) -> bool:
    """Whether an error may count against the endpoint: raised there or here, not relayed from
    a third node (Moleculer: ``!err.nodeID || err.nodeID == ctx.nodeID``)."""
    node = exc.node_id if isinstance(exc, NerveError) else None
    return node is None or node == endpoint_node or node == this_node


# --- bulkhead ---------------------------------------------------------------------------


@dataclass(frozen=True)
class BulkheadStatistics:
    """One served action's compartment: handlers running and calls waiting, and its limits."""

    in_flight: int
    queued: int
    concurrency: int
    max_queue_size: int


class _Compartment:
    """At most ``concurrency`` handlers at once; up to ``max_queue_size`` callers wait in
    arrival order. A freed slot goes straight to the first waiter (no overtaking: waiters
    exist only while every slot is taken), and a waiter that is cancelled leaves the queue
    holding nothing (trio's ParkingLot: a task it has unparked owns the slot)."""

    def __init__(self, concurrency: int, max_queue_size: int) -> None:
        self.concurrency = concurrency
        self.max_queue_size = max_queue_size
        self.in_flight = 0
        self.waiting = trio.lowlevel.ParkingLot()

    async def run(self, handler: Callable[[Any], Awaitable[Any]], ctx: Any,
                  rejected: Callable[[Any], NerveError]) -> Any:
        if self.in_flight < self.concurrency:
            self.in_flight += 1  # no checkpoint here: the handler makes its own
        elif len(self.waiting) >= self.max_queue_size:
            raise rejected(ctx)
        else:
            await self.waiting.park()  # woken holding the slot its releaser handed over
        try:
            return await handler(ctx)
        finally:
            if self.waiting:
                self.waiting.unpark()
            else:
                self.in_flight -= 1

    def statistics(self) -> BulkheadStatistics:
        return BulkheadStatistics(self.in_flight, len(self.waiting), self.concurrency, self.max_queue_size)


_BULKHEAD_KEYS = ("concurrency", "max_queue_size")


class Bulkhead(Middleware):
    """Bound the handlers of each action (and event subscription) served on this node:
    at most ``concurrency`` run at once, up to ``max_queue_size`` more wait their turn in
    arrival order, and a call beyond that fails at once with ``QueueIsFullError`` (429,
    retryable). ``max_queue_size=0`` means no waiting at all (Moleculer's documented meaning).

    A waiting call that is cancelled (its caller gave up, its deadline passed) leaves the
    queue and takes no slot with it. An action or event overrides the limits with the property
    ``bulkhead={"concurrency": ..., "max_queue_size": ...}`` and opts out with
    ``bulkhead={"enabled": False}``.
    """

    def __init__(self, concurrency: int = 10, max_queue_size: int = 100) -> None:
        problems = self._problems(concurrency, max_queue_size)
        if problems:
            raise BrokerOptionsError("Bulkhead: " + "; ".join(problems))
        self.concurrency = concurrency
        self.max_queue_size = max_queue_size
        self._actions: dict[str, _Compartment] = {}

    @staticmethod
    def _problems(concurrency: Any, max_queue_size: Any) -> list[str]:
        out = []
        if not (isinstance(concurrency, int) and not isinstance(concurrency, bool) and concurrency >= 1):
            out.append(f"concurrency must be an int >= 1, not {concurrency!r}")
        if not (isinstance(max_queue_size, int) and not isinstance(max_queue_size, bool) and max_queue_size >= 0):
            out.append(f"max_queue_size must be an int >= 0, not {max_queue_size!r}")
        return out

    def statistics(self, action: str) -> BulkheadStatistics:
        """The compartment of the served action ``action`` (KeyError if it has none)."""
        return self._actions[action].statistics()

    def _compartment(self, what: str, properties: Mapping[str, Any] | None) -> _Compartment | None:
        override = properties.get("bulkhead") if properties else None
        if override is None:
            return _Compartment(self.concurrency, self.max_queue_size)
        if not isinstance(override, Mapping):
            raise ServiceSchemaError(f"{what}: the bulkhead property must be a dict, not {override!r}")
        if override.get("enabled", True) is False:
            return None
        unknown = set(override) - set(_BULKHEAD_KEYS) - {"enabled"}
        if unknown:
            raise ServiceSchemaError(f"{what}: unknown bulkhead options {sorted(unknown)}")
        concurrency = override.get("concurrency", self.concurrency)
        max_queue_size = override.get("max_queue_size", self.max_queue_size)
        problems = self._problems(concurrency, max_queue_size)
        if problems:
            raise ServiceSchemaError(f"{what}: bulkhead: " + "; ".join(problems))
        return _Compartment(concurrency, max_queue_size)

    def local_action(self, next: ActionHandler, action: ActionInfo) -> ActionHandler:
        compartment = self._compartment(f"action {action.name!r}", action.properties)
        if compartment is None:
            return next
        self._actions[action.name] = compartment
        name, node_id = action.name, action.node_id

        def rejected(ctx: Context) -> NerveError:
            return QueueIsFullError(f"Queue is full. Request '{name}' action on '{node_id}' node is rejected.",
                                    data={"action": name, "nodeID": node_id}, node_id=node_id)

        async def bulkhead(ctx: Context) -> Any:
            return await compartment.run(next, ctx, rejected)

        return bulkhead

    def local_event(self, next: EventHandler, event: EventInfo) -> EventHandler:
        compartment = self._compartment(f"event {event.name!r} of {event.service!r}", event.properties)
        if compartment is None:
            return next
        name, service = event.name, event.service

        def rejected(ctx: Context) -> NerveError:
            node_id = ctx.broker.node_id
            return QueueIsFullError(f"Queue is full. Event '{name}' of '{service}' on '{node_id}' node is rejected.",
                                    data={"event": name, "service": service, "nodeID": node_id}, node_id=node_id)

        async def bulkhead(ctx: Context) -> None:
            await compartment.run(next, ctx, rejected)

        return bulkhead
