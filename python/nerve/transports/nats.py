"""NATS transport: Moleculer's subjects over a thin trio NATS core client, so that nerve nodes
join a moleculer.js cluster (``MOL[-namespace].<TYPE>[.<nodeID>]``, JSON by default).

Discovery and liveness are Moleculer's: DISCOVER and INFO broadcasts, HEARTBEAT every
``heartbeat_interval``, a node silent for ``heartbeat_timeout`` is lost. A broken NATS
connection is re-established with backoff (rotating through the servers given); what is
published meanwhile waits in a buffer bounded in bytes, and peers rediscover each other.

Streams: to a node that said in its INFO that it reads them (a nerve node), nerve's own stream
frames (binary chunks and credit, as on TCP) travel on ``<prefix>.NSTREAM.<nodeID>``, a
subject moleculer.js never subscribes to; each message is the sender's id (one length byte,
then UTF-8) and one whole frame. To any other node the transit sends Moleculer's stream
packets (REQ / RES with ``seq``) on the usual subjects. Balanced mode (Moleculer's
``disableBalancer``): ``<prefix>.REQB.<action>`` and ``<prefix>.EVENTB.<group>.<event>``,
subscribed in queue groups so that NATS picks one subscriber per message.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import trio

from nerve.errors import BrokerDisconnectedError, BrokerOptionsError, NerveError, ProtocolError
from nerve.frames import FrameDecoder, FrameEncoder, FrameError
from nerve.packets import PacketType
from nerve.transports.base import Transport
from nerve.transports.nats_client import NatsClient, NatsOptions, check_subject, parse_nats_url

if TYPE_CHECKING:
    from nerve.transports.base import Upstream

__all__ = ["NatsTransport", "NatsClient", "NatsOptions"]

_DISCONNECT = int(PacketType.DISCONNECT)
_REQ = int(PacketType.REQ)
_EVENT = int(PacketType.EVENT)
_STREAM_DATA = 21
_STREAM_CREDIT = 22
#: bytes queued for the NATS server above which stream producers wait (calls never do)
_HIGH_WATER = 8 * 1024 * 1024
#: the largest stream chunk sent to a nerve node over NATS (a frame holds it with its header)
_MAX_CHUNK = 4 * 1024 * 1024
#: bytes published while disconnected that wait for the reconnection; beyond, publishes fail
_RECONNECT_BUFFER = 8 * 1024 * 1024


def _subject_ok(text: str) -> bool:
    try:
        check_subject(text)
    except ProtocolError:
        return False
    return True


class NatsTransport(Transport):
    """Moleculer's NATS transporter (``transport="nats://host:port"``).

    ``url``: one server or several (``"nats://h1:4222,nats://h2:4222"`` or a list), tried in
    turn, ``tls://`` for TLS; credentials in it (``nats://user:pass@host``,
    ``nats://token@host``) or given as ``user`` / ``password`` / ``token``; ``tls``: an
    ``ssl.SSLContext`` (required TLS with that context), ``tls_hostname`` to check instead of
    the host dialled. ``max_reconnect_buffer``: bytes published while the connection is down
    that wait for it; beyond, a publish fails with ``BrokerDisconnectedError``."""

    logger_name = "nerve.nats"

    native_streams = False
    bus_streams = True

    def __init__(self, url: str | list[str] | tuple[str, ...], *, peers: list[str] | tuple[str, ...] = (),
                 user: str | None = None, password: str | None = None, token: str | None = None,
                 tls: Any = None, tls_hostname: str | None = None,
                 max_reconnect_buffer: int = _RECONNECT_BUFFER, **_: Any) -> None:
        if peers:
            raise BrokerOptionsError("peers= is for the tcp transport; NATS finds nodes by itself")
        self.options: NatsOptions = parse_nats_url(url, user=user, password=password, token=token,
                                                   tls=tls, tls_hostname=tls_hostname)
        #: the servers, without credentials (safe to log)
        self.url = ",".join(self.options.servers)
        self.address = None
        self.upstream: Upstream | None = None
        self.client: NatsClient | None = None
        self.prefix = "MOL"
        self._last_seen: dict[str, float] = {}
        #: nodes reading nerve's stream frames: (window, max chunk, max request streams)
        self._stream_peers: dict[str, tuple[int, int, int]] = {}
        self._encoder = FrameEncoder()
        #: what was published while disconnected, sent once connected again
        self._held: list[tuple[str, bytes]] = []
        self._held_bytes = 0
        self.max_reconnect_buffer = max_reconnect_buffer
        self._connected = trio.Event()
        #: set when the current connection is lost (then replaced by a fresh event)
        self._lost = trio.Event()
        #: balanced mode: queue-group subscriptions wanted (subject -> queue) and made (sid)
        self._balanced: dict[str, str] = {}
        self._balanced_sids: dict[str, int] = {}

    def _subject(self, kind: int, node_id: str | None = None) -> str:
        name = PacketType(kind).name
        return f"{self.prefix}.{name}.{node_id}" if node_id else f"{self.prefix}.{name}"

    async def serve(self, upstream: Upstream, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Connect (and reconnect with backoff whenever the NATS connection breaks)."""
        self.upstream = upstream
        if upstream.namespace:
            self.prefix = f"MOL-{upstream.namespace}"
        try:  # our own id and namespace name subjects: they must be able to
            check_subject(f"{self.prefix}.INFO.{upstream.node_id}")
        except ProtocolError:
            raise BrokerOptionsError(f"node id {upstream.node_id!r} / namespace {upstream.namespace!r} cannot "
                                     "name a NATS subject (no spaces, control characters, '*' or '>')") from None
        if len(upstream.node_id.encode("utf-8", "surrogatepass")) > 255:
            raise BrokerOptionsError("a node id on NATS is at most 255 bytes of UTF-8")
        first = True
        delay = 0.1
        servers = self.options.servers
        turn = 0
        failures: list[str] = []
        while True:
            server = servers[turn % len(servers)]
            turn += 1
            try:
                client = await NatsClient.connect(server, name=upstream.node_id, options=self.options)
            except (OSError, trio.BrokenResourceError, ProtocolError) as exc:
                failures.append(f"{server}: {exc}")
                if turn % len(servers):
                    continue  # the next server of the list, at once
                if first:
                    raise BrokerDisconnectedError(f"cannot connect to NATS ({'; '.join(failures)})") from exc
                self.log.warning("NATS unreachable (%s); retrying in %.1fs", "; ".join(failures), delay)
                failures.clear()
                await trio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            failures.clear()
            turn -= 1  # stay with the server that answered
            began = trio.current_time()
            try:
                await self._run(client, task_status if first else trio.TASK_STATUS_IGNORED)
            except* (OSError, trio.BrokenResourceError, ProtocolError) as group:
                self.log.warning("NATS connection lost (%s); reconnecting", group.exceptions[0])
            finally:
                self.client = None
                self._connected = trio.Event()
                self._lost.set()  # wake whoever waits for that connection's queue to drain
                self._lost = trio.Event()
                self._balanced_sids.clear()
            first = False
            if trio.current_time() - began < 1.0:  # a connection that fails at once: back off
                await trio.sleep(delay)
                delay = min(delay * 2, 5.0)
            else:
                delay = 0.1

    async def _run(self, client: NatsClient, task_status: Any) -> None:
        assert self.upstream is not None
        me = self.upstream.node_id
        for name in ("EVENT", "REQ", "RES", "DISCOVER", "INFO", "PING", "PONG", "NSTREAM"):
            client.subscribe(f"{self.prefix}.{name}.{me}")
        for name in ("DISCOVER", "INFO", "HEARTBEAT", "DISCONNECT"):
            client.subscribe(f"{self.prefix}.{name}")
        for subject, queue in self._balanced.items():
            self._balanced_sids[subject] = client.subscribe(subject, queue)
        self.max_payload = client.max_payload
        self.client = client
        held, self._held, self._held_bytes = self._held, [], 0
        for subject, payload in held:  # what waited for the reconnection, in order
            try:
                client.publish(subject, payload)
            except ProtocolError as exc:  # over this server's max_payload: that one only
                self.log.warning("dropping a message held during the reconnection: %s", exc)
        self._connected.set()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(client.writer)
                nursery.start_soon(self._reader, client)
                nursery.start_soon(self._heartbeats)
                for kind, payload in self.upstream.greeting_frames():
                    try:
                        self._publish(kind, None, payload)
                    except ProtocolError as exc:  # our INFO over max_payload: say so, serve on
                        self.log.error("cannot announce this node on NATS: %s (peers will not see "
                                       "its services)", exc)
                task_status.started()
                await trio.sleep_forever()
        finally:
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(client.stream)

    def _publish(self, kind: int, node_id: str | None, payload: bytes) -> None:
        self._publish_to(self._subject(kind, node_id), payload)

    def _publish_to(self, subject: str, payload: bytes) -> None:
        client = self.client
        if client is None:
            check_subject(subject)
            if self.max_payload is not None and len(payload) > self.max_payload:
                raise ProtocolError(f"payload of {len(payload)} bytes is over the NATS max_payload "
                                    f"{self.max_payload}", reason="nats_max_payload")
            if self._held_bytes + len(payload) > self.max_reconnect_buffer:
                raise BrokerDisconnectedError(
                    f"not connected to NATS, and {self._held_bytes} bytes already wait for the "
                    f"reconnection (max_reconnect_buffer={self.max_reconnect_buffer})")
            self._held.append((subject, payload))
            self._held_bytes += len(payload)
        else:
            client.publish(subject, payload)
        self.bytes_sent += len(payload)

    async def _reader(self, client: NatsClient) -> None:
        assert self.upstream is not None
        upstream = self.upstream
        async for subject, payload in client.messages():
            parts = subject.split(".", 2)
            if len(parts) < 2:
                continue
            self.bytes_received += len(payload)
            name = parts[1]
            if name == "NSTREAM":
                self._on_stream_message(payload)
                continue
            try:
                kind = _REQ if name == "REQB" else _EVENT if name == "EVENTB" else int(PacketType[name])
            except KeyError:
                self.log.debug("ignoring NATS subject %s", subject)
                continue
            try:
                upstream.on_bus_frame(kind, payload)
            except NerveError as exc:
                self.log.warning("dropping a %s on %s: %s", parts[1], subject, exc)
            except Exception:  # a packet reached something unexpected: drop it, keep the node
                self.log.exception("dropping a %s on %s: error while handling it", parts[1], subject)

    def _on_stream_message(self, payload: bytes) -> None:
        """A message on our NSTREAM subject: the sender's id, then one stream frame."""
        assert self.upstream is not None
        try:
            n = payload[0]
            sender = payload[1:1 + n].decode("utf-8")
            if not sender or len(payload) < 1 + n:
                raise ValueError("no sender")
            decoder = FrameDecoder(max(len(payload), 64), split_streams=True)
            frames = decoder.feed(memoryview(payload)[1 + n:])
            if len(frames) != 1 or decoder.buffered or frames[0][0] not in (_STREAM_DATA, _STREAM_CREDIT):
                raise ValueError("not one stream frame")
        except (IndexError, ValueError, FrameError) as exc:  # UnicodeDecodeError is a ValueError
            self.log.warning("dropping a malformed stream message: %s", exc)
            return
        if sender not in self._stream_peers:
            return  # a node we do not read stream frames from (unknown, or gone)
        frame = frames[0]
        try:
            if frame[0] == _STREAM_DATA:
                self.upstream.on_stream_data(sender, frame[1], frame[2], frame[3], frame[4])
            else:
                self.upstream.on_stream_credit(sender, frame[1], frame[2], frame[3])
        except NerveError as exc:
            self.log.warning("dropping a stream frame of %s: %s", sender, exc)

    def seen(self, node_id: str, kind: int) -> bool:
        fresh = node_id not in self._last_seen
        if kind == _DISCONNECT:
            self._last_seen.pop(node_id, None)
            self._stream_peers.pop(node_id, None)
        else:
            self._last_seen[node_id] = trio.current_time()
        return fresh

    async def _heartbeats(self) -> None:
        assert self.upstream is not None
        upstream = self.upstream
        while True:
            await trio.sleep(upstream.heartbeat_interval)
            kind, payload = upstream.heartbeat_frame()
            self._publish(kind, None, payload)
            now = trio.current_time()
            for node, seen in list(self._last_seen.items()):
                if now - seen > upstream.heartbeat_timeout:
                    del self._last_seen[node]
                    self._stream_peers.pop(node, None)
                    self.log.warning("node %s silent for %.1fs: marking it lost", node, now - seen)
                    upstream.on_disconnected(node, graceful=False)

    # --- Transport API ------------------------------------------------------------------

    def send(self, node_id: str, kind: int, payload: bytes) -> None:
        self._publish(kind, node_id, payload)

    def broadcast(self, kind: int, payload: bytes) -> None:
        self._publish(kind, None, payload)

    def streams_native(self, node_id: str) -> bool:
        return node_id in self._stream_peers

    def set_peer_streams(self, node_id: str, config: tuple[int, int, int] | None) -> None:
        if config is None:
            self._stream_peers.pop(node_id, None)
        else:
            window, chunk, most = config
            chunk = min(chunk, _MAX_CHUNK)  # one frame, well under the queue's mark
            self._stream_peers[node_id] = (max(window, chunk), chunk, most)

    def peer_stream_config(self, node_id: str) -> tuple[int, int]:
        try:
            window, chunk, _ = self._stream_peers[node_id]
        except KeyError:
            raise BrokerDisconnectedError(f"node '{node_id}' reads no stream frames of nerve's") from None
        if self.max_payload is not None:  # a chunk and its headers in one NATS message
            chunk = max(1024, min(chunk, self.max_payload - 512))
        return max(window, chunk), chunk

    def peer_max_streams(self, node_id: str) -> int:
        config = self._stream_peers.get(node_id)
        return config[2] if config is not None else 0

    def _stream_frame(self, node_id: str) -> tuple[str, bytes]:
        assert self.upstream is not None
        if node_id not in self._last_seen and node_id not in self._stream_peers:
            raise BrokerDisconnectedError(f"node '{node_id}' is not connected")
        me = self.upstream.node_id.encode("utf-8")
        return f"{self.prefix}.NSTREAM.{node_id}", bytes((len(me),)) + me

    def send_stream_data(self, node_id: str, flags: int, stream_id: str, seq: int, chunk: Any) -> None:
        subject, head = self._stream_frame(node_id)
        self._encoder.append_stream_data(flags, stream_id, seq, chunk)
        self._publish_to(subject, head + self._encoder.take())

    def send_stream_credit(self, node_id: str, flags: int, stream_id: str, consumed: int) -> None:
        subject, head = self._stream_frame(node_id)
        self._encoder.append_stream_credit(flags, stream_id, consumed)
        self._publish_to(subject, head + self._encoder.take())

    def has_room(self, node_id: str, n: int) -> bool:
        client = self.client
        if client is None:
            return False
        queued = client.pending_bytes
        return queued == 0 or queued + n <= _HIGH_WATER  # (a chunk over the mark goes alone)

    async def _progress(self, client: NatsClient) -> None:
        """Wait until ``client``'s queue drained, or its connection was lost."""
        lost = self._lost
        async with trio.open_nursery() as nursery:
            async def drained() -> None:
                await client.drained()
                nursery.cancel_scope.cancel()

            async def gone() -> None:
                await lost.wait()
                nursery.cancel_scope.cancel()

            nursery.start_soon(drained)
            nursery.start_soon(gone)

    async def wait_ready(self, node_id: str, n: int) -> None:
        """Wait until a chunk of ``n`` bytes would be admitted: connected, and the queue to the
        server below its mark (a producer's own bound, the idle timeout, cuts a long wait)."""
        while not self.has_room(node_id, n):
            client = self.client
            if client is None:
                await self._connected.wait()
            else:
                await self._progress(client)
        await trio.lowlevel.checkpoint()

    async def reserve(self, node_id: str, n: int) -> Any:
        await self.wait_ready(node_id, n)
        return None

    async def wait_writable(self, node_id: str) -> None:
        """Pace a sender (an emit) while the queue to the server is over its mark. While
        disconnected nothing waits: the reconnect buffer is bounded and refuses beyond."""
        client = self.client
        if client is not None and client.pending_bytes > _HIGH_WATER:
            await self._progress(client)
        else:
            await trio.lowlevel.checkpoint()

    # --- balanced mode (Moleculer's disableBalancer) -----------------------------------------

    def set_balanced(self, actions: list[str], events: list[tuple[str, str]]) -> None:
        """Serve these actions and (group, event) pairs through queue groups (replacing the
        previous set): NATS gives each message to one subscriber of its group."""
        wanted: dict[str, str] = {}
        for a in actions:
            if _subject_ok(a):
                wanted[f"{self.prefix}.REQB.{a}"] = a
        for g, e in events:
            # As moleculer.js: a '**' and what follows it subscribe as NATS's '>'.
            at = e.find("**")
            e = e[:at] + ">" if at >= 0 else e
            if _subject_ok(g) and _subject_ok(e.replace("*", "x").replace(">", "x")):
                wanted[f"{self.prefix}.EVENTB.{g}.{e}"] = g
        client = self.client
        for subject in [s for s in self._balanced if s not in wanted]:
            del self._balanced[subject]
            sid = self._balanced_sids.pop(subject, None)
            if client is not None and sid is not None:
                client.unsubscribe(sid)
        for subject, queue in wanted.items():
            if subject not in self._balanced:
                self._balanced[subject] = queue
                if client is not None:
                    self._balanced_sids[subject] = client.subscribe(subject, queue)

    def send_balanced_request(self, action: str, payload: bytes) -> None:
        self._publish_to(f"{self.prefix}.REQB.{action}", payload)

    def send_balanced_event(self, group: str, event: str, payload: bytes) -> None:
        self._publish_to(f"{self.prefix}.EVENTB.{group}.{event}", payload)

    def connected(self) -> list[str]:
        return list(self._last_seen)

    async def disconnect_all(self) -> None:
        client = self.client
        if client is not None:
            with trio.move_on_after(1):  # our goodbye (DISCONNECT) out before the socket closes
                await client.drained()
        await trio.lowlevel.checkpoint()
