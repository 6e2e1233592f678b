"""Helpers of the hostile-peer tests: a target node in its own process, and a raw peer that
speaks nerve's framing and handshake by hand (over a real trio socket) and so can say anything.

The raw peer builds its own msgpack (:func:`pack`) so that it can send what msgspec never would:
strings that are not UTF-8 (:class:`RawStr`), wrong types, huge frames.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import signal
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

from nerve.frames import FrameDecoder, FrameEncoder, FrameType, encode_frame

TARGET = Path(__file__).with_name("hostile_target.py")
CHUNK_SIZE = 256 * 1024  # a chunk size (under the default max_chunk, 1 MiB)


# --- msgpack, by hand -------------------------------------------------------------------


class RawStr:
    """A msgpack *str* whose bytes are sent as given (invalid UTF-8 included)."""

    def __init__(self, data: bytes) -> None:
        self.data = data


BAD_UTF8 = RawStr(b"evil-\xff\xfe-\xc3\x28")


def pack(obj: Any) -> bytes:
    """msgpack of dicts, lists, str / RawStr, bytes, bools, None, ints and floats."""
    if obj is None:
        return b"\xc0"
    if obj is True:
        return b"\xc3"
    if obj is False:
        return b"\xc2"
    if isinstance(obj, int):
        if 0 <= obj < 128:
            return bytes([obj])
        if -32 <= obj < 0:
            return struct.pack("b", obj)
        if obj >= 0:
            return b"\xcf" + struct.pack(">Q", obj)
        return b"\xd3" + struct.pack(">q", obj)
    if isinstance(obj, float):
        return b"\xcb" + struct.pack(">d", obj)
    if isinstance(obj, (str, RawStr)):
        data = obj.encode() if isinstance(obj, str) else obj.data
        n = len(data)
        if n < 32:
            return bytes([0xA0 | n]) + data
        if n < 256:
            return b"\xd9" + bytes([n]) + data
        if n < 65536:
            return b"\xda" + struct.pack(">H", n) + data
        return b"\xdb" + struct.pack(">I", n) + data
    if isinstance(obj, (bytes, bytearray)):
        n = len(obj)
        if n < 256:
            return b"\xc4" + bytes([n]) + bytes(obj)
        if n < 65536:
            return b"\xc5" + struct.pack(">H", n) + bytes(obj)
        return b"\xc6" + struct.pack(">I", n) + bytes(obj)
    if isinstance(obj, (list, tuple)):
        head = bytes([0x90 | len(obj)]) if len(obj) < 16 else b"\xdd" + struct.pack(">I", len(obj))
        return head + b"".join(pack(x) for x in obj)
    if isinstance(obj, dict):
        head = bytes([0x80 | len(obj)]) if len(obj) < 16 else b"\xdf" + struct.pack(">I", len(obj))
        return head + b"".join(pack(k) + pack(v) for k, v in obj.items())
    raise TypeError(f"cannot pack {type(obj).__name__}")


def proof(secret: bytes, role: bytes, first: bytes, second: bytes, me: str, peer: str) -> bytes:
    """The handshake's HMAC (docs/protocol.md, "Connections")."""
    message = b"nerve-auth\0" + role + b"\0" + first + second + me.encode() + b"\0" + peer.encode()
    return hmac.new(secret, message, hashlib.sha256).digest()


def hello_fields(node_id: Any, **kw: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {"nodeID": node_id, "namespace": "", "ver": "5", "window": 4 << 20,
                              "maxChunk": 256 << 10}
    fields.update(kw)
    return fields


# --- a target node in its own process ---------------------------------------------------


class Node:
    """``hostile_target.py`` in a subprocess; ``opts`` are extra Broker keyword arguments."""

    def __init__(self, node_id: str, *, peers: tuple[str, ...] = (), secret: str | None = None,
                 opts: dict[str, Any] | None = None) -> None:
        self.node_id = node_id
        args = [sys.executable, str(TARGET), "--node-id", node_id, "--opts", json.dumps(opts or {})]
        for p in peers:
            args += ["--peer", p]
        if secret is not None:
            args += ["--secret", secret]
        self.log = tempfile.NamedTemporaryFile(prefix=f"nerve-{node_id}-", suffix=".log", delete=False)
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=self.log)
        assert self.proc.stdout is not None
        line = b""
        deadline = time.monotonic() + 20
        while not line and time.monotonic() < deadline and self.proc.poll() is None:
            line = self.proc.stdout.readline()
        if not line:
            self.proc.kill()
            self.proc.wait()
            why = self.last_error()
            self.stop()
            raise RuntimeError(f"node {node_id} did not start: {why}")
        info = json.loads(line)
        self.address: str = info["address"]
        self.pid: int = info["pid"]
        host, _, port = self.address.removeprefix("tcp://").rpartition(":")
        self.host, self.port = host, int(port)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stderr(self) -> str:
        return Path(self.log.name).read_text(errors="replace")

    def last_error(self) -> str:
        """The last exception line of the node's stderr."""
        lines = [line.strip(" |+-") for line in self.stderr().splitlines()]
        errors = [line for line in lines if re.match(r"[\w.]+(Error|Exception|Group)\b.*:", line)]
        return errors[-1] if errors else " / ".join(lines[-3:])

    def why_dead(self) -> str:
        return f"node {self.node_id} exited ({self.proc.returncode}): {self.last_error()}"

    def state(self) -> str:
        """'exited: <why>' or 'alive, at N% CPU' (measured over 0.5 s)."""
        if not self.alive():
            return self.why_dead()
        before = self.cpu_seconds()
        time.sleep(0.5)
        return f"alive, at {(self.cpu_seconds() - before) / 0.5:.0%} CPU"

    def rss(self) -> int:
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")

    def cpu_seconds(self) -> float:
        with open(f"/proc/{self.pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                self.proc.kill()  # frozen (a busy loop never sees SIGTERM) or slow
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:  # pragma: no cover
            pass
        self.log.close()
        Path(self.log.name).unlink(missing_ok=True)


# --- a raw, hostile peer ----------------------------------------------------------------


class Closed(Exception):
    """The node closed the connection."""


class Hostile:
    """One raw connection to a node; frames in and out by hand."""

    def __init__(self, stream: trio.SocketStream, node_id: str = "intruder") -> None:
        self.stream = stream
        self.node_id = node_id
        self.decoder = FrameDecoder(1 << 30, split_streams=True)
        self.frames: list[Any] = []  # received, not yet taken
        self.ack: dict[str, Any] | None = None
        self._sending = trio.StrictFIFOLock()  # tasks of a test may send at once (heartbeats)

    @classmethod
    async def connect(cls, address: str, node_id: str = "intruder") -> Hostile:
        host, _, port = address.removeprefix("tcp://").rpartition(":")
        return cls(await trio.open_tcp_stream(host, int(port)), node_id)

    # sending

    async def send_raw(self, data: bytes) -> None:
        """Raises Closed if the node closed (or reset) the connection."""
        async with self._sending:
            try:
                await self.stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                raise Closed() from None

    async def try_send_raw(self, data: bytes) -> bool:
        """send_raw; False if the node had closed the connection already."""
        try:
            await self.send_raw(data)
        except Closed:
            return False
        return True

    async def send(self, kind: int, payload: bytes) -> None:
        await self.send_raw(encode_frame(kind, payload))

    async def send_packet(self, kind: int, fields: dict[str, Any]) -> None:
        body = {"ver": "5", "sender": self.node_id}
        body.update(fields)
        await self.send(kind, pack(body))

    async def send_stream_data(self, flags: int, stream_id: str, seq: int, chunk: bytes) -> None:
        enc = FrameEncoder(1 << 30)
        enc.append_stream_data(flags, stream_id, seq, chunk)
        await self.send_raw(enc.take())

    async def send_credit(self, flags: int, stream_id: str, consumed: int) -> None:
        enc = FrameEncoder(1 << 30)
        enc.append_stream_credit(flags, stream_id, consumed)
        await self.send_raw(enc.take())

    # receiving

    async def _more(self) -> None:
        try:
            data = await self.stream.receive_some(1 << 20)
        except trio.BrokenResourceError:  # reset: the node closed with our bytes unread
            raise Closed() from None
        if not data:
            raise Closed()
        self.frames.extend(self.decoder.feed(data))

    async def next_frame(self, kinds: tuple[int, ...] | None = None) -> Any:
        """The next received frame (of one of ``kinds``; others are dropped). Raises Closed."""
        while True:
            while self.frames:
                frame = self.frames.pop(0)
                if kinds is None or frame[0] in kinds:
                    return frame
            await self._more()

    async def closed_by_peer(self, timeout: float) -> bool:
        """True once the node closed the connection (reading and dropping what it sends),
        False if it is still open after ``timeout``."""
        with trio.move_on_after(timeout):
            try:
                while True:
                    self.frames.clear()
                    await self._more()
            except (Closed, trio.BrokenResourceError):
                return True
        return False

    # handshake

    async def handshake(self, *, secret: str | None = None, **fields: Any) -> dict[str, Any]:
        """Dial-side handshake as ``self.node_id``; returns the node's HELLO_ACK fields."""
        import msgspec

        nonce = os.urandom(16)
        extra: dict[str, Any] = {"auth": True, "nonce": nonce} if secret is not None else {}
        extra.update(fields)
        await self.send(FrameType.HELLO, pack(hello_fields(self.node_id, **extra)))
        frame = await self.next_frame((int(FrameType.HELLO_ACK),))
        ack = msgspec.msgpack.decode(frame[1])
        self.ack = ack
        if not ack.get("accept", True):
            raise Closed(f"refused: {ack.get('reason')}")
        if secret is not None:
            answer = proof(secret.encode(), b"dialer", ack["nonce"], nonce, self.node_id, ack["nodeID"])
            await self.send(FrameType.HELLO, pack(hello_fields(self.node_id, auth=True, proof=answer)))
        return ack  # type: ignore[no-any-return]

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.stream)
