"""The live fuzzer's cancel category (nerve.fuzzing, docs/protocol.md "Cancellation"): what its
generators send (HELLOs whatever their ``cancel``; CANCEL frames for the sender's own calls in
every state, for other connections' calls, garbage ones, floods) and what it checks, and that its
oracles catch defects planted in a node's CANCEL handling (tests/fuzz_node.py --break-cancel).

The generator tests draw cases with fixed seeds and classify what they contain: each test fails
when a generator stops producing one of the shapes listed (or starts raising). The live tests
fuzz a node process with one planted defect each and expect the matching finding.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st

from nerve.frames import DEFAULT_MAX_FRAME_SIZE, STREAM_FLAG_END, STREAM_FLAG_ERROR, FrameDecoder, FrameType
from nerve.fuzzing import _ABSENT, _Case, _cancel_flags, _cancel_payloads, _Generator, _loads, _Session
from nerve.packets import Request
from nerve.serializers import get_serializer
from nerve.testing import NodeProcess, Reproducer, Step, fuzz_node, replay
from nerve.transports.tcp import Hello

NODE = str(Path(__file__).with_name("fuzz_node.py"))
MSGPACK = get_serializer("msgpack")


def generator() -> _Generator:
    return _Generator(_Session("fuzz-target", [], {}), secret=False, namespace="", ver="5",
                      stream_actions=["fuzz.upload"], call_actions=["fuzz.echo", "fuzz.slow"],
                      legit_params={"text": "legit"}, upload_action="fuzz.upload",
                      download_action="fuzz.download", download_params={"size": 200_000})


def draw(build: Callable[[st.DataObject], Any], n: int, seed: int) -> list[Any]:
    """``n`` values built from hypothesis draws, the same ones on every run."""
    out: list[Any] = []

    @hypothesis_seed(seed)
    @settings(max_examples=n, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(st.data())
    def run(data: st.DataObject) -> None:
        out.append(build(data))

    run()
    return out


def valid_cancel(payload: bytes) -> bool:
    try:
        payload.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return len(payload) <= 256


def payload_class(payload: bytes) -> str:
    if len(payload) >= DEFAULT_MAX_FRAME_SIZE - 6:
        return "largest frame or over"
    if len(payload) >= 1 << 20:
        return "huge"
    if len(payload) > 256:
        return "over 256 bytes"
    if not valid_cancel(payload):
        return "not utf-8"
    if not payload:
        return "empty"
    if len(payload) == 256:
        return "256 bytes"
    return "other valid"


def flag_class(hello: bytes) -> str:
    obj = _loads(hello)
    if not isinstance(obj, dict) or "cancel" not in obj:
        return "absent"
    return str(obj["cancel"]) if isinstance(obj["cancel"], bool) else "wrong type"


def classify(case: list[Step]) -> set[str]:
    """The shapes of one cancel case: how each CANCEL stands to the REQ of its id."""
    seen: set[str] = set()
    flags: dict[int, str] = {}
    reqs: dict[tuple[int, str], dict[str, Any]] = {}  # (conn, id) -> what we know of that call
    group: dict[int, int] = {}  # conn -> number of its current write (sync, handshake, close: next)
    cancelled: Counter[tuple[int, str]] = Counter()
    for step in case:
        c = step.conn
        if step.op in ("sync", "handshake", "close", "connect"):
            group[c] = group.get(c, 0) + 1
            for made in reqs.values():
                if made["conn"] == c and step.op == "sync":
                    made["read"] = True
                    made["ended_then_read"] = made["ended"]
            if step.op == "handshake":
                flags[c] = flag_class(step.payload)
                seen.add(f"hello cancel {flags[c]}")
                if (_loads(step.payload) or {}).get("window", 1 << 20) < 1 << 20:
                    seen.add("small window")
            continue
        if step.op == "raw":
            frames = FrameDecoder(DEFAULT_MAX_FRAME_SIZE).feed(step.payload)
            kinds = Counter(f[0] for f in frames)
            if kinds[FrameType.CANCEL] >= 1000 and kinds[FrameType.REQUEST]:
                seen.add("flood")
            continue
        if step.type == FrameType.REQUEST:
            req = _loads(step.payload) or {}
            key = (c, str(req.get("id")))
            if cancelled[key]:
                seen.add("cancel before its REQ")
            if key in reqs:
                seen.add("id again after its CANCEL")
            reqs[key] = {"conn": c, "group": group.get(c, 0), "read": False, "ended": False,
                         "ended_then_read": False, "action": req.get("action"), "stream": req.get("stream")}
        elif step.type == FrameType.STREAM_DATA:
            sid = step.payload[2:2 + step.payload[1]].decode(errors="replace")
            stream = reqs.get((c, sid))
            if stream is not None:
                if cancelled[(c, sid)] and stream["read"] and not stream["ended"]:
                    seen.add("stream chunks after its CANCEL")
                if step.payload[0] & (STREAM_FLAG_END | STREAM_FLAG_ERROR):
                    stream["ended"] = True
        elif step.type == FrameType.CANCEL:
            seen.add(f"payload {payload_class(step.payload)}")
            if flags.get(c) in ("False", "absent"):
                seen.add("CANCEL from a peer that did not offer cancel")
            call_id = step.payload.decode(errors="replace")
            key = (c, call_id)
            cancelled[key] += 1
            call = reqs.get(key)
            if cancelled[key] == 2 and call is not None:
                seen.add("CANCEL twice")
            if any(k[1] == call_id and k[0] != c for k in reqs):
                seen.add("CANCEL of another connection's call")
            if call is None:
                continue
            if call["group"] == group.get(c, 0):
                seen.add(f"{'stream ' if call['stream'] else ''}REQ and its CANCEL in one write")
            elif call["ended_then_read"] or (not call["stream"] and call["read"]
                                             and call["action"] != "fuzz.download"):
                seen.add("CANCEL of a finished call")
            elif call["stream"] and call["read"]:
                seen.add("CANCEL of a request stream in flight")
            elif call["action"] == "fuzz.download" and call["read"]:
                seen.add("CANCEL of a response stream in flight")
    return seen


# --- the generators ----------------------------------------------------------------------


def test_cancel_cases_cover_the_cancel_surface() -> None:
    gen = generator()
    cases = draw(lambda data: gen.cancel_case(data, gen.prefix()), 300, seed=11)
    assert len(cases) >= 250 and all(isinstance(c, _Case) for c in cases)
    seen: Counter[str] = Counter()
    for case in cases:
        seen.update(classify(case))
    wanted = [
        "hello cancel True", "hello cancel False", "hello cancel absent", "hello cancel wrong type",
        "small window", "REQ and its CANCEL in one write", "stream REQ and its CANCEL in one write",
        "cancel before its REQ", "CANCEL twice", "CANCEL of a finished call",
        "CANCEL of a request stream in flight", "stream chunks after its CANCEL",
        "CANCEL of a response stream in flight", "id again after its CANCEL",
        "CANCEL of another connection's call", "CANCEL from a peer that did not offer cancel",
        "flood", "payload not utf-8", "payload empty", "payload 256 bytes", "payload over 256 bytes",
        "payload huge", "payload other valid",
    ]
    missing = [w for w in wanted if not seen[w]]
    assert not missing, (missing, dict(seen))


def test_what_a_cancel_case_promises_is_only_what_the_protocol_promises() -> None:
    """A connection the oracle expects to stay open sent only valid CANCELs (UTF-8, at most 256
    bytes) and offered a bool or nothing in its HELLO; a call expected to succeed is named by
    no CANCEL of its own connection; the node id checked afterwards is that of connection 0."""
    gen = generator()
    cases = draw(lambda data: gen.cancel_case(data, gen.prefix()), 300, seed=12)
    kept = expected = 0
    for case in cases:
        for c in case.keep_open:
            kept += 1
            hellos = [s for s in case if s.conn == c and s.op == "handshake"]
            assert len(hellos) == 1 and flag_class(hellos[0].payload) != "wrong type", case
            assert not [s for s in case if s.conn == c and s.op == "close"], case
            for s in case:
                if s.conn == c and s.op == "frame" and s.type == FrameType.CANCEL:
                    assert valid_cancel(s.payload), (c, s.payload[:40])
                if s.conn == c and s.op == "raw":
                    frames = FrameDecoder(DEFAULT_MAX_FRAME_SIZE).feed(s.payload)
                    assert all(valid_cancel(bytes(f[1])) for f in frames if f[0] == FrameType.CANCEL)
        for c, call_id in case.expect_ok:
            expected += 1
            assert any(s.conn == c and s.op == "frame" and s.type == FrameType.REQUEST
                       and (_loads(s.payload) or {}).get("id") == call_id for s in case)
            assert not any(s.conn == c and s.op == "frame" and s.type == FrameType.CANCEL
                           and s.payload == call_id.encode() for s in case)
        if case.node_id is not None:
            first = next(s for s in case if s.conn == 0)
            assert first.op == "handshake" and (_loads(first.payload) or {}).get("nodeID") == case.node_id
    assert kept > 150 and expected > 30, (kept, expected)


def test_hellos_say_cancel_true_false_nothing_or_garbage() -> None:
    """A bool or nothing decodes (the target accepts it); a wrong type does not (the target
    refuses that HELLO)."""
    gen = generator()
    flags = draw(lambda data: data.draw(_cancel_flags()), 200, seed=13)
    kinds: Counter[str] = Counter()
    for flag in flags:
        payload = gen.hello_flag("fuzz-x", flag)
        if flag is _ABSENT:
            kinds["absent"] += 1
            assert "cancel" not in msgspec.msgpack.decode(payload)
            assert msgspec.msgpack.decode(payload, type=Hello).cancel is False
        elif isinstance(flag, bool):
            kinds[str(flag)] += 1
            assert msgspec.msgpack.decode(payload, type=Hello).cancel is flag
        else:
            kinds["wrong type"] += 1
            with pytest.raises((msgspec.DecodeError, msgspec.ValidationError)):
                msgspec.msgpack.decode(payload, type=Hello)
    assert all(kinds[k] > 5 for k in ("True", "False", "absent", "wrong type")), kinds


def test_cancel_payloads_reach_every_size_and_encoding() -> None:
    payloads = draw(lambda data: data.draw(_cancel_payloads(["own-call"])), 600, seed=14)
    kinds = Counter(payload_class(p) for p in payloads)
    assert b"own-call" in payloads
    for kind in ("not utf-8", "empty", "256 bytes", "over 256 bytes", "huge", "largest frame or over"):
        assert kinds[kind], (kind, kinds)
    sizes = {len(p) for p in payloads}
    assert {DEFAULT_MAX_FRAME_SIZE - 6, DEFAULT_MAX_FRAME_SIZE - 5} & sizes, sorted(sizes)[-5:]


def test_every_frame_type_is_generated_after_a_handshake() -> None:
    """frame_step once raised ValueError for CANCEL (not a packet type): every batch that drew it
    ended, silently, with a note. Every frame type, CANCEL included, must build."""
    gen = generator()
    steps = draw(lambda data: gen.frame_step(data, 0, "fuzz-p", ["a-stream"]), 600, seed=15)
    types = Counter(s.type for s in steps)
    assert set(types) == {int(t) for t in FrameType}, sorted(set(FrameType) - set(types))
    cases = draw(lambda data: gen.handshake_case(data, gen.prefix()), 120, seed=16)
    flags = Counter(flag_class(s.payload) for case in cases for s in case if s.op == "handshake")
    assert flags["wrong type"] and flags["False"] and flags["True"], flags


def test_sync_steps_round_trip() -> None:
    rep = Reproducer([Step(0, "handshake", FrameType.HELLO, b"\x80"), Step(0, "sync"),
                      Step(0, "frame", FrameType.CANCEL, b"id")])
    data = json.loads(json.dumps(rep.to_json()))
    assert Reproducer.from_json(data) == Reproducer(rep.steps)
    assert data["steps"][2]["name"] == "CANCEL" and "sync" in rep.how


# --- the oracles, on planted defects ------------------------------------------------------


def node(*args: str) -> NodeProcess:
    return NodeProcess([sys.executable, NODE, "--max-peer-requests", "64", *args])


@pytest.mark.anyio
async def test_a_sync_step_lets_the_target_start_the_call_before_its_cancel() -> None:
    """REQ and CANCEL in one write: the CANCEL finds the handler still queued. With a sync
    between them it finds it running (the node planted with exit-running dies of that)."""
    hello = msgspec.msgpack.encode({"nodeID": "replayer", "ver": "5", "window": 1 << 20, "maxChunk": 1 << 16,
                                    "cancel": True})

    def steps(call_id: str, sync: bool) -> list[Step]:
        call = MSGPACK.encode(Request(sender="replayer", id=call_id, action="fuzz.slow"))
        return [Step(0, "handshake", FrameType.HELLO, hello), Step(0, "frame", FrameType.REQUEST, call),
                *([Step(0, "sync")] if sync else []), Step(0, "frame", FrameType.CANCEL, call_id.encode())]

    async with node("--break-cancel", "exit-running") as target:
        assert await replay(target.address, Reproducer(steps("slow-1", sync=False)), bound=2.0) == "ok"
        assert await replay(target.address, Reproducer(steps("slow-2", sync=True)), bound=2.0) == "refused"


@pytest.mark.anyio
@pytest.mark.parametrize(("defect", "kind"), [
    ("raise", "misbehaved"),       # _cancel_id raises RuntimeError: the valid CANCEL's connection is dropped
    ("exit-queued", "crash"),      # the node dies on a CANCEL of a queued handler (REQ + CANCEL in one write)
    ("exit-stream", "crash"),      # ... of a stream handler reading its request stream
    ("leak", "leak"),              # a CANCEL that finds its handler leaves a request counted
])
async def test_the_cancel_category_catches_a_planted_defect(defect: str, kind: str) -> None:
    async with node("--break-cancel", defect) as target:
        report = await fuzz_node(target, duration=3, seed=7, legit_action="fuzz.echo", legit_params={"text": "x"},
                                 actions=["fuzz.echo", "fuzz.slow"], upload_action="fuzz.upload",
                                 download_action="fuzz.download", download_params={"size": 200_000},
                                 categories=["cancel"], minimize_budget=0, settle=1)
    summary = report.summary()
    hits = [f for f in report.findings if f.kind == kind]
    assert hits, summary
    if kind == "crash":
        assert any("PlantedCancelError" in f.signature for f in hits), summary
    if kind == "misbehaved":
        assert hits[0].signature == "misbehaved:closed", summary
    if kind == "leak":
        assert any(f.signature == "leak:peer_requests" for f in hits), summary
    assert report.category("cancel").cases > 0
