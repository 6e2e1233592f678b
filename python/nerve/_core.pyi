"""Type stub of ``nerve._core``, the Rust core (pyo3): frames, stream headers, flow control.

Hand-written; ``ci/stubtest.sh`` checks it against the built extension.
"""

from typing import Any, final

from typing_extensions import Buffer, Self

__all__ = [
    "CreditSender",
    "StreamReceiver",
    "decode_stream_header",
    "encode_frame",
    "FrameDecoder",
    "FrameEncoder",
    "HEADER_LEN",
    "DEFAULT_MAX_FRAME_SIZE",
    "STREAM_FLAG_RESPONSE",
    "STREAM_FLAG_END",
    "STREAM_FLAG_ERROR",
    "FRAME_TYPES",
]

HEADER_LEN: int
"""Size of a frame header: checksum byte, u32 big-endian total length, type byte (6)."""
DEFAULT_MAX_FRAME_SIZE: int
"""Default upper bound on one frame, header included (8 MiB)."""
STREAM_FLAG_RESPONSE: int
"""Stream frame flag: the frame belongs to the call's response stream (else its request stream)."""
STREAM_FLAG_END: int
"""STREAM_DATA: the stream ends here (empty body). STREAM_CREDIT: the consumer stopped reading."""
STREAM_FLAG_ERROR: int
"""STREAM_DATA: the stream failed; the body is the serialized error."""
FRAME_TYPES: dict[str, int]
"""Frame type ids by Rust name (``"Event"``, ``"StreamData"``...); mirrored by ``nerve.frames.FrameType``."""

@final
class FrameEncoder:
    """Coalesces any number of frames into one outgoing ``bytes`` (:meth:`take`) or one
    list of parts for a single ``writev`` (:meth:`take_parts`).

    Payloads of 2048 bytes or more given as ``bytes`` (or as a memoryview of a ``bytes``) are
    kept by reference until taken; any other payload (a bytearray could change after
    ``append`` returns) is copied when appended.
    """

    def __new__(cls, max_frame_size: int = ...) -> Self: ...
    def append(self, type_id: int, payload: Buffer) -> None:
        """Append one frame of ``type_id`` carrying ``payload`` (any bytes-like object).

        Raises ``FrameError`` (``unknown_type``, ``payload_too_large``)."""
    def append_stream_data(self, flags: int, stream_id: str, seq: int, chunk: Buffer) -> None:
        """Append a STREAM_DATA frame: binary stream header, then ``chunk`` untouched.

        ``stream_id`` is at most 255 bytes of UTF-8 (else ``FrameError('bad_stream_header')``)."""
    def append_stream_credit(self, flags: int, stream_id: str, consumed: int) -> None:
        """Append a STREAM_CREDIT frame: the consumer has read ``consumed`` bytes in total."""
    def take(self) -> bytes:
        """Every appended frame as one ``bytes``; the encoder is empty afterwards."""
    def take_parts(self) -> list[Buffer]:
        """Every appended frame as bytes-like parts to write in order with one ``writev``:
        headers and small payloads joined into ``bytes`` between the large payloads, which
        are the objects that were appended, not copies. The encoder is empty afterwards."""
    def __len__(self) -> int:
        """Bytes waiting in the encoder."""
    @property
    def frames(self) -> int:
        """Frames waiting in the encoder."""
    @property
    def max_frame_size(self) -> int:
        """Largest frame (header included) the encoder accepts."""

@final
class FrameDecoder:
    """Splits a byte stream into frames, whatever the boundaries of the pieces it is fed.

    A bad header raises ``FrameError`` as soon as its 6 bytes are in (``bad_checksum``,
    ``length_below_header``, ``length_above_maximum``, ``unknown_type``); the decoder is then
    poisoned and every later :meth:`feed` raises the same error.

    With ``split_streams``, a STREAM_DATA frame of at least ``direct_min`` bytes whose start
    is fed but not its end is received *directly*: its chunk (a ``bytes`` of the chunk's size)
    is allocated once and the frame's remaining bytes are written into it, by :meth:`feed`
    or, while :attr:`direct_missing` is non-zero, by :meth:`read_from`, which reads from a
    descriptor straight into it. The chunk is handed out only once complete. After any error
    the decoder is poisoned: every later call raises that error again.
    """

    def __new__(cls, max_frame_size: int = ..., *, split_streams: bool = False,
                direct_min: int = ...) -> Self:
        """``max_frame_size`` must lie in ``[HEADER_LEN, 2**32 - 1]`` (else ``ValueError``)."""
    @property
    def direct_missing(self) -> int:
        """Bytes still missing from the large frame being received directly (0: none is)."""
    def read_from(self, fd: int) -> tuple[int, list[Any]]:
        """Read at most :attr:`direct_missing` bytes from the non-blocking descriptor ``fd``
        straight into the chunk (without the GIL); returns ``(n, frames)``, ``n == 0`` at end
        of file, ``frames`` the chunk's item once complete. ``BlockingIOError`` when nothing
        is there yet, ``OSError`` as ``read(2)`` fails, ``ValueError`` if no frame is being
        received directly."""
    def feed(self, data: Buffer) -> list[Any]:
        """Feed received bytes; returns every frame they complete, as ``(type, payload)`` tuples.

        With ``split_streams``, STREAM_DATA frames come out as
        ``(21, flags, stream_id, seq, chunk: bytes)`` and STREAM_CREDIT frames as
        ``(22, flags, stream_id, consumed, None)``: the binary stream header is parsed in Rust
        and the chunk is copied once; a bad stream header raises
        ``FrameError('bad_stream_header')``."""
    @property
    def buffered(self) -> int:
        """Bytes held for an incomplete frame (always below ``max_frame_size``)."""
    @property
    def max_frame_size(self) -> int:
        """Largest frame (header included) the decoder accepts."""

def encode_frame(type_id: int, payload: Buffer) -> bytes:
    """One whole frame as ``bytes``."""

def decode_stream_header(payload: Buffer) -> tuple[int, str, int, int]:
    """Parse the binary header of a STREAM_DATA / STREAM_CREDIT payload:
    returns ``(flags, stream_id, seq_or_consumed, body_offset)``.

    A truncated header or a non-UTF-8 id raises ``FrameError('bad_stream_header')``."""

@final
class CreditSender:
    """The producer's side of a stream: how many bytes it may send under the peer's grants."""

    def __new__(cls, window: int, max_chunk: int) -> Self:
        """Raises ``FlowError('invalid_config')`` for a window or chunk size out of range."""
    def next_chunk_len(self, want: int) -> int:
        """``min(want, max_chunk, credit)``; 0 once closed."""
    def on_sent(self, n: int) -> int:
        """Record a chunk of ``n`` bytes as sent; returns its seq."""
    def on_credit(self, consumed_total: int) -> bool:
        """Apply the peer's absolute grant; True if the credit grew."""
    def close(self) -> int:
        """Mark the end; returns the seq of the end marker."""
    def statistics(self) -> dict[str, int | bool]:
        """Counters and state as a dict (for logs and metrics)."""
    @property
    def credit(self) -> int:
        """Bytes that may be sent now."""
    @property
    def window(self) -> int:
        """The receiver's window in bytes."""
    @property
    def max_chunk(self) -> int:
        """Largest chunk in bytes."""
    @property
    def sent(self) -> int:
        """Total bytes sent."""
    @property
    def consumed(self) -> int:
        """Total bytes the peer says its consumer has read."""
    @property
    def next_seq(self) -> int:
        """Seq of the next chunk."""
    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called."""

@final
class StreamReceiver:
    """The consumer's side of a stream: reorders chunks within the window, hands them out in
    seq order and says when to grant credit. After its first ``FlowError`` every push,
    push_end and pop raises that same error."""

    def __new__(cls, window: int, max_chunk: int, max_reorder: int = 64, first_seq: int = 0) -> Self:
        """Raises ``FlowError('invalid_config')`` for a setting out of range."""
    def push(self, seq: int, chunk: Any) -> None:
        """Accept data chunk ``seq``: any bytes-like object, kept as is."""
    def push_end(self, seq: int) -> None:
        """Accept the end marker at ``seq`` (the seq after the last data chunk)."""
    def pop(self) -> Any | None:
        """The next chunk in seq order (the object pushed), or None if it has not arrived."""
    def take_grant(self) -> int | None:
        """Total bytes consumed, when a grant is due (a quarter window read since the last one)."""
    def force_grant(self) -> int | None:
        """Total bytes consumed, if anything was read since the last grant."""
    def missing(self) -> int | None:
        """The first missing seq when something after it has arrived, else None."""
    def statistics(self) -> dict[str, int | bool | str | None]:
        """Counters and state as a dict (for logs and metrics); ``end_seq`` is None until the
        end marker arrives and ``failed`` is the FlowError reason or None."""
    @property
    def finished(self) -> bool:
        """True once the end marker arrived and every chunk before it was popped (and no error)."""
    @property
    def buffered_bytes(self) -> int:
        """Bytes received and not yet popped."""
    @property
    def received(self) -> int:
        """Total bytes received."""
    @property
    def consumed(self) -> int:
        """Total bytes popped."""
    @property
    def next_seq(self) -> int:
        """Seq :meth:`pop` hands out next."""
    @property
    def parked(self) -> int:
        """Chunks waiting out of order (arrived ahead of a missing one)."""
    @property
    def window(self) -> int:
        """The window in bytes."""
    @property
    def max_chunk(self) -> int:
        """Largest accepted chunk in bytes."""
    @property
    def max_reorder(self) -> int:
        """Most chunks that may be parked ahead of a missing one."""
    @property
    def end_seq(self) -> int | None:
        """The seq of the end marker, once seen."""
    @property
    def failed(self) -> bool:
        """True once a FlowError has been raised (and will be again)."""
