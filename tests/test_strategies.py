"""Load-balancing strategies: lowest CPU, lowest latency (pinging under a mock clock), sharding
on a consistent-hash ring (hypothesis: stable when nodes come and go, even with vnodes), the
CPU meter, and a shard-keyed call across real TCP brokers once the core wires strategies."""

from __future__ import annotations

import collections
import time
import types
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgspec
import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import nerve
from nerve._cpu import CpuMeter
from nerve.errors import NerveError, RequestTimeoutError, ServiceNotAvailableError
from nerve.registry import ActionEndpoint, Registry
from nerve.strategies import CpuUsageStrategy, HashRing, LatencyStrategy, ShardStrategy

ACTION = "users.get"


def cluster_registry(*node_ids: str) -> Registry:
    """A registry as the transit leaves it after INFO from each node: every node serves users.get."""
    reg = Registry("me")
    for node_id in node_ids:
        reg.update_node(node_id, services=[{"name": "users", "actions": {ACTION: {"name": ACTION}}}],
                        instance_id=f"{node_id}-1", seq=1)
    return reg


def picks(strategy: Any, endpoints: Sequence[ActionEndpoint], n: int = 300, ctx: Any = None) -> collections.Counter[str]:
    return collections.Counter(strategy.select(ACTION, endpoints, ctx).node_id for _ in range(n))


def ctx_of(params: Any = None, meta: dict[str, Any] | None = None) -> Any:
    return types.SimpleNamespace(params=params, meta=meta or {})


# --- CPU usage ----------------------------------------------------------------------------


def cpu_cluster(cpus: dict[str, float | None], **kw: Any) -> tuple[CpuUsageStrategy, list[ActionEndpoint]]:
    reg = cluster_registry(*cpus)
    for node_id, cpu in cpus.items():
        reg.nodes[node_id].cpu = cpu
    strategy = CpuUsageStrategy(seed=1, **kw)
    strategy.bind(reg)
    return strategy, reg.actions[ACTION]


def test_cpu_lowest_usage_wins_when_every_candidate_is_sampled() -> None:
    strategy, eps = cpu_cluster({"a": 80, "b": 30, "c": 50})
    assert picks(strategy, eps) == {"b": 300}


def test_cpu_a_node_under_the_low_mark_is_taken_at_once_not_the_lowest() -> None:
    strategy, eps = cpu_cluster({"a": 9, "b": 1, "c": 50}, low_cpu_usage=10)
    counts = picks(strategy, eps)
    assert counts["c"] == 0
    assert counts["a"] > 50 and counts["b"] > 50, counts  # both idle enough: the first sampled


def test_cpu_unknown_usage_is_the_worst_and_all_unknown_is_random() -> None:
    strategy, eps = cpu_cluster({"a": None, "b": 95, "c": None})
    assert picks(strategy, eps) == {"b": 300}
    strategy, eps = cpu_cluster({"a": None, "b": None, "c": None})
    assert set(picks(strategy, eps)) == {"a", "b", "c"}
    strategy, eps = cpu_cluster({"a": float("nan"), "b": 60})
    assert picks(strategy, eps) == {"b": 300}


def test_cpu_samples_distinct_candidates() -> None:
    # Two distinct samples out of four: the busiest node can never win, the second busiest
    # wins only when drawn with the busiest (1 in 6 pairs).
    strategy, eps = cpu_cluster({"a": 20, "b": 30, "c": 40, "d": 50}, sample_count=2)
    counts = picks(strategy, eps, n=1200)
    assert counts["d"] == 0
    assert 100 < counts["c"] < 320, counts
    assert counts["a"] > counts["b"] > counts["c"]


def test_cpu_without_a_registry_is_random() -> None:
    strategy = CpuUsageStrategy(seed=3)
    eps = cluster_registry("a", "b").actions[ACTION]
    assert set(picks(strategy, eps)) == {"a", "b"}


def test_cpu_through_the_registry_follows_heartbeat_updates() -> None:
    strategy = CpuUsageStrategy(seed=5)
    reg = Registry("me", strategy=strategy, prefer_local=False)
    strategy.bind(reg)  # idempotent: the registry binds it itself once the core wires ``bind``
    for node_id in ("a", "b", "c"):
        reg.update_node(node_id, services=[{"name": "users", "actions": {ACTION: {}}}], instance_id=None, seq=1)
        reg.nodes[node_id].cpu = 70
    reg.nodes["c"].cpu = 40
    assert {reg.select_action(ACTION).node_id for _ in range(50)} == {"c"}
    reg.nodes["c"].cpu = 90  # the next heartbeat
    reg.nodes["a"].cpu = 55
    assert {reg.select_action(ACTION).node_id for _ in range(50)} == {"a"}
    reg.node_gone("a")
    assert {reg.select_action(ACTION).node_id for _ in range(50)} == {"b"}


# --- latency: choice ----------------------------------------------------------------------


def test_latency_moving_average_of_the_last_pings() -> None:
    strategy = LatencyStrategy(collect_count=3)
    assert strategy.latency("a") is None
    for rtt in (0.001, 0.002, 0.003, 0.010):
        strategy.record("a", rtt)
    assert strategy.latency("a") == pytest.approx((0.002 + 0.003 + 0.010) / 3)
    strategy.forget("a")
    assert strategy.latency("a") is None


def test_latency_lowest_measured_wins_and_under_the_mark_is_taken_at_once() -> None:
    eps = cluster_registry("a", "b", "c", "d").actions[ACTION]
    strategy = LatencyStrategy(lowest_latency=10, seed=2)
    for node_id, ms in {"a": 50, "b": 20, "c": 30}.items():
        strategy.record(node_id, ms / 1000)
    assert picks(strategy, eps) == {"b": 300}  # d is unmeasured: never preferred
    for _ in range(3):
        strategy.record("c", 0.001)  # mean (30 + 1 + 1 + 1) / 4 ms = 8.25 ms: under 10 ms
    strategy.record("a", 0.005)
    strategy.record("a", 0.001)
    strategy.record("a", 0.001)
    strategy.record("a", 0.001)  # mean of the last five: 11.6 ms, still over
    assert picks(strategy, eps) == {"c": 300}
    strategy.record("a", 0.001)  # 50 ms has left the window: mean 1.8 ms
    counts = picks(strategy, eps)
    assert counts["a"] > 50 and counts["c"] > 50 and counts["b"] == counts["d"] == 0, counts


def test_latency_unmeasured_is_random_and_the_local_node_is_closest() -> None:
    reg = cluster_registry("a", "b")
    strategy = LatencyStrategy(seed=4)
    eps = reg.actions[ACTION]
    assert set(picks(strategy, eps)) == {"a", "b"}
    local = ActionEndpoint(ACTION, "me", True, "users")
    strategy.record("a", 0.005)  # under the mark, like the local node: either, never b
    assert set(picks(strategy, [*eps, local])) == {"me", "a"}
    strategy.record("a", 0.100)
    assert picks(strategy, [*eps, local]) == {"me": 300}


# --- latency: pinging under a mock clock --------------------------------------------------


class FakeBroker:
    """``registry`` and ``ping`` as LatencyStrategy.run uses them; a node with no delay never
    answers, one whose delay is an exception raises it."""

    def __init__(self, registry: Registry, delays: dict[str, Any]) -> None:
        self.registry = registry
        self.delays = delays
        self.pings: dict[str, list[float]] = collections.defaultdict(list)

    async def ping(self, node_id: str, timeout: float = 2.0) -> float:
        self.pings[node_id].append(trio.current_time())
        delay = self.delays.get(node_id)
        if isinstance(delay, Exception):
            raise delay
        with trio.move_on_after(timeout):
            if delay is None:
                await trio.sleep_forever()
            await trio.sleep(delay)
            return float(delay)
        raise RequestTimeoutError(f"no PONG from {node_id!r}")


def test_latency_run_pings_rounds_newcomers_timeouts_and_forgets() -> None:
    reg = cluster_registry("fast", "slow", "dead")
    broker = FakeBroker(reg, {"fast": 0.002, "slow": 0.050, "dead": None,
                              "late": 0.004, "flaky": ServiceNotAvailableError("not connected")})
    strategy = LatencyStrategy(ping_interval=10, collect_count=3, ping_timeout=2.0, seed=7)

    async def at(t: float) -> None:
        await trio.sleep(t - trio.current_time())

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(strategy.run, broker)
            await at(2.5)
            # The first round went out at once; the dead node counts as a 2 s round trip.
            assert {n: t for n, t in broker.pings.items()} == {"fast": [0.0], "slow": [0.0], "dead": [0.0]}
            assert strategy.latency("fast") == pytest.approx(0.002)
            assert strategy.latency("slow") == pytest.approx(0.050)
            assert strategy.latency("dead") == pytest.approx(2.0)
            assert picks(strategy, reg.actions[ACTION]) == {"fast": 300}

            for node_id in ("late", "flaky"):
                reg.update_node(node_id, services=[], instance_id=None, seq=1)
            await at(6.5)
            # A newcomer is measured at the next tick, not at the next round; one whose ping
            # fails (other than by timing out) is left unmeasured and asked again each tick.
            assert broker.pings["late"] == [pytest.approx(3.0)]
            assert strategy.latency("late") == pytest.approx(0.004)
            assert broker.pings["flaky"] == [pytest.approx(t, abs=0.05) for t in (3.0, 4.0, 5.0, 6.0)]
            assert strategy.latency("flaky") is None
            reg.node_gone("flaky")

            await at(10.5)
            assert broker.pings["fast"] == [0.0, pytest.approx(10.0)]
            assert broker.pings["late"] == [pytest.approx(3.0), pytest.approx(10.0)]
            assert "me" not in broker.pings  # never ourselves

            reg.node_gone("slow")
            broker.delays["fast"] = 0.008
            await at(13.5)
            assert strategy.latency("slow") is None  # forgotten once gone (the round ended at 12)
            await at(20.5)
            assert strategy.latency("fast") == pytest.approx((0.002 + 0.002 + 0.008) / 3)
            await at(40.5)
            assert strategy.latency("fast") == pytest.approx(0.008)  # only the last three count
            assert len(broker.pings["fast"]) == 5 and len(broker.pings["slow"]) == 2
            assert len(broker.pings["flaky"]) == 4
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_latency_pings_at_most_max_concurrent_at_once() -> None:
    nodes = [f"n{i}" for i in range(7)]
    reg = cluster_registry(*nodes)
    broker = FakeBroker(reg, dict.fromkeys(nodes, 0.1))
    strategy = LatencyStrategy(max_concurrent_pings=3)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(strategy.run, broker)
            await trio.sleep(1)
            nursery.cancel_scope.cancel()
        starts = sorted(t for times in broker.pings.values() for t in times)
        assert starts == [0.0] * 3 + [pytest.approx(0.1)] * 3 + [pytest.approx(0.2)]

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_latency_options_are_checked() -> None:
    with pytest.raises(ValueError):
        LatencyStrategy(ping_interval=0)
    with pytest.raises(ValueError):
        LatencyStrategy(collect_count=0)


# --- shard: the key -----------------------------------------------------------------------


class UserParams(msgspec.Struct):
    user_id: int
    profile: dict[str, Any] = {}


def test_shard_key_from_params_meta_paths_structs_and_callables() -> None:
    assert ShardStrategy().key_of(ctx_of({"user_id": 42})) == "42"
    assert ShardStrategy().key_of(ctx_of(UserParams(user_id=7))) == "7"
    assert ShardStrategy("#tenant").key_of(ctx_of({"user_id": 1}, {"tenant": "acme"})) == "acme"
    assert ShardStrategy("user.id").key_of(ctx_of({"user": {"id": "u9"}})) == "u9"
    assert ShardStrategy("user.id").key_of(ctx_of({"user.id": "flat"})) == "flat"
    assert ShardStrategy("#auth.org").key_of(ctx_of(meta={"auth": {"org": 3}})) == "3"
    assert ShardStrategy(lambda ctx: ctx.params["a"] + ctx.params["b"]).key_of(ctx_of({"a": 1, "b": 2})) == "3"
    for shard, ctx in [
        (ShardStrategy(), None),
        (ShardStrategy(), ctx_of({"other": 1})),
        (ShardStrategy(), ctx_of("user_id")),  # params that are not a mapping
        (ShardStrategy(), ctx_of([1, 2])),
        (ShardStrategy("#tenant"), ctx_of({"tenant": "in params, not meta"})),
        (ShardStrategy("user.id"), ctx_of({"user": "not a mapping"})),
        (ShardStrategy("profile.upper"), ctx_of({"profile": "abc"})),
    ]:
        assert shard.key_of(ctx) is None


def test_shard_without_a_key_goes_round_robin() -> None:
    eps = cluster_registry("a", "b", "c").actions[ACTION]
    strategy = ShardStrategy()
    got = [strategy.select(ACTION, eps, ctx).node_id for ctx in (None, ctx_of({}), ctx_of({"x": 1})) * 3]
    assert got == ["a", "b", "c"] * 3


def test_shard_same_key_same_node_and_keys_spread() -> None:
    eps = cluster_registry("a", "b", "c").actions[ACTION]
    strategy = ShardStrategy()
    owner = {}
    for i in range(300):
        ctx = ctx_of({"user_id": i})
        owner[i] = strategy.select(ACTION, eps, ctx).node_id
        assert {strategy.select(ACTION, list(reversed(eps)), ctx).node_id for _ in range(3)} == {owner[i]}
    assert set(owner.values()) == {"a", "b", "c"}
    # A fresh strategy (another process) agrees: the ring depends only on the node ids.
    again = ShardStrategy()
    assert all(again.select(ACTION, eps, ctx_of({"user_id": i})).node_id == owner[i] for i in range(300))


def test_shard_through_the_registry_with_context() -> None:
    strategy = ShardStrategy("#tenant")
    reg = cluster_registry("a", "b", "c")
    reg.strategy = strategy
    first = reg.select_action(ACTION, ctx=ctx_of(meta={"tenant": "acme"})).node_id
    assert {reg.select_action(ACTION, ctx=ctx_of(meta={"tenant": "acme"})).node_id for _ in range(20)} == {first}
    # A retry excludes the node that failed: the key goes to the next node on the ring.
    retry = reg.select_action(ACTION, exclude={first}, ctx=ctx_of(meta={"tenant": "acme"})).node_id
    assert retry != first
    assert retry == strategy.node_for("acme", {"a", "b", "c"} - {first})


def test_shard_options_are_checked() -> None:
    with pytest.raises(ValueError):
        ShardStrategy(vnodes=0)
    with pytest.raises(ValueError):
        HashRing([])


# --- shard: the ring (properties) ---------------------------------------------------------

node_ids = st.text(st.characters(codec="utf-8"), min_size=1, max_size=12)
node_sets = st.lists(node_ids, min_size=2, max_size=10, unique=True)
keys = st.lists(st.text(max_size=16), min_size=1, max_size=200, unique=True)
ring_sizes = st.sampled_from([2**32, 2**64, 1_000, 7])


@given(nodes=node_sets, keys=keys, data=st.data(), vnodes=st.integers(1, 40), ring_size=ring_sizes)
def test_ring_removing_a_node_moves_only_its_keys(nodes: list[str], keys: list[str], data: st.DataObject,
                                                  vnodes: int, ring_size: int) -> None:
    gone = data.draw(st.sampled_from(nodes))
    before = HashRing(nodes, vnodes=vnodes, ring_size=ring_size)
    after = HashRing([n for n in nodes if n != gone], vnodes=vnodes, ring_size=ring_size)
    for key in keys:
        old, new = before.node_for(key), after.node_for(key)
        assert new != gone
        if old != gone:
            assert new == old, (key, old, new)


@given(nodes=node_sets, keys=keys, newcomer=node_ids, vnodes=st.integers(1, 40), ring_size=ring_sizes)
def test_ring_adding_a_node_moves_keys_only_to_it(nodes: list[str], keys: list[str], newcomer: str,
                                                   vnodes: int, ring_size: int) -> None:
    before = HashRing(nodes, vnodes=vnodes, ring_size=ring_size)
    after = HashRing([*nodes, newcomer], vnodes=vnodes, ring_size=ring_size)
    for key in keys:
        if after.node_for(key) != before.node_for(key):
            assert after.node_for(key) == newcomer


@given(nodes=st.lists(node_ids, min_size=2, max_size=8, unique=True))
@settings(max_examples=50)
def test_ring_shares_are_roughly_even_with_enough_vnodes(nodes: list[str]) -> None:
    shares = HashRing(nodes, vnodes=200).shares()
    assert sum(shares.values()) == pytest.approx(1.0)
    fair = 1 / len(nodes)
    assert all(0.6 * fair < s < 1.5 * fair for s in shares.values()), shares


def test_ring_vnodes_even_out_the_shares_and_keys_follow_them() -> None:
    nodes = [f"node-{i}" for i in range(5)]

    def spread(vnodes: int) -> float:
        shares = HashRing(nodes, vnodes=vnodes).shares()
        return max(shares.values()) / min(shares.values())

    assert spread(1) > 2 * spread(200)
    assert spread(200) < 1.35
    ring = HashRing(nodes, vnodes=200)
    counts = collections.Counter(ring.node_for(f"user-{i}") for i in range(20_000))
    for node_id, share in ring.shares().items():
        assert counts[node_id] == pytest.approx(20_000 * share, rel=0.1)
    assert all(3_000 < c < 5_000 for c in counts.values()), counts


@given(nodes=node_sets, keys=st.lists(st.text(max_size=8), min_size=1, max_size=60), data=st.data())
@settings(suppress_health_check=[HealthCheck.too_slow])
def test_shard_cache_never_changes_an_answer(nodes: list[str], keys: list[str], data: st.DataObject) -> None:
    cached, uncached = ShardStrategy(cache_size=5), ShardStrategy(cache_size=0)
    for key in keys:
        subset = data.draw(st.lists(st.sampled_from(nodes), min_size=1, unique=True))
        expected = HashRing(subset, vnodes=10).node_for(key)
        assert cached.node_for(key, subset) == uncached.node_for(key, subset) == expected


# --- CPU meter ----------------------------------------------------------------------------


def stat_line(user: int, system: int, idle: int, iowait: int = 0, guest: int = 0) -> str:
    return f"cpu  {user} 0 {system} {idle} {iowait} 0 0 0 {guest} 0\ncpu0 1 2 3 4 5 6 7 8 9 10\n"


def test_cpu_meter_busy_share_of_the_interval(tmp_path: Path) -> None:
    stat = tmp_path / "stat"
    stat.write_text(stat_line(100, 100, 800))
    meter = CpuMeter(str(stat))
    assert meter.percent() == pytest.approx(20.0)  # nothing elapsed yet: the figure since boot
    stat.write_text(stat_line(150, 150, 900))
    assert meter.percent() == pytest.approx(50.0)
    assert meter.percent() == pytest.approx(50.0)  # no tick since: the previous figure
    stat.write_text(stat_line(150, 150, 900, iowait=100))
    assert meter.percent() == pytest.approx(0.0)  # waiting for I/O is idle
    stat.write_text(stat_line(250, 150, 1000, iowait=100, guest=100))
    assert meter.percent() == pytest.approx(50.0)  # guest time is already in user time


def test_cpu_meter_never_raises_and_stays_in_range(tmp_path: Path) -> None:
    stat = tmp_path / "stat"
    for content in ["", "garbage\n", "cpu  a b c d\n", "cpu  1 2\n", "intr 1 2 3\n"]:
        stat.write_text(content)
        value = CpuMeter(str(stat)).percent()
        assert isinstance(value, float) and 0.0 <= value <= 100.0
    meter = CpuMeter(str(tmp_path / "missing"))
    assert 0.0 <= meter.percent() <= 100.0
    stat.write_text(stat_line(100, 100, 800))
    meter = CpuMeter(str(stat))
    stat.write_text(stat_line(50, 50, 800))  # counters going back (a container moved): ignored
    assert meter.percent() == pytest.approx(20.0)


def test_cpu_meter_sees_this_process_spinning() -> None:
    meter = CpuMeter()
    meter.percent()
    end = time.monotonic() + 0.3
    while time.monotonic() < end:
        pass
    assert 0.0 < meter.percent() <= 100.0


# --- end to end: real brokers over TCP ----------------------------------------------------




class Users(nerve.Service):
    name = "users"

    @nerve.action
    async def get(self, ctx: nerve.Context) -> dict[str, Any]:
        return {"node": self.broker.node_id, "user": ctx.params.get("user_id")}


async def wait_for_nodes(broker: nerve.Broker, count: int, timeout: float = 15) -> None:
    with trio.fail_after(timeout):
        while len({ep.node_id for ep in broker.registry.actions.get(ACTION, [])}) != count:
            await trio.sleep(0.05)


HEARTBEAT: dict[str, Any] = dict(heartbeat_interval=0.2, heartbeat_timeout=1.5)


@pytest.mark.anyio
async def test_shard_keyed_calls_stick_to_one_node_across_tcp_brokers() -> None:
    shard = ShardStrategy("user_id")
    async with nerve.Broker("shard-a", transport="tcp://127.0.0.1:0", services=[Users()],
                            strategy=shard, prefer_local=False, **HEARTBEAT) as a:
        assert a.address is not None
        async with nerve.Broker("shard-b", transport="tcp://127.0.0.1:0", peers=[a.address],
                                services=[Users()], **HEARTBEAT):
            async with nerve.Broker("shard-c", transport="tcp://127.0.0.1:0", peers=[a.address],
                                    services=[Users()], **HEARTBEAT):
                await wait_for_nodes(a, 3)
                owner: dict[int, str] = {}
                for user in range(30):
                    landed = {(await a.call(ACTION, {"user_id": user}))["node"] for _ in range(4)}
                    assert len(landed) == 1, (user, landed)
                    owner[user] = landed.pop()
                    assert owner[user] == shard.node_for(str(user), ["shard-a", "shard-b", "shard-c"])
                assert set(owner.values()) == {"shard-a", "shard-b", "shard-c"}
                spread = collections.Counter([(await a.call(ACTION, {}))["node"] for _ in range(9)])
                assert spread == {"shard-a": 3, "shard-b": 3, "shard-c": 3}  # no key: round-robin
            await wait_for_nodes(a, 2)
            for user in range(30):
                now = (await a.call(ACTION, {"user_id": user}))["node"]
                if owner[user] != "shard-c":
                    assert now == owner[user], user  # only shard-c's users moved
                else:
                    assert now in ("shard-a", "shard-b")


@pytest.mark.anyio
async def test_latency_strategy_measures_peers_of_a_running_broker() -> None:
    latency = LatencyStrategy(ping_interval=0.5, lowest_latency=0)  # loopback is under any mark
    async with nerve.Broker("lat-a", transport="tcp://127.0.0.1:0", services=[Users()],
                            strategy=latency, prefer_local=False, **HEARTBEAT) as a:
        assert a.address is not None
        async with nerve.Broker("lat-b", transport="tcp://127.0.0.1:0", peers=[a.address],
                                services=[Users()], **HEARTBEAT):
            await wait_for_nodes(a, 2)
            with trio.fail_after(10):
                while latency.latency("lat-b") is None:
                    await trio.sleep(0.05)
            assert 0 < latency.latency("lat-b") < 1.0  # type: ignore[operator]
            assert latency.latency("lat-a") is None  # never pings itself
            # The local node (0 ms) is the lowest: every call stays here.
            assert {(await a.call(ACTION, {}))["node"] for _ in range(10)} == {"lat-a"}


class Points(nerve.Service):
    name = "points"

    def __init__(self) -> None:
        self.got: list[int] = []

    @nerve.event("user.scored")
    async def scored(self, ctx: nerve.Context) -> None:
        self.got.append(ctx.params["user_id"])


@pytest.mark.anyio
async def test_shard_keyed_events_land_on_the_node_that_owns_the_key() -> None:
    shard = ShardStrategy("user_id")
    here, there = Points(), Points()
    async with nerve.Broker("evshard-a", transport="tcp://127.0.0.1:0", services=[here],
                            strategy=shard, prefer_local=False, **HEARTBEAT) as a:
        assert a.address is not None
        async with nerve.Broker("evshard-b", transport="tcp://127.0.0.1:0", peers=[a.address],
                                services=[there], **HEARTBEAT):
            with trio.fail_after(10):
                while len({ep.node_id for ep in a.registry.event_endpoints("user.scored")}) < 2:
                    await trio.sleep(0.05)
            for user in range(20):
                for _ in range(3):
                    await a.emit("user.scored", {"user_id": user})
            with trio.fail_after(5):
                while len(here.got) + len(there.got) < 60:
                    await trio.sleep(0.02)
    nodes = ["evshard-a", "evshard-b"]
    for user in range(20):
        owner = here if shard.node_for(str(user), nodes) == "evshard-a" else there
        other = there if owner is here else here
        assert owner.got.count(user) == 3 and user not in other.got, user
    assert here.got and there.got
