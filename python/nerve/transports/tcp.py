"""Native TCP transport: one connection per node pair, Rust framing, coalesced writes.

Each connection has a reader task (FrameDecoder -> transit) and a writer task that sends
everything queued in its FrameEncoder with one ``writev`` of its parts (``send_all`` of one
joined buffer over TLS). The reader reads the body of a large stream chunk straight into the
chunk (``FrameDecoder.read_from``; see docs/internals.md "Reads"). A wave of frames is not held
back until the writer runs, though: once ``_EAGER_FRAMES`` frames (or ``_EAGER_BYTES``) are
queued, the task that queues one writes them straight to the socket, so the peer works on the
start of a wave while the rest is produced instead of both sides taking turns (64 calls in
flight went from 37k to 55k req/s; see ``docs/internals.md``). A lone frame answering a lone
frame (one call in flight) is written at once too, saving the writer task's hop.

A HELLO handshake names the nodes and settles duplicate connections; PEERS frames spread
addresses so a node given one seed learns all; HEARTBEATs and a watchdog turn a silent peer
into a lost one.

Hostile peers. Each connection is a boundary: whatever a peer's bytes cause (a malformed
frame or packet, an invalid id or address, a bug they reach) ends that connection, logged
once and counted in :meth:`TcpTransport.statistics`, never the node or another connection.
Before a peer is accepted (and authenticated, with ``secret=``) its handshake frames are read
exactly, each no larger than ``max_hello_size``, with at most ``max_handshakes`` in progress,
so an unauthenticated peer holds at most that much memory and no frame of it is processed.
Stream producers are admitted to a connection's write queue by room under its high-water mark
(FIFO, so many streams share it fairly) instead of queueing first; addresses learned from
peers are dialled at most ``max_redials`` times in a row before they are forgotten.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import math
import os
import random
import re
import socket
import ssl
import sys
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import msgspec
import trio

from nerve.errors import BrokerDisconnectedError, BrokerOptionsError, FrameError, ProtocolError
from nerve.frames import (
    DEFAULT_MAX_FRAME_SIZE,
    HEADER_LEN,
    IOV_MAX,
    FrameDecoder,
    FrameEncoder,
    FrameType,
    encode_frame,
    unwritten,
)
from nerve.packets import PacketType
from nerve.statistics import TransportStatistics
from nerve.transports.base import Transport

if TYPE_CHECKING:
    from nerve.transports.base import Upstream

__all__ = ["TcpTransport", "TcpStatistics", "parse_address", "valid_node_id"]


_HELLO = int(FrameType.HELLO)
_HELLO_ACK = int(FrameType.HELLO_ACK)
_PEERS = int(FrameType.PEERS)
_STREAM_DATA = int(FrameType.STREAM_DATA)
_STREAM_CREDIT = int(FrameType.STREAM_CREDIT)
_CANCEL = int(FrameType.CANCEL)
#: a call id in a CANCEL frame is at most this long (ids are short; a longer one is refused)
_MAX_CANCEL_ID = 256
_DISCONNECT = int(PacketType.DISCONNECT)
_HEARTBEAT = int(PacketType.HEARTBEAT)

_RECV_SIZE = 256 * 1024
#: What the reader asks for right after a large chunk was received straight into its buffer:
#: the next bytes are most likely the start of the next large frame, whose body should go
#: straight into its own chunk rather than through the read buffer (see Connection.reader).
_RECV_AFTER_DIRECT = 16 * 1024
#: Largest SO_RCVLOWAT asked for while a large chunk comes in (the kernel caps it too).
_MAX_RCVLOWAT = 4 * 1024 * 1024
#: Unsent bytes the kernel may hold for a plain TCP connection before it is not writable.
_NOTSENT_LOWAT = 1024 * 1024
#: Longest wait for SO_RCVLOWAT's mark before reading what has come (a slow link's peer must
#: still be seen alive between heartbeats).
_LOWAT_WAIT = 0.5


def _kernel_at_least(major: int, minor: int) -> bool:
    found = re.match(r"(\d+)\.(\d+)", os.uname().release) if sys.platform.startswith("linux") else None
    return found is not None and (int(found[1]), int(found[2])) >= (major, minor)


#: Linux grows a socket's receive buffer to hold SO_RCVLOWAT's mark since 4.18; before, a
#: mark larger than the buffer is never reached, so it is only used where it is met.
_RCVLOWAT_GROWS = _kernel_at_least(4, 18)
#: os.writev (POSIX): without it, writes and reads take trio's one-buffer path, as over TLS.
_VECTORED = hasattr(os, "writev")
#: How often an idle writer looks again at producers parked for room (see Connection.writer).
_READY_RECHECK = 0.01
#: Largest piece of one send_all (the write-stall watchdog times each piece).
_WRITE_SLICE = 1024 * 1024
#: Queued frames that the queueing task writes itself (fewer wait for the writer task's batch).
_EAGER_FRAMES = 8
#: Queued bytes that are written eagerly whatever the frame count.
_EAGER_BYTES = 64 * 1024
_HANDSHAKE_TIMEOUT = 5.0
#: Largest handshake frame (HELLO / HELLO_ACK) accepted before a peer is authenticated.
DEFAULT_MAX_HELLO_SIZE = 64 * 1024
#: Inbound handshakes in progress at once; connections beyond are closed at once.
DEFAULT_MAX_HANDSHAKES = 64
#: Failed dials in a row of an address learned from a peer before it is forgotten.
DEFAULT_MAX_REDIALS = 10
#: Established connections at most; further HELLOs are refused ("too many connections").
DEFAULT_MAX_CONNECTIONS = 1024
#: A connection that lasted this long (s) was not a failure (its redials start afresh).
_STABLE = 5.0
#: Addresses learned from peers being dialled at once (more wait for the next PEERS).
_MAX_LEARNED_DIALS = 64
#: Entries of one PEERS frame looked at.
_MAX_PEERS_ENTRIES = 1024
#: Largest stream window taken from a peer's HELLO.
_MAX_WINDOW = 1 << 30
#: Longest node id accepted from a peer.
MAX_NODE_ID_LEN = 256


class Hello(msgspec.Struct, kw_only=True, omit_defaults=True):
    """HELLO (dialer) and HELLO_ACK (acceptor) payloads."""

    node_id: str = msgspec.field(name="nodeID")
    namespace: str = ""
    ver: str = "5"
    address: str | None = None
    window: int = 0
    max_chunk: int = msgspec.field(default=0, name="maxChunk")
    accept: bool = True
    reason: str | None = None
    auth: bool = False
    nonce: bytes = b""
    proof: bytes = b""
    #: request streams the sender serves at once per peer (0: not said, no limit known)
    max_streams: int = msgspec.field(default=0, name="maxStreams")
    #: the sender understands CANCEL frames (a caller that stops waiting cancels the handler)
    cancel: bool = False


class Peers(msgspec.Struct):
    """PEERS: node id -> address of every node the sender is connected to."""

    nodes: dict[str, str]


_hello_encoder = msgspec.msgpack.Encoder()
_hello_decoder = msgspec.msgpack.Decoder(Hello)
_peers_decoder = msgspec.msgpack.Decoder(Peers)


def parse_address(url: str) -> tuple[str, int]:
    """``tcp://host:port`` -> (host, port); ``BrokerOptionsError`` for anything else
    (a port outside 0..65535, a broken IPv6 literal, a path or query...)."""
    host: str | None = None
    port: int | None = None
    try:
        parts = urlsplit(url)
        if (parts.scheme == "tcp" and not parts.path and not parts.query and not parts.fragment
                and url.isprintable() and not any(c.isspace() for c in url)):
            host, port = parts.hostname, parts.port
    except (ValueError, TypeError, AttributeError):
        pass
    if not host or port is None:
        raise BrokerOptionsError(f"expected 'tcp://host:port', got {url!r}")
    return host, port


_HOST_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-_:%")


_WILDCARDS = frozenset({"", "0.0.0.0", "::", "0:0:0:0:0:0:0:0"})


def peer_address(url: Any) -> str | None:
    """``url`` if it is a dialable ``tcp://host:port`` (port 1..65535), else None: for
    addresses that peers tell us (HELLO, PEERS), which are never trusted."""
    if not isinstance(url, str) or len(url) > 300:
        return None
    try:
        host, port = parse_address(url)
    except BrokerOptionsError:
        return None
    if not (0 < port < 65536 and len(host) <= 253 and _HOST_CHARS.issuperset(host)):
        return None  # a host name of letters, digits, '.', '-', or an IP literal; no IDNA
    if host in _WILDCARDS:
        return None  # "any address" is where a node listens, never where one is reached
    return url


def valid_node_id(node_id: Any) -> bool:
    """A node id a peer may use: a non-empty printable string of at most 256 characters."""
    return isinstance(node_id, str) and 0 < len(node_id) <= MAX_NODE_ID_LEN and node_id.isprintable()


@dataclass(frozen=True)
class TcpStatistics(TransportStatistics):
    """A snapshot of a TCP transport (``TcpTransport.statistics()``): ``connections`` are the
    established connections now; ``bytes_sent`` / ``bytes_received`` count socket bytes."""

    #: inbound handshakes in progress now
    handshakes: int
    #: connections established since start
    connections_opened: int
    #: handshakes that failed or were refused (bad frames, wrong secret, timeouts, limits)
    handshakes_failed: int
    #: inbound connections closed at once because ``max_handshakes`` were in progress
    handshakes_over_limit: int
    #: connections ended because the peer broke the protocol (or caused an error)
    protocol_errors: int
    #: connections dropped because the peer did not read (queue over max_write_queue, or a
    #: write stalled for the heartbeat timeout)
    not_reading: int
    #: connections dropped because the peer went silent (heartbeat timeout)
    silent: int
    #: addresses learned from peers given up after max_redials failed dials
    addresses_forgotten: int
    #: bytes queued for all peers now
    bytes_queued: int
    #: stream producers waiting for room in a write queue now
    producers_waiting: int


class Connection:
    """One established connection to a peer node.

    Write path: frames are appended to ``encoder`` (never blocking) and written by the writer
    task or eagerly by the task that queued them (see the module docstring). Bulk producers
    (streams) call :meth:`reserve` before they queue a chunk: it returns at once while the
    queue has room under the transport's ``high_water`` mark, and otherwise parks the
    producer in a FIFO that the writer empties as the queue drains.
    """

    def __init__(self, transport: TcpTransport, stream: trio.abc.Stream, hello: Hello,
                 decoder: FrameDecoder, fd: int | None = None) -> None:
        self.transport = transport
        self.stream = stream
        self.node_id = hello.node_id
        self.address = peer_address(hello.address)
        # Never trust the peer's numbers to be usable by our encoder.
        chunk_cap = max(1024, transport.max_frame_size - 512)
        self.max_chunk = max(1, min(hello.max_chunk, chunk_cap))
        self.window = max(self.max_chunk, min(hello.window, _MAX_WINDOW))
        self.max_streams = max(0, hello.max_streams)
        self.cancels = hello.cancel is True
        self.encoder = FrameEncoder(transport.max_frame_size)
        self.decoder = decoder
        self.graceful = False
        self.closed = False
        self.last_recv = trio.current_time()
        self._wakeup = trio.Event()
        self._waiters: deque[list[Any]] = deque()  # [task, bytes] of parked producers
        self._promised = 0  # bytes of room held by admitted producers that have not queued yet
        self._ready: deque[Any] = deque()  # (task, bytes) waiting for room to exist (hold nothing)
        self._writable: deque[Any] = deque()  # tasks waiting for the queue to be under the mark
        self.reported = False  # the transit was told this connection ended
        self._flushed = trio.Event()
        self._flushed.set()
        self.cancel_scope: trio.CancelScope | None = None
        #: frames queued at which the queueing task writes them itself (see _queued)
        self.eager_frames = _EAGER_FRAMES
        self._sending = False  # the writer task is writing
        self._send_started = 0.0  # when its last write started
        self._unsent: list[Any] = []  # parts an eager write could not send; the writer sends them first
        self._sock = stream.socket if isinstance(stream, trio.SocketStream) else None
        #: a TCP socket (not a test's socketpair): the TCP socket options below apply
        self._tcp = self._sock is not None and self._sock.family in (socket.AF_INET, socket.AF_INET6)
        if self._tcp:
            assert self._sock is not None
            # trio keeps at most 16 KiB unsent in the kernel (TCP_NOTSENT_LOWAT), for latency;
            # our own queue already orders what goes out, and a large chunk then takes several
            # writes and wake-ups. Let one chunk's worth wait in the kernel instead.
            if hasattr(socket, "TCP_NOTSENT_LOWAT"):
                with contextlib.suppress(OSError):
                    self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT, _NOTSENT_LOWAT)
        if fd is None and self._sock is not None and _VECTORED:
            fd = self._sock.fileno()
        self._fd = fd  # None: no eager writes, no writev / direct reads (a TLS stream)

    def _closed_error(self) -> BrokerDisconnectedError:
        return BrokerDisconnectedError(f"connection to '{self.node_id}' is closed",
                                       data={"nodeID": self.node_id})

    def send(self, kind: int, payload: Any) -> None:
        if self.closed:
            raise self._closed_error()
        self.encoder.append(kind, payload)
        self._queued()

    def send_stream_data(self, flags: int, stream_id: str, seq: int, chunk: Any) -> None:
        if self.closed:
            raise self._closed_error()
        self.encoder.append_stream_data(flags, stream_id, seq, chunk)
        self._queued()

    def send_stream_credit(self, flags: int, stream_id: str, consumed: int) -> None:
        if self.closed:
            raise self._closed_error()
        self.encoder.append_stream_credit(flags, stream_id, consumed)
        self._queued()

    def _queued(self) -> None:
        encoder = self.encoder
        if (encoder.frames >= self.eager_frames or len(encoder) >= _EAGER_BYTES) \
                and not self._sending and not self._unsent and self._fd is not None:
            # Write now, from this task, rather than at the end of the scheduler batch: the
            # peer works on these frames while we produce the rest of the wave.
            total = len(encoder)
            parts = encoder.take_parts()
            try:
                sent = os.writev(self._fd, parts[:IOV_MAX])
            except OSError:  # full (BlockingIOError) or broken: the writer sends or fails
                sent = 0
            self.transport.bytes_sent += sent
            if sent == total:
                self._admit()
                return
            self._unsent = unwritten(parts, sent)
        self._wakeup.set()
        if self._flushed.is_set():
            self._flushed = trio.Event()
        if len(self.encoder) > self.transport.max_write_queue:
            self._overloaded()

    def _overloaded(self) -> None:
        """The peer does not read what we owe it: drop the connection rather than the memory
        (its pending calls fail with a retryable error; it may reconnect)."""
        if not self.closed and self.cancel_scope is not None:
            self.transport.log.warning("disconnecting %s: %d bytes queued for it (max_write_queue %d); it is not reading",
                        self.node_id, len(self.encoder), self.transport.max_write_queue)
            self.transport._count("not_reading")
            self.close()

    def close(self) -> None:
        """End the connection (its task unwinds and reports the peer gone)."""
        self.closed = True
        self._wake_all()
        if self.cancel_scope is not None:
            self.cancel_scope.cancel()

    # --- admission of bulk producers ----------------------------------------------------
    #
    # A producer that may queue at once (has_room) queues without a checkpoint in between.
    # One that must wait parks in a FIFO; the writer, whenever the queue shrinks, admits the
    # parked producers whose bytes fit, in order, and promises them that room
    # (``_promised``, counted as queued) until they queue or give up (``release``). So room
    # is never given twice, however long an admitted producer takes to produce its chunk,
    # and a producer that gives up hands its room on at once.

    def _fits(self, n: int) -> bool:
        queued = len(self.encoder) + self._promised
        return queued == 0 or queued + n <= self.transport.high_water

    def has_room(self, n: int) -> bool:
        """True if ``n`` more bytes may be queued now without waiting."""
        return not self._waiters and self._fits(n) and not self.closed

    async def reserve(self, n: int) -> None:
        """Wait until ``n`` more bytes fit in the write queue (under the high-water mark, or
        the queue is empty), in FIFO order with other producers, and hold that room: the
        caller must :meth:`release` ``n`` once it has queued its bytes or given up. Raises
        BrokerDisconnectedError once the connection is closed (holding nothing)."""
        await trio.lowlevel.checkpoint_if_cancelled()
        if self.closed:
            raise self._closed_error()
        if not self._waiters and self._fits(n):
            self._promised += n
            return
        entry = [trio.lowlevel.current_task(), n]
        self._waiters.append(entry)

        def abort(_: Any) -> trio.lowlevel.Abort:
            self._waiters.remove(entry)
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)
        if self.closed:  # woken by _wake_all: nothing was promised
            raise self._closed_error()
        # woken by _admit, which promised us the room

    def release(self, n: int) -> None:
        """Give back room held by :meth:`reserve` (its bytes were queued, or never will be)."""
        self._promised = max(0, self._promised - n)
        self._admit()

    def _admit(self) -> None:
        """The queue shrank (or room was given back): admit the parked producers whose
        bytes now fit, in order (holders first, with room promised); then, with room left,
        let as many producers about to produce a chunk look again as that room takes; and
        wake every non-stream producer once the bytes queued are under the mark (room
        promised to streams does not hold them back: they interleave)."""
        waiters = self._waiters
        if self.closed or not (waiters or self._ready or self._writable):
            return
        queued = len(self.encoder) + self._promised
        budget = self.transport.high_water - queued
        first = queued == 0
        while waiters:
            n = waiters[0][1]
            if n > budget and not first:
                break
            task = waiters.popleft()[0]
            budget -= n
            self._promised += n
            first = False
            trio.lowlevel.reschedule(task)
        ready = self._ready
        if not waiters and ready and (budget > 0 or first):
            # They hold nothing and re-check on waking; one that then queues nothing is
            # looked at again by the idle writer (see writer()).
            while ready and (budget > 0 or first):
                task, n = ready.popleft()
                budget -= n
                first = False
                trio.lowlevel.reschedule(task)
        if self._writable and len(self.encoder) <= self.transport.high_water:
            while self._writable:
                trio.lowlevel.reschedule(self._writable.popleft())

    def _wake_all(self) -> None:
        while self._waiters:
            trio.lowlevel.reschedule(self._waiters.popleft()[0])
        while self._ready:
            trio.lowlevel.reschedule(self._ready.popleft()[0])
        while self._writable:
            trio.lowlevel.reschedule(self._writable.popleft())

    async def _park(self, queue: deque[Any], entry: Any) -> None:
        queue.append(entry)

        def abort(_: Any) -> trio.lowlevel.Abort:
            queue.remove(entry)
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)

    async def wait_ready(self, n: int) -> None:
        """Wait until ``n`` bytes would be admitted now (no producer waiting, room under the
        mark), without holding that room: for a producer about to produce its next chunk,
        which then queues it or parks *with* it in :meth:`reserve` (which goes first)."""
        await trio.lowlevel.checkpoint_if_cancelled()
        while not self.closed and (self._waiters or not self._fits(n)):
            await self._park(self._ready, (trio.lowlevel.current_task(), n))
        if self.closed:
            raise self._closed_error()

    async def wait_writable(self) -> None:
        """Wait while the queue is over the high-water mark (non-stream producers, after
        they queued; never behind stream producers)."""
        while not self.closed and len(self.encoder) > self.transport.high_water:
            await self._park(self._writable, trio.lowlevel.current_task())
        await trio.lowlevel.checkpoint()

    # --- tasks --------------------------------------------------------------------------

    async def writer(self) -> None:
        encoder = self.encoder
        fd = self._fd
        while True:
            if self._unsent:
                parts, self._unsent = self._unsent, []
            elif len(encoder):
                # Large payloads go out from the producers' own objects (one writev of headers
                # and chunks), never joined into a copy; a TLS stream needs one buffer.
                parts = encoder.take_parts() if fd is not None else [encoder.take()]
                self._admit()  # only once the queue is empty, not while _unsent goes out
            else:
                self._admit()  # the queue went out whole (perhaps as _unsent): room for all
                self._flushed.set()
                self._wakeup = trio.Event()
                if self._ready:
                    # Producers woken to produce a chunk may queue nothing (a live feed with
                    # nothing to say): look at those still parked again soon.
                    with trio.move_on_after(_READY_RECHECK):
                        await self._wakeup.wait()
                else:
                    await self._wakeup.wait()
                continue
            # Left set if a write fails or is cancelled midway: nothing may follow its bytes.
            self._sending = True
            if fd is not None:
                await self._write_parts(fd, parts)
            else:
                # Sent in slices so the write-stall watchdog sees progress, not a whole batch.
                view = memoryview(parts[0])
                for at in range(0, len(view), _WRITE_SLICE):
                    self._send_started = trio.current_time()
                    part = view[at:at + _WRITE_SLICE]
                    await self.stream.send_all(part)
                    self.transport.bytes_sent += len(part)
            self._sending = False

    async def _write_parts(self, fd: int, parts: list[Any]) -> None:
        """Write ``parts`` in order with ``writev``, waiting while the socket is full. The
        write-stall watchdog times each wait (``_send_started``), so a peer that reads slowly
        but steadily is not taken for one that stopped."""
        while parts:
            self._send_started = trio.current_time()
            try:
                n = os.writev(fd, parts[:IOV_MAX])
            except BlockingIOError:
                await trio.lowlevel.wait_writable(fd)
                continue
            except OSError as exc:
                raise trio.BrokenResourceError(f"writing to {self.node_id}: {exc}") from exc
            self.transport.bytes_sent += n
            parts = unwritten(parts, n)

    async def reader(self) -> None:
        sock = self._sock
        if sock is None:
            receive = self.stream.receive_some
            while True:
                data = await receive(_RECV_SIZE)
                if not data:
                    return
                self.transport.bytes_received += len(data)
                self.last_recv = trio.current_time()
                self._on_frames(self.decoder.feed(data))
        # A plain socket: small frames are read into one reused buffer; the body of a large
        # STREAM_DATA frame is read straight into its chunk (decoder.read_from), so a chunk is
        # copied once, by the kernel, on its way in.
        decoder = self.decoder
        feed = decoder.feed
        recv_into = sock.recv_into
        view = memoryview(bytearray(_RECV_SIZE))
        want = _RECV_SIZE
        fd = self._fd
        assert fd is not None
        lowat = 1  # SO_RCVLOWAT now
        cap = _MAX_RCVLOWAT if self._tcp and _RCVLOWAT_GROWS else 1  # (not on a test's socketpair)
        read_from = decoder.read_from
        while True:
            missing = decoder.direct_missing
            if missing:
                # The rest of a large chunk: be woken once it is all in (SO_RCVLOWAT; the
                # kernel caps it and grows the receive buffer to match), then read it with one
                # call, instead of one scheduler round per segment the peer's writes make.
                if cap > 1 and (missing < lowat or lowat == 1):
                    try:
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, min(missing, cap))
                        lowat = min(missing, cap)
                    except OSError:  # refused here: read as the bytes come
                        cap = 1
                # Never wait long on the mark: a slow but steady peer must still be seen
                # alive (last_recv) between heartbeats, so read what is there every so often.
                with trio.move_on_after(_LOWAT_WAIT):
                    await trio.lowlevel.wait_readable(fd)
                try:
                    n, frames = read_from(fd)
                except BlockingIOError:  # (nothing yet)
                    continue
                if not n:
                    return
                want = _RECV_AFTER_DIRECT
            else:
                if lowat != 1:
                    lowat = 1
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)
                n = await recv_into(view, want)
                if not n:
                    return
                frames = feed(view[:n])
                want = _RECV_SIZE
            self.transport.bytes_received += n
            self.last_recv = trio.current_time()
            if frames:
                self._on_frames(frames)

    def _on_frames(self, frames: list[Any]) -> None:
        upstream = self.transport.upstream
        assert upstream is not None
        node = self.node_id
        # A lone frame in is likely answered by a lone frame out: write that one at once.
        self.eager_frames = 1 if len(frames) == 1 else _EAGER_FRAMES
        for frame in frames:
            kind = frame[0]
            if kind == _STREAM_DATA:
                upstream.on_stream_data(node, frame[1], frame[2], frame[3], frame[4])
                continue
            if kind == _STREAM_CREDIT:
                upstream.on_stream_credit(node, frame[1], frame[2], frame[3])
                continue
            payload = frame[1]
            if kind == _CANCEL:
                upstream.on_cancel(node, _cancel_id(node, payload))
            elif kind == _PEERS:
                self.transport._on_peers(self, payload)
            elif kind == _HELLO or kind == _HELLO_ACK:
                raise ProtocolError(f"{node} sent a second handshake frame", reason="unexpected_hello")
            else:
                if kind == _DISCONNECT:
                    self.graceful = True
                upstream.on_frame(node, kind, payload)

    async def flush(self) -> None:
        await self._flushed.wait()


class TcpTransport(Transport):
    """The native TCP transport. Limits (constructor arguments, safe defaults):
    ``max_frame_size``; ``high_water`` (bytes queued for a peer above which stream producers
    wait) and ``max_write_queue`` (above which the peer is dropped as not reading);
    ``max_hello_size`` and ``max_handshakes`` (what unauthenticated peers may hold);
    ``max_redials`` (failed dials of an address learned from a peer before it is forgotten;
    seeds given by the user are dialled for ever)."""

    logger_name = "nerve.tcp"

    native_streams = True

    def __init__(self, url: str, *, peers: list[str] | tuple[str, ...] = (),
                 max_frame_size: int = DEFAULT_MAX_FRAME_SIZE, high_water: int = 4 * 1024 * 1024,
                 max_write_queue: int = 64 * 1024 * 1024,
                 reconnect_min: float = 0.05, reconnect_max: float = 5.0,
                 secret: str | bytes | None = None,
                 max_hello_size: int = DEFAULT_MAX_HELLO_SIZE,
                 max_handshakes: int = DEFAULT_MAX_HANDSHAKES,
                 max_redials: int = DEFAULT_MAX_REDIALS,
                 max_streams: int = 0,
                 tls_cert: str | os.PathLike[str] | None = None,
                 tls_key: str | os.PathLike[str] | None = None,
                 tls_ca: str | os.PathLike[str] | None = None,
                 tls_mutual: bool = False,
                 max_connections: int = DEFAULT_MAX_CONNECTIONS,
                 advertise: str | None = None) -> None:
        self.host, self.port = parse_address(url)
        if advertise is not None and (parse_address(advertise)[0] in _WILDCARDS or parse_address(advertise)[1] == 0):
            raise BrokerOptionsError(f"advertise={advertise!r}: peers cannot dial a wildcard host or port 0")
        #: what peers are told to dial (HELLO, relayed in PEERS): ``advertise=``, else the bound
        #: address, a wildcard host replaced by this host's first non-loopback address
        self._advertise = advertise
        self.advertised: str | None = None
        self._tls_server, self._tls_client = _tls_contexts(tls_cert, tls_key, tls_ca, tls_mutual)
        self.tls_mutual = tls_mutual
        for p in peers:
            parse_address(p)
        if max_hello_size < 256 or max_handshakes < 1 or max_redials < 1:
            raise BrokerOptionsError("need max_hello_size >= 256, max_handshakes >= 1, max_redials >= 1")
        self.seeds = list(peers)
        self.max_frame_size = max_frame_size
        self.high_water = high_water
        self.max_write_queue = max(max_write_queue, high_water)
        self.secret = secret.encode() if isinstance(secret, str) else secret
        self.reconnect_min = reconnect_min
        self.reconnect_max = reconnect_max
        self.max_hello_size = max_hello_size
        self.max_handshakes = max_handshakes
        self.max_redials = max_redials
        #: request streams this node serves at once per peer, told to peers in HELLO
        self.max_streams = max_streams
        self.upstream: Upstream | None = None
        self.address: str | None = None
        self.connections: dict[str, Connection] = {}
        #: seed address -> why its last dial failed (cleared when it connects)
        self._seed_errors: dict[str, str] = {}
        #: seed address -> the kind of failure last warned about (a seed that flaps or a
        #: peer that varies its refusal text gets one warning per kind, not one per redial)
        self._seed_warned: dict[str, str] = {}
        self._dialing: dict[str, str] = {}  # address -> node id we expect (or "")
        self._dial_loops: set[str] = set()  # addresses with a dial loop (dialling or waiting)
        self._learned_loops = 0  # of which learned from peers
        self._known: dict[str, str] = {}  # node id -> address (of nodes we were connected to)
        self._nursery: trio.Nursery | None = None
        self._closing = False
        self._handshakes = 0
        self._handshakes_by_host: dict[str, int] = {}
        self._max_handshakes_per_host = max(1, max_handshakes // 4)
        self._seed_addresses = {parse_address(p) for p in peers}
        self.max_connections = max_connections
        self._counts = {"connections_opened": 0, "handshakes_failed": 0, "handshakes_over_limit": 0,
                        "protocol_errors": 0, "not_reading": 0, "silent": 0, "addresses_forgotten": 0}

    def _count(self, what: str) -> None:
        self._counts[what] += 1

    def statistics(self) -> TcpStatistics:
        conns = [c for c in self.connections.values() if not c.closed]
        return TcpStatistics(
            connections=len(conns), bytes_sent=self.bytes_sent, bytes_received=self.bytes_received,
            handshakes=self._handshakes,
            bytes_queued=sum(len(c.encoder) for c in conns),
            producers_waiting=sum(len(c._waiters) + len(c._ready) for c in conns), **self._counts)

    # --- Transport API ------------------------------------------------------------------

    def _conn(self, node_id: str) -> Connection:
        conn = self.connections.get(node_id)
        if conn is None:
            raise BrokerDisconnectedError(f"node '{node_id}' is not connected", data={"nodeID": node_id})
        return conn

    def send(self, node_id: str, kind: int, payload: bytes) -> None:
        self._conn(node_id).send(kind, payload)

    def broadcast(self, kind: int, payload: bytes) -> None:
        for conn in list(self.connections.values()):
            if not conn.closed:
                conn.send(kind, payload)

    def send_stream_data(self, node_id: str, flags: int, stream_id: str, seq: int, chunk: Any) -> None:
        self._conn(node_id).send_stream_data(flags, stream_id, seq, chunk)

    def send_stream_credit(self, node_id: str, flags: int, stream_id: str, consumed: int) -> None:
        self._conn(node_id).send_stream_credit(flags, stream_id, consumed)

    def send_cancel(self, node_id: str, call_id: str) -> None:
        conn = self.connections.get(node_id)
        if conn is not None and conn.cancels and not conn.closed:
            conn.send(_CANCEL, call_id.encode("utf-8", "surrogatepass"))

    def has_room(self, node_id: str, n: int) -> bool:
        conn = self.connections.get(node_id)
        return conn is None or conn.has_room(n)

    async def reserve(self, node_id: str, n: int) -> Any:
        conn = self.connections.get(node_id)
        if conn is None:
            await trio.lowlevel.checkpoint()
            return None  # the send that follows raises BrokerDisconnectedError
        await conn.reserve(n)
        return conn

    def release(self, token: Any, n: int) -> None:
        if token is not None:
            token.release(n)

    async def wait_ready(self, node_id: str, n: int) -> None:
        conn = self.connections.get(node_id)
        if conn is None:
            await trio.lowlevel.checkpoint()
            return
        await conn.wait_ready(n)

    async def wait_writable(self, node_id: str) -> None:
        conn = self.connections.get(node_id)
        if conn is None:
            await trio.lowlevel.checkpoint()
            return
        await conn.wait_writable()

    def peer_stream_config(self, node_id: str) -> tuple[int, int]:
        conn = self._conn(node_id)
        return conn.window, conn.max_chunk

    def peer_max_streams(self, node_id: str) -> int:
        conn = self.connections.get(node_id)
        return conn.max_streams if conn is not None else 0

    def peer_address(self, node_id: str) -> str | None:
        conn = self.connections.get(node_id)
        return conn.address if conn is not None else self._known.get(node_id)

    def connected(self) -> list[str]:
        return [n for n, c in self.connections.items() if not c.closed]

    async def disconnect_all(self) -> None:
        self._closing = True
        with trio.move_on_after(1):
            for conn in list(self.connections.values()):
                await conn.flush()
        for conn in list(self.connections.values()):
            conn.graceful = True
            conn.close()
        await trio.lowlevel.checkpoint()

    # --- serving ------------------------------------------------------------------------

    async def serve(self, upstream: Upstream, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        self.upstream = upstream
        try:
            listeners = await trio.open_tcp_listeners(self.port, host=self.host)
        except OSError as exc:
            why = os.strerror(exc.errno).lower() if exc.errno else str(exc)
            raise BrokerOptionsError(f"cannot listen on tcp://{self.host}:{self.port}: {why}",
                                     data={"address": f"tcp://{self.host}:{self.port}"}) from exc
        sockname = listeners[0].socket.getsockname()
        self.address = f"tcp://{self.host}:{sockname[1]}"
        self.advertised = self._advertise or await _advertisable(self.host, sockname[1])
        if self.advertised.startswith(("tcp://127.", "tcp://[::1]")) and self.host in _WILDCARDS:
            self.log.warning("listening on %s but this host has no address but loopback to tell peers: "
                             "peers on other hosts cannot dial %s; set advertise=", self.address, self.advertised)
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(trio.serve_listeners, self._handle_inbound, listeners)
            nursery.start_soon(self._heartbeats)
            for seed in self.seeds:
                if seed != self.address:
                    self._start_dial_loop(seed, "", learned=False)
            task_status.started()
            await trio.sleep_forever()

    def _hello(self, *, accept: bool = True, reason: str | None = None, nonce: bytes = b"",
               proof: bytes = b"") -> bytes:
        assert self.upstream is not None
        window, max_chunk = self.upstream.stream_config
        return _hello_encoder.encode(Hello(
            node_id=self.upstream.node_id, namespace=self.upstream.namespace, ver=self.upstream.ver,
            address=self.advertised or self.address, window=window, max_chunk=max_chunk,
            accept=accept, reason=reason, auth=self.secret is not None, nonce=nonce, proof=proof,
            max_streams=self.max_streams, cancel=True))

    def _proof(self, role: bytes, first: bytes, second: bytes, me: str, peer: str) -> bytes:
        """HMAC-SHA256 over both nonces and both node ids, bound to the role."""
        assert self.secret is not None
        message = (b"nerve-auth\0" + role + b"\0" + first + second + me.encode("utf-8", "surrogatepass")
                   + b"\0" + peer.encode("utf-8", "surrogatepass"))
        return hmac.new(self.secret, message, hashlib.sha256).digest()

    async def _read_handshake(self, stream: trio.abc.Stream, expected: int) -> Hello:
        """Read exactly one handshake frame of type ``expected`` (nothing beyond it: what
        follows is the connection's) and decode it. Raises ProtocolError for anything else."""
        limit = self.max_hello_size
        with trio.fail_after(_HANDSHAKE_TIMEOUT):
            header = await _receive_exactly(stream, HEADER_LEN)
            decoder = FrameDecoder(limit)
            frames = decoder.feed(header)  # checks the header: checksum, length <= limit, type
            if header[5] != expected:
                raise ProtocolError(f"expected {FrameType(expected).name} first, got frame type {header[5]}",
                                    reason="handshake")
            if not frames:
                length = int.from_bytes(header[1:5], "big")
                frames = decoder.feed(await _receive_exactly(stream, length - HEADER_LEN))
        try:
            hello = _hello_decoder.decode(frames[0][1])
        except Exception as exc:  # DecodeError, invalid UTF-8, nesting...
            raise ProtocolError(f"bad handshake frame: {exc}", reason="handshake") from None
        if not valid_node_id(hello.node_id):
            raise ProtocolError(f"bad node id in handshake: {hello.node_id[:80]!r}", reason="handshake")
        return hello

    def _check_peer(self, hello: Hello) -> str | None:
        """Why a peer's HELLO is unacceptable, or None."""
        assert self.upstream is not None
        if hello.namespace != self.upstream.namespace:
            return f"namespace mismatch: {hello.namespace[:80]!r} != {self.upstream.namespace!r}"
        if hello.ver != self.upstream.ver:
            return f"protocol version mismatch: {hello.ver[:16]!r} != {self.upstream.ver!r}"
        if hello.node_id == self.upstream.node_id:
            return f"node id conflict: {hello.node_id!r} is my own id"
        if hello.window <= 0 or hello.max_chunk <= 0 or hello.max_chunk > hello.window:
            return "bad stream window / chunk size"
        if hello.address is not None and peer_address(hello.address) is None:
            return f"bad address {hello.address[:80]!r}"
        return None

    async def _handle_inbound(self, stream: trio.SocketStream) -> None:
        """An accepted connection: the boundary of everything its peer sends."""
        host = _remote(stream).rpartition(":")[0]
        from_host = self._handshakes_by_host.get(host, 0)
        if self._handshakes >= self.max_handshakes or from_host >= self._max_handshakes_per_host:
            # TLS handshakes count too; one host may hold only a quarter of the slots.
            self._count("handshakes_over_limit")
            self.log.debug("closing an inbound connection from %s: %d handshakes in progress (%d from it)",
                      host, self._handshakes, from_host)
            await trio.aclose_forcefully(stream)
            return
        self._handshakes += 1
        self._handshakes_by_host[host] = from_host + 1
        try:
            conn = await self._accept(stream)
        except Exception as exc:  # whatever the peer's bytes caused: its connection ends
            self._count("handshakes_failed")
            self.log.warning("inbound connection from %s refused: %s", _remote(stream), _describe(exc))
            conn = None
        finally:
            self._handshakes -= 1
            left = self._handshakes_by_host.pop(host) - 1
            if left:
                self._handshakes_by_host[host] = left
        if conn is None:
            await trio.aclose_forcefully(stream)
            return
        await self._run(conn)
        if conn.address and (not conn.graceful or self._is_seed(conn.address)):
            # It dialled us and was lost (or is a seed): try to get it back (a learned
            # address for a while only: it may be gone).
            self._start_dial_loop(conn.address, conn.node_id, learned=not self._is_seed(conn.address))

    async def _accept(self, raw: trio.SocketStream) -> Connection | None:
        """The acceptor's side of the handshake: the connection, or None when refused."""
        assert self.upstream is not None
        stream: trio.abc.Stream = raw
        if self._tls_server is not None:
            tls = trio.SSLStream(raw, self._tls_server, server_side=True)
            with trio.fail_after(_HANDSHAKE_TIMEOUT):
                await tls.do_handshake()
            stream = tls
        hello = await self._read_handshake(stream, _HELLO)
        reason = self._check_peer(hello)
        if reason is None and self.tls_mutual and not _cert_names_node(stream, hello.node_id):
            reason = f"its certificate does not name node {hello.node_id!r}"
        if reason is None:
            if hello.node_id in self.connections:
                reason = "duplicate connection"
            elif len(self.connections) >= self.max_connections:
                reason = f"too many connections ({self.max_connections})"
            elif self._dialing.get(hello.address or "") == hello.node_id and \
                    self.upstream.node_id < hello.node_id:
                reason = "duplicate connection"  # our own dial to it wins
        nonce = os.urandom(16) if self.secret is not None else b""
        proof = b""
        if reason is None and self.secret is None and hello.auth:
            reason = "the dialer requires a shared secret and this node has none"
        if self.secret is not None and reason is None:
            if not hello.auth or len(hello.nonce) < 16:
                reason = "authentication required"
            else:
                proof = self._proof(b"acceptor", hello.nonce, nonce, self.upstream.node_id, hello.node_id)
        await stream.send_all(encode_frame(_HELLO_ACK, self._hello(accept=reason is None, reason=reason,
                                                                   nonce=nonce, proof=proof)))
        if reason is None and self.secret is not None:
            # No frame of the dialer is processed before its proof checks out.
            auth = await self._read_handshake(stream, _HELLO)
            expected = self._proof(b"dialer", nonce, hello.nonce, hello.node_id, self.upstream.node_id)
            if not hmac.compare_digest(auth.proof, expected):
                reason = "authentication failed"
        if reason is not None:
            if reason != "duplicate connection":
                self._count("handshakes_failed")
                self.log.warning("refused %s: %s", hello.node_id, reason)
            return None
        return Connection(self, stream, hello, FrameDecoder(self.max_frame_size, split_streams=True),
                          fd=None if stream is not raw else raw.socket.fileno())

    def _start_dial_loop(self, address: str, node_id: str, *, learned: bool) -> None:
        if self._closing or self._nursery is None or address in self._dial_loops:
            return
        if learned:
            if self._learned_loops >= _MAX_LEARNED_DIALS:
                return
            self._learned_loops += 1
        self._dial_loops.add(address)
        self._nursery.start_soon(self._dial_loop, address, node_id, learned)

    def _is_seed(self, address: str) -> bool:
        try:
            where = parse_address(address)
        except BrokerOptionsError:
            return False
        return where in self._seed_addresses

    async def _dial_loop(self, address: str, node_id: str, learned: bool) -> None:
        """Connect to ``address`` and run the connection, again and again with backoff.

        Seeds are dialled for ever, after a graceful close too (the node may come back). An
        address learned from a peer is given up after ``max_redials`` failures in a row, or
        once its node says goodbye. A connection that ends within ``_STABLE`` seconds counts
        as a failure, so a peer that accepts and drops us is never redialled in a tight loop.
        While not connected, a learned address holds one of the ``_MAX_LEARNED_DIALS`` slots.
        """
        delay = self.reconnect_min
        failures = 0
        holds_slot = learned  # taken by _start_dial_loop
        try:
            while not self._closing:
                if node_id and node_id in self.connections:
                    return
                if address in self._dialing:
                    return
                self._dialing[address] = node_id
                try:
                    result = await self._dial(address)
                finally:
                    self._dialing.pop(address, None)
                if result == "refused" and learned:
                    return  # (a seed that refuses us is misconfigured: keep trying, it may be fixed)
                if isinstance(result, Connection):
                    self._seed_errors.pop(address, None)
                    if holds_slot:
                        self._learned_loops -= 1
                        holds_slot = False
                    started = trio.current_time()
                    await self._run(result)
                    if self._closing or (result.graceful and learned):
                        return
                    if learned:
                        if self._learned_loops >= _MAX_LEARNED_DIALS:
                            return
                        self._learned_loops += 1
                        holds_slot = True
                    if trio.current_time() - started >= _STABLE:
                        failures = 0
                        delay = self.reconnect_min
                    else:
                        failures += 1
                else:
                    failures += 1
                if learned and failures >= self.max_redials:
                    self.log.info("giving up on %s (%s) after %d failed dials", address, node_id or "?", failures)
                    self._count("addresses_forgotten")
                    if node_id and self._known.get(node_id) == address:
                        del self._known[node_id]
                    return
                await trio.sleep(delay * (0.5 + random.random()))
                if failures:
                    delay = min(delay * 2, self.reconnect_max)
        finally:
            self._dial_loops.discard(address)
            if holds_slot:
                self._learned_loops -= 1

    def _dial_failed(self, address: str, why: str) -> None:
        """A dial of ``address`` failed (nothing listens, no answer): see :meth:`_failed`."""
        self._failed(address, why, f"cannot reach seed {address}: {why} (retrying in the background)",
                     f"cannot connect to {address}: {why}", other_warns=False)

    def _refused(self, address: str, why: str) -> None:
        """A handshake with ``address`` was refused (a wrong secret, a certificate, another
        cluster): see :meth:`_failed`; a learned address's refusal is a warning too."""
        self._failed(address, why, f"{address}: {why}", f"{address}: {why}", other_warns=True)

    def _failed(self, address: str, why: str, warning: str, repeat: str, *, other_warns: bool) -> None:
        """A seed's failure is recorded (``unreachable_seeds``) and warned about once per kind
        (the detail is the peer's text; a flapping seed does not re-warn); the repeats, and a
        learned address's failures unless ``other_warns``, are debug lines."""
        if self._is_seed(address):
            self._seed_errors[address] = why
            kind = why.split(":", 1)[0]
            if self._seed_warned.get(address) != kind:
                self._seed_warned[address] = kind
                self.log.warning("%s", warning)
                return
        elif other_warns:
            self.log.warning("%s", warning)
            return
        self.log.debug("%s", repeat)

    def unreachable_seeds(self) -> dict[str, str]:
        return dict(self._seed_errors)

    async def _dial(self, address: str) -> Connection | str:
        """One dial: the established connection (not yet running), "refused" (for good:
        a bad address, a mismatch), "busy" (refused for now: full, or already connected), or
        "retry"."""
        try:
            host, port = parse_address(address)
        except BrokerOptionsError as exc:
            self.log.warning("not dialling %r: %s", address, exc)
            return "refused"
        try:
            with trio.fail_after(_HANDSHAKE_TIMEOUT):
                raw = await trio.open_tcp_stream(host, port)
        except (OSError, trio.TooSlowError) as exc:
            self._dial_failed(address, _connect_failure(exc))
            return "retry"
        except Exception as exc:  # a host name the resolver rejects (IDNA...): never the node's end
            self.log.warning("not dialling %r: %r", address, exc)
            return "refused"
        stream: trio.abc.Stream = raw
        try:
            if self._tls_client is not None:
                tls = trio.SSLStream(raw, self._tls_client, server_hostname=host)
                with trio.fail_after(_HANDSHAKE_TIMEOUT):
                    await tls.do_handshake()
                stream = tls
            conn = await self._connect(stream, address, host)
        except Exception as exc:  # whatever the peer's bytes caused: this dial failed
            self._count("handshakes_failed")
            self._dial_failed(address, f"handshake failed: {_describe(exc)}")
            conn = "retry"
        if isinstance(conn, str):
            await trio.aclose_forcefully(raw)
        return conn

    async def _connect(self, stream: trio.abc.Stream, address: str, host: str) -> Connection | str:
        """The dialer's side of the handshake: the connection, or "refused" / "retry"."""
        assert self.upstream is not None
        nonce = os.urandom(16)
        await stream.send_all(encode_frame(_HELLO, self._hello(nonce=nonce)))
        hello = await self._read_handshake(stream, _HELLO_ACK)
        if not hello.accept:
            why = str(hello.reason)
            if why == "duplicate connection" or why.startswith("too many connections"):
                self.log.debug("%s refused us for now: %s", address, why[:200])
                return "busy"
            self._refused(address, f"it refused us: {why[:200]}")
            return "refused"
        reason = self._check_peer(hello)
        if reason is None and self._tls_client is not None and not (
                _cert_names_node(stream, hello.node_id) or (not self.tls_mutual and _cert_names_node(stream, host))):
            # Its chain is checked against our CA; the certificate must also name the node
            # (or, without mutual TLS, the host we dialled).
            reason = f"its certificate names neither node {hello.node_id!r} nor {host!r}" if not self.tls_mutual \
                else f"its certificate does not name node {hello.node_id!r}"
        if reason is None and self.secret is None and hello.auth:
            reason = "the node requires a shared secret and we have none"
        if reason is None and self.secret is not None:
            me, peer = self.upstream.node_id, hello.node_id
            expected = self._proof(b"acceptor", nonce, hello.nonce, peer, me)
            if not hmac.compare_digest(hello.proof, expected):
                reason = "authentication failed (the node does not share our secret)"
            else:
                await stream.send_all(encode_frame(_HELLO, self._hello(
                    proof=self._proof(b"dialer", hello.nonce, nonce, me, peer))))
        if reason is not None or hello.node_id in self.connections:
            if reason:
                self._count("handshakes_failed")
                self._refused(address, f"we refused it: {reason}")
            return "refused"
        fd = stream.socket.fileno() if isinstance(stream, trio.SocketStream) else None
        return Connection(self, stream, hello, FrameDecoder(self.max_frame_size, split_streams=True), fd=fd)

    async def _run(self, conn: Connection) -> None:
        """Register an established connection and serve it until it closes. Whatever the
        peer's frames cause ends this connection only."""
        assert self.upstream is not None
        node = conn.node_id
        other = self.connections.get(node)
        if other is not None and not other.closed:
            # Lost a (rare) race with a simultaneous connection: keep the established one.
            self.log.debug("dropping a duplicate connection to %s", node)
            conn.closed = True
            await trio.aclose_forcefully(conn.stream)
            return
        if other is not None and not other.reported:
            # Its end was not reported yet (its task is unwinding): report it before ours begins.
            other.reported = True
            try:
                self.upstream.on_disconnected(node, graceful=other.graceful)
            except Exception:  # pragma: no cover - a bug, but never the node's end
                self.log.exception("error while forgetting node %s", node)
        self.connections[node] = conn
        self._count("connections_opened")
        if conn.address:
            self._known[node] = conn.address
        self.log.debug("connected to %s at %s", node, conn.address)
        try:
            with trio.CancelScope() as scope:
                conn.cancel_scope = scope
                if conn.closed:  # pragma: no cover - closed before it ran
                    scope.cancel()
                self.upstream.on_connected(node)
                self._share_peers()
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_until_done, conn.reader, nursery.cancel_scope)
                    nursery.start_soon(conn.writer)
        except* (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as group:
            self.log.debug("connection to %s broke: %r", node, group.exceptions[0])
        except* ProtocolError as group:
            self._count("protocol_errors")
            self.log.warning("disconnecting %s: %s", node, group.exceptions[0])
        except* Exception as group:
            # Not a protocol error we name: a peer reached something we did not expect.
            self._count("protocol_errors")
            self.log.error("disconnecting %s: error while handling its frames", node,
                      exc_info=group.exceptions[0])
        finally:
            conn.close()
            if self.connections.get(node) is conn:
                del self.connections[node]
            if node not in self.connections:
                self._known.pop(node, None)  # nothing of a gone peer is kept (its dial loop has the address)
            if not conn.reported:  # (a newer connection reported it when it took over)
                conn.reported = True
                try:
                    self.upstream.on_disconnected(node, graceful=conn.graceful)
                except Exception:  # pragma: no cover - a bug, but never the node's end
                    self.log.exception("error while forgetting node %s", node)
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(conn.stream)

    # --- discovery and liveness ---------------------------------------------------------

    def _share_peers(self) -> None:
        nodes = {n: c.address for n, c in self.connections.items() if c.address and not c.closed}
        payload = msgspec.msgpack.encode(Peers(nodes))
        for conn in list(self.connections.values()):
            if not conn.closed:
                conn.send(_PEERS, payload)

    def _on_peers(self, conn: Connection, payload: bytes) -> None:
        assert self.upstream is not None
        try:
            peers = _peers_decoder.decode(payload)
        except Exception as exc:  # DecodeError, invalid UTF-8, nesting...
            raise ProtocolError(f"bad PEERS frame from {conn.node_id}: {exc}", reason="bad_peers") from None
        for i, (node_id, address) in enumerate(peers.nodes.items()):
            if i >= _MAX_PEERS_ENTRIES:
                break
            if not valid_node_id(node_id) or node_id == self.upstream.node_id or node_id in self.connections:
                continue
            address = peer_address(address)  # type: ignore[assignment]
            if address is None or address == self.address:
                continue
            self._start_dial_loop(address, node_id, learned=True)

    async def _heartbeats(self) -> None:
        assert self.upstream is not None
        interval = self.upstream.heartbeat_interval
        timeout = self.upstream.heartbeat_timeout
        while True:
            await trio.sleep(min(interval, timeout / 3))
            try:
                heartbeat_kind, payload = self.upstream.heartbeat_frame()
            except ProtocolError:  # pragma: no cover
                continue
            now = trio.current_time()
            for conn in list(self.connections.values()):
                if conn.closed:
                    continue
                if now - conn.last_recv > timeout:
                    self.log.warning("node %s silent for %.1fs: marking it lost", conn.node_id, now - conn.last_recv)
                    self._count("silent")
                    conn.close()
                    continue
                if conn._sending and now - conn._send_started > timeout:
                    self.log.warning("disconnecting %s: it has read nothing for %.1fs", conn.node_id,
                                now - conn._send_started)
                    self._count("not_reading")
                    conn.close()
                    continue
                conn.send(heartbeat_kind, payload)
                if (conn._waiters or conn._ready or conn._writable) and not conn._sending:
                    # Producers admitted earlier may have left without queueing (their stream
                    # ended): never leave the others parked by an idle writer.
                    conn._admit()


async def _receive_exactly(stream: trio.abc.Stream, n: int) -> bytes:
    """Exactly ``n`` bytes (never more: what follows is not ours to read)."""
    buf = bytearray()
    while len(buf) < n:
        data = await stream.receive_some(n - len(buf))
        if not data:
            raise ProtocolError("connection closed during the handshake", reason="handshake_eof")
        buf += data
    return bytes(buf)


def _tls_contexts(cert: Any, key: Any, ca: Any, mutual: bool) -> tuple[ssl.SSLContext | None,
                                                                         ssl.SSLContext | None]:
    """(acceptor, dialer) TLS contexts, or (None, None) without TLS. Peers' chains are
    verified against ``ca``; identities are checked by node id (see _cert_names_node), so the
    dialer does not match the certificate against the address's host name by itself."""
    if cert is None and key is None and ca is None:
        if mutual:
            raise BrokerOptionsError("tls_mutual needs tls_cert, tls_key and tls_ca")
        return None, None
    if cert is None or ca is None:
        raise BrokerOptionsError("TLS needs tls_cert (with tls_key unless the file holds it) and tls_ca")
    try:
        server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=os.fspath(ca))
        server.load_cert_chain(os.fspath(cert), os.fspath(key) if key is not None else None)
        server.verify_mode = ssl.CERT_REQUIRED if mutual else ssl.CERT_NONE
        client = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=os.fspath(ca))
        client.check_hostname = False
        client.verify_mode = ssl.CERT_REQUIRED
        client.load_cert_chain(os.fspath(cert), os.fspath(key) if key is not None else None)
    except (OSError, ssl.SSLError, ValueError) as exc:
        raise BrokerOptionsError(f"cannot load the TLS certificate, key or CA: {exc}") from None
    for ctx in (server, client):
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return server, client


def _cert_names_node(stream: trio.abc.Stream, name: str) -> bool:
    """True if the peer's (verified) certificate names ``name``: its subject's common name or
    a DNS / IP subject alternative name."""
    if not isinstance(stream, trio.SSLStream):
        return False
    cert = stream.getpeercert()
    if not cert:
        return False
    names = {value for kind, value in cert.get("subjectAltName", ()) if kind in ("DNS", "IP Address")}
    for rdn in cert.get("subject", ()):
        names.update(value for key, value in rdn if key == "commonName")
    return name in names


def _connect_failure(exc: BaseException) -> str:
    """Why a connect failed, in a few words ("connection refused"): trio wraps each address's
    own OSError in a group behind "all attempts to connect ... failed"."""
    if isinstance(exc, trio.TooSlowError):
        return "no answer within the handshake timeout"
    cause = exc.__cause__
    while isinstance(cause, BaseExceptionGroup) and cause.exceptions:
        cause = cause.exceptions[0]
    for candidate in (cause, exc):
        if isinstance(candidate, OSError) and candidate.errno:
            return os.strerror(candidate.errno).lower()
    for candidate in (cause, exc):
        if isinstance(candidate, OSError) and candidate.strerror:
            return candidate.strerror.lower()[:200]
    return str(exc)[:200]


async def _advertisable(host: str, port: int) -> str:
    """The address to tell peers for a listener bound to ``host``: a wildcard (``0.0.0.0``,
    ``::``, empty) is not an address anyone can dial, so this host's first non-loopback
    address stands for it (loopback if it has none)."""
    if host not in ("", "0.0.0.0", "::"):
        return f"tcp://{'[' + host + ']' if ':' in host else host}:{port}"
    family = socket.AF_INET6 if host == "::" else socket.AF_INET
    try:  # (trio's resolver runs in a thread: a slow DNS blocks nothing)
        infos = await trio.socket.getaddrinfo(socket.gethostname(), None, family)
        found = sorted({str(info[4][0]) for info in infos})
    except OSError:
        found = []
    usable = [a for a in found if not a.startswith("127.") and a != "::1"]
    pick = usable[0] if usable else ("::1" if family == socket.AF_INET6 else "127.0.0.1")
    return f"tcp://[{pick}]:{port}" if ":" in pick else f"tcp://{pick}:{port}"


def _remote(stream: trio.abc.Stream) -> str:
    try:
        if isinstance(stream, trio.SSLStream):
            stream = stream.transport_stream
        host, port = stream.socket.getpeername()[:2]  # type: ignore[attr-defined]
        return f"{host}:{port}"
    except (OSError, AttributeError, ValueError):
        return "?"


def _describe(exc: BaseException) -> str:
    if isinstance(exc, trio.TooSlowError):
        return "handshake timed out"
    if isinstance(exc, (ProtocolError, FrameError, OSError, trio.BrokenResourceError)):
        return str(exc) or repr(exc)
    return repr(exc)


def _cancel_id(node: str, payload: bytes) -> str:
    """The call id of a CANCEL frame: UTF-8, at most _MAX_CANCEL_ID bytes (else ProtocolError,
    which ends that connection)."""
    if len(payload) > _MAX_CANCEL_ID:
        raise ProtocolError(f"{node} sent a CANCEL of {len(payload)} bytes", reason="bad_cancel")
    try:
        return bytes(payload).decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError(f"{node} sent a CANCEL whose call id is not UTF-8", reason="bad_cancel") from None


async def _until_done(fn: Any, scope: trio.CancelScope) -> None:
    await fn()
    scope.cancel()


