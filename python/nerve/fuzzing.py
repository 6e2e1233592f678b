"""The live-node protocol fuzzer: a hostile peer that attacks a running nerve node over raw TCP.

It speaks the wire itself (frames, HELLO handshake and HMAC auth, packets, stream frames) and
sends what a broken or malicious peer could: a recorded legitimate session, mutated; generated
frames of every type with wrong-typed fields, invalid UTF-8, huge and deeply nested values and
odd addresses; stateful sequences from a hypothesis ``RuleBasedStateMachine``; bursts of
connections, streams and requests; CANCEL frames (for its own calls in flight, queued, finished
or not yet made, for streams still flowing, garbage ones, floods, from peers that did or did not
offer ``cancel``). Oracles watch the target throughout: the process is alive,
a real :class:`nerve.Broker` keeps calling an action within a latency bound, and the target's
RSS and open descriptors come back to their baseline once the hostile connections are closed.
After each cancel case a burst of calls from the same node id must all be answered (a request
count left behind by a cancelled call shows as ``QueueIsFullError``), and a connection that sent
only valid frames must stay open.
:func:`fuzz_service` fuzzes one action's params from its msgspec Struct (or JSON schema).

Reached through :mod:`nerve.testing` and ``nerve fuzz``; it needs ``hypothesis`` (the
``testing`` extra). It uses only the public API and the wire layer; the broker knows nothing of it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import math
import os
import random
import re
import shlex
import struct
import tempfile
import time
import uuid
import warnings
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import trio
from hypothesis import HealthCheck, Phase, Verbosity, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st
from hypothesis.errors import HypothesisDeprecationWarning, HypothesisException
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import nerve
from nerve.errors import NerveError, RequestTimeoutError
from nerve.frames import (
    DEFAULT_MAX_FRAME_SIZE,
    HEADER_LEN,
    STREAM_FLAG_END,
    STREAM_FLAG_ERROR,
    STREAM_FLAG_RESPONSE,
    FrameDecoder,
    FrameType,
    encode_frame,
)
from nerve.packets import Disconnect, Event, PacketType, Ping, Request
from nerve.serializers import get_serializer
from nerve.transports.tcp import Hello, parse_address

__all__ = [
    "ODD_ADDRESSES",
    "BadStr",
    "Nested",
    "pack",
    "Step",
    "Reproducer",
    "Finding",
    "CategoryStats",
    "LegitStats",
    "FuzzReport",
    "NodeProcess",
    "fuzz_node",
    "fuzz_service",
    "replay",
    "minimize",
]

log = logging.getLogger("nerve.fuzz")

ODD_ADDRESSES: tuple[str, ...] = (
    "tcp://127.0.0.1:99999",
    "tcp://[::1",
    "",
    "tcp://",
    "tcp://:0",
    "tcp://127.0.0.1",
    "tcp://127.0.0.1:-1",
    "tcp://127.0.0.1:port",
    "tcp://127.0.0.1:0",
    "udp://127.0.0.1:4000",
    "tcp://256.256.256.256:1",
    "tcp://[::1]:99999",
    "tcp://user:pw@127.0.0.1:1",
    "tcp://\x00:1",
    "tcp://" + "a" * 300 + ":1",
)
"""Addresses a hostile HELLO or PEERS frame names: out of range, unparsable, empty, wrong scheme."""

_MSGPACK = get_serializer("msgpack")
_RECV = 256 * 1024
_WINDOW = 1024 * 1024
_CHUNK = 64 * 1024


# --- msgpack with values msgspec will not write ----------------------------------------


class BadStr(bytes):
    """Bytes written as a msgpack *str* (so they may be invalid UTF-8) by :func:`pack`."""


@dataclass(frozen=True)
class Nested:
    """An array (or map) nested ``depth`` levels deep, written by :func:`pack` without recursion."""

    depth: int
    maps: bool = False


def _header(n: int, fix: int, fix_max: int, codes: tuple[int, int, int] | tuple[int, int]) -> bytes:
    if n <= fix_max:
        return bytes([fix | n])
    if len(codes) == 3 and n < 256:
        return bytes([codes[0]]) + struct.pack(">B", n)
    if n < 65536:
        return bytes([codes[-2]]) + struct.pack(">H", n)
    return bytes([codes[-1]]) + struct.pack(">I", n)


def pack(value: Any) -> bytes:
    """msgpack of ``value``, where :class:`BadStr` and :class:`Nested` may appear anywhere
    (msgspec refuses to write either); everything else is written as msgspec would."""
    if isinstance(value, BadStr):
        return _header(len(value), 0xA0, 31, (0xD9, 0xDA, 0xDB)) + bytes(value)
    if isinstance(value, Nested):
        if value.maps:
            return b"\x81\xa1k" * value.depth + b"\xc0"
        return b"\x91" * value.depth + b"\xc0"
    if isinstance(value, dict):
        out = [_header(len(value), 0x80, 15, (0xDE, 0xDF))]
        for k, v in value.items():
            out.append(pack(k))
            out.append(pack(v))
        return b"".join(out)
    if isinstance(value, (list, tuple)):
        out = [_header(len(value), 0x90, 15, (0xDC, 0xDD))]
        out.extend(pack(v) for v in value)
        return b"".join(out)
    return msgspec.msgpack.encode(value)


def _loads(payload: bytes) -> Any:
    """Lenient msgpack decode (None when it does not decode)."""
    try:
        return msgspec.msgpack.decode(payload)
    except (msgspec.DecodeError, RecursionError, ValueError):
        return None


def _stream_payload(flags: int, stream_id: bytes, seq: int, body: bytes = b"") -> bytes:
    """A STREAM_DATA / STREAM_CREDIT payload (``seq`` is the consumed count for credit)."""
    return bytes([flags & 0xFF, len(stream_id) & 0xFF]) + stream_id + struct.pack(">Q", seq % 2**64) + body


def _parse_stream(payload: bytes) -> tuple[int, bytes, int, bytes] | None:
    if len(payload) < 2:
        return None
    n = payload[1]
    if len(payload) < 2 + n + 8:
        return None
    (seq,) = struct.unpack(">Q", payload[2 + n:10 + n])
    return payload[0], payload[2:2 + n], seq, payload[10 + n:]


# --- reproducers ------------------------------------------------------------------------


@dataclass
class Step:
    """One step of a case, on connection ``conn`` (an index within the case).

    ``op`` is ``"connect"`` (open the TCP connection), ``"handshake"`` (send ``payload`` as the
    HELLO frame, wait for HELLO_ACK and, when the fuzzer has a secret, answer the auth proof),
    ``"frame"`` (a frame of ``type`` carrying ``payload``), ``"raw"`` (``payload`` as is: a
    truncated or bit-flipped frame, or many frames at once), ``"sync"`` (send what is pending,
    then a PING, and wait for its PONG: the target has read everything before; nothing on a
    connection without a handshake) or ``"close"``. A frame or raw step on a connection not yet
    open opens it (with no handshake). Consecutive frame and raw steps on one connection go out
    in one write, so the target may read them in one piece.
    """

    conn: int
    op: str
    type: int = 0
    payload: bytes = b""

    def to_json(self) -> dict[str, Any]:
        """The step as plain data (payloads in hex)."""
        out: dict[str, Any] = {"conn": self.conn, "op": self.op}
        if self.op == "frame":
            out["type"] = self.type
            try:
                out["name"] = FrameType(self.type).name
            except ValueError:
                out["name"] = "?"
        if self.op in ("frame", "raw", "handshake"):
            out["payload"] = self.payload.hex()
        return out

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Step:
        """A step from its plain data (``to_json``'s)."""
        op = str(obj["op"])
        return cls(int(obj["conn"]), op, int(obj.get("type", FrameType.HELLO if op == "handshake" else 0)),
                   bytes.fromhex(obj.get("payload", "")))

    def size(self) -> int:
        """Bytes this step sends."""
        return len(self.payload) + (6 if self.op == "frame" else 0)


@dataclass
class Reproducer:
    """What to send to reproduce a finding: the steps, in order (see :class:`Step`); connections
    are closed at the end. Replay it with :func:`replay`."""

    steps: list[Step]
    how: str = ("steps in order; consecutive frame/raw steps on one connection in one write; "
                "handshake = HELLO (+ HMAC proof with the secret); sync = PING, then wait for its PONG; "
                "every connection closed at the end")

    def to_json(self) -> dict[str, Any]:
        """The reproducer as plain data (``replay`` takes it back)."""
        return {"how": self.how, "steps": [s.to_json() for s in self.steps]}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Reproducer:
        """A reproducer from its plain data (``to_json``'s, as a report stores it)."""
        return cls([Step.from_json(s) for s in obj["steps"]])

    def frames(self) -> list[tuple[int, str]]:
        """The frames as ``(type, hex payload)`` (raw steps as type 0)."""
        return [(s.type if s.op == "frame" else 0, s.payload.hex())
                for s in self.steps if s.op in ("frame", "raw")]

    def size(self) -> int:
        """Total bytes sent by its steps."""
        return sum(s.size() for s in self.steps) + 16 * len(self.steps)


# --- report -----------------------------------------------------------------------------


@dataclass
class Finding:
    """A defect: ``kind`` is ``crash`` (the node died or stopped accepting connections),
    ``hang`` (alive but not answering within the latency bound), ``leak`` (RSS or descriptors
    above their baseline after the run; or a peer's request count left behind: after a cancel
    case, calls from its node id are refused with ``QueueIsFullError`` while a fresh node's are
    answered), ``legit_call_failed`` (the legitimate client's call failed while the node was
    up), ``misbehaved`` (a cancel case's connection that sent only valid frames was closed, or
    a call no CANCEL of its own named was not answered with success) or ``internal_error``
    (an action answered a 5xx or a non-nerve exception: :func:`fuzz_service`)."""

    kind: str
    category: str
    summary: str
    detail: str = ""
    reproducer: Reproducer | None = None
    params: Any = None
    action: str | None = None
    minimized: bool = False
    reproduced: bool | None = None
    count: int = 1
    signature: str = ""

    def to_json(self) -> dict[str, Any]:
        """The finding as plain data."""
        out = {k: v for k, v in asdict(self).items() if k != "reproducer"}
        out["reproducer"] = self.reproducer.to_json() if self.reproducer is not None else None
        out["params"] = msgspec.to_builtins(self.params, enc_hook=repr) if self.params is not None else None
        return out


@dataclass
class CategoryStats:
    """What was sent in one category: cases (each a few connections), connections, frames, bytes."""

    cases: int = 0
    connections: int = 0
    frames: int = 0
    bytes: int = 0


@dataclass
class LegitStats:
    """The legitimate client's calls: how many, how many failed, the slowest, and the failures."""

    action: str = ""
    calls: int = 0
    failed: int = 0
    max_latency: float = 0.0
    failures: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class FuzzReport:
    """The outcome of :func:`fuzz_node` or :func:`fuzz_service`. ``ok`` is True when nothing
    was found; ``to_json()`` and ``summary()`` give it as data and as text."""

    target: str
    seed: int
    duration: float = 0.0
    categories: dict[str, CategoryStats] = field(default_factory=dict)
    legit: LegitStats = field(default_factory=LegitStats)
    resources: dict[str, Any] = field(default_factory=dict)
    findings: list[Finding] = field(default_factory=list)
    restarts: int = 0
    notes: list[str] = field(default_factory=list)

    def _of(self, kind: str) -> list[Finding]:
        return [f for f in self.findings if f.kind == kind]

    @property
    def crashes(self) -> list[Finding]:
        """Findings where the node died."""
        return self._of("crash")

    @property
    def hangs(self) -> list[Finding]:
        """Findings where the node stopped answering in time."""
        return self._of("hang")

    @property
    def leaks(self) -> list[Finding]:
        """Findings where memory, descriptors or counts grew and did not come back."""
        return self._of("leak")

    @property
    def failed_legit_calls(self) -> int:
        """How many of the legitimate client's calls failed (or took longer than its latency bound)."""
        return self.legit.failed

    @property
    def ok(self) -> bool:
        """True when there is no finding of any kind."""
        return not self.findings and self.legit.failed == 0

    def category(self, name: str) -> CategoryStats:
        """The statistics of one category of cases (created on first use)."""
        return self.categories.setdefault(name, CategoryStats())

    def to_json(self) -> dict[str, Any]:
        """The report as plain data (what ``--report`` writes)."""
        return {
            "target": self.target,
            "seed": self.seed,
            "duration": round(self.duration, 3),
            "ok": self.ok,
            "categories": {k: asdict(v) for k, v in self.categories.items()},
            "legit": asdict(self.legit),
            "resources": self.resources,
            "restarts": self.restarts,
            "findings": [f.to_json() for f in self.findings],
            "notes": self.notes,
        }

    def summary(self) -> str:
        """The report as text (what ``nerve fuzz`` prints)."""
        lines = [f"nerve fuzz: {self.target}, seed {self.seed}, {self.duration:.1f}s"]
        for name, c in self.categories.items():
            lines.append(f"  {name:<10} {c.cases:>7} cases {c.connections:>7} connections "
                         f"{c.frames:>8} frames {c.bytes / 1e6:>9.1f} MB")
        lg = self.legit
        if lg.action:
            lines.append(f"  legitimate client: {lg.calls} calls to {lg.action}, {lg.failed} failed, "
                         f"slowest {lg.max_latency * 1000:.0f} ms")
        if self.resources:
            lines.append(f"  resources: {json.dumps(self.resources)}")
        if self.restarts:
            lines.append(f"  target restarted {self.restarts} times")
        if not self.findings:
            lines.append("  no findings" if self.ok else "  no findings, but legitimate calls failed")
        for i, f in enumerate(self.findings, 1):
            what = f"{f.action}: " if f.action else ""
            lines.append(f"  [{i}] {f.kind.upper()} ({f.category}, seen {f.count}x): {what}{f.summary}")
            if f.detail:
                for line in f.detail.strip().splitlines()[-4:]:
                    lines.append(f"        | {line[:160]}")
            if f.params is not None:
                lines.append(f"      params: {_short(repr(f.params), 300)}")
            if f.reproducer is not None:
                state = "minimized" if f.minimized else "not minimized"
                if f.reproduced is not None:
                    state += ", reproduced on a fresh target" if f.reproduced else ", did not reproduce on a fresh target"
                lines.append(f"      reproducer ({state}, {len(f.reproducer.steps)} steps):")
                for s in f.reproducer.steps[:12]:
                    j = s.to_json()
                    payload = j.get("payload", "")
                    label = j.get("name", "") or s.op
                    lines.append(f"        conn {s.conn} {s.op:<9} {label if s.op == 'frame' else '':<13} "
                                 f"{_short(payload, 96)}")
                if len(f.reproducer.steps) > 12:
                    lines.append(f"        ... {len(f.reproducer.steps) - 12} more")
        for note in self.notes:
            lines.append(f"  note: {note}")
        return "\n".join(lines)


def _short(text: str, n: int) -> str:
    return text if len(text) <= n else text[:n] + f"...({len(text)} chars)"


# --- the target -------------------------------------------------------------------------


class NodeProcess:
    """A target node the fuzzer starts itself (and restarts after a crash, and for each replay
    while minimizing): ``argv`` runs a node that prints one JSON line with its ``address``
    (``nerve run`` does; ``nodeID`` and ``pid`` are read too when present). Its stderr is kept
    in a temporary file; the tail is quoted in crash findings."""

    def __init__(self, argv: Sequence[str] | str, *, env: dict[str, str] | None = None,
                 cwd: str | os.PathLike[str] | None = None, start_timeout: float = 30.0) -> None:
        self.argv = shlex.split(argv) if isinstance(argv, str) else list(argv)
        self.env = env
        self.cwd = cwd
        self.start_timeout = start_timeout
        self.process: trio.Process | None = None
        self.address: str = ""
        self.node_id: str | None = None
        self.pid: int | None = None
        self._dir = Path(tempfile.mkdtemp(prefix="nerve-fuzz-"))
        self._starts = 0
        self._stderr: Path | None = None

    async def start(self) -> None:
        """Start the node's process and read its first JSON line (its address)."""
        self._starts += 1
        out = self._dir / f"stdout-{self._starts}"
        self._stderr = self._dir / f"stderr-{self._starts}"
        with open(out, "wb") as fo, open(self._stderr, "wb") as fe:
            self.process = await trio.lowlevel.open_process(self.argv, stdout=fo, stderr=fe,
                                                            env=self.env, cwd=self.cwd)
        with trio.fail_after(self.start_timeout):
            while True:
                text = out.read_text(errors="replace")
                line = text.split("\n", 1)[0] if "\n" in text else ""
                if line:
                    break
                if self.process.poll() is not None:
                    raise RuntimeError(f"target exited ({self.process.returncode}) before printing its "
                                       f"address: {self.stderr_tail()}")
                await trio.sleep(0.02)
        info = json.loads(line)
        self.address = str(info["address"])
        self.node_id = info.get("nodeID")
        self.pid = int(info.get("pid") or self.process.pid)

    def alive(self) -> bool:
        """Whether the process is still running."""
        return self.process is not None and self.process.poll() is None

    def stderr_tail(self, lines: int = 12) -> str:
        """The last lines the process wrote to stderr (for a report)."""
        if self._stderr is None or not self._stderr.exists():
            return ""
        with open(self._stderr, "rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - 16384))
            text = f.read().decode(errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def crash_signature(self) -> str:
        """The exception that ended the process (the innermost of an exception group), with
        quoted values blanked so that one defect hit with different inputs reads the same;
        else the exit code."""
        for line in reversed(self.stderr_tail(60).splitlines()):
            line = line.strip().lstrip("|+ ").strip()
            match = _EXCEPTION_LINE.match(line)
            if match and "ExceptionGroup" not in match.group(1) and "MultiError" not in match.group(1):
                return _QUOTED.sub("'…'", line)[:200]
        code = self.process.returncode if self.process is not None else None
        return f"exit code {code}"

    async def stop(self) -> None:
        """Stop the process (SIGTERM, then SIGKILL after a grace period)."""
        proc = self.process
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            with trio.move_on_after(3):
                await proc.wait()
            if proc.poll() is None:
                proc.kill()
                with trio.CancelScope(shield=True):
                    await proc.wait()
        self.process = None

    async def restart(self) -> None:
        """Kill the process if it still runs and start it again (to go on fuzzing after a finding)."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            with trio.CancelScope(shield=True):
                await self.process.wait()
        await self.stop()
        await self.start()

    async def __aenter__(self) -> NodeProcess:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        with trio.CancelScope(shield=True):
            await self.stop()


_EXCEPTION_LINE = re.compile(r"^((?:[A-Za-z_][\w]*\.)*[A-Za-z_]\w*(?:Error|Exception|Exit|Interrupt|Fault|Warning))(?::|$)")
_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"|\b\d+\b")


def _node_of(case: Sequence[Step], conn: int) -> str:
    """The node id a case's connection said in its HELLO (or "?")."""
    for s in case:
        if s.conn == conn and s.op == "handshake":
            hello = _loads(s.payload)
            if isinstance(hello, dict) and isinstance(hello.get("nodeID"), str):
                return str(hello["nodeID"])
    return "?"


def _proc_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
        return state not in (b"Z", b"X")
    except (OSError, IndexError):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


def _rss(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _peak_rss(pid: int) -> int | None:
    """The process's peak RSS so far (VmHWM), in bytes."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _fds(pid: int) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def _cpu_seconds(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


# --- a hostile connection ---------------------------------------------------------------


class _Conn:
    """One raw connection to the target: writes what it is told, reads and counts what comes."""

    def __init__(self, stream: trio.SocketStream, node_id: str) -> None:
        self.stream = stream
        self.node_id = node_id
        self.decoder = FrameDecoder(DEFAULT_MAX_FRAME_SIZE)
        self.eof = False
        self.ack: Hello | None = None
        self.ack_raw: bytes | None = None
        self.pongs: set[str] = set()
        self.received = 0
        self.handshaken = False
        self.response_streams: deque[str] = deque(maxlen=32)
        #: call id -> "ok" or the error's name, for the RES frames received (the first 65536)
        self.answers: dict[str, str] = {}
        self.pending = bytearray()
        self.ends_raw = False  # the last thing written was raw bytes (perhaps half a frame)
        self._arrived = trio.Event()
        self.scope = trio.CancelScope()

    async def read(self) -> None:
        with self.scope:
            try:
                while True:
                    data = await self.stream.receive_some(_RECV)
                    if not data:
                        break
                    try:
                        frames = self.decoder.feed(data)
                    except NerveError:
                        break
                    for frame in frames:
                        self._on_frame(frame[0], bytes(frame[1]))
                    self._wake()
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass
            finally:
                self.eof = True
                self._wake()

    def _wake(self) -> None:
        self._arrived.set()
        self._arrived = trio.Event()

    def _on_frame(self, kind: int, payload: bytes) -> None:
        self.received += 1
        if kind == FrameType.HELLO_ACK and self.ack_raw is None:
            self.ack_raw = payload
            try:
                self.ack = msgspec.msgpack.decode(payload, type=Hello)
            except msgspec.DecodeError:
                self.ack = None
        elif kind == FrameType.PONG:
            obj = _loads(payload)
            if isinstance(obj, dict) and isinstance(obj.get("id"), str):
                self.pongs.add(obj["id"])
        elif kind == FrameType.RESPONSE:
            obj = _loads(payload)
            if isinstance(obj, dict) and isinstance(obj.get("id"), str):
                if obj.get("stream"):
                    self.response_streams.append(obj["id"])
                if len(self.answers) < 65536:
                    error = obj.get("error")
                    name = error.get("name") if isinstance(error, dict) else None
                    self.answers[obj["id"]] = "ok" if obj.get("success") is True else str(name or "error")

    async def wait_for(self, predicate: Callable[[], bool], timeout: float) -> bool:
        with trio.move_on_after(timeout):
            while not predicate():
                if self.eof:
                    return predicate()
                await self._arrived.wait()
            return True
        return False

    async def flush(self) -> int:
        if not self.pending:
            return 0
        data, self.pending = bytes(self.pending), bytearray()
        if self.eof:
            return 0
        try:
            await self.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            self.eof = True
            return 0
        return len(data)

    async def close(self) -> None:
        self.scope.cancel()
        await trio.aclose_forcefully(self.stream)


def _hello_payload(node_id: str, *, namespace: str = "", ver: str = "5", auth: bool = False,
                   address: str | None = None, **overrides: Any) -> bytes:
    fields: dict[str, Any] = {"nodeID": node_id, "namespace": namespace, "ver": ver,
                              "window": _WINDOW, "maxChunk": _CHUNK, "auth": auth,
                              "nonce": os.urandom(16) if auth else b""}
    if address is not None:
        fields["address"] = address
    fields.update(overrides)
    return pack(fields)


def _dialer_proof(secret: bytes, acceptor_nonce: bytes, dialer_nonce: bytes, me: str, peer: str) -> bytes:
    """The dialer's HMAC proof of the handshake (see docs/protocol.md, Connections)."""
    message = (b"nerve-auth\0dialer\0" + acceptor_nonce + dialer_nonce + me.encode(errors="surrogatepass")
               + b"\0" + peer.encode(errors="surrogatepass"))
    return hmac.new(secret, message, hashlib.sha256).digest()


@dataclass
class _Outcome:
    """What one case's run observed."""

    connections: int = 0
    frames: int = 0
    bytes: int = 0
    refused: int = 0  # connections the target did not accept (ECONNREFUSED)
    stalled: int = 0  # handshakes the target did not answer within the bound
    canary: str = "none"  # "pong", "closed", "timeout" or "none"


class _Runner:
    """Runs the steps of one case against an address, the connections' readers in ``nursery``."""

    def __init__(self, address: str, nursery: trio.Nursery, *, secret: bytes | None, bound: float,
                 prefix: str) -> None:
        self.host, self.port = parse_address(address)
        self.nursery = nursery
        self.secret = secret
        self.bound = bound
        self.prefix = prefix
        self.conns: dict[int, _Conn] = {}
        self.outcome = _Outcome()
        self.last: int | None = None

    def node_id(self, index: int) -> str:
        return f"{self.prefix}-{index}"

    async def _open(self, index: int) -> _Conn | None:
        conn = self.conns.get(index)
        if conn is not None and not conn.eof:
            return conn
        if conn is not None:
            await conn.close()
        try:
            with trio.fail_after(self.bound):
                stream = await trio.open_tcp_stream(self.host, self.port)
        except (OSError, trio.TooSlowError):
            self.outcome.refused += 1
            self.conns.pop(index, None)
            return None
        conn = _Conn(stream, self.node_id(index))
        self.conns[index] = conn
        self.outcome.connections += 1
        self.nursery.start_soon(conn.read)
        return conn

    async def apply(self, step: Step) -> None:
        if self.last is not None and self.last != step.conn and self.last in self.conns:
            self.outcome.bytes += await self.conns[self.last].flush()
        self.last = step.conn
        if step.op == "close":
            conn = self.conns.pop(step.conn, None)
            if conn is not None:
                self.outcome.bytes += await conn.flush()
                await conn.close()
            return
        conn = self.conns.get(step.conn)
        if step.op == "sync":
            if conn is not None and conn.handshaken and not conn.eof:
                self.outcome.frames += 1
                await self.sync(conn)
            return
        if conn is None or step.op == "connect" or (conn.eof and step.op == "handshake"):
            conn = await self._open(step.conn)
            if conn is None or step.op == "connect":
                return
        if step.op == "handshake":
            await self._handshake(conn, step.payload)
        elif step.op == "frame":
            conn.pending += encode_frame(step.type, step.payload)
            conn.ends_raw = False
            self.outcome.frames += 1
        elif step.op == "raw":
            conn.pending += step.payload
            conn.ends_raw = True
            self.outcome.frames += 1

    async def _handshake(self, conn: _Conn, payload: bytes) -> None:
        conn.pending += encode_frame(FrameType.HELLO, payload)
        self.outcome.frames += 1
        self.outcome.bytes += await conn.flush()
        if not await conn.wait_for(lambda: conn.ack_raw is not None, self.bound):
            if not conn.eof:
                self.outcome.stalled += 1
            return
        ack = conn.ack
        if ack is None or not ack.accept:
            return
        if self.secret is not None and ack.auth:
            hello = _loads(payload)
            if not isinstance(hello, dict):
                return
            me = hello.get("nodeID")
            nonce = hello.get("nonce")
            if not isinstance(me, str) or not isinstance(nonce, bytes):
                return
            proof = _dialer_proof(self.secret, ack.nonce, nonce, me, ack.node_id)
            conn.pending += encode_frame(FrameType.HELLO, pack({"nodeID": me, "proof": proof}))
            self.outcome.frames += 1
        conn.handshaken = True

    async def flush_all(self) -> None:
        for conn in list(self.conns.values()):
            self.outcome.bytes += await conn.flush()

    async def sync(self, conn: _Conn, timeout: float | None = None) -> bool:
        """Send what is pending and a PING; True once its PONG is back (the target has read
        all that came before), False if the connection ended or the bound passed first."""
        ping_id = uuid.uuid4().hex
        conn.pending += encode_frame(FrameType.PING, _MSGPACK.encode(Ping(sender=conn.node_id, id=ping_id)))
        conn.ends_raw = False
        self.outcome.bytes += await conn.flush()
        return await conn.wait_for(lambda: ping_id in conn.pongs, self.bound if timeout is None else timeout)

    async def finish(self, canary_timeout: float) -> _Outcome:
        """Flush, check with a PING that the last handshaken connection was processed (PONG)
        or dropped, then close every connection."""
        await self.flush_all()
        live = [c for c in self.conns.values() if c.handshaken and not c.eof]
        if live and live[-1].ends_raw:
            self.outcome.canary = "skipped"  # a PING would only complete a half frame
        elif live:
            conn = live[-1]
            ping_id = uuid.uuid4().hex
            conn.pending += encode_frame(FrameType.PING, _MSGPACK.encode(Ping(sender=conn.node_id, id=ping_id)))
            await conn.flush()
            if await conn.wait_for(lambda: ping_id in conn.pongs, canary_timeout):
                self.outcome.canary = "pong"
            else:
                self.outcome.canary = "closed" if conn.eof else "timeout"
        for conn in list(self.conns.values()):
            await conn.close()
        self.conns.clear()
        return self.outcome


async def _probe(address: str, *, secret: bytes | None, bound: float, namespace: str = "",
                 ver: str = "5") -> tuple[str, str | None]:
    """Open a fresh connection and complete a handshake: ("ok", node id), ("refused", None)
    or ("timeout", None)."""
    async with trio.open_nursery() as nursery:
        runner = _Runner(address, nursery, secret=secret, bound=bound, prefix=f"fuzz-probe-{uuid.uuid4().hex[:8]}")
        await runner.apply(Step(0, "handshake", FrameType.HELLO, _hello_payload(
            runner.node_id(0), namespace=namespace, ver=ver, auth=secret is not None)))
        conn = runner.conns.get(0)
        result: tuple[str, str | None]
        if conn is None:
            result = ("refused", None)
        elif conn.ack is not None:
            result = ("ok", conn.ack.node_id)
            if conn.handshaken:
                conn.pending += encode_frame(FrameType.DISCONNECT, _MSGPACK.encode(
                    Disconnect(ver=ver, sender=conn.node_id)))
                await conn.flush()
        elif conn.eof:
            result = ("refused", None)
        else:
            result = ("timeout", None)
        for c in list(runner.conns.values()):
            await c.close()
        nursery.cancel_scope.cancel()
    return result


# --- the legitimate client --------------------------------------------------------------


class _LegitClient:
    """A real Broker calling ``action`` on the target over and over, timing every call."""

    def __init__(self, stats: LegitStats, action: str, params: Any, *, secret: bytes | None,
                 namespace: str, bound: float, interval: float = 0.02) -> None:
        self.stats = stats
        self.action = action
        self.params = params
        self.secret = secret
        self.namespace = namespace
        self.bound = bound
        self.interval = interval
        self.scope: trio.CancelScope | None = None
        self.last_ok = 0.0
        self.paused = False

    async def run(self, address: str, target_id: str | None,
                  task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            await self._run(address, target_id, task_status)
        except (NerveError, OSError, trio.TooSlowError) as exc:
            # the target went away under the client (a crash is reported by the other oracles)
            self.stats.failed += 1
            self.stats.failures.append({"t": round(trio.current_time(), 3), "latency": 0.0,
                                        "error": f"client stopped: {type(exc).__name__}: {exc}"[:300]})
        except Exception as exc:  # noqa: BLE001 - the legitimate node itself died: that is a finding
            # What the target sent on (PEERS, INFO...) ended a well-behaved node beside it.
            self.stats.failed += 1
            leaf: BaseException = exc
            while isinstance(leaf, BaseExceptionGroup) and leaf.exceptions:
                leaf = leaf.exceptions[0]
            self.stats.failures.append({"t": round(trio.current_time(), 3), "latency": 0.0,
                                        "error": f"legitimate node crashed: {type(leaf).__name__}: {leaf}"[:300]})

    async def _run(self, address: str, target_id: str | None, task_status: trio.TaskStatus[None]) -> None:
        with trio.CancelScope() as scope:
            self.scope = scope
            async with nerve.Broker(f"fuzz-legit-{os.getpid()}-{uuid.uuid4().hex[:6]}",
                                    transport="tcp://127.0.0.1:0", peers=[address], secret=self.secret,
                                    namespace=self.namespace, heartbeat_interval=1.0,
                                    heartbeat_timeout=30.0) as broker:
                with trio.fail_after(max(10.0, self.bound * 3)):
                    target_id = await _wait_target(broker, target_id)
                    service = self.action.rsplit(".", 1)[0]
                    if not self.action.startswith("$"):
                        await broker.wait_for_services(service, timeout=None)
                    await broker.call(self.action, self.params, node_id=target_id, timeout=self.bound * 3)
                self.last_ok = trio.current_time()
                task_status.started()
                while True:
                    await trio.sleep(self.interval)
                    if self.paused:
                        continue
                    t0 = trio.current_time()
                    try:
                        await broker.call(self.action, self.params, node_id=target_id, timeout=self.bound)
                        latency = trio.current_time() - t0
                        if latency > self.bound:
                            raise RequestTimeoutError(f"answered after {latency:.3f}s")
                        self.last_ok = trio.current_time()
                    except NerveError as exc:
                        latency = trio.current_time() - t0
                        self.stats.failed += 1
                        if len(self.stats.failures) < 100:
                            self.stats.failures.append({"t": round(t0, 3), "error": f"{type(exc).__name__}: {exc}"[:300],
                                                        "latency": round(latency, 3)})
                    self.stats.calls += 1
                    self.stats.max_latency = max(self.stats.max_latency, latency)

    def stop(self) -> None:
        if self.scope is not None:
            self.scope.cancel()


async def _wait_target(broker: nerve.Broker, target_id: str | None) -> str:
    while True:
        for node in broker.registry.nodes.values():
            if not node.local and node.available and (target_id is None or node.id == target_id):
                return node.id
        await trio.sleep(0.02)


# --- recording a legitimate session -----------------------------------------------------


@dataclass
class _Session:
    target_id: str
    frames: list[tuple[int, bytes]]
    actions: dict[str, dict[str, Any]]


async def _record_session(address: str, *, secret: bytes | None, namespace: str, legit_action: str,
                          legit_params: Any, upload_action: str | None, download_action: str | None,
                          download_params: Any, bound: float) -> _Session:
    """Run a real Broker through a recording proxy: its frames to the target (after the
    handshake), the target's id and action descriptions. Frames the target's services did not
    exercise (an event, a ping, stream credit) are added in the same shapes."""
    host, port = parse_address(address)
    recorded: list[tuple[int, bytes]] = []
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    proxy = f"tcp://127.0.0.1:{listeners[0].socket.getsockname()[1]}"

    async def pipe(src: trio.SocketStream, dst: trio.SocketStream, decoder: FrameDecoder | None) -> None:
        try:
            while data := await src.receive_some(_RECV):
                if decoder is not None:
                    recorded.extend((f[0], bytes(f[1])) for f in decoder.feed(data))
                await dst.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError, NerveError):
            pass
        finally:
            await trio.aclose_forcefully(dst)

    async def handle(client: trio.SocketStream) -> None:
        try:
            upstream = await trio.open_tcp_stream(host, port)
        except OSError:
            await trio.aclose_forcefully(client)
            return
        async with trio.open_nursery() as n:
            n.start_soon(pipe, client, upstream, FrameDecoder(DEFAULT_MAX_FRAME_SIZE))
            n.start_soon(pipe, upstream, client, None)

    actions: dict[str, dict[str, Any]] = {}
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.serve_listeners, handle, listeners)
        async with nerve.Broker(f"fuzz-recorder-{uuid.uuid4().hex[:8]}", transport="tcp://127.0.0.1:0",
                                peers=[proxy], secret=secret, namespace=namespace) as broker:
            with trio.fail_after(max(15.0, bound * 5)):
                target_id = await _wait_target(broker, None)
                listing = await broker.call("$node.actions", node_id=target_id, timeout=bound * 3)
                for name, eps in broker.registry.actions.items():
                    for ep in eps:
                        if ep.node_id == target_id:
                            actions[name] = dict(ep.definition)
                for entry in listing or []:
                    if isinstance(entry, dict) and isinstance(entry.get("name"), str):
                        actions.setdefault(entry["name"], {})
                if not legit_action.startswith("$"):
                    await broker.wait_for_services(legit_action.rsplit(".", 1)[0], timeout=None)
                await broker.call(legit_action, legit_params, node_id=target_id, timeout=bound * 3)

                async def body() -> Any:
                    for i in range(3):
                        yield bytes([i]) * 1024

                try:
                    await broker.call(upload_action or legit_action, legit_params if upload_action is None else None,
                                      node_id=target_id, timeout=bound * 3,
                                      stream=nerve.PacketStream.from_iterable(body()))
                except NerveError:
                    pass
                if download_action is not None:
                    try:
                        stream = await broker.call(download_action, download_params, node_id=target_id,
                                                   timeout=bound * 3)
                        if isinstance(stream, nerve.PacketStream):
                            await stream.read_all()
                    except NerveError:
                        pass
                await broker.emit("fuzz.session", {"n": 1})
                await broker.ping(target_id, timeout=bound * 3)
        nursery.cancel_scope.cancel()
    frames = [(k, p) for k, p in recorded if k not in (FrameType.HELLO, FrameType.HELLO_ACK)]
    kinds = {k for k, _ in frames}
    sid = uuid.uuid4().hex
    if FrameType.EVENT not in kinds:
        frames.insert(-1, (int(FrameType.EVENT), _MSGPACK.encode(Event(
            sender="fuzz", event="fuzz.session", data={"n": 1}, broadcast=True))))
    if not any(k == FrameType.STREAM_CREDIT and p[:1] and p[0] & STREAM_FLAG_RESPONSE for k, p in frames):
        frames.insert(-1, (int(FrameType.STREAM_CREDIT), _stream_payload(STREAM_FLAG_RESPONSE, sid.encode(), 65536)))
    if FrameType.STREAM_DATA not in kinds:
        frames.insert(-1, (int(FrameType.REQUEST), _MSGPACK.encode(Request(
            sender="fuzz", id=sid, action=legit_action, params=legit_params, stream=True, seq=0))))
        for seq in range(3):
            frames.insert(-1, (int(FrameType.STREAM_DATA), _stream_payload(0, sid.encode(), seq, b"x" * 512)))
        frames.insert(-1, (int(FrameType.STREAM_DATA), _stream_payload(STREAM_FLAG_END, sid.encode(), 3)))
    return _Session(target_id, frames, actions)


# --- what a hostile peer sends: strategies ----------------------------------------------

_INT_MIN, _INT_MAX = -(2**63), 2**64 - 1
_NO_TIMEOUT = object()  # a REQ without a timeout field


def _wrong_values() -> st.SearchStrategy[Any]:
    """Values of the wrong type for any field, invalid UTF-8, huge and deeply nested values."""
    return st.one_of(
        st.none(), st.booleans(), st.sampled_from([0, -1, 1, _INT_MIN, _INT_MAX, 2**53 + 1, 2**31]),
        st.integers(_INT_MIN, _INT_MAX), st.floats(), st.text(max_size=16), st.binary(max_size=16),
        st.lists(st.integers(-3, 3), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(-9, 9), max_size=2),
        st.binary(min_size=1, max_size=8).map(lambda b: BadStr(b + b"\xff\xc0")),
        st.sampled_from([BadStr(b"\xff"), BadStr(b"\xed\xa0\x80"), BadStr(b"a\x00b"), BadStr(b"\xc3")]),
        st.integers(16, 24).map(lambda n: "a" * (1 << n)),
        st.integers(16, 23).map(lambda n: b"\x00" * (1 << n)),
        st.integers(100, 200_000).map(Nested),
        st.integers(100, 200_000).map(lambda d: Nested(d, maps=True)),
        st.sampled_from(ODD_ADDRESSES),
    )


def _mutate_fields(data: st.DataObject, obj: dict[Any, Any], count: int = 3) -> dict[Any, Any]:
    """Up to ``count`` field mutations: a wrong value, a field removed, an extra field."""
    obj = dict(obj)
    for _ in range(data.draw(st.integers(1, count))):
        op = data.draw(st.sampled_from(["set", "set", "delete", "extra", "badkey"]))
        keys = list(obj)
        if op == "set" and keys:
            obj[data.draw(st.sampled_from(keys))] = data.draw(_wrong_values())
        elif op == "delete" and keys:
            obj.pop(data.draw(st.sampled_from(keys)))
        elif op == "badkey":
            obj[data.draw(st.sampled_from([BadStr(b"\xff\xfe"), 1, b"bin", ""]))] = data.draw(_wrong_values())
        else:
            obj[data.draw(st.text(max_size=8))] = data.draw(_wrong_values())
    return obj


def _packet_kinds() -> list[PacketType]:
    return list(PacketType)


# --- CANCEL frames ----------------------------------------------------------------------

_MAX_CANCEL_ID = 256  # docs/protocol.md: a CANCEL payload is the call id, UTF-8, at most 256 bytes

#: CANCEL payloads that are not UTF-8: a lone continuation or lead byte, a truncated sequence,
#: an overlong NUL, an encoded surrogate, code points above U+10FFFF, a good prefix, bad tail
_BAD_UTF8: tuple[bytes, ...] = (b"\xff", b"\xfe\xff", b"\x80", b"\xc3", b"\xe2\x82", b"\xc0\x80", b"\xed\xa0\x80",
                                b"\xed\xbf\xbf", b"\xf4\x90\x80\x80", b"\xf8\x88\x80\x80\x80", b"call-1\xff",
                                b"\x00\xff", b"a" * 255 + b"\xc3")

#: payloads at the 256-byte limit: just under, at and over it, counted in bytes, not characters
_EDGE_IDS: tuple[bytes, ...] = (
    b"a" * 255, b"a" * 256, b"a" * 257, "\u00e9".encode() * 128, b"a" + "\u00e9".encode() * 128,
    "\u20ac".encode() * 85 + b"a", "\u20ac".encode() * 86, "\U0001f600".encode() * 64, "\U0001f600".encode() * 64 + b"a",
    b"", b"\x00", b" ", "\u2028".encode(), b"\xef\xbb\xbfid",
)

#: huge payloads: 4 KiB, 64 KiB, 1 MiB, the largest frame there is, and one byte more
_HUGE_CANCELS: tuple[int, ...] = (4096, 1 << 16, 1 << 20, DEFAULT_MAX_FRAME_SIZE - HEADER_LEN,
                                  DEFAULT_MAX_FRAME_SIZE - HEADER_LEN + 1)


class _Absent:
    """A HELLO field left out (a marker: no strategy draws it)."""

    def __repr__(self) -> str:
        return "<absent>"


_ABSENT = _Absent()

#: what a HELLO may say in ``cancel`` besides true and false: the wrong types
_BAD_CANCEL_FLAGS: tuple[Any, ...] = (1, 0, -1, 2**64 - 1, 1.0, "true", "false", "", b"\x01", BadStr(b"\xff"),
                                      None, [], [True], {}, {"cancel": True})


def _cancel_payloads(ids: Sequence[str] = ()) -> st.SearchStrategy[bytes]:
    """CANCEL payloads: the given call ids (the sender's own), ids of no call, invalid UTF-8,
    empty, at and around the 256-byte limit (in bytes: multi-byte characters at the edge),
    random bytes and text, and now and then a huge one (up to the largest frame and beyond)."""
    known = [i.encode("utf-8", "surrogatepass") for i in ids]
    return st.one_of(  # (a branch is drawn as often as any other: the known ids have two)
        st.sampled_from(known) if known else st.just(b"no-such-call"),
        st.sampled_from(known) if known else st.uuids().map(lambda u: u.hex.encode()),
        st.sampled_from(_BAD_UTF8),
        st.sampled_from(_EDGE_IDS),
        st.binary(max_size=300),
        st.text(max_size=40).map(lambda t: t.encode("utf-8", "surrogatepass")),
        st.integers(0, 19).flatmap(lambda n: st.sampled_from(_HUGE_CANCELS) if n == 0 else st.just(300))
        .map(lambda n: b"c" * n),
    )


def _cancel_flags() -> st.SearchStrategy[Any]:
    """What a HELLO says in ``cancel``: mostly true, else false, nothing (the field left out:
    :data:`_ABSENT`) or a value of the wrong type."""
    return st.integers(0, 9).flatmap(lambda n: st.sampled_from([True, True, True, False, _ABSENT]) if n < 8
                                     else st.one_of(st.sampled_from(_BAD_CANCEL_FLAGS), _wrong_values()))


def _valid_cancel(payload: bytes) -> bool:
    if len(payload) > _MAX_CANCEL_ID:
        return False
    try:
        payload.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


class _Case(list[Step]):
    """The steps of a cancel case, with what the target promised about them: the connections
    that must still be open at the end (they sent only valid frames), the calls ``(conn, id)``
    that must have been answered with success (no CANCEL of their own connection named them),
    and the node id whose request count is checked afterwards."""

    def __init__(self, steps: Sequence[Step] = (), *, node_id: str | None = None) -> None:
        super().__init__(steps)
        self.keep_open: set[int] = set()
        self.expect_ok: list[tuple[int, str]] = []
        self.node_id = node_id


class _Generator:
    """Builds cases (lists of :class:`Step`) from hypothesis draws, for each category."""

    def __init__(self, session: _Session, *, secret: bool, namespace: str, ver: str,
                 stream_actions: list[str], call_actions: list[str], legit_params: Any = None,
                 upload_action: str | None = None, download_action: str | None = None,
                 download_params: Any = None) -> None:
        self.session = session
        self.auth = secret
        self.namespace = namespace
        self.ver = ver
        self.stream_actions = stream_actions or call_actions
        self.call_actions = call_actions
        #: the legitimate client's action and params: a call of it must succeed
        self.legit_action = call_actions[0] if call_actions else "$node.health"
        self.legit_params = legit_params
        self.upload_action = upload_action
        self.download_action = download_action
        self.download_params = download_params
        self.counter = 0

    def prefix(self) -> str:
        """A fresh node id prefix, always of the same length (so what hypothesis draws from a
        payload's length does not depend on how many cases ran before)."""
        self.counter += 1
        return f"fuzz-{uuid.uuid4().hex[:12]}"

    def hello(self, node_id: str, **overrides: Any) -> bytes:
        return _hello_payload(node_id, namespace=self.namespace, ver=self.ver, auth=self.auth, **overrides)

    def hello_flag(self, node_id: str, flag: Any, **overrides: Any) -> bytes:
        """A HELLO whose ``cancel`` says ``flag`` (left out for :data:`_ABSENT`)."""
        if flag is not _ABSENT:
            overrides["cancel"] = flag
        return self.hello(node_id, **overrides)

    # handshake: what comes first on a connection
    def handshake_case(self, data: st.DataObject, prefix: str) -> list[Step]:
        me = f"{prefix}-0"
        kind = data.draw(st.sampled_from(["fields", "fields", "address", "address", "first_frame",
                                          "garbage", "partial", "early_frames", "bad_proof", "second_hello",
                                          "cancel_flag"]))
        base: dict[Any, Any] = _loads(self.hello(me, cancel=True)) or {}
        if kind == "cancel_flag":
            # cancel true, false, left out or of a wrong type; then CANCEL frames on what was agreed
            steps = [Step(0, "handshake", FrameType.HELLO, self.hello_flag(me, data.draw(_cancel_flags())))]
            for _ in range(data.draw(st.integers(0, 2))):
                steps.append(Step(0, "frame", FrameType.CANCEL, data.draw(_cancel_payloads())))
            return steps
        if kind == "fields":
            return [Step(0, "handshake", FrameType.HELLO, pack(_mutate_fields(data, base)))]
        if kind == "address":
            address = data.draw(st.one_of(st.sampled_from(ODD_ADDRESSES), st.text(max_size=40),
                                          st.binary(max_size=12).map(lambda b: BadStr(b"tcp://" + b + b":1"))))
            steps = [Step(0, "handshake", FrameType.HELLO, pack({**base, "address": address}))]
            if data.draw(st.booleans()):
                steps.append(Step(0, "frame", FrameType.PEERS, pack({"nodes": {f"{prefix}-peer": address}})))
            return steps
        if kind == "first_frame":
            t = data.draw(st.sampled_from(list(FrameType)))
            return [Step(0, "frame", t, data.draw(st.one_of(st.binary(max_size=64), st.just(pack(base)))))]
        if kind == "garbage":
            return [Step(0, "raw", 0, data.draw(st.binary(min_size=1, max_size=256)))]
        if kind == "partial":
            wire = encode_frame(FrameType.HELLO, pack(base))
            return [Step(0, "raw", 0, wire[:data.draw(st.integers(1, len(wire) - 1))])]
        if kind == "early_frames":
            # HELLO and frames in the same write: nothing may be processed before the handshake.
            steps = [Step(0, "frame", FrameType.HELLO, pack(base))]
            for _ in range(data.draw(st.integers(1, 4))):
                steps.append(self.frame_step(data, 0, prefix))
            return steps
        if kind == "bad_proof":
            steps = [Step(0, "frame", FrameType.HELLO, pack(base))]
            proof = data.draw(st.one_of(st.binary(max_size=40), _wrong_values()))
            steps.append(Step(0, "frame", FrameType.HELLO, pack({"nodeID": me, "proof": proof})))
            return steps
        hello2 = pack(_mutate_fields(data, base, 2))
        return [Step(0, "handshake", FrameType.HELLO, pack(base)), Step(0, "frame", FrameType.HELLO, hello2)]

    # frames of every type, after a good handshake
    def frame_step(self, data: st.DataObject, conn: int, prefix: str, stream_ids: Sequence[str] = ()) -> Step:
        t = data.draw(st.sampled_from(list(FrameType)))
        if t in (FrameType.STREAM_DATA, FrameType.STREAM_CREDIT):
            sid = data.draw(st.one_of(st.sampled_from(list(stream_ids) or ["x"]).map(str.encode),
                                      st.binary(max_size=20), st.just(b"\xff\xfe")))
            flags = data.draw(st.one_of(st.sampled_from([0, 1, 2, 3, 4, 5, 6, 7]), st.integers(0, 255)))
            seq = data.draw(st.one_of(st.integers(0, 4), st.sampled_from([2**63, 2**64 - 1, 2**32]),
                                      st.integers(0, 2**64 - 1)))
            body = b"" if t == FrameType.STREAM_CREDIT else data.draw(st.one_of(
                st.binary(max_size=256), st.integers(_CHUNK - 2, _CHUNK + 2).map(lambda n: b"z" * n)))
            payload = _stream_payload(flags, sid, seq, body)
            if data.draw(st.integers(0, 9)) == 0:
                payload = payload[:data.draw(st.integers(0, len(payload)))]
            elif data.draw(st.integers(0, 9)) == 0:
                payload = bytes([flags, data.draw(st.integers(0, 255))]) + sid
            return Step(conn, "frame", t, payload)
        if t == FrameType.CANCEL:
            return Step(conn, "frame", t, data.draw(_cancel_payloads(stream_ids)))
        if t in (FrameType.HELLO, FrameType.HELLO_ACK):
            base = _loads(self.hello(f"{prefix}-{conn}", cancel=True)) or {}
            return Step(conn, "frame", t, pack(_mutate_fields(data, base)))
        if t == FrameType.PEERS:
            nodes = data.draw(st.dictionaries(
                st.one_of(st.text(max_size=12), st.just(BadStr(b"\xff"))),
                st.one_of(st.sampled_from(ODD_ADDRESSES), st.text(max_size=30), _wrong_values()), max_size=4))
            shape = data.draw(st.sampled_from(["ok", "ok", "mutated"]))
            obj: Any = {"nodes": nodes}
            if shape == "mutated":
                obj = _mutate_fields(data, obj, 2)
            return Step(conn, "frame", t, pack(obj))
        kind = PacketType(int(t))
        how = data.draw(st.sampled_from(["valid", "mutated", "mutated", "junk"]))
        if how == "junk":
            return Step(conn, "frame", t, data.draw(st.one_of(st.binary(max_size=128),
                                                              st.just(pack(Nested(100_000))))))
        from nerve.testing import packets  # the strategies of the testing module

        pkt = data.draw(packets(kind, self.ver))
        if isinstance(pkt, Request) and self.call_actions and data.draw(st.booleans()):
            pkt = msgspec.structs.replace(pkt, action=data.draw(st.sampled_from(self.call_actions)))
        payload = _MSGPACK.encode(pkt)
        if how == "mutated":
            obj = _loads(payload)
            if isinstance(obj, dict):
                payload = pack(_mutate_fields(data, obj))
        return Step(conn, "frame", t, payload)

    def generated_case(self, data: st.DataObject, prefix: str) -> list[Step]:
        steps = [Step(0, "handshake", FrameType.HELLO, self.hello(f"{prefix}-0"))]
        ids: list[str] = []
        if data.draw(st.booleans()) and self.stream_actions:
            sid = uuid.uuid4().hex
            ids.append(sid)
            steps.append(Step(0, "frame", FrameType.REQUEST, _MSGPACK.encode(Request(
                ver=self.ver, sender=f"{prefix}-0", id=sid, action=data.draw(st.sampled_from(self.stream_actions)),
                stream=True, seq=0))))
        for _ in range(data.draw(st.integers(1, 6))):
            steps.append(self.frame_step(data, 0, prefix, ids))
        return steps

    # the recorded session, mutated
    def session_case(self, data: st.DataObject, prefix: str) -> list[Step]:
        frames: list[tuple[int, bytes]] = list(self.session.frames)
        raw_tail: bytes | None = None
        ops = data.draw(st.lists(st.sampled_from(
            ["bitflip", "wireflip", "truncate", "duplicate", "reorder", "drop", "seq", "seq", "field", "none"]),
            min_size=1, max_size=4))
        for op in ops:
            if not frames:
                break
            i = data.draw(st.integers(0, len(frames) - 1))
            kind, payload = frames[i]
            if op == "bitflip" and payload:
                j = data.draw(st.integers(0, len(payload) - 1))
                b = bytearray(payload)
                b[j] ^= 1 << data.draw(st.integers(0, 7))
                frames[i] = (kind, bytes(b))
            elif op == "wireflip":
                flipped = bytearray(encode_frame(kind, payload))
                j = data.draw(st.integers(0, min(len(flipped) - 1, 15)))
                flipped[j] ^= 1 << data.draw(st.integers(0, 7))
                raw_tail = bytes(flipped)
                frames = frames[:i]
            elif op == "truncate":
                wire = encode_frame(kind, payload)
                raw_tail = wire[:data.draw(st.integers(1, len(wire) - 1))]
                frames = frames[:i]
            elif op == "duplicate":
                frames.insert(data.draw(st.integers(i, len(frames))), frames[i])
            elif op == "reorder":
                j = data.draw(st.integers(0, len(frames) - 1))
                frames[i], frames[j] = frames[j], frames[i]
            elif op == "drop":
                del frames[i]
            elif op == "seq":
                data_frames = [n for n, (k, _) in enumerate(frames) if k == FrameType.STREAM_DATA]
                if data_frames:
                    n = data.draw(st.sampled_from(data_frames))
                    parsed = _parse_stream(frames[n][1])
                    if parsed is not None:
                        flags, sid, seq, body = parsed
                        how = data.draw(st.sampled_from(["gap", "back", "zero", "max", "swap", "skip_first"]))
                        if how == "swap" and n + 1 < len(frames) and frames[n + 1][0] == FrameType.STREAM_DATA:
                            frames[n], frames[n + 1] = frames[n + 1], frames[n]
                        elif how == "skip_first":
                            del frames[data_frames[0]]
                        else:
                            new = {"gap": seq + data.draw(st.integers(1, 100)), "back": max(seq - 1, 0),
                                   "zero": 0, "max": 2**64 - 1, "swap": seq + 1, "skip_first": seq}[how]
                            frames[n] = (FrameType.STREAM_DATA, _stream_payload(flags, sid, new, body))
            elif op == "field":
                obj = _loads(payload)
                if isinstance(obj, dict):
                    frames[i] = (kind, pack(_mutate_fields(data, obj, 2)))
        steps = [Step(0, "handshake", FrameType.HELLO, self.hello(f"{prefix}-0"))]
        steps.extend(Step(0, "frame", k, p) for k, p in frames)
        if raw_tail is not None:
            steps.append(Step(0, "raw", 0, raw_tail))
        return steps

    # bursts: many connections, streams or requests at once
    def burst_case(self, data: st.DataObject, prefix: str) -> list[Step]:
        kind = data.draw(st.sampled_from(["handshakes", "idle", "streams", "requests", "churn"]))
        steps: list[Step] = []
        if kind == "handshakes":
            n = data.draw(st.integers(16, 120))
            steps = [Step(i, "frame", FrameType.HELLO, self.hello(f"{prefix}-{i}")) for i in range(n)]
            steps.append(Step(n, "handshake", FrameType.HELLO, self.hello(f"{prefix}-{n}")))
        elif kind == "idle":
            n = data.draw(st.integers(16, 120))
            steps = [Step(i, "connect") for i in range(n)]
            steps.append(Step(n, "handshake", FrameType.HELLO, self.hello(f"{prefix}-{n}")))
        elif kind == "churn":
            for i in range(data.draw(st.integers(5, 40))):
                steps.append(Step(i, "handshake", FrameType.HELLO, self.hello(f"{prefix}-{i}")))
                steps.append(Step(i, "close"))
            steps.append(Step(999, "handshake", FrameType.HELLO, self.hello(f"{prefix}-999")))
        elif kind == "streams" and self.stream_actions:
            steps = [Step(0, "handshake", FrameType.HELLO, self.hello(f"{prefix}-0"))]
            n = data.draw(st.integers(32, 400))
            size = data.draw(st.sampled_from([1, 1024, 16384, _CHUNK]))
            end = data.draw(st.booleans())
            action = data.draw(st.sampled_from(self.stream_actions))
            for _ in range(n):
                sid = uuid.uuid4().hex
                steps.append(Step(0, "frame", FrameType.REQUEST, _MSGPACK.encode(Request(
                    ver=self.ver, sender=f"{prefix}-0", id=sid, action=action, stream=True, seq=0))))
                steps.append(Step(0, "frame", FrameType.STREAM_DATA, _stream_payload(0, sid.encode(), 0, b"b" * size)))
                if end:
                    steps.append(Step(0, "frame", FrameType.STREAM_DATA, _stream_payload(STREAM_FLAG_END, sid.encode(), 1)))
        else:
            steps = [Step(0, "handshake", FrameType.HELLO, self.hello(f"{prefix}-0"))]
            action = data.draw(st.sampled_from(self.call_actions or ["$node.list"]))
            for _ in range(data.draw(st.integers(100, 3000))):
                steps.append(Step(0, "frame", FrameType.REQUEST, _MSGPACK.encode(Request(
                    ver=self.ver, sender=f"{prefix}-0", id=uuid.uuid4().hex, action=action,
                    params=self.session_params(), timeout=5000))))
        return steps

    # CANCEL (docs/protocol.md, Cancellation): for the sender's own calls and others'
    def cancel_case(self, data: st.DataObject, prefix: str) -> list[Step]:
        """A HELLO whose ``cancel`` is true, false, left out or garbage (a peer that did not offer
        ``cancel`` sends CANCEL all the same), then one of: ``own`` (calls, request streams and
        response streams of its own, each CANCELled in the same write as its REQ, before it,
        twice, once it finished, or while in flight with frames of the stream after the
        CANCEL), ``garbage`` (CANCEL payloads not UTF-8, empty, around and over 256 bytes,
        huge; beside a connection that must not notice), ``cross`` (CANCELs for another
        connection's calls, which must still succeed) or ``flood`` (many REQs and CANCELs in
        one write, from several connections). See :class:`_Case` for what is checked."""
        me = f"{prefix}-0"
        flag = data.draw(_cancel_flags())
        agreed = isinstance(flag, bool) or flag is _ABSENT
        # a small window keeps a response stream waiting for credit: a CANCEL finds it in flight
        window = data.draw(st.sampled_from([None, None, 16384, 65536]))
        sizes = {} if window is None else {"window": window, "maxChunk": window // 4}
        case = _Case([Step(0, "handshake", FrameType.HELLO, self.hello_flag(me, flag, **sizes))],
                     node_id=me if agreed else None)
        kind = data.draw(st.sampled_from(["own", "own", "own", "garbage", "cross", "flood"]))
        if kind == "own":
            valid = self._cancel_own(data, 0, me, case, window)
        elif kind == "garbage":
            valid = self._cancel_garbage(data, prefix, case)
        elif kind == "cross":
            valid = self._cancel_cross(data, prefix, case)
        else:
            valid = self._cancel_flood(data, prefix, case)
        if agreed and valid:
            case.keep_open.add(0)
        return case

    def _call_id(self, data: st.DataObject, any_id: bool) -> str:
        """A fresh call id; with ``any_id`` now and then one at the edges: empty, a NUL, 256
        bytes of multi-byte characters, 256 or 257 bytes (a CANCEL of it is refused)."""
        if any_id and data.draw(st.integers(0, 3)) == 0:
            return data.draw(st.sampled_from(["", "1", "\x00", "\u00e9" * 128, "\u20ac" * 85 + "a",
                                              "\U0001f600" * 64, "a" * 256, "a" * 257]))
        return uuid.uuid4().hex

    def _cancel_request(self, data: st.DataObject, c: int, sender: str, what: str, call_id: str,
                        grant: int = 0) -> tuple[list[Step], list[Step]]:
        """A call of kind ``what`` (``call``, ``stream``: a request stream, ``download``: a response
        stream) on connection ``c``: the steps that make it (the REQ, the first chunks) and
        those that would finish it (the rest of the chunks and END; credit: a STOP, or
        ``grant`` consumed bytes, which the caller knows were sent)."""
        timeout = data.draw(st.sampled_from([_NO_TIMEOUT, _NO_TIMEOUT, 0, 50, 5000]))
        extra: dict[str, Any] = {} if timeout is _NO_TIMEOUT else {"timeout": timeout}
        if what == "stream" and self.stream_actions:
            action = self.upload_action or data.draw(st.sampled_from(self.stream_actions))
            sid = call_id.encode()
            head = [Step(c, "frame", FrameType.REQUEST, _MSGPACK.encode(Request(
                ver=self.ver, sender=sender, id=call_id, action=action, stream=True, seq=0, **extra)))]
            size = data.draw(st.sampled_from([1, 100, 4096]))
            n = data.draw(st.integers(0, 3))
            head += [Step(c, "frame", FrameType.STREAM_DATA, _stream_payload(0, sid, i, b"u" * size)) for i in range(n)]
            more = data.draw(st.integers(0, 2))
            tail = [Step(c, "frame", FrameType.STREAM_DATA, _stream_payload(0, sid, n + i, b"v" * size))
                    for i in range(more)]
            if data.draw(st.integers(0, 4)) == 0:
                body = _MSGPACK.encode_value({"name": "StreamError", "message": "fuzz", "code": 500})
                tail.append(Step(c, "frame", FrameType.STREAM_DATA, _stream_payload(STREAM_FLAG_ERROR, sid, n + more, body)))
            else:
                tail.append(Step(c, "frame", FrameType.STREAM_DATA, _stream_payload(STREAM_FLAG_END, sid, n + more)))
            return head, tail
        if what == "download" and self.download_action:
            head = [Step(c, "frame", FrameType.REQUEST, _MSGPACK.encode(Request(
                ver=self.ver, sender=sender, id=call_id, action=self.download_action,
                params=self.download_params, **extra)))]
            sid = call_id.encode()
            credit = data.draw(st.sampled_from(["grant", "grant", "stop", "none"]))
            if credit == "stop":
                tail = [Step(c, "frame", FrameType.STREAM_CREDIT,
                             _stream_payload(STREAM_FLAG_RESPONSE | STREAM_FLAG_END, sid, 0))]
            elif credit == "grant":
                tail = [Step(c, "frame", FrameType.STREAM_CREDIT, _stream_payload(STREAM_FLAG_RESPONSE, sid, grant))]
            else:
                tail = []
            return head, tail
        action = data.draw(st.sampled_from(self.call_actions or [self.legit_action]))
        params = self.legit_params if action == self.legit_action else self.session_params()
        return [Step(c, "frame", FrameType.REQUEST, _MSGPACK.encode(Request(
            ver=self.ver, sender=sender, id=call_id, action=action, params=params, **extra)))], []

    def _cancel_own(self, data: st.DataObject, c: int, sender: str, case: _Case,
                    window: int | None = None) -> bool:
        """Calls of ``sender`` on connection ``c``, each CANCELled in a drawn way; False if a
        frame sent is one the target may refuse (a CANCEL over 256 bytes). ``window``: the one
        its HELLO said, when small (a response stream then waits for credit after it)."""
        valid = True
        used: set[str] = set()
        for _ in range(data.draw(st.integers(1, 4))):
            what = data.draw(st.sampled_from(["call", "call", "stream", "stream", "download"]))
            how = data.draw(st.sampled_from(["race", "race", "before", "twice", "finished", "inflight",
                                             "inflight", "reuse"]))
            # stream ids travel in stream frames (at most 255 bytes): those stay plain
            call_id = self._call_id(data, what == "call")
            if call_id in used:  # an edge id drawn twice: a second call under it, while the first
                call_id = uuid.uuid4().hex  # may still be in service, is refused by design
            used.add(call_id)
            # credit for a response stream only once the target has sent what it grants (after a sync)
            grant = (window or 0) if how in ("finished", "inflight") else 0
            head, tail = self._cancel_request(data, c, sender, what, call_id, grant)
            cancel = Step(c, "frame", FrameType.CANCEL, call_id.encode("utf-8", "surrogatepass"))
            valid = valid and _valid_cancel(cancel.payload)
            sync = Step(c, "sync")
            if how == "race":  # the REQ and its CANCEL in one write: the handler is still queued
                case += [*head, cancel, *tail]
            elif how == "before":  # a CANCEL for a call not made yet is ignored; the call runs
                case += [cancel, *head, *tail]
            elif how == "twice":
                case += [*head, cancel, cancel, *tail]
            elif how == "finished":  # the call is over (or nearly) when its CANCEL comes
                case += [*head, sync, *tail, sync, cancel]
                if data.draw(st.booleans()):
                    case += [sync, cancel]
            elif how == "inflight":  # read by the target, running or streaming; frames of its stream after
                case += [*head, sync, cancel]
                if data.draw(st.booleans()):
                    case += [sync]
                case += tail
                if data.draw(st.booleans()):
                    case += [cancel]
            else:  # the id again right after its CANCEL: the target may still hold the first
                # call (its handler has not ended yet), and an id reused while in service is a
                # protocol error (docs/protocol.md): the connection may be closed
                case += [*head, cancel, *tail]
                again, rest = self._cancel_request(data, c, sender, what, call_id)
                case += [*again, *rest]
                valid = False
        return valid

    def _cancel_garbage(self, data: st.DataObject, prefix: str, case: _Case) -> bool:
        """Bad CANCEL payloads (each ends the connection that sent it, nothing else): a bystander
        connection beside it stays open and its call succeeds."""
        me = f"{prefix}-0"
        bystander = data.draw(st.booleans())
        if bystander:
            case.insert(0, Step(1, "handshake", FrameType.HELLO, self.hello(f"{prefix}-1", cancel=True)))
            case.keep_open.add(1)
        valid = True
        if data.draw(st.booleans()):
            valid = self._cancel_own(data, 0, me, case)
        for _ in range(data.draw(st.integers(1, 3))):
            payload = data.draw(st.one_of(_cancel_payloads(), st.sampled_from(_BAD_UTF8),
                                          st.sampled_from(_EDGE_IDS), st.sampled_from(_HUGE_CANCELS[:3]).map(lambda n: b"h" * n)))
            case.append(Step(0, "frame", FrameType.CANCEL, payload))
            valid = valid and _valid_cancel(payload)
        if data.draw(st.booleans()):
            # the same node id again (its old connection may not be gone yet), and a CANCEL on it
            case += [Step(0, "close"), Step(0, "handshake", FrameType.HELLO, self.hello(me, cancel=True)),
                     Step(0, "frame", FrameType.CANCEL, data.draw(_cancel_payloads()))]
            valid = False
        if bystander:
            call_id = uuid.uuid4().hex
            case += [Step(1, "frame", FrameType.REQUEST, _MSGPACK.encode(Request(
                ver=self.ver, sender=f"{prefix}-1", id=call_id, action=self.legit_action, params=self.legit_params))),
                Step(1, "sync")]
            case.expect_ok.append((1, call_id))
        return valid

    def _cancel_cross(self, data: st.DataObject, prefix: str, case: _Case) -> bool:
        """CANCELs naming another connection's calls (a call is known by its peer and id): its
        call and its request stream in flight must still succeed."""
        other = f"{prefix}-1"
        case.insert(0, Step(1, "handshake", FrameType.HELLO, self.hello(other, cancel=True)))
        case.keep_open.add(1)
        call_id = uuid.uuid4().hex
        case.append(Step(1, "frame", FrameType.REQUEST, _MSGPACK.encode(Request(
            ver=self.ver, sender=other, id=call_id, action=self.legit_action, params=self.legit_params))))
        case.expect_ok.append((1, call_id))
        ids = [call_id]
        tail: list[Step] = []
        if self.upload_action:
            up = uuid.uuid4().hex
            ids.append(up)
            case += [Step(1, "frame", FrameType.REQUEST, _MSGPACK.encode(Request(
                ver=self.ver, sender=other, id=up, action=self.upload_action, stream=True, seq=0))),
                Step(1, "frame", FrameType.STREAM_DATA, _stream_payload(0, up.encode(), 0, b"x" * 100))]
            tail = [Step(1, "frame", FrameType.STREAM_DATA, _stream_payload(0, up.encode(), 1, b"y" * 100)),
                    Step(1, "frame", FrameType.STREAM_DATA, _stream_payload(STREAM_FLAG_END, up.encode(), 2))]
            case.expect_ok.append((1, up))
        case.append(Step(1, "sync"))
        valid = True
        for _ in range(data.draw(st.integers(1, 3))):
            payload = data.draw(st.one_of(st.sampled_from(ids).map(str.encode), _cancel_payloads(ids)))
            case.append(Step(0, "frame", FrameType.CANCEL, payload))
            valid = valid and _valid_cancel(payload)
        if data.draw(st.booleans()):  # its own call of the same id: that one may be cancelled
            case += [Step(0, "frame", FrameType.REQUEST, _MSGPACK.encode(Request(
                ver=self.ver, sender=f"{prefix}-0", id=ids[-1], action=self.legit_action, params=self.legit_params))),
                Step(0, "frame", FrameType.CANCEL, ids[-1].encode())]
        case += [Step(0, "sync"), *tail, Step(1, "sync")]
        return valid

    def _cancel_flood(self, data: st.DataObject, prefix: str, case: _Case) -> bool:
        """Many REQs and CANCELs in one write, from one to four connections, for a few rounds:
        each REQ followed by its CANCEL, all REQs then all their CANCELs (once or twice), or
        the REQs then CANCELs of calls that do not exist."""
        # (hypothesis draws the first of a list most: the large sizes come first)
        conns = data.draw(st.integers(1, 4))
        calls = data.draw(st.sampled_from([256, 1024, 64, 16, 1]))
        cancels = data.draw(st.sampled_from([5000, 20000, 1000, 64, 0]))
        rounds = data.draw(st.integers(1, 3))
        how = data.draw(st.sampled_from(["unknown", "interleaved", "own", "twice"]))
        for c in range(1, conns):
            case.insert(c - 1, Step(c, "handshake", FrameType.HELLO, self.hello(f"{prefix}-{c}", cancel=True)))
            case.keep_open.add(c)
        for r in range(rounds):
            for c in range(conns):
                sender = f"{prefix}-{c}"
                ids = [f"{r}.{i}" for i in range(calls)]
                reqs = [encode_frame(FrameType.REQUEST, _MSGPACK.encode(Request(
                    ver=self.ver, sender=sender, id=i, action=self.legit_action, params=self.legit_params)))
                    for i in ids]
                own = [encode_frame(FrameType.CANCEL, i.encode()) for i in ids]
                if how == "interleaved":
                    payload = b"".join(q + x for q, x in zip(reqs, own, strict=True))
                elif how in ("own", "twice"):
                    payload = b"".join(reqs) + b"".join(own) * (2 if how == "twice" else 1)
                else:
                    payload = b"".join(reqs) + encode_frame(FrameType.CANCEL, b"z") * cancels
                case.append(Step(c, "raw", 0, payload))
        case += [Step(c, "sync") for c in range(conns)]
        return True

    def session_params(self) -> Any:
        for kind, payload in self.session.frames:
            if kind == FrameType.REQUEST:
                obj = _loads(payload)
                if isinstance(obj, dict) and obj.get("action") in self.call_actions:
                    return obj.get("params")
        return None


# --- the stateful machine ---------------------------------------------------------------


def _machine(engine: _Engine) -> type[RuleBasedStateMachine]:
    """A RuleBasedStateMachine whose rules act on live connections to the target: open,
    handshake (offering ``cancel`` or not), send a frame of any kind, open a stream, send a
    chunk with a seq, skip or rewind a seq, end or fail a stream, grant credit, call, CANCEL a
    call or stream of the connection (or anything else), close, reconnect."""
    gen = engine.gen
    actions = gen.stream_actions

    class HostileSession(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.prefix = gen.prefix()
            self.steps: list[Step] = []
            self.runner = _Runner(engine.address, engine.nursery, secret=engine.secret, bound=engine.bound,
                                  prefix=self.prefix)
            self.open: set[int] = set()
            self.streams: list[list[Any]] = []  # [conn, id, next seq]
            self.calls: deque[tuple[int, str]] = deque(maxlen=16)  # (conn, id) of recent calls
            self.skip = engine.time_up()

        def do(self, *steps: Step) -> None:
            if self.skip or engine.time_up():
                self.skip = True
                return
            self.steps.extend(steps)

            async def run() -> None:
                for s in steps:
                    await self.runner.apply(s)
                await self.runner.flush_all()

            trio.from_thread.run(run)

        @rule(c=st.integers(0, 3), offer=st.booleans())
        def connect_and_handshake(self, c: int, offer: bool) -> None:
            self.do(Step(c, "handshake", FrameType.HELLO, gen.hello(f"{self.prefix}-{c}", cancel=offer)))
            self.open.add(c)

        @rule(c=st.integers(0, 3))
        def connect_only(self, c: int) -> None:
            self.do(Step(c, "connect"))

        @precondition(lambda self: bool(self.open))
        @rule(data=st.data())
        def send_frame(self, data: st.DataObject) -> None:
            c = data.draw(st.sampled_from(sorted(self.open)))
            ids = [s[1] for s in self.streams if s[0] == c]
            self.do(gen.frame_step(data, c, self.prefix, ids))

        @precondition(lambda self: bool(self.open) and bool(actions))
        @rule(data=st.data())
        def open_stream(self, data: st.DataObject) -> None:
            c = data.draw(st.sampled_from(sorted(self.open)))
            sid = uuid.uuid4().hex
            self.streams.append([c, sid, 0])
            self.do(Step(c, "frame", FrameType.REQUEST, _MSGPACK.encode(Request(
                ver=gen.ver, sender=f"{self.prefix}-{c}", id=sid, action=data.draw(st.sampled_from(actions)),
                stream=True, seq=0))))

        @precondition(lambda self: bool(self.streams))
        @rule(i=st.integers(0, 63), size=st.sampled_from([0, 1, 100, 4096, _CHUNK, _CHUNK + 1]))
        def send_chunk(self, i: int, size: int) -> None:
            s = self.streams[i % len(self.streams)]
            self.do(Step(s[0], "frame", FrameType.STREAM_DATA, _stream_payload(0, s[1].encode(), s[2], b"c" * size)))
            s[2] += 1

        @precondition(lambda self: bool(self.streams))
        @rule(i=st.integers(0, 63), k=st.integers(1, 70))
        def skip_seq(self, i: int, k: int) -> None:
            self.streams[i % len(self.streams)][2] += k

        @precondition(lambda self: bool(self.streams))
        @rule(i=st.integers(0, 63))
        def rewind_seq(self, i: int) -> None:
            s = self.streams[i % len(self.streams)]
            s[2] = max(0, s[2] - 1)

        @precondition(lambda self: bool(self.streams))
        @rule(i=st.integers(0, 63), error=st.booleans())
        def end_stream(self, i: int, error: bool) -> None:
            s = self.streams[i % len(self.streams)]
            flags = STREAM_FLAG_ERROR if error else STREAM_FLAG_END
            body = _MSGPACK.encode_value({"name": "Error", "message": "fuzz", "code": 500}) if error else b""
            self.do(Step(s[0], "frame", FrameType.STREAM_DATA, _stream_payload(flags, s[1].encode(), s[2], body)))

        @precondition(lambda self: bool(self.streams))
        @rule(i=st.integers(0, 63), consumed=st.integers(0, 2**64 - 1), flags=st.sampled_from([0, 1, 2, 3]))
        def credit(self, i: int, consumed: int, flags: int) -> None:
            s = self.streams[i % len(self.streams)]
            self.do(Step(s[0], "frame", FrameType.STREAM_CREDIT, _stream_payload(flags, s[1].encode(), consumed)))

        @precondition(lambda self: bool(self.open) and bool(gen.call_actions))
        @rule(data=st.data())
        def call(self, data: st.DataObject) -> None:
            c = data.draw(st.sampled_from(sorted(self.open)))
            call_id = uuid.uuid4().hex
            self.calls.append((c, call_id))
            self.do(Step(c, "frame", FrameType.REQUEST, _MSGPACK.encode(Request(
                ver=gen.ver, sender=f"{self.prefix}-{c}", id=call_id,
                action=data.draw(st.sampled_from(gen.call_actions)), params=gen.session_params()))))

        @precondition(lambda self: bool(self.open))
        @rule(data=st.data())
        def cancel(self, data: st.DataObject) -> None:
            c = data.draw(st.sampled_from(sorted(self.open)))
            ids = [s[1] for s in self.streams if s[0] == c] + [i for k, i in self.calls if k == c]
            self.do(Step(c, "frame", FrameType.CANCEL, data.draw(_cancel_payloads(ids))))

        @precondition(lambda self: bool(self.open))
        @rule(data=st.data())
        def close(self, data: st.DataObject) -> None:
            c = data.draw(st.sampled_from(sorted(self.open)))
            self.open.discard(c)
            self.streams = [s for s in self.streams if s[0] != c]
            self.do(Step(c, "close"))

        @precondition(lambda self: bool(self.open))
        @rule(data=st.data())
        def reconnect(self, data: st.DataObject) -> None:
            c = data.draw(st.sampled_from(sorted(self.open)))
            self.streams = [s for s in self.streams if s[0] != c]
            self.do(Step(c, "close"), Step(c, "handshake", FrameType.HELLO, gen.hello(f"{self.prefix}-{c}")))

        @invariant()
        def target_alive(self) -> None:
            if not self.skip and engine.dead():
                self.skip = True

        def teardown(self) -> None:
            if not self.steps:
                trio.from_thread.run(self.runner.finish, 0.0)
                return
            trio.from_thread.run(engine.conclude, "stateful", self.steps, self.runner)

    return HostileSession


# --- the engine -------------------------------------------------------------------------


_CATEGORIES = ("handshake", "session", "generated", "stateful", "burst", "cancel", "service")

#: calls sent in one write to check a peer's request count after a cancel case (fewer when
#: the target serves fewer at once for one peer: measured once, on a fresh node id)
_PEER_CALLS = 256


class _Engine:
    def __init__(self, report: FuzzReport, *, target: NodeProcess | None, address: str, pid: int | None,
                 secret: bytes | None, namespace: str, ver: str, bound: float, seed: int,
                 legit_action: str, legit_params: Any, call_actions: list[str], stream_actions: list[str],
                 upload_action: str | None, download_action: str | None, download_params: Any,
                 minimize_budget: float, categories: Sequence[str], service_examples: int) -> None:
        self.report = report
        self.target = target
        self.address = address
        self.pid = pid
        self.secret = secret
        self.namespace = namespace
        self.ver = ver
        self.bound = bound
        self.seed = seed
        self.legit_action = legit_action
        self.legit_params = legit_params
        self.call_actions = call_actions
        self.stream_actions = stream_actions
        self.upload_action = upload_action
        self.download_action = download_action
        self.download_params = download_params
        self.minimize_left = minimize_budget
        self.categories = list(categories)
        self.service_examples = service_examples
        self.deadline = math.inf  # time.monotonic()
        self.recent: deque[tuple[float, str, list[Step]]] = deque(maxlen=8)
        self.signatures: dict[str, Finding] = {}
        self.legit: _LegitClient | None = None
        self.legit_seen_failures = 0
        self.stopped = False  # the target is gone and cannot be restarted
        self.cases_since_probe = 0
        self.target_id: str | None = None
        self.gen: _Generator
        self.nursery: trio.Nursery
        self.baseline: dict[str, int | None] = {}
        self.peer_calls: int | None = None  # see count_check
        self.downs = 0  # times the target was found down (crashed or hanging)

    # --- state of the target

    def time_up(self) -> bool:
        """True once the fuzzing time is over or the target is gone (callable from any thread)."""
        return self.stopped or time.monotonic() >= self.deadline

    def dead(self) -> bool:
        if self.target is not None:
            return not self.target.alive()
        if self.pid is not None:
            return not _proc_alive(self.pid)
        return False

    def current_pid(self) -> int | None:
        return self.target.pid if self.target is not None else self.pid

    async def start_legit(self) -> None:
        self.legit = _LegitClient(self.report.legit, self.legit_action, self.legit_params, secret=self.secret,
                                  namespace=self.namespace, bound=self.bound)
        try:
            await self.nursery.start(self.legit.run, self.address, self.target_id)
        except RuntimeError:  # it ended before it started: the failure is in the stats
            self.legit = None

    async def restart_target(self) -> bool:
        if self.target is None:
            self.stopped = True
            return False
        if self.legit is not None:
            self.legit.stop()
        await self.target.restart()
        self.report.restarts += 1
        self.address = self.target.address
        self.target_id = None
        status, node_id = await _probe(self.address, secret=self.secret, bound=self.bound * 3,
                                       namespace=self.namespace, ver=self.ver)
        self.target_id = node_id
        await self.start_legit()
        self.legit_seen_failures = self.report.legit.failed
        self.take_baseline()
        return status == "ok"

    def take_baseline(self) -> None:
        pid = self.current_pid()
        if pid is not None:
            self.baseline = {"rss": _rss(pid), "fds": _fds(pid)}

    # --- running cases

    async def run_steps(self, steps: Sequence[Step], canary: float | None = None) -> _Outcome:
        async with trio.open_nursery() as nursery:
            runner = _Runner(self.address, nursery, secret=self.secret, bound=self.bound,
                             prefix=f"fuzz-{uuid.uuid4().hex[:10]}")
            for s in steps:
                await runner.apply(s)
            outcome = await runner.finish(self.bound / 4 if canary is None else canary)
            nursery.cancel_scope.cancel()
        return outcome

    async def case(self, category: str, steps: list[Step]) -> None:
        """Run one case, count it, check the oracles (and for a cancel case what the target
        promised: :meth:`promises`, :meth:`count_check`)."""
        problems: list[tuple[str, str]] = []
        downs = self.downs
        async with trio.open_nursery() as nursery:
            runner = _Runner(self.address, nursery, secret=self.secret, bound=self.bound,
                             prefix=f"fuzz-{uuid.uuid4().hex[:10]}")
            for s in steps:
                await runner.apply(s)
            if isinstance(steps, _Case):
                problems = await self.promises(runner, steps)
            await self.conclude(category, steps, runner)
            nursery.cancel_scope.cancel()
        if not isinstance(steps, _Case) or self.stopped or self.dead() or self.downs != downs:
            return  # (a connection closed by a crash is that crash)
        if problems:
            self.add_finding(Finding(
                kind="misbehaved", category=category, summary=problems[0][1],
                detail="\n".join(p for _, p in problems), reproducer=Reproducer(list(steps)),
                signature=f"misbehaved:{problems[0][0]}"))
        if steps.node_id is not None and not self.time_up():
            await self.count_check(category, steps, steps.node_id)

    async def promises(self, runner: _Runner, case: _Case) -> list[tuple[str, str]]:
        """What the target promised about a cancel case: its connections that sent only valid
        frames are still open (a PING is answered), and the calls no CANCEL of their own
        connection named were answered with success. Returns (signature, text) of each broken
        promise."""
        problems: list[tuple[str, str]] = []
        await runner.flush_all()
        for c in sorted(case.keep_open):
            conn = runner.conns.get(c)
            if conn is None or not conn.handshaken:
                continue  # refused, or never opened: nothing was promised
            await runner.sync(conn)
            if conn.eof:
                problems.append(("closed", f"the target closed connection {c} ({_node_of(case, c)}), which sent "
                                 "only valid frames (CANCELs of UTF-8 call ids of at most 256 bytes)"))
        for c, call_id in case.expect_ok:
            conn = runner.conns.get(c)
            if conn is None or not conn.handshaken or (conn.eof and call_id not in conn.answers):
                continue
            answers = conn.answers
            await conn.wait_for(lambda: call_id in answers, self.bound)  # noqa: B023 - awaited here
            if call_id not in answers and not await runner.sync(conn):
                continue  # the target is slow or gone (the other oracles tell), not silent on this call
            answer = answers.get(call_id)
            if answer != "ok":
                problems.append((f"answer:{answer}", f"the call {call_id} of connection {c} ({_node_of(case, c)}) "
                                 f"was {'not answered' if answer is None else f'answered {answer}'} "
                                 f"within {self.bound}s (no CANCEL of that connection named it)"))
        return problems

    async def calls_from(self, node_id: str, n: int) -> tuple[int, int, int] | None:
        """``n`` calls of the legitimate action in one write, from a new connection as
        ``node_id``: (answered with success, answered QueueIsFullError, other answers or none
        within the bound); None when the handshake was refused (the node id is still taken)."""
        result: tuple[int, int, int] | None = None
        async with trio.open_nursery() as nursery:
            runner = _Runner(self.address, nursery, secret=self.secret, bound=self.bound,
                             prefix=f"fuzz-count-{uuid.uuid4().hex[:8]}")
            await runner.apply(Step(0, "handshake", FrameType.HELLO, self.gen.hello(node_id, cancel=True)))
            conn = runner.conns.get(0)
            if conn is not None and conn.handshaken and not conn.eof:
                ids = [uuid.uuid4().hex for _ in range(n)]
                for call_id in ids:
                    conn.pending += encode_frame(FrameType.REQUEST, _MSGPACK.encode(Request(
                        ver=self.ver, sender=node_id, id=call_id, action=self.legit_action, params=self.legit_params)))
                await conn.flush()
                await conn.wait_for(lambda: all(i in conn.answers for i in ids), self.bound)
                ok = sum(conn.answers.get(i) == "ok" for i in ids)
                full = sum(conn.answers.get(i) == "QueueIsFullError" for i in ids)
                result = (ok, full, n - ok - full)
            for c in list(runner.conns.values()):
                await c.close()
            nursery.cancel_scope.cancel()
        return result

    async def count_check(self, category: str, case: list[Step], node_id: str) -> None:
        """After a cancel case (its connections closed), calls from its node id in one write
        must all be answered: a request count the case left behind shows as QueueIsFullError.
        Several tries within the bound (calls of the case may still run); a failure counts only
        if a fresh node id's calls are all answered just after (so the limit is not lower now)."""
        if self.peer_calls is None:
            measured = await self.calls_from(f"fuzz-{uuid.uuid4().hex[:12]}-m", _PEER_CALLS)
            if measured is None or measured[2] or not measured[0]:
                return  # the target is busy: measure again next time
            self.peer_calls = measured[0]  # the per-peer limit when it is lower
        n = self.peer_calls
        # once that leak is known, a shorter wait (it only counts another sighting)
        end = trio.current_time() + (0.5 if "leak:peer_requests" in self.signatures else self.bound)
        last: tuple[int, int, int] | None = None
        while not self.dead():
            last = await self.calls_from(node_id, n)
            if last is not None and last[0] == n:
                return
            if trio.current_time() >= end:
                break
            await trio.sleep(0.1)
        if last is None or not last[1] or self.dead():
            return  # refused throughout, or slow answers: not a count left behind
        fresh = await self.calls_from(f"fuzz-{uuid.uuid4().hex[:12]}-f", n)
        if fresh is None or fresh[0] < n:
            if fresh is not None and fresh[1] and not fresh[2]:
                self.peer_calls = max(1, fresh[0])  # the limit is lower now (fewer peers' share)
            return
        steps = [*case, *(Step(c, "close") for c in sorted({s.conn for s in case})),
                 Step(99, "handshake", FrameType.HELLO, self.gen.hello(node_id, cancel=True))]
        steps += [Step(99, "frame", FrameType.REQUEST, _MSGPACK.encode(Request(
            ver=self.ver, sender=node_id, id=f"count-{i}", action=self.legit_action, params=self.legit_params)))
            for i in range(n)]
        sent: dict[tuple[int, Any, Any], int] = {}
        for s in case:
            if s.op == "frame" and s.type == FrameType.REQUEST:
                req = _loads(s.payload)
                if isinstance(req, dict):
                    key = (s.conn, req.get("id"), req.get("action"))
                    sent[key] = sent.get(key, 0) + 1
        again = [f"{call_id!r:.40} ({action}, conn {c})" for (c, call_id, action), k in sent.items() if k > 1]
        self.add_finding(Finding(
            kind="leak", category=category, signature="leak:peer_requests", reproducer=Reproducer(steps),
            summary=f"after a cancel case, {n} calls in one write from its node id got {last[1]} "
                    f"QueueIsFullError ({last[2]} other or no answer) for {self.bound}s, while {n} from "
                    "a fresh node id were all answered: a request count of that peer was left behind",
            detail=f"node id {node_id!r}; the reproducer ends with the calls (conn 99); call ids the case "
                   f"sent more than once: {', '.join(again) or 'none'}"))

    async def conclude(self, category: str, steps: list[Step], runner: _Runner) -> None:
        outcome = await runner.finish(self.bound / 4)
        stats = self.report.category(category)
        stats.cases += 1
        stats.connections += outcome.connections
        stats.frames += outcome.frames
        stats.bytes += outcome.bytes
        self.recent.append((trio.current_time(), category, steps))
        await self.check(category, outcome)

    async def check(self, category: str, outcome: _Outcome | None) -> None:
        """The oracles after a case: alive, answering (probe when the canary did not come
        back), and the legitimate client's calls."""
        symptom: str | None = None
        if self.dead():
            symptom = "crash"
        else:
            self.cases_since_probe += 1
            needs_probe = outcome is None or outcome.canary not in ("pong", "closed") or outcome.stalled \
                or outcome.refused or self.cases_since_probe >= 25
            if needs_probe:
                self.cases_since_probe = 0
                status, _ = await _probe(self.address, secret=self.secret, bound=self.bound,
                                         namespace=self.namespace, ver=self.ver)
                if self.dead():
                    symptom = "crash"
                elif status == "refused":
                    symptom = "crash"
                elif status == "timeout":
                    symptom = "hang"
        if symptom is not None:
            await self.on_target_down(category, symptom)
            return
        failed = self.report.legit.failed
        if failed > self.legit_seen_failures:
            self.legit_seen_failures = failed
            last = self.report.legit.failures[-1] if self.report.legit.failures else {}
            self.add_finding(Finding(
                kind="legit_call_failed", category=category,
                summary=f"the legitimate client's call to {self.legit_action} failed while the node was up",
                detail=str(last.get("error", "")), reproducer=self.suspects() if self.recent else None,
                signature=f"legit:{str(last.get('error', ''))[:60]}"))

    def suspects(self, last: int = 0) -> Reproducer:
        """The recent cases (the ``last`` ones, or all kept), in order, each on connections of
        its own, each closed after its case (a reproducer to minimize)."""
        steps: list[Step] = []
        offset = 0
        for _, _, case in list(self.recent)[-last:]:
            width = max((s.conn for s in case), default=0) + 1
            steps.extend(Step(s.conn + offset, s.op, s.type, s.payload) for s in case)
            steps.extend(Step(c + offset, "close") for c in range(width))
            offset += width
        return Reproducer(steps)

    async def on_target_down(self, category: str, symptom: str) -> None:
        self.downs += 1
        detail = ""
        signature = symptom
        pid = self.current_pid()
        if symptom == "hang" and pid is not None:
            before = _cpu_seconds(pid)
            await trio.sleep(0.5)
            after = _cpu_seconds(pid)
            if before is not None and after is not None:
                detail = f"target CPU {100 * (after - before) / 0.5:.0f}% while not answering"
        if symptom == "crash" and self.target is not None:
            await trio.sleep(0.05)
            detail = self.target.stderr_tail()
            signature = f"crash:{self.target.crash_signature()}"
        last = self.recent[-1][2] if self.recent else []
        finding = Finding(kind=symptom, category=category,
                          summary=("the node died or stopped accepting connections" if symptom == "crash"
                                   else "the node stopped answering (handshake not acknowledged within "
                                        f"{self.bound}s)"),
                          detail=detail, reproducer=Reproducer(list(last)), signature=signature)
        known = signature in self.signatures
        self.add_finding(finding)
        if self.legit is not None:
            self.legit.paused = True
        if self.target is None:
            self.stopped = True
            return
        if not known:
            await self.minimize_finding(finding, self.suspects() if self.recent else None)
        await self.restart_target()

    def add_finding(self, finding: Finding) -> None:
        known = self.signatures.get(finding.signature)
        if known is not None:
            known.count += 1
            return
        self.signatures[finding.signature] = finding
        self.report.findings.append(finding)
        log.warning("finding: %s (%s) %s", finding.kind, finding.category, finding.summary)

    # --- minimizing

    async def reproduces(self, steps: Sequence[Step], symptom: str, signature: str) -> bool:
        """Replay ``steps`` against a healthy (restarted if need be) target; True if the
        same symptom follows."""
        assert self.target is not None
        if not self.target.alive() or (await _probe(self.target.address, secret=self.secret, bound=self.bound,
                                                    namespace=self.namespace, ver=self.ver))[0] != "ok":
            await self.target.restart()
            self.report.restarts += 1
        self.address = self.target.address
        await self.run_steps(steps, canary=self.bound / 4)
        with trio.move_on_after(1.0 if symptom == "crash" else 0.1):
            while self.target.alive():
                await trio.sleep(0.01)
        if symptom == "crash":
            if self.target.alive():
                status, _ = await _probe(self.target.address, secret=self.secret, bound=self.bound,
                                         namespace=self.namespace, ver=self.ver)
                return status == "refused" and signature == "crash"
            await trio.sleep(0.05)
            return f"crash:{self.target.crash_signature()}" == signature or signature == "crash"
        status, _ = await _probe(self.target.address, secret=self.secret, bound=self.bound,
                                 namespace=self.namespace, ver=self.ver)
        return status == "timeout"

    async def minimize_finding(self, finding: Finding, suspects: Reproducer | None) -> None:
        if self.target is None or finding.reproducer is None or self.minimize_left <= 0:
            return
        t0 = trio.current_time()
        budget = min(self.minimize_left, 30.0)
        with trio.move_on_after(budget):
            candidates = [finding.reproducer]
            if len(self.recent) >= 2:
                candidates.append(self.suspects(2))
            if suspects is not None and len(suspects.steps) > len(candidates[-1].steps):
                candidates.append(suspects)
            for candidate in candidates:
                if await self.reproduces(candidate.steps, finding.kind, finding.signature):
                    finding.reproducer = await _shrink(candidate, lambda s: self.reproduces(
                        s, finding.kind, finding.signature))
                    finding.minimized = True
                    break
            if finding.minimized:
                await self.target.restart()
                self.report.restarts += 1
                self.address = self.target.address
                assert finding.reproducer is not None
                finding.reproduced = await self.reproduces(finding.reproducer.steps, finding.kind, finding.signature)
            else:
                finding.reproduced = False
        self.minimize_left -= trio.current_time() - t0


async def _shrink(reproducer: Reproducer, reproduces: Callable[[list[Step]], Any]) -> Reproducer:
    """Delete steps (halves, then quarters, ... then single steps), then halve payloads,
    keeping each change that still reproduces. Stops where the caller's cancel scope ends it."""
    steps = list(reproducer.steps)
    best = list(steps)
    try:
        n = 2
        while len(steps) >= 2:
            size = math.ceil(len(steps) / n)
            reduced = False
            for start in range(0, len(steps), size):
                candidate = steps[:start] + steps[start + size:]
                if candidate and await reproduces(candidate):
                    steps = best = candidate
                    n = max(n - 1, 2)
                    reduced = True
                    break
            if not reduced:
                if size == 1:
                    break
                n = min(n * 2, len(steps))
        for i in range(len(steps)):
            # structure-aware first: drop the keys of a msgpack map payload one by one
            obj = _loads(steps[i].payload) if steps[i].op in ("frame", "handshake") else None
            if isinstance(obj, dict):
                for key in list(obj):
                    smaller = {k: v for k, v in obj.items() if k != key}
                    s = steps[i]
                    candidate = steps[:i] + [Step(s.conn, s.op, s.type, pack(smaller))] + steps[i + 1:]
                    if await reproduces(candidate):
                        steps = best = candidate
                        obj = smaller
            while steps[i].op in ("frame", "raw") and len(steps[i].payload) > 1:
                s = steps[i]
                candidate = steps[:i] + [Step(s.conn, s.op, s.type, s.payload[:len(s.payload) // 2])] + steps[i + 1:]
                if not await reproduces(candidate):
                    break
                steps = best = candidate
    finally:
        reproducer = Reproducer(best)
    return reproducer


# --- hypothesis batches -----------------------------------------------------------------


def _quiet_hypothesis() -> None:
    """The trio thread uses the global ``random`` (backoff jitter) while hypothesis draws in the
    worker thread; hypothesis takes that for a strategy using ``random`` and warns."""
    warnings.filterwarnings("ignore", message="Do not use the `random` module inside strategies",
                            category=HypothesisDeprecationWarning)


def _batch_settings(max_examples: int, **kw: Any) -> settings:
    return settings(max_examples=max_examples, deadline=None, phases=[Phase.generate], database=None,
                    suppress_health_check=list(HealthCheck), verbosity=Verbosity.quiet, **kw)


def _run_case_batch(engine: _Engine, category: str, build: Callable[[st.DataObject, str], list[Step]],
                    seed: int, max_examples: int) -> None:
    """In a worker thread: ``max_examples`` cases drawn by hypothesis, each run in trio."""

    @hypothesis_seed(seed)
    @_batch_settings(max_examples)
    @given(st.data())
    def batch(data: st.DataObject) -> None:
        if engine.time_up():
            return
        steps = build(data, engine.gen.prefix())
        trio.from_thread.run(engine.case, category, steps)

    try:
        batch()
    except HypothesisException as exc:  # hypothesis' own complaints end the batch, not the campaign
        log.debug("fuzz batch %s ended: %r", category, exc)
    except Exception as exc:  # noqa: BLE001 - a generator bug must not stop the campaign
        log.exception("fuzz batch %s failed: %r", category, exc)
        engine.report.notes.append(f"{category} batch error: {type(exc).__name__}: {exc}"[:300])


def _run_machine_batch(engine: _Engine, seed: int, max_examples: int) -> None:
    from hypothesis.stateful import run_state_machine_as_test

    machine = _machine(engine)
    try:
        from hypothesis.stateful import get_state_machine_test

        test = get_state_machine_test(machine, settings=_batch_settings(max_examples, stateful_step_count=30))
        hypothesis_seed(seed)(test)()
    except ImportError:  # pragma: no cover - older hypothesis: unseeded
        run_state_machine_as_test(machine, settings=_batch_settings(max_examples, stateful_step_count=30))
    except HypothesisException as exc:
        log.debug("fuzz state machine batch ended: %r", exc)
    except Exception as exc:  # noqa: BLE001
        log.exception("fuzz state machine failed: %r", exc)
        engine.report.notes.append(f"stateful batch error: {type(exc).__name__}: {exc}"[:300])


# --- fuzz_node --------------------------------------------------------------------------


async def fuzz_node(
    target: str | NodeProcess,
    *,
    secret: str | bytes | None = None,
    duration: float = 60.0,
    seed: int | None = None,
    pid: int | None = None,
    legit_action: str | None = None,
    legit_params: Any = None,
    actions: Sequence[str] = (),
    upload_action: str | None = None,
    download_action: str | None = None,
    download_params: Any = None,
    namespace: str = "",
    protocol_version: str = "5",
    latency_bound: float = 2.0,
    rss_tolerance: int = 32 * 1024 * 1024,
    fd_tolerance: int = 2,
    settle: float = 10.0,
    minimize_budget: float = 60.0,
    categories: Sequence[str] = _CATEGORIES,
    service_examples: int = 60,
) -> FuzzReport:
    """Fuzz a live nerve node for ``duration`` seconds (trio) and return a :class:`FuzzReport`.

    ``target`` is an address (``tcp://host:port``; pass ``pid=`` when the node runs on this
    machine to watch its process, RSS and descriptors) or a :class:`NodeProcess` the fuzzer
    starts, restarts after a crash and replays findings against to minimize them (within
    ``minimize_budget`` seconds in all). ``secret`` is the cluster's shared secret (the fuzzer
    completes the HMAC handshake).

    A real Broker calls ``legit_action`` (default ``$node.health``, pinned to the target) with
    ``legit_params`` throughout; each call must succeed within ``latency_bound`` seconds.
    ``actions`` are the actions hostile REQ frames may name and whose params are fuzzed (from the
    schema the node announces); the legit action is always among them. Give an action that reads
    a request stream (``upload_action``) and one that returns a response stream
    (``download_action``) to record and fuzz stream sessions against real streams. Only those
    actions are ever called: point the fuzzer at a test node, not at one with real data.

    ``categories`` picks among ``handshake``, ``session``, ``generated``, ``stateful``,
    ``burst``, ``cancel`` and ``service``; the time is shared round-robin. After each cancel
    case, calls from its node id in one write must all be answered (a request count a
    cancelled call left behind shows as ``QueueIsFullError``): up to 256 of them, or the
    target's per-peer limit when it is lower (``max_peer_requests``; a target serving many
    more per peer shows only a large leak that way). After the run, with the hostile
    connections closed, the target's RSS and descriptors must come back within
    ``rss_tolerance`` bytes / ``fd_tolerance`` descriptors of their baseline within ``settle``
    seconds.
    """
    seed = random.randrange(2**31) if seed is None else seed
    _quiet_hypothesis()
    secret_b = secret.encode() if isinstance(secret, str) else secret
    legit_action = legit_action or (list(actions)[0] if actions else "$node.health")
    report = FuzzReport(target=target if isinstance(target, str) else " ".join(target.argv), seed=seed)
    report.legit.action = legit_action
    call_actions = list(dict.fromkeys([legit_action, *actions]))
    stream_actions = [a for a in (upload_action,) if a] or [a for a in call_actions if not a.startswith("$")]
    t_start = trio.current_time()
    owned = isinstance(target, NodeProcess)
    async with trio.open_nursery() as nursery:
        if isinstance(target, NodeProcess):
            if not target.alive():
                await target.start()
            address = target.address
        else:
            address = target
        engine = _Engine(report, target=target if isinstance(target, NodeProcess) else None, address=address,
                         pid=pid, secret=secret_b, namespace=namespace, ver=protocol_version,
                         bound=latency_bound, seed=seed, legit_action=legit_action, legit_params=legit_params,
                         call_actions=call_actions, stream_actions=stream_actions, upload_action=upload_action,
                         download_action=download_action, download_params=download_params,
                         minimize_budget=minimize_budget, categories=categories,
                         service_examples=service_examples)
        engine.nursery = nursery
        try:
            session = await _record_session(address, secret=secret_b, namespace=namespace,
                                            legit_action=legit_action, legit_params=legit_params,
                                            upload_action=upload_action, download_action=download_action,
                                            download_params=download_params, bound=latency_bound)
            engine.target_id = session.target_id
            engine.gen = _Generator(session, secret=secret_b is not None, namespace=namespace,
                                    ver=protocol_version, stream_actions=stream_actions,
                                    call_actions=call_actions, legit_params=legit_params,
                                    upload_action=upload_action, download_action=download_action,
                                    download_params=download_params)
            await engine.start_legit()
            await trio.sleep(0.5)
            engine.take_baseline()
            engine.deadline = time.monotonic() + duration
            await _campaign(engine, session)
            if engine.legit is not None:
                engine.legit.paused = False
                await trio.sleep(min(1.0, latency_bound))
            await engine.check("final", None)
            if not engine.stopped:
                await _leak_check(engine, rss_tolerance, fd_tolerance, settle)
        finally:
            if engine.legit is not None:
                engine.legit.stop()
            nursery.cancel_scope.cancel()
    if owned:
        report.notes.append("target started by the fuzzer" + (f"; restarted {report.restarts}x" if report.restarts else ""))
    report.duration = trio.current_time() - t_start
    return report


async def _campaign(engine: _Engine, session: _Session) -> None:
    gen = engine.gen
    builders: dict[str, Callable[[st.DataObject, str], list[Step]]] = {
        "handshake": gen.handshake_case, "session": gen.session_case,
        "generated": gen.generated_case, "burst": gen.burst_case, "cancel": gen.cancel_case,
    }
    sizes = {"handshake": 40, "session": 40, "generated": 40, "burst": 3, "stateful": 3, "cancel": 20, "service": 0}
    round_no = 0
    services = [a for a in engine.call_actions if not a.startswith("$") and session.actions.get(a, {}).get("params")]
    service_fuzzers: list[_ServiceFuzzer] = []
    while not engine.time_up():
        for category in engine.categories:
            if engine.time_up():
                break
            batch_seed = engine.seed * 1000 + round_no
            if category in builders:
                await trio.to_thread.run_sync(_run_case_batch, engine, category, builders[category],
                                              batch_seed, sizes[category])
            elif category == "stateful":
                await trio.to_thread.run_sync(_run_machine_batch, engine, batch_seed, sizes["stateful"])
            elif category == "service" and services:
                if not service_fuzzers:
                    for action in services:
                        service_fuzzers.append(_ServiceFuzzer(
                            action, None, schema=session.actions[action].get("params"), bound=engine.bound))
                for sf in service_fuzzers:
                    if engine.time_up():
                        break
                    await _service_round(engine, sf, batch_seed)
        round_no += 1


async def _service_round(engine: _Engine, sf: _ServiceFuzzer, seed: int) -> None:
    async with nerve.Broker(f"fuzz-svc-{uuid.uuid4().hex[:8]}", transport="tcp://127.0.0.1:0",
                            peers=[engine.address], secret=engine.secret, namespace=engine.namespace) as broker:
        with trio.move_on_after(engine.bound * 3):
            engine.target_id = await _wait_target(broker, engine.target_id)
            await broker.wait_for_services(sf.action.rsplit(".", 1)[0], timeout=None)
        sf.broker, sf.node_id = broker, engine.target_id
        sf.dead = engine.dead
        n = 20
        stats = engine.report.category("service")
        found = await trio.to_thread.run_sync(sf.run_batch, seed, n, engine.time_up)
        stats.cases += sf.sent
        stats.frames += sf.sent
        sf.sent = 0
        for finding in found:
            finding.category = "service"
            engine.add_finding(finding)
    await engine.check("service", None)


async def _leak_check(engine: _Engine, rss_tolerance: int, fd_tolerance: int, settle: float) -> None:
    pid = engine.current_pid()
    base = engine.baseline
    if pid is None or not base:
        engine.report.resources = {"note": "no pid: RSS and descriptors not watched"}
        return
    rss_min: int | None = None
    fds_min: int | None = None
    with trio.move_on_after(settle):
        while True:
            rss, fds = _rss(pid), _fds(pid)
            if rss is not None:
                rss_min = rss if rss_min is None else min(rss_min, rss)
            if fds is not None:
                fds_min = fds if fds_min is None else min(fds_min, fds)
            rss_ok = rss_min is None or base["rss"] is None or rss_min <= base["rss"] + rss_tolerance
            fds_ok = fds_min is None or base["fds"] is None or fds_min <= base["fds"] + fd_tolerance
            if rss_ok and fds_ok:
                break
            await trio.sleep(0.25)
    engine.report.resources = {"pid": pid, "baseline": dict(base), "peak": {"rss": _peak_rss(pid)},
                               "after": {"rss": rss_min, "fds": fds_min},
                               "tolerance": {"rss": rss_tolerance, "fds": fd_tolerance}}
    if rss_min is not None and base["rss"] is not None and rss_min > base["rss"] + rss_tolerance:
        engine.add_finding(Finding(kind="leak", category="final", signature="leak:rss",
                                   summary=f"RSS {rss_min / 2**20:.1f} MiB after the run, baseline "
                                           f"{base['rss'] / 2**20:.1f} MiB (tolerance {rss_tolerance / 2**20:.0f} MiB)"))
    if fds_min is not None and base["fds"] is not None and fds_min > base["fds"] + fd_tolerance:
        engine.add_finding(Finding(kind="leak", category="final", signature="leak:fds",
                                   summary=f"{fds_min} open descriptors after the run, baseline {base['fds']} "
                                           f"(tolerance {fd_tolerance})"))


# --- replay and minimize (public) -------------------------------------------------------


async def replay(address: str, reproducer: Reproducer | dict[str, Any], *, secret: str | bytes | None = None,
                 bound: float = 2.0) -> str:
    """Send a reproducer (a :class:`Reproducer` or its JSON form from a report) to the node at
    ``address``; returns what a fresh connection sees afterwards: ``"ok"``, ``"refused"`` (it is
    down) or ``"timeout"`` (it hangs)."""
    rep = reproducer if isinstance(reproducer, Reproducer) else Reproducer.from_json(reproducer)
    secret_b = secret.encode() if isinstance(secret, str) else secret
    async with trio.open_nursery() as nursery:
        runner = _Runner(address, nursery, secret=secret_b, bound=bound, prefix=f"fuzz-replay-{uuid.uuid4().hex[:8]}")
        for step in rep.steps:
            await runner.apply(step)
        await runner.finish(bound / 4)
        nursery.cancel_scope.cancel()
    await trio.sleep(0.2)
    status, _ = await _probe(address, secret=secret_b, bound=bound)
    return status


async def minimize(target: NodeProcess, reproducer: Reproducer, *, secret: str | bytes | None = None,
                   symptom: str = "crash", bound: float = 2.0, budget: float = 60.0) -> Reproducer | None:
    """The smallest variant of ``reproducer`` that still gives ``symptom`` (``"crash"`` or
    ``"hang"``) on ``target`` (restarted as needed; every replay is on a healthy node), or
    None if the reproducer does not reproduce at all. Bounded by ``budget`` seconds."""
    report = FuzzReport(target=" ".join(target.argv), seed=0)
    secret_b = secret.encode() if isinstance(secret, str) else secret
    if not target.alive():
        await target.start()
    engine = _Engine(report, target=target, address=target.address, pid=None, secret=secret_b, namespace="",
                     ver="5", bound=bound, seed=0, legit_action="$node.health", legit_params=None,
                     call_actions=[], stream_actions=[], upload_action=None, download_action=None,
                     download_params=None, minimize_budget=budget, categories=(), service_examples=0)
    signature = symptom
    with trio.move_on_after(budget):
        if not await engine.reproduces(reproducer.steps, symptom, "crash" if symptom == "crash" else "hang"):
            return None
        if symptom == "crash":
            signature = f"crash:{target.crash_signature()}"
        return await _shrink(reproducer, lambda s: engine.reproduces(s, symptom, signature))
    return None


# --- service-level fuzzing --------------------------------------------------------------


def _schema_strategy(schema: Any, defs: dict[str, Any], depth: int = 0) -> st.SearchStrategy[Any]:
    """Values valid for the subset of JSON schema msgspec writes (``$ref``, ``anyOf``, object,
    array, string, integer, number, boolean, null, enum, const)."""
    from nerve.testing import json_values

    if not isinstance(schema, dict) or depth > 8:
        return json_values()
    if "$ref" in schema:
        name = str(schema["$ref"]).rsplit("/", 1)[-1]
        return _schema_strategy(defs.get(name, {}), defs, depth + 1)
    if "anyOf" in schema:
        return st.one_of(*[_schema_strategy(s, defs, depth + 1) for s in schema["anyOf"]])
    if "enum" in schema:
        return st.sampled_from(list(schema["enum"]))
    if "const" in schema:
        return st.just(schema["const"])
    t = schema.get("type")
    if isinstance(t, list):
        return st.one_of(*[_schema_strategy({**schema, "type": x}, defs, depth + 1) for x in t])
    if t == "object":
        props = schema.get("properties") or {}
        required = set(schema.get("required") or [])
        fixed = {k: _schema_strategy(v, defs, depth + 1) for k, v in props.items() if k in required}
        optional = {k: _schema_strategy(v, defs, depth + 1) for k, v in props.items() if k not in required}
        if not props:
            return st.dictionaries(st.text(max_size=8), json_values(max_leaves=4), max_size=3)
        return st.fixed_dictionaries(fixed, optional=optional)
    if t == "array":
        return st.lists(_schema_strategy(schema.get("items", {}), defs, depth + 1),
                        min_size=int(schema.get("minItems", 0)), max_size=max(int(schema.get("minItems", 0)), 5))
    if t == "string":
        lo = int(schema.get("minLength", 0))
        hi = schema.get("maxLength")
        return st.text(min_size=lo, max_size=int(hi) if hi is not None else max(lo, 20))
    if t == "integer":
        return st.integers(schema.get("minimum", schema.get("exclusiveMinimum", -(2**63))),
                           schema.get("maximum", schema.get("exclusiveMaximum", 2**63 - 1)))
    if t == "number":
        return st.floats(allow_nan=False, allow_infinity=False,
                         min_value=schema.get("minimum"), max_value=schema.get("maximum"))
    if t == "boolean":
        return st.booleans()
    if t == "null":
        return st.none()
    return json_values()


def _valid_params(params_type: Any, schema: Any) -> st.SearchStrategy[Any]:
    if params_type is not None:
        try:
            base = st.from_type(params_type)
            base.example  # noqa: B018 - touch the lazy strategy
            return base.map(lambda v: msgspec.to_builtins(v, builtin_types=(bytes,)))
        except Exception:  # noqa: BLE001 - fall back on the schema
            schema = msgspec.json.schema(params_type)
    if isinstance(schema, dict):
        return _schema_strategy(schema, schema.get("$defs") or {})
    from nerve.testing import json_values

    return json_values()


def _near_valid(valid: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Valid params, and params one mutation away: a missing field, a wrong type, an extra
    field, a huge value; and now and then something else entirely."""
    from nerve.testing import json_values

    wrong = st.one_of(
        st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.floats(), st.text(max_size=20),
        st.binary(max_size=20), st.lists(st.integers(-9, 9), max_size=3), st.dictionaries(st.text(max_size=4), st.integers(-9, 9), max_size=2),
        st.integers(10, 20).map(lambda n: "x" * (1 << n)), st.sampled_from([2**63, -(2**63), 2**64 - 1, 1e308, -0.0]),
        st.integers(10, 200).map(lambda d: _nest(d)),
    )

    @st.composite
    def mutate(draw: Any) -> Any:
        value = draw(valid)
        if not isinstance(value, dict):
            return draw(st.one_of(st.just(value), wrong))
        value = dict(value)
        op = draw(st.sampled_from(["none", "missing", "wrong", "wrong", "extra", "huge", "other"]))
        if op == "missing" and value:
            value.pop(draw(st.sampled_from(sorted(value))))
        elif op == "wrong" and value:
            value[draw(st.sampled_from(sorted(value)))] = draw(wrong)
        elif op == "extra":
            value[draw(st.text(max_size=10))] = draw(wrong)
        elif op == "huge" and value:
            value[draw(st.sampled_from(sorted(value)))] = draw(st.sampled_from(
                ["y" * (1 << 20), 2**64 - 1, -(2**63), list(range(10_000)), _nest(300)]))
        elif op == "other":
            return draw(st.one_of(json_values(), wrong))
        return value

    return mutate()


def _nest(depth: int) -> Any:
    value: Any = 0
    for _ in range(depth):
        value = [value]
    return value


class _ServiceFailure(Exception):
    pass


class _ServiceFuzzer:
    """Calls one action with hypothesis-drawn params and keeps the smallest failing params per
    distinct failure (a 5xx or non-nerve error, a hang, a crash)."""

    def __init__(self, action: str, params_type: Any, *, schema: Any = None, bound: float = 2.0) -> None:
        self.action = action
        self.strategy = _near_valid(_valid_params(params_type, schema))
        self.bound = bound
        self.broker: nerve.Broker | None = None
        self.node_id: str | None = None
        self.dead: Callable[[], bool] = lambda: False
        self.failures: dict[str, Finding] = {}
        self.sent = 0

    async def call(self, params: Any) -> tuple[str, str] | None:
        """None when the answer is a result or a typed 4xx; else (kind, description)."""
        assert self.broker is not None
        try:
            msgspec.msgpack.encode(params)
        except (TypeError, OverflowError, ValueError, RecursionError):
            return None  # the client could not send it: not the service's problem
        self.sent += 1
        t0 = trio.current_time()
        try:
            with trio.fail_after(self.bound * 2):
                await self.broker.call(self.action, params, node_id=self.node_id, timeout=self.bound)
        except trio.TooSlowError:
            return "hang", f"no answer within {self.bound * 2}s"
        except RequestTimeoutError as exc:
            return "hang", f"{type(exc).__name__}: {exc}"
        except NerveError as exc:
            if self.dead() or exc.code is None or exc.code >= 500:
                kind = "crash" if self.dead() else "internal_error"
                return kind, f"{type(exc).__name__} (code {exc.code}): {_short(str(exc), 400)}"
            return None
        except Exception as exc:  # noqa: BLE001 - what users' handlers raise is the finding
            return "internal_error", f"{type(exc).__name__}: {_short(str(exc), 400)}"
        if trio.current_time() - t0 > self.bound:
            return "hang", f"answered after {trio.current_time() - t0:.2f}s"
        return None

    def run_batch(self, seed: int, examples: int, stop: Callable[[], bool]) -> list[Finding]:
        """In a worker thread: about ``examples`` params drawn and called; returns the new
        findings. Hypothesis stops at a failure and shrinks it, so the examples are run as
        batches: each batch shrinks the first failure it meets that is not known yet."""
        found: list[Finding] = []
        start = self.sent
        batch_no = 0
        while self.sent - start < examples and not stop():
            before = self.sent
            self._batch(seed * 7919 + batch_no, examples - (self.sent - start), stop, found)
            batch_no += 1
            if self.sent == before:
                break
        return found

    def _batch(self, seed: int, examples: int, stop: Callable[[], bool], found: list[Finding]) -> None:
        target: list[str] = []  # the signature this batch shrinks

        @hypothesis_seed(seed)
        @settings(max_examples=max(1, examples), deadline=None, database=None,
                  suppress_health_check=list(HealthCheck), verbosity=Verbosity.quiet,
                  phases=[Phase.generate, Phase.shrink])
        @given(self.strategy)
        def batch(params: Any) -> None:
            if stop():
                return
            problem = trio.from_thread.run(self.call, params)
            if problem is None:
                return
            kind, text = problem
            signature = f"{kind}:{text.split(':', 1)[0]}"
            known = self.failures.get(signature)
            if known is None:
                finding = Finding(kind=kind, category="service", action=self.action, params=params,
                                  summary=text.splitlines()[0][:300], detail=text,
                                  signature=f"svc:{self.action}:{signature}", minimized=True)
                self.failures[signature] = finding
                found.append(finding)
                if not target:
                    target.append(signature)
            elif len(repr(params)) < len(repr(known.params)):
                known.params = params
                known.summary = text.splitlines()[0][:300]
            if target and target[0] == signature:
                raise _ServiceFailure(signature)

        try:
            batch()
        except _ServiceFailure:
            pass
        except Exception as exc:  # noqa: BLE001 - hypothesis' own (flaky...): keep what we have
            log.debug("service fuzz of %s: batch ended with %r", self.action, exc)


async def fuzz_service(
    target: nerve.Broker | str,
    action: str,
    params_type: Any = None,
    *,
    examples: int = 200,
    seed: int | None = None,
    secret: str | bytes | None = None,
    namespace: str = "",
    node_id: str | None = None,
    timeout: float = 2.0,
) -> FuzzReport:
    """Fuzz the params of one action (trio): valid params drawn from ``params_type`` (a msgspec
    Struct, with hypothesis ``st.from_type``; by default the JSON schema the action announces)
    and near-valid ones (a field missing, of the wrong type, extra, huge). Each answer must be a
    result or a typed 4xx :class:`nerve.errors.NerveError` (``ValidationError``...), never a 5xx
    or another exception, a hang (no answer within ``timeout``) or a crash. Failures are shrunk
    by hypothesis; each finding carries its smallest params.

    ``target`` is a running Broker (in-process services, or one connected to the cluster) or the
    address of a node (a client Broker is started for the run). ``action`` may be ``None`` with
    ``params_type=None`` only through :func:`fuzz_node`; here name it. Example::

        report = await nerve.testing.fuzz_service(broker, "math.add", AddParams, examples=100)
        assert report.ok, report.summary()
    """
    seed = random.randrange(2**31) if seed is None else seed
    _quiet_hypothesis()
    report = FuzzReport(target=target if isinstance(target, str) else f"broker {target.node_id}", seed=seed)
    t0 = trio.current_time()
    secret_b = secret.encode() if isinstance(secret, str) else secret

    async def run(broker: nerve.Broker) -> None:
        service = action.rsplit(".", 1)[0]
        if not action.startswith("$"):
            await broker.wait_for_services(service, timeout=max(10.0, timeout * 5))
        schema = None
        for ep in broker.registry.actions.get(action, []):
            if node_id is None or ep.node_id == node_id:
                schema = ep.definition.get("params")
                if ep.spec is not None and params_type is None and ep.spec.params_type is not None:
                    schema = msgspec.json.schema(ep.spec.params_type)
        sf = _ServiceFuzzer(action, params_type, schema=schema, bound=timeout)
        sf.broker, sf.node_id = broker, node_id
        found = await trio.to_thread.run_sync(sf.run_batch, seed, examples, lambda: False)
        stats = report.category("service")
        stats.cases += sf.sent
        stats.frames += sf.sent
        report.findings.extend(found)

    if isinstance(target, str):
        async with nerve.Broker(f"fuzz-svc-{uuid.uuid4().hex[:8]}", transport="tcp://127.0.0.1:0",
                                peers=[target], secret=secret_b, namespace=namespace) as broker:
            await run(broker)
    else:
        await run(target)
    report.duration = trio.current_time() - t0
    return report
