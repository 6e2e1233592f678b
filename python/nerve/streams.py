"""PacketStream: a byte stream that is a call's request body and/or its response.

The producer side writes chunks under a credit window (``nerve._core.CreditSender``); the
consumer side reads through a bounded reorder buffer (``nerve._core.StreamReceiver``) and
grants credit as it reads, so memory per stream stays under window + one chunk. The same
object works as an in-process pipe (a local call) or bound to a remote peer by the transit.

Two named interfaces join a stream to what carries it (DESIGN.md 1b: no other module reads a
stream's underscore names):

- :class:`StreamLink` is how a stream reaches its connection: a producer's chunks, its end
  and its failure go down through it, and it answers for room in the connection's queue.
  The transit subclasses it (frames to a peer); ``_LoopbackLink`` here feeds a local reader.
- :class:`StreamPort` is the port a transport-facing layer uses (the transit, and the
  caller for a local call): the methods of :class:`PacketStream` under "the port" below.
  Producer side: bind it to a link (``bind_producer``) or to a new local reader (``pipe``),
  run its source (``has_source``, ``pump``), feed it credit (``on_credit``), fail it
  (``fail_producer``, ``abort_untaken``), learn when it is over (``producer_done``,
  ``add_closed_callback``, ``abort_before_bind``). Consumer side: make it a reader whose
  credit goes to a callback (``bind_reader``), deliver what arrives (``deliver``,
  ``deliver_end``, ``deliver_error``), drop it (``discard``) or stop it once its handler is
  done with it (``end_reading``). They are plain methods of the stream: the per-chunk ones
  (``deliver``, ``on_credit``) cost one call, as before, with no wrapper in between.
"""

from __future__ import annotations

import ctypes
import io
import logging
import os
import secrets
import stat
from collections.abc import AsyncIterable, AsyncIterator, Callable
from pathlib import Path
from typing import IO, Any, Protocol

import trio

from nerve._core import CreditSender, StreamReceiver
from nerve.errors import (
    FlowError,
    NerveError,
    StreamClosedError,
    StreamError,
    StreamIdleTimeoutError,
    StreamOverflowError,
)
from nerve.frames import writev_all
from nerve.statistics import StreamStatistics

log = logging.getLogger("nerve.streams")

__all__ = ["PacketStream", "StreamLink", "StreamPort", "DEFAULT_STREAM_WINDOW", "DEFAULT_MAX_CHUNK"]

DEFAULT_MAX_CHUNK = 1024 * 1024
DEFAULT_STREAM_WINDOW = 4 * 1024 * 1024
DEFAULT_MAX_REORDER = 64
#: Seconds a producer waits for its stream to be given to a call before a warning says why
UNBOUND_WARNING = 10.0
_READ_BATCH = 4  # chunks read per worker-thread hop in transfer_from

PathLike = str | os.PathLike[str]


class StreamLink:
    """Where a producer's chunks go: the consumer's receiver here, or frames to a peer (the
    named interface through which a stream reaches its connection)."""

    def data(self, seq: int, chunk: Any) -> None:
        raise NotImplementedError

    def end(self, seq: int) -> None:
        raise NotImplementedError

    def fail(self, exc: BaseException) -> None:
        raise NotImplementedError

    def has_room(self, n: int) -> bool:
        """True if a chunk of ``n`` bytes may be queued now."""
        return True

    async def reserve(self, n: int) -> Any:
        """Wait for room for a chunk of ``n`` bytes and hold it; returns a token for
        :meth:`release` (called once the chunk is queued, or will not be)."""
        await trio.lowlevel.checkpoint()
        return None

    def release(self, token: Any, n: int) -> None:
        """Give back room held by :meth:`reserve`."""

    async def wait_ready(self, n: int) -> None:
        """Wait until a chunk of ``n`` bytes would be admitted now, holding nothing."""
        await trio.lowlevel.checkpoint()


class _LoopbackLink(StreamLink):
    """A producer and consumer in one process: chunks go straight to the reading side."""

    def __init__(self, stream: PacketStream) -> None:
        self.stream = stream

    def data(self, seq: int, chunk: Any) -> None:
        self.stream.deliver(seq, chunk if isinstance(chunk, bytes) else bytes(chunk))

    def end(self, seq: int) -> None:
        self.stream.deliver_end(seq)

    def fail(self, exc: BaseException) -> None:
        self.stream.deliver_error(exc if isinstance(exc, NerveError) else
                                   StreamError(f"stream aborted by its producer: {exc!r}"))


class StreamPort(Protocol):
    """The port a transport-facing layer (the transit; the caller, for a local call) uses on
    a stream. :class:`PacketStream` implements it; see the module docstring."""

    idle_timeout: float | None

    # producer side
    def bind_producer(self, link: StreamLink, window: int, max_chunk: int) -> None: ...
    def pipe(self) -> PacketStream: ...
    @property
    def has_source(self) -> bool: ...
    async def pump(self) -> None: ...
    def on_credit(self, consumed: int, stop: bool = False) -> None: ...
    def fail_producer(self, exc: BaseException) -> None: ...
    def abort_untaken(self, exc: BaseException) -> None: ...
    @property
    def producer_done(self) -> bool: ...
    @property
    def abort_before_bind(self) -> BaseException | None: ...
    def add_closed_callback(self, fn: Callable[[], None]) -> None: ...

    # consumer side
    def bind_reader(self, grant: Callable[[int, bool], None]) -> None: ...
    def deliver(self, seq: int, chunk: Any) -> None: ...
    def deliver_end(self, seq: int) -> None: ...
    def deliver_error(self, exc: BaseException) -> None: ...
    def discard(self, exc: BaseException) -> None: ...
    def end_reading(self, exc: BaseException) -> None: ...


class PacketStream:
    """A stream of byte chunks with credit-based flow control.

    Producer side: ``await send(data)``, ``await close()`` (end of stream),
    ``await abort(exc)`` (the reader's next read raises ``exc``), ``transfer_from(path)``.
    Consumer side: ``async for chunk in stream``, ``await receive()`` (``b""`` at the end),
    ``transfer_to(path)``, and ``close()`` to stop reading early (the producer's next
    ``send`` raises :class:`~nerve.errors.StreamClosedError`).

    A stream given to a call (``stream=``) or returned by a handler is attached to that
    call; the other side reads a stream of its own with the same content.

    Cancellation: a ``send`` cancelled part-way may have sent some of ``data``; the stream
    stays usable. ``transfer_to`` leaves nothing under the target name unless it succeeded.
    """

    def __init__(
        self,
        *,
        window: int = DEFAULT_STREAM_WINDOW,
        max_chunk: int = DEFAULT_MAX_CHUNK,
        idle_timeout: float | None = None,
        max_reorder: int = DEFAULT_MAX_REORDER,
    ) -> None:
        if max_chunk <= 0 or window < max_chunk:
            raise ValueError(f"need 0 < max_chunk <= window (got max_chunk={max_chunk}, window={window})")
        self.window = window
        self.max_chunk = max_chunk
        self.idle_timeout = idle_timeout
        self._max_reorder = max_reorder
        self._source: AsyncIterable[Any] | None = None
        # consumer side
        self._rx = StreamReceiver(window, max_chunk, max_reorder, 0)
        self._rx_wakeup = trio.Event()
        self._rx_error: BaseException | None = None
        self._rx_stopped = False
        self._grant: Callable[[int, bool], None] | None = None
        self._current: Any = None
        # producer side
        self._tx: CreditSender | None = None
        self._link: StreamLink | None = None
        self._bound = trio.Event()
        self._credit_wakeup = trio.Event()
        self._tx_error: BaseException | None = None
        self._tx_done = False
        self._on_closed: list[Callable[[], None]] = []
        self._pending_abort: BaseException | None = None
        self._pump_scope: trio.CancelScope | None = None
        self._room: tuple[Any, int] | None = None  # (token, bytes) of queue room held
        #: the content's length when it is known (``from_file`` sets it): a handler that returns
        #: such a stream answers with ``meta["size"]`` (unless it set one), for progress bars
        self.size: int | None = None
        self.bytes_sent = 0
        self.bytes_received = 0
        self.chunks_sent = 0
        self.chunks_received = 0
        #: seconds the producer waited for credit (see statistics())
        self.credit_wait = 0.0
        #: reader side: its producer takes no credit (a Moleculer stream); ``window`` is then
        #: only the bound past which the stream fails with StreamOverflowError
        self.uncredited = False
        #: per-chunk observers (middlewares' stream_sent / stream_received), see ``watch``
        self._on_sent: Callable[[int], None] | None = None
        self._on_received: Callable[[int], None] | None = None

    # --- constructors -------------------------------------------------------------------

    @classmethod
    def from_file(cls, path: PathLike, **kw: Any) -> PacketStream:
        """A stream whose content is the file at ``path``, read when the stream is sent.

        A path that is not a readable regular file fails here, at once (FileNotFoundError,
        IsADirectoryError, PermissionError), not on the receiving node."""
        target = Path(path)
        info = os.stat(target)  # FileNotFoundError, PermissionError
        if stat.S_ISDIR(info.st_mode):
            raise IsADirectoryError(f"{target}: is a directory, not a file to stream")
        size = None
        if stat.S_ISREG(info.st_mode):  # (a FIFO is not opened here: that would wait for a writer)
            if not os.access(target, os.R_OK):
                raise PermissionError(f"{target}: not readable")
            size = info.st_size
        stream = cls(**kw)
        stream.size = size
        stream._source = _file_chunks(Path(path), stream.max_chunk)
        return stream

    @classmethod
    def from_iterable(cls, chunks: AsyncIterable[bytes | bytearray | memoryview], **kw: Any) -> PacketStream:
        """A stream whose content is what ``chunks`` yields, pulled as credit allows."""
        stream = cls(**kw)
        stream._source = chunks
        return stream

    # --- producer side ------------------------------------------------------------------

    async def send(self, data: bytes | bytearray | memoryview) -> None:
        """Send ``data`` (split into chunks), waiting for credit as needed.

        A stream's producer waits until the stream is given to a call (``stream=``) or
        returned by a handler: produce from a task started beside the call (or use
        ``from_file`` / ``from_iterable``), never before it in the same task, which would wait
        for ever; a warning says so after :data:`UNBOUND_WARNING` seconds."""
        if not self._bound.is_set():
            await self._wait_bound()
        if self._tx_done or self._tx is None or self._link is None:
            why = f": {self._tx_error}" if self._tx_error is not None else " (after close())"
            raise StreamClosedError(f"cannot send on a stream that is over{why}")
        view = data if isinstance(data, bytes) and len(data) <= self.max_chunk else memoryview(data)
        total = len(view)
        if total == 0:
            await trio.lowlevel.checkpoint()
            return
        at = 0
        link = self._link
        try:
            while at < total:
                self._raise_if_stopped()
                n = self._tx.next_chunk_len(total - at)
                if n == 0:
                    self._give_back_room()  # never hold room while waiting for the reader
                    await self._wait_credit()
                    continue
                room = self._room
                if room is None and not link.has_room(n):
                    # Admitted to the connection's queue before queueing, never after: any
                    # number of producers keeps the queue under its high-water mark.
                    room = self._room = (await self._wait_room(n), n)
                    continue  # check again: the stream may have ended meanwhile
                chunk = view if (at == 0 and n == total) else view[at:at + n]
                seq = self._tx.on_sent(n)
                link.data(seq, chunk)
                if room is not None:
                    self._room = None
                    link.release(*room)
                self.bytes_sent += n
                self.chunks_sent += 1
                if self._on_sent is not None:
                    self._on_sent(n)
                at += n
                await trio.lowlevel.checkpoint()
        except BaseException:
            self._give_back_room()
            raise

    async def _wait_bound(self) -> None:
        """Wait until the stream is attached to a call; warn once if that takes long (the
        usual cause: ``await stream.transfer_from(...)`` before the call, in the same task)."""
        with trio.move_on_after(UNBOUND_WARNING):
            await self._bound.wait()
            return
        log.warning("a PacketStream's producer has waited %gs for the stream to be given to a call: "
                    "is it produced before the call, in the same task? Produce it from a task "
                    "started beside the call, or use PacketStream.from_file / from_iterable",
                    UNBOUND_WARNING)
        await self._bound.wait()

    def _give_back_room(self) -> None:
        room, self._room = self._room, None
        if room is not None and self._link is not None:
            self._link.release(*room)

    async def _wait_ready(self) -> None:
        """Wait until a full chunk could be sent now (credit, and room in the queue), holding
        nothing: a pumped source is asked for its next chunk only then, and a source that
        takes long to produce it (a live feed) holds no room from others meanwhile."""
        if not self._bound.is_set():
            await self._wait_bound()
        if self._tx is None or self._link is None:  # aborted before it was attached
            raise self._tx_error or StreamClosedError("the stream is over")
        while True:
            self._raise_if_stopped()
            n = self._tx.next_chunk_len(self.max_chunk)
            if n == 0:
                if self._tx_done:
                    return  # send() says why
                await self._wait_credit()
                continue
            if self._link.has_room(n):
                return
            if self.idle_timeout is None:
                await self._link.wait_ready(n)
                return
            with trio.move_on_after(self.idle_timeout):
                await self._link.wait_ready(n)
                return
            exc = StreamIdleTimeoutError(f"the connection took nothing for {self.idle_timeout:g}s "
                                         "(the peer does not read)")
            self._abort_now(exc)
            raise exc

    async def _wait_room(self, n: int) -> Any:
        """Wait for room for ``n`` bytes in the connection's queue and hold it (returns the
        link's token), bounded by the idle timeout (a peer that reads nothing holds a
        producer no longer than that)."""
        assert self._link is not None
        if self.idle_timeout is None:
            return await self._link.reserve(n)
        with trio.move_on_after(self.idle_timeout):
            return await self._link.reserve(n)
        exc = StreamIdleTimeoutError(f"the connection took nothing for {self.idle_timeout:g}s "
                                     "(the peer does not read)")
        self._abort_now(exc)
        raise exc

    async def _wait_credit(self) -> None:
        assert self._tx is not None
        self._credit_wakeup = trio.Event()
        if self._tx.credit > 0 or self._tx_error is not None:
            return
        started = trio.current_time()
        try:
            if self.idle_timeout is None:
                await self._credit_wakeup.wait()
                return
            with trio.move_on_after(self.idle_timeout):
                await self._credit_wakeup.wait()
                return
        finally:
            self.credit_wait += trio.current_time() - started
        exc = StreamIdleTimeoutError(f"no credit from the reader for {self.idle_timeout:g}s")
        self._abort_now(exc)
        raise exc

    def _raise_if_stopped(self) -> None:
        if self._tx_error is not None:
            raise self._tx_error

    async def close(self) -> None:
        """Producer: end the stream. Consumer: stop reading (the producer is told)."""
        if self._is_consumer():
            self._stop_reading(StreamClosedError("the reader closed the stream"))
            await trio.lowlevel.checkpoint()
            return
        if not self._bound.is_set():
            await self._wait_bound()
        if self._tx_done or self._tx is None or self._link is None:  # over (or aborted unbound)
            await trio.lowlevel.checkpoint()
            return
        self._raise_if_stopped()
        self._tx_done = True
        self._link.end(self._tx.close())
        self._fire_closed()
        await trio.lowlevel.checkpoint()

    aclose = close

    async def abort(self, exc: BaseException | None = None) -> None:
        """Fail the stream: the reader's next read raises ``exc`` (a StreamError by default)."""
        self._abort_now(exc if exc is not None else StreamError("stream aborted by its producer"))
        await trio.lowlevel.checkpoint()

    @property
    def taken(self) -> bool:
        """A call took this request stream (it is bound to a connection or a local reader)."""
        return self._bound.is_set()

    def abort_untaken(self, exc: BaseException) -> None:
        """The call this stream was given to ended before taking it: fail whoever feeds it
        (nothing was sent; a no-op once the stream is over)."""
        if not self._tx_done:
            self._abort_now(exc)

    def _abort_now(self, exc: BaseException) -> None:
        if self._is_consumer():
            self._stop_reading(exc)
            return
        if self._tx_done:
            return
        self._tx_done = True
        self._tx_error = self._tx_error or exc
        if self._link is not None:
            self._link.fail(exc)
        else:
            # Not attached to a call (yet, or ever: the call failed first): whoever waits to
            # send on it learns now rather than never.
            self._pending_abort = exc
            self._bound.set()
        self._fire_closed()
        self._credit_wakeup.set()
        if self._pump_scope is not None:
            self._pump_scope.cancel()  # a pump waiting on its source stops too

    async def transfer_from(self, source: PathLike | IO[bytes]) -> int:
        """Send the whole content of a file (path or binary file object), then close.

        Reads happen in a worker thread, never on the trio loop. Returns bytes sent.
        """
        sent = 0
        try:
            if isinstance(source, (str, os.PathLike)):
                chunks = _file_chunks(Path(source), self.max_chunk)
            else:
                chunks = _fileobj_chunks(source, self.max_chunk)
            async for chunk in chunks:
                await self.send(chunk)
                sent += len(chunk)
        except BaseException as exc:
            if not isinstance(exc, (StreamClosedError, trio.Cancelled)):
                self._abort_now(exc)
            raise
        await self.close()
        return sent

    def watch(self, sent: Callable[[int], None] | None = None,
              received: Callable[[int], None] | None = None) -> None:
        """Call ``sent(n)`` for every chunk of ``n`` bytes this producer sends, ``received(n)``
        for every chunk that reaches this reader (the middlewares' stream hooks use it)."""
        if sent is not None:
            self._on_sent = sent
        if received is not None:
            self._on_received = received

    async def pump(self) -> None:
        """Send everything from the source given to from_file / from_iterable, then close.

        Stops (cancelling the source) as soon as the reader stops reading or goes away."""
        source = self._source
        if source is None:
            return
        self._source = None
        with trio.CancelScope() as self._pump_scope:
            try:
                if self._tx_error is not None:
                    return
                try:
                    chunks = source.__aiter__()
                    while True:
                        # Pull the next chunk only once it can go: a producer waiting for credit
                        # or for room in the connection's queue holds no chunk of its own.
                        await self._wait_ready()
                        try:
                            chunk = await chunks.__anext__()
                        except StopAsyncIteration:
                            break
                        await self.send(chunk)
                        del chunk  # sent (copied or queued): not ours to hold while we wait
                except (StreamClosedError, StreamIdleTimeoutError):
                    return
                except trio.Cancelled:
                    if self._tx_error is None:
                        self._abort_now(StreamError("the stream's producer was cancelled"))
                    raise
                except BaseException as exc:
                    self._abort_now(exc)
                    if isinstance(exc, Exception):
                        return
                    raise
                await self.close()
            finally:
                self._give_back_room()  # whatever way the pump ends

    # --- the port (StreamPort: used by the transit, and by the caller for a local call) ---

    @property
    def has_source(self) -> bool:
        """Made by from_file / from_iterable and not pumped yet: :meth:`pump` sends it."""
        return self._source is not None

    @property
    def producer_done(self) -> bool:
        """The producer side is over (closed, aborted, stopped by its reader, or failed)."""
        return self._tx_done

    @property
    def abort_before_bind(self) -> BaseException | None:
        """Why the stream was aborted before any call took it (None if it was not)."""
        if self._tx_done and self._link is None:
            return self._tx_error or StreamError("the request stream was aborted before the call")
        return None

    def add_closed_callback(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` when the producer side ends (never, if it has ended already)."""
        self._on_closed.append(fn)

    def bind_reader(self, grant: Callable[[int, bool], None]) -> None:
        """Make this stream a reader: ``grant(consumed, stop)`` is told of credit as it reads
        (and ``stop=True`` once it stops reading)."""
        self._grant = grant

    def end_reading(self, exc: BaseException) -> None:
        """Its reader is done with it: if the stream was not read to its end, stop it (the
        producer is told; the next read raises ``exc``)."""
        if not self._rx.finished:
            self._stop_reading(exc)


    def _is_consumer(self) -> bool:
        return self._grant is not None

    def bind_producer(self, link: StreamLink, window: int, max_chunk: int) -> None:
        """Attach this producer to ``link`` under the reader's credit window and chunk size."""
        if self._link is not None:
            raise StreamError("this stream is already attached to a call")
        # (An abort before now set _bound already, to wake senders; the link learns of it below.)
        self._tx = CreditSender(window, max_chunk)
        self._link = link
        self._bound.set()
        if self._pending_abort is not None:
            link.fail(self._pending_abort)

    def pipe(self) -> PacketStream:
        """Bind this producer to a new in-process reader (a local call) and return it."""
        reader = PacketStream(window=self.window, max_chunk=self.max_chunk,
                              idle_timeout=self.idle_timeout, max_reorder=self._max_reorder)
        reader.bind_reader(self.on_credit)
        self.bind_producer(_LoopbackLink(reader), self.window, self.max_chunk)
        return reader

    def on_credit(self, consumed: int, stop: bool = False) -> None:
        """The reader consumed ``consumed`` bytes in all (``stop``: it stopped reading)."""
        if stop:
            if self._tx_error is None:
                self._tx_error = StreamClosedError("the reader closed the stream")
            self._tx_done = True
            self._fire_closed()
            if self._pump_scope is not None:
                self._pump_scope.cancel()
        elif self._tx is not None:
            try:
                self._tx.on_credit(consumed)
            except FlowError as exc:
                self._tx_error = exc
        self._credit_wakeup.set()

    def fail_producer(self, exc: BaseException) -> None:
        """The peer is gone or broke the protocol: the next send raises ``exc``."""
        if self._tx_error is None:
            self._tx_error = exc
        self._tx_done = True
        self._credit_wakeup.set()
        self._fire_closed()
        if self._pump_scope is not None:
            self._pump_scope.cancel()

    def _fire_closed(self) -> None:
        callbacks, self._on_closed = self._on_closed, []
        for cb in callbacks:
            cb()

    # --- consumer side ------------------------------------------------------------------

    def deliver(self, seq: int, chunk: Any) -> None:
        """Reader: chunk ``seq`` arrived."""
        if self._rx_error is not None or self._rx_stopped:
            return
        try:
            self._rx.push(seq, chunk)
        except FlowError as exc:
            self.deliver_error(self._overflow(exc) if self.uncredited else exc)
            self._notify_producer_stop()
            return
        self.bytes_received += len(chunk)
        self.chunks_received += 1
        if self._on_received is not None:
            self._on_received(len(chunk))
        self._rx_wakeup.set()

    def _overflow(self, exc: FlowError) -> StreamOverflowError:
        """What a reader without credit to give (its producer has no flow control) says when
        the producer got too far ahead: the stream fails; it never grows past the bound."""
        return StreamOverflowError(
            f"the stream's producer has no flow control (a Moleculer stream) and got more than "
            f"{self.window} bytes (max_stream_buffer) or {self._max_reorder} chunks ahead of this "
            f"reader ({exc}); read faster or raise max_stream_buffer",
            data={"buffered": self._rx.buffered_bytes, "limit": self.window})

    def deliver_end(self, seq: int) -> None:
        """Reader: the producer ended the stream after chunk ``seq - 1``."""
        try:
            self._rx.push_end(seq)
        except FlowError as exc:
            self.deliver_error(exc)
        self._rx_wakeup.set()

    @property
    def read_error(self) -> BaseException | None:
        """Reader side: the error a read raises now (the producer aborted or failed the
        stream, or it went away; or this reader stopped reading), else None."""
        return self._rx_error

    def deliver_error(self, exc: BaseException) -> None:
        """Reader: the producer failed the stream; the next read raises ``exc``."""
        if self._rx_error is None:
            self._rx_error = exc
        self._rx_wakeup.set()

    def discard(self, exc: BaseException) -> None:
        """The producer is gone: fail the stream and free what it buffered (the reader's next
        read raises ``exc``; chunks not read yet are dropped)."""
        self.deliver_error(exc)
        self._rx_stopped = True
        if self._rx.buffered_bytes:
            self._rx = StreamReceiver(self.window, self.max_chunk, self._max_reorder, 0)

    def _stop_reading(self, exc: BaseException) -> None:
        if not self._rx_stopped:
            self._rx_stopped = True
            if self._rx_error is None:
                self._rx_error = exc
            self._notify_producer_stop()
        self._rx_wakeup.set()

    def _notify_producer_stop(self) -> None:
        if self._grant is not None:
            self._grant(self._rx.consumed, True)

    async def receive(self) -> bytes:
        """The next chunk, or ``b""`` once the stream has ended."""
        while True:
            if self._rx_stopped:
                assert self._rx_error is not None
                raise self._rx_error
            try:
                chunk = self._rx.pop()
            except FlowError:  # the receiver broke on a chunk: the error it was given says why
                if self._rx_error is not None:
                    raise self._rx_error from None
                raise
            if chunk is not None:
                grant = self._rx.take_grant()
                if grant is not None and self._grant is not None:
                    self._grant(grant, False)
                await trio.lowlevel.checkpoint()
                return chunk if isinstance(chunk, bytes) else bytes(chunk)
            if self._rx_error is not None:
                raise self._rx_error
            if self._rx.finished:
                await trio.lowlevel.checkpoint()
                return b""
            await self._wait_data()

    def _pop_ready(self, limit: int) -> list[Any]:
        """Every chunk ready now (up to ``limit`` bytes), granting credit for them."""
        out: list[Any] = []
        size = 0
        while size < limit:
            try:
                chunk = self._rx.pop()
            except FlowError:
                if self._rx_error is not None:
                    raise self._rx_error from None
                raise
            if chunk is None:
                break
            out.append(chunk)
            size += len(chunk)
        if out:
            grant = self._rx.take_grant()
            if grant is not None and self._grant is not None:
                self._grant(grant, False)
        return out

    async def _wait_data(self) -> None:
        """Wait for the next chunk (the caller found none ready). Chunks parked behind a
        missing seq do not count: a gap waits here, bounded by the idle timeout and the
        reorder limit, never in a busy loop."""
        self._rx_wakeup = trio.Event()
        if self._rx_error is not None or self._rx.finished:
            await trio.lowlevel.checkpoint()
            return
        if self.idle_timeout is None:
            await self._rx_wakeup.wait()
            return
        with trio.move_on_after(self.idle_timeout):
            await self._rx_wakeup.wait()
            return
        self._stop_reading(StreamIdleTimeoutError(f"no data for {self.idle_timeout:g}s"))

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    async def __anext__(self) -> bytes:
        chunk = await self.receive()
        if not chunk:
            raise StopAsyncIteration
        return chunk

    async def read_all(self, limit: int | None = None) -> bytes:
        """Everything until the end, as one ``bytes`` (``limit`` guards memory)."""
        parts: list[bytes] = []
        total = 0
        async for chunk in self:
            total += len(chunk)
            if limit is not None and total > limit:
                await self.close()
                raise StreamError(f"stream is longer than the limit of {limit} bytes")
            parts.append(chunk)
        return b"".join(parts)

    async def transfer_to(self, target: PathLike | IO[bytes]) -> int:
        """Write the whole stream to a file; returns the byte count.

        For a path, data goes to a temporary file beside the target, which is fsynced and
        renamed over the target only on success: on any failure (including cancellation)
        nothing appears under the target name. Writes happen in a worker thread.
        """
        if not isinstance(target, (str, os.PathLike)):
            return await self._drain_into(target)
        path = Path(target)
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.part")
        f = await trio.to_thread.run_sync(open, tmp, "xb")
        try:
            written = await self._drain_into(f, writeback=True)
            await trio.to_thread.run_sync(_fsync_close, f)
            await trio.to_thread.run_sync(os.replace, tmp, path)
        except BaseException:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(_discard, f, tmp)
            raise
        return written

    async def _drain_into(self, f: IO[bytes], writeback: bool = False) -> int:
        """Write what arrives to ``f`` from a worker thread, a window's worth per hop (credit
        for it is granted as it is taken, so the next window arrives while this one is
        written). ``writeback``: ``f`` is our own new file, to be fsynced at the end; start
        writing each batch to disk as soon as it is in the page cache, so that the fsync at
        the end waits for the last batch only, not for the whole file."""
        written = 0
        while True:
            batch = self._pop_ready(self.window)
            if batch:
                await trio.to_thread.run_sync(_write_all, f, batch, written if writeback else None)
                written += sum(len(c) for c in batch)
                continue
            if self._rx_error is not None:
                raise self._rx_error
            if self._rx.finished:
                return written
            await self._wait_data()

    # --- introspection ------------------------------------------------------------------

    def statistics(self) -> StreamStatistics:
        """Bytes and chunks sent and received, bytes buffered (reader side), credit and the
        time spent waiting for it (producer side): see :class:`nerve.statistics.StreamStatistics`."""
        return StreamStatistics(
            bytes_sent=self.bytes_sent, bytes_received=self.bytes_received,
            chunks_sent=self.chunks_sent, chunks_received=self.chunks_received,
            bytes_buffered=self._rx.buffered_bytes,
            credit=self._tx.credit if self._tx is not None else 0, credit_wait=self.credit_wait,
            window=self.window, max_chunk=self.max_chunk)

    def __repr__(self) -> str:
        return f"<PacketStream sent={self.bytes_sent} received={self.bytes_received}>"


def _write_all(f: IO[bytes], chunks: list[Any], offset: int | None = None) -> None:
    """Write ``chunks`` to ``f`` (in a worker thread). ``offset``: where they start in the
    file, whose writeback to disk is then started at once (see ``_start_writeback``)."""
    try:
        f.flush()
        fileno = f.fileno()
    except (OSError, ValueError, AttributeError, io.UnsupportedOperation):
        fileno = -1
    if fileno < 0:
        for c in chunks:
            f.write(c)
        return
    total = writev_all(fileno, [memoryview(c).cast("B") for c in chunks])
    if offset is not None:
        _start_writeback(fileno, offset, total)


def _libc_sync_file_range() -> Any:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.sync_file_range
    except (OSError, AttributeError, TypeError):  # not Linux (no such symbol; Windows): fsync does it all
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_sync_file_range = _libc_sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2


def _start_writeback(fileno: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing ``[offset, offset + length)`` of the file to disk now,
    without waiting for it (Linux ``sync_file_range(SYNC_FILE_RANGE_WRITE)``): the disk works
    while the rest of the stream arrives, and the final fsync has only the tail left. (The
    fsync is still what makes the file durable: this call promises nothing.)"""
    if _sync_file_range is not None:
        _sync_file_range(fileno, offset, length, _SYNC_FILE_RANGE_WRITE)  # errors: fsync reports them


def _fsync_close(f: IO[bytes]) -> None:
    f.flush()
    os.fsync(f.fileno())
    f.close()


def _discard(f: IO[bytes], tmp: Path) -> None:
    try:
        f.close()
    finally:
        tmp.unlink(missing_ok=True)


async def _file_chunks(path: Path, chunk: int) -> AsyncIterator[bytes]:
    f = await trio.to_thread.run_sync(open, path, "rb")
    try:
        async for c in _fileobj_chunks(f, chunk):
            yield c
    finally:
        await trio.to_thread.run_sync(f.close)


async def _fileobj_chunks(f: IO[bytes], chunk: int) -> AsyncIterator[bytes]:
    def read_batch() -> list[bytes]:
        out = []
        for _ in range(_READ_BATCH):
            b = f.read(chunk)
            if not b:
                break
            out.append(b)
        return out

    while True:
        batch = await trio.to_thread.run_sync(read_batch)
        if not batch:
            return
        for b in batch:
            yield b


def _as_port(stream: PacketStream) -> StreamPort:
    """(Never called: mypy checks here that PacketStream is a StreamPort.)"""
    return stream
