"""The live-node fuzzer (nerve.testing.fuzz_node / fuzz_service, ``nerve fuzz``): its oracles and
minimizer catch deliberate defects, and a bounded run against a real node finds nothing.

The CI run (``test_a_node_survives_a_minute_of_fuzzing``) starts tests/fuzz_node.py as a real
process on loopback with a shared secret and fuzzes it for 60 s while a legitimate client calls
alongside; it asserts the real oracles: no crash, no hang, no failed legitimate call, RSS and
descriptors back to baseline, no request count left behind by a cancelled call (the node serves
256 requests per peer at once, so one count left behind shows). The cancel category's own
tests are in tests/test_fuzz_cancel.py.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest
import trio

import nerve
from nerve.errors import ValidationError
from nerve.frames import FrameType
from nerve.packets import Ping, Request
from nerve.serializers import get_serializer
from nerve.testing import (
    BadStr,
    Nested,
    NodeProcess,
    Reproducer,
    Step,
    fuzz_node,
    fuzz_service,
    minimize,
    pack,
    replay,
)

NODE = str(Path(__file__).with_name("fuzz_node.py"))
MSGPACK = get_serializer("msgpack")


def node(*args: str) -> NodeProcess:
    return NodeProcess([sys.executable, NODE, *args])


def hello(node_id: str) -> bytes:
    return pack({"nodeID": node_id, "ver": "5", "window": 1 << 20, "maxChunk": 1 << 16})


def request(action: str, params: object = None) -> bytes:
    return MSGPACK.encode(Request(sender="x", id=action + "-1", action=action, params=params))


# --- the wire helpers ----------------------------------------------------------------


def test_pack_writes_what_msgspec_will_not() -> None:
    assert pack({"a": [1, "b", b"c", None]}) == msgspec.msgpack.encode({"a": [1, "b", b"c", None]})
    bad = pack({"nodeID": BadStr(b"\xff\xfe")})
    with pytest.raises(msgspec.DecodeError, match="UTF-8"):
        msgspec.msgpack.decode(bad)
    deep = pack(Nested(5))
    assert msgspec.msgpack.decode(deep) == [[[[[None]]]]]
    assert len(pack(Nested(100_000, maps=True))) == 300_001


def test_reproducers_round_trip_through_json() -> None:
    rep = Reproducer([Step(0, "handshake", 16, hello("a")), Step(0, "frame", 21, b"\x00\x01x"),
                      Step(1, "raw", 0, b"\xff"), Step(1, "close")])
    data = json.loads(json.dumps(rep.to_json()))
    assert Reproducer.from_json(data) == Reproducer(rep.steps)
    assert data["steps"][1]["name"] == "STREAM_DATA"
    assert rep.frames() == [(21, "000178"), (0, "ff")]


# --- service-level fuzzing -------------------------------------------------------------


class NameParams(msgspec.Struct):
    name: str
    count: int = 1


class Names(nerve.Service):
    name = "names"

    @nerve.action
    async def first(self, ctx: nerve.Context, params: NameParams) -> str:
        return params.name[0]  # IndexError on an empty name: an internal error

    @nerve.action
    async def checked(self, ctx: nerve.Context, params: NameParams) -> str:
        if not params.name or not 0 <= params.count <= 100:
            raise ValidationError("name must not be empty, count in [0, 100]", data={"field": "name"})
        return params.name[0] * params.count


@pytest.mark.anyio
async def test_fuzz_service_finds_an_internal_error_and_shrinks_its_params() -> None:
    async with nerve.Broker("svc", services=[Names()]) as broker:
        report = await fuzz_service(broker, "names.first", NameParams, examples=150, seed=1)
    errors = [f for f in report.findings if f.kind == "internal_error" and "IndexError" in f.summary]
    assert errors, report.summary()
    assert errors[0].params == {"name": ""} or errors[0].params == {"name": "", "count": 1}
    assert not report.ok


@pytest.mark.anyio
async def test_fuzz_service_accepts_results_and_typed_4xx_over_tcp() -> None:
    async with nerve.Broker("svc", transport="tcp://127.0.0.1:0", services=[Names()]) as server:
        assert server.address is not None
        # by address, with the params' schema taken from what the node announces
        report = await fuzz_service(server.address, "names.checked", examples=150, seed=2)
    assert report.ok, report.summary()
    assert report.category("service").cases >= 100


# --- the node oracles and the minimizer, on deliberate defects ---------------------------


@pytest.mark.anyio
async def test_replay_tells_a_healthy_node_from_a_frozen_one() -> None:
    async with node("--fragile") as target:
        steps = [Step(0, "handshake", FrameType.HELLO, hello("probe-a")),
                 Step(0, "frame", FrameType.PING, MSGPACK.encode(Ping(sender="probe-a", id="1")))]
        assert await replay(target.address, Reproducer(steps), bound=2.0) == "ok"
        frozen = [Step(0, "handshake", FrameType.HELLO, hello("probe-b")),
                  Step(0, "frame", FrameType.REQUEST, request("fragile.freeze"))]
        assert await replay(target.address, Reproducer(frozen), bound=1.0) == "timeout"


@pytest.mark.anyio
async def test_minimize_keeps_only_what_crashes_the_node() -> None:
    padding = [Step(0, "frame", FrameType.PING, MSGPACK.encode(Ping(sender="m", id=str(i)))) for i in range(3)]
    steps = [Step(1, "handshake", FrameType.HELLO, hello("bystander")), Step(1, "close"),
             Step(0, "handshake", FrameType.HELLO, hello("m")), *padding,
             Step(0, "frame", FrameType.REQUEST, request("fragile.exit", {"pad": "x" * 5000})), *padding]
    async with node("--fragile") as target:
        smallest = await minimize(target, Reproducer(steps), symptom="crash", budget=60)
    assert smallest is not None
    frames = [s for s in smallest.steps if s.op == "frame"]
    assert len(smallest.steps) <= 2, smallest.to_json()
    assert [s.type for s in frames] == [FrameType.REQUEST]
    assert b"fragile.exit" in frames[0].payload and len(frames[0].payload) < 200


@pytest.mark.anyio
async def test_fuzz_node_finds_minimizes_and_reproduces_a_crash() -> None:
    async with node("--fragile") as target:
        report = await fuzz_node(target, duration=4, seed=5, legit_action="fuzz.echo",
                                 legit_params={"text": "hi"}, actions=["fragile.exit"],
                                 categories=["generated"], minimize_budget=40, settle=2)
    assert report.crashes, report.summary()
    crash = report.crashes[0]
    assert crash.minimized and crash.reproduced, report.summary()
    assert crash.reproducer is not None
    assert any(s.op == "frame" and s.type == FrameType.REQUEST and b"fragile.exit" in s.payload
               for s in crash.reproducer.steps), report.summary()
    assert not report.ok


# --- the CI run and the command ----------------------------------------------------------


@pytest.mark.anyio
async def test_a_node_survives_a_minute_of_fuzzing(tmp_path: Path) -> None:
    """60 s of every category against a real node process with a secret, metrics and tracing on
    (the metered and traced paths see the hostile input too); a legitimate client
    calls fuzz.echo throughout. Zero crashes, hangs, failed legitimate calls and leaks."""
    async with node("--secret", "ci-secret", "--max-peer-requests", "256", "--metrics", "--tracing") as target:
        report = await fuzz_node(
            target, secret="ci-secret", duration=60, seed=20261129, legit_action="fuzz.echo",
            legit_params={"text": "legit", "n": 2}, actions=["fuzz.echo", "fuzz.slow"], upload_action="fuzz.upload",
            download_action="fuzz.download", download_params={"size": 200_000}, latency_bound=2.0,
            minimize_budget=20, settle=10)
    (tmp_path / "fuzz-report.json").write_text(json.dumps(report.to_json(), indent=2, default=repr))
    print(report.summary())
    summary = report.summary()
    assert report.crashes == [], summary
    assert report.hangs == [], summary
    assert report.leaks == [], summary
    assert report.legit.failed == 0, summary
    assert report.findings == [], summary
    assert report.legit.calls > 100, summary
    for category in ("handshake", "session", "generated", "stateful", "burst", "cancel", "service"):
        assert report.category(category).cases > 0, (category, summary)
    # a generator that raises ends its batch with a note, not a finding: none may
    assert not [n for n in report.notes if "batch error" in n], summary
    assert report.resources.get("baseline", {}).get("fds"), summary


def test_nerve_fuzz_command_writes_a_report(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, NODE], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        info = json.loads(proc.stdout.readline())
        out = tmp_path / "report.json"
        done = subprocess.run(
            [sys.executable, "-m", "nerve.cli", "fuzz", info["address"], "--pid", str(info["pid"]),
             "--duration", "4", "--seed", "7", "--action", "fuzz.echo", "--params", '{"text": "x"}',
             "--category", "session", "--category", "generated", "--report", str(out)],
            capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr
        report = json.loads(out.read_text())
        assert report["ok"] and report["seed"] == 7
        assert report["categories"]["session"]["cases"] > 0
        assert report["legit"]["action"] == "fuzz.echo" and report["legit"]["calls"] > 0
        assert "nerve fuzz:" in done.stdout
    finally:
        proc.terminate()
        proc.wait(10)


def test_readme_fuzzing_example_runs(tmp_path: Path) -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("## Fuzzing your own nodes", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert blocks
    script = tmp_path / "fuzz_example.py"
    script.write_text(blocks[0])
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "no findings" in out.stdout and "calls to math.add, 0 failed" in out.stdout
