"""Frame encoder/decoder of the Rust core: round trips, arbitrary splits, hostile input,
every error reason from the 6 header bytes alone, stream headers and payload ownership.
"""

from __future__ import annotations

import contextlib
import gc
import os
import socket
import struct
import tracemalloc
from typing import Any, Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nerve import testing
from nerve.errors import FrameError, NerveError, ProtocolError
from nerve.frames import (
    DEFAULT_MAX_FRAME_SIZE,
    HEADER_LEN,
    IOV_MAX,
    STREAM_FLAG_END,
    STREAM_FLAG_ERROR,
    STREAM_FLAG_RESPONSE,
    FrameDecoder,
    FrameEncoder,
    FrameType,
    decode_stream_header,
    encode_frame,
    unwritten,
    writev_all,
)

REASONS = {
    "bad_checksum",
    "length_below_header",
    "length_above_maximum",
    "unknown_type",
    "payload_too_large",
    "bad_stream_header",
}
KNOWN_TYPES = {int(t) for t in FrameType}
UNKNOWN_TYPES = sorted(set(range(256)) - KNOWN_TYPES)

fuzz = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

Piece = bytes | bytearray | memoryview
as_piece: list[Callable[[bytes], Piece]] = [bytes, bytearray, memoryview]


def header(type_id: int, total: int, *, checksum: int | None = None) -> bytes:
    """A 6-byte header written independently of the core: XOR checksum, u32 BE length, type."""
    body = struct.pack(">IB", total, type_id)
    crc = 0
    for b in body:
        crc ^= b
    return bytes([crc if checksum is None else checksum]) + body


def decode_all(data: Piece, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE) -> list[tuple[int, bytes]]:
    decoder = FrameDecoder(max_frame_size)
    out = decoder.feed(data)
    assert decoder.buffered == 0
    return out


def raises_reason(reason: str, fn: Callable[..., Any], *args: Any) -> FrameError:
    with pytest.raises(FrameError) as info:
        fn(*args)
    assert info.value.reason == reason, str(info.value)
    return info.value


# --- round trips ---------------------------------------------------------------------


class TestRoundTrip:
    @fuzz
    @given(testing.wire_bytes())
    def test_encoder_take_once_then_decoder(self, wire: tuple[bytes, list[testing.Frame]]) -> None:
        data, frames = wire
        encoder = FrameEncoder()
        for type_id, payload in frames:
            encoder.append(type_id, payload)
        assert encoder.frames == len(frames)
        assert len(encoder) == len(data)
        out = encoder.take()
        assert out == data  # same bytes as encode_frame, frame after frame
        assert len(encoder) == 0 and encoder.frames == 0
        assert encoder.take() == b""
        assert decode_all(out) == [(int(t), p) for t, p in frames]

    @fuzz
    @given(testing.wire_bytes(), st.data())
    def test_any_split_yields_the_same_frames(self, wire: tuple[bytes, list[testing.Frame]],
                                              data: st.DataObject) -> None:
        stream, frames = wire
        pieces = data.draw(testing.splits(stream))
        kinds = data.draw(st.lists(st.sampled_from(as_piece), min_size=len(pieces), max_size=len(pieces)))
        decoder = FrameDecoder()
        out: list[tuple[int, bytes]] = []
        for piece, kind in zip(pieces, kinds):
            out.extend(decoder.feed(kind(piece)))
            assert decoder.buffered < decoder.max_frame_size
        assert out == [(int(t), p) for t, p in frames]
        assert decoder.buffered == 0

    def test_byte_at_a_time(self) -> None:
        frames = [(FrameType.REQUEST, b"hello"), (FrameType.PING, b""), (FrameType.STREAM_DATA, b"x" * 300)]
        stream = b"".join(encode_frame(t, p) for t, p in frames)
        ends = {sum(HEADER_LEN + len(p) for _, p in frames[: k + 1]) for k in range(len(frames))}
        decoder = FrameDecoder(1024)
        out: list[tuple[int, bytes]] = []
        frame_start = 0
        for i in range(len(stream)):
            got = decoder.feed(stream[i : i + 1])
            out.extend(got)
            if i + 1 in ends:
                assert len(got) == 1
                frame_start = i + 1
            else:
                assert got == []
            assert decoder.buffered == i + 1 - frame_start
        assert out == [(int(t), p) for t, p in frames]
        assert decoder.buffered == 0

    def test_buffered_counts_the_incomplete_frame(self) -> None:
        frame = encode_frame(FrameType.REQUEST, b"0123456789")
        decoder = FrameDecoder()
        assert decoder.feed(frame[:3]) == [] and decoder.buffered == 3
        assert decoder.feed(frame[3:12]) == [] and decoder.buffered == 12
        assert decoder.feed(frame[12:] + frame[:7]) == [(2, b"0123456789")]
        assert decoder.buffered == 7

    def test_frame_of_exactly_max_size(self) -> None:
        frame = encode_frame(FrameType.EVENT, b"z" * 58)
        assert decode_all(frame, max_frame_size=64) == [(1, b"z" * 58)]

    def test_decoder_max_frame_size_is_validated(self) -> None:
        assert FrameDecoder(HEADER_LEN).max_frame_size == HEADER_LEN
        assert FrameDecoder(2**32 - 1).max_frame_size == 2**32 - 1
        for bad in (0, HEADER_LEN - 1, 2**32):
            with pytest.raises(ValueError):
                FrameDecoder(bad)


# --- hostile input -------------------------------------------------------------------


def corrupted_streams() -> st.SearchStrategy[bytes]:
    """Pure garbage, or a valid stream with a few bytes overwritten / a header spliced in."""

    @st.composite
    def corrupt(draw: st.DrawFn) -> bytes:
        stream = bytearray(draw(testing.wire_bytes(testing.frame_lists(300, min_size=1, max_size=6)))[0])
        for _ in range(draw(st.integers(1, 3))):
            at = draw(st.integers(0, len(stream) - 1))
            stream[at] = draw(st.integers(0, 255))
        if draw(st.booleans()):
            at = draw(st.integers(0, len(stream)))
            stream[at:at] = header(draw(st.integers(0, 255)), draw(st.integers(0, 2**32 - 1)))
        return bytes(stream)

    return st.one_of(st.binary(max_size=2048), corrupt())


class TestHostileInput:
    @settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(corrupted_streams(), st.sampled_from([HEADER_LEN, 7, 64, 1024, DEFAULT_MAX_FRAME_SIZE]), st.data())
    def test_garbage_gives_frames_or_frame_error(self, stream: bytes, max_frame_size: int,
                                                 data: st.DataObject) -> None:
        decoder = FrameDecoder(max_frame_size)
        failure: FrameError | None = None
        for piece in data.draw(testing.splits(stream, max_pieces=8)):
            try:
                frames = decoder.feed(piece)
            except FrameError as exc:
                failure = exc
                break
            for type_id, payload in frames:
                assert type_id in KNOWN_TYPES
                assert HEADER_LEN + len(payload) <= max_frame_size
            assert decoder.buffered < max_frame_size
        if failure is not None:
            assert isinstance(failure, ProtocolError) and isinstance(failure, NerveError)
            assert failure.reason in REASONS - {"payload_too_large", "bad_stream_header"}
            assert decoder.buffered == 0
            # Poisoned: every later feed raises the same reason, whatever it is fed.
            for later in (b"", encode_frame(FrameType.PING, b"")):
                raises_reason(failure.reason, decoder.feed, later)

    @fuzz
    @given(st.binary(min_size=HEADER_LEN, max_size=HEADER_LEN))
    def test_any_header_is_judged_on_its_own(self, head: bytes) -> None:
        """Six bytes always suffice: either a header error, or the decoder waits for the payload."""
        decoder = FrameDecoder(1024)
        try:
            out = decoder.feed(head)
        except FrameError as exc:
            assert exc.reason in {"bad_checksum", "length_below_header", "length_above_maximum", "unknown_type"}
        else:
            (total,) = struct.unpack(">I", head[1:5])
            assert out == ([(head[5], b"")] if total == HEADER_LEN else [])
            assert decoder.buffered == (0 if total == HEADER_LEN else HEADER_LEN)


# --- each error reason from the header alone ---------------------------------------------


def assert_header_error(head: bytes, reason: str, max_frame_size: int = 1024) -> FrameDecoder:
    """The first 5 bytes are accepted (buffered); the 6th raises ``reason``, no payload needed."""
    assert len(head) == HEADER_LEN
    decoder = FrameDecoder(max_frame_size)
    assert decoder.feed(head[:5]) == []
    assert decoder.buffered == 5
    raises_reason(reason, decoder.feed, head[5:])
    assert decoder.buffered == 0
    # The same header in one piece, after a valid frame in the same buffer:
    other = FrameDecoder(max_frame_size)
    raises_reason(reason, other.feed, encode_frame(FrameType.PING, b"ok") + head)
    return decoder


class TestHeaderErrors:
    def test_bad_checksum(self) -> None:
        good = header(FrameType.REQUEST, 16)
        for flip in (0x01, 0x80, 0xFF):
            assert_header_error(bytes([good[0] ^ flip]) + good[1:], "bad_checksum")

    def test_bad_checksum_is_checked_first(self) -> None:
        # Length 0 and type 0 are both invalid too; the checksum is what is reported.
        assert_header_error(header(0, 0, checksum=0x55), "bad_checksum")

    @pytest.mark.parametrize("total", range(HEADER_LEN))
    def test_length_below_header(self, total: int) -> None:
        assert_header_error(header(FrameType.REQUEST, total), "length_below_header")

    def test_length_above_maximum(self) -> None:
        assert FrameDecoder(1024).feed(header(FrameType.REQUEST, 1024)) == []
        assert_header_error(header(FrameType.REQUEST, 1025), "length_above_maximum")

    @pytest.mark.parametrize("type_id", [0, 9, 15, max(KNOWN_TYPES) + 1, 255])
    def test_unknown_type(self, type_id: int) -> None:
        assert_header_error(header(type_id, HEADER_LEN + 1), "unknown_type")

    @given(st.sampled_from(UNKNOWN_TYPES))
    @settings(deadline=None, max_examples=50)
    def test_every_unknown_type(self, type_id: int) -> None:
        raises_reason("unknown_type", FrameDecoder(1024).feed, header(type_id, HEADER_LEN))

    def test_4_gib_header_raises_alone_and_poisons(self) -> None:
        decoder = assert_header_error(header(FrameType.STREAM_DATA, 2**32 - 1), "length_above_maximum",
                                      max_frame_size=64 * 1024)
        err = raises_reason("length_above_maximum", decoder.feed, b"")
        assert "4294967295" in str(err)
        raises_reason("length_above_maximum", decoder.feed, encode_frame(FrameType.PING, b""))
        raises_reason("length_above_maximum", decoder.feed, bytearray(100))
        assert decoder.buffered == 0


# --- encoder refusals ----------------------------------------------------------------


class TestEncoderRefusals:
    def test_payload_too_large(self) -> None:
        encoder = FrameEncoder(64)
        encoder.append(FrameType.REQUEST, b"a")
        encoder.append(FrameType.REQUEST, b"b" * 58)  # 58 + 6 == 64: fits
        for payload in (b"c" * 59, bytearray(59), memoryview(b"d" * 5000)):
            raises_reason("payload_too_large", encoder.append, FrameType.REQUEST, payload)
        raises_reason("payload_too_large", encoder.append_stream_data, 0, "id", 0, b"e" * 60)
        assert encoder.frames == 2  # refusals leave the encoder as it was
        assert decode_all(encoder.take(), 64) == [(2, b"a"), (2, b"b" * 58)]

    @pytest.mark.parametrize("type_id", [0, 9, 15, max(KNOWN_TYPES) + 1, 255])
    def test_unknown_type(self, type_id: int) -> None:
        encoder = FrameEncoder()
        raises_reason("unknown_type", encoder.append, type_id, b"x")
        raises_reason("unknown_type", encode_frame, type_id, b"x")
        assert encoder.frames == 0 and len(encoder) == 0

    @pytest.mark.parametrize("type_id", [-1, 256])
    def test_type_outside_a_byte(self, type_id: int) -> None:
        with pytest.raises(OverflowError):
            FrameEncoder().append(type_id, b"x")
        with pytest.raises(OverflowError):
            encode_frame(type_id, b"x")

    def test_non_buffer_payload(self) -> None:
        with pytest.raises(TypeError):
            FrameEncoder().append(FrameType.REQUEST, "text")  # type: ignore[arg-type]
        with pytest.raises(TypeError):
            encode_frame(FrameType.REQUEST, 42)  # type: ignore[arg-type]

    def test_refused_stream_id_leaves_encoder_intact(self) -> None:
        encoder = FrameEncoder()
        encoder.append(FrameType.REQUEST, b"before")
        raises_reason("bad_stream_header", encoder.append_stream_data, 0, "x" * 256, 1, b"chunk")
        raises_reason("bad_stream_header", encoder.append_stream_credit, 0, "x" * 256, 1)
        encoder.append(FrameType.REQUEST, b"after")
        assert decode_all(encoder.take()) == [(2, b"before"), (2, b"after")]

    def test_credit_frame_respects_max_frame_size(self) -> None:
        encoder = FrameEncoder(16)
        raises_reason("payload_too_large", encoder.append_stream_credit, 0, "a-long-stream-id", 1)


# --- stream frames -------------------------------------------------------------------

stream_ids = st.text(max_size=120).filter(lambda s: len(s.encode()) <= 255)
flag_values = st.integers(0, 255)
u64 = st.integers(0, 2**64 - 1)


class TestStreamFrames:
    @fuzz
    @given(st.lists(st.tuples(st.booleans(), flag_values, stream_ids, u64, st.binary(max_size=3000)),
                    max_size=8), st.data())
    def test_round_trip(self, items: list[tuple[bool, int, str, int, bytes]], data: st.DataObject) -> None:
        encoder = FrameEncoder()
        for is_data, flags, sid, value, chunk in items:
            if is_data:
                encoder.append_stream_data(flags, sid, value, chunk)
            else:
                encoder.append_stream_credit(flags, sid, value)
        stream = encoder.take()
        decoder = FrameDecoder()
        frames = [f for piece in data.draw(testing.splits(stream)) for f in decoder.feed(piece)]
        assert len(frames) == len(items)
        for (type_id, payload), (is_data, flags, sid, value, chunk) in zip(frames, items):
            assert type_id == (FrameType.STREAM_DATA if is_data else FrameType.STREAM_CREDIT)
            got_flags, got_id, got_value, offset = decode_stream_header(payload)
            assert (got_flags, got_id, got_value) == (flags, sid, value)
            assert offset == 2 + len(sid.encode()) + 8
            assert payload[offset:] == (chunk if is_data else b"")

    @pytest.mark.parametrize("sid", ["x" * 255, "€" * 85, "流" * 85, "🚀" * 63 + "abc", "", "héllo-ω"])
    def test_id_limits_and_non_ascii(self, sid: str) -> None:
        assert len(sid.encode()) <= 255
        encoder = FrameEncoder()
        flags = STREAM_FLAG_RESPONSE | STREAM_FLAG_END
        encoder.append_stream_data(flags, sid, 2**64 - 1, memoryview(b"chunk"))
        encoder.append_stream_credit(STREAM_FLAG_ERROR, sid, 7)
        (t1, p1), (t2, p2) = decode_all(encoder.take())
        assert t1 == FrameType.STREAM_DATA and t2 == FrameType.STREAM_CREDIT
        f, got, seq, off = decode_stream_header(p1)
        assert (f, got, seq, p1[off:]) == (flags, sid, 2**64 - 1, b"chunk")
        assert decode_stream_header(bytearray(p2)) == (STREAM_FLAG_ERROR, sid, 7, len(p2))

    @pytest.mark.parametrize("sid", ["x" * 256, "€" * 86])
    def test_id_over_255_bytes_refused(self, sid: str) -> None:
        raises_reason("bad_stream_header", FrameEncoder().append_stream_data, 0, sid, 0, b"")
        raises_reason("bad_stream_header", FrameEncoder().append_stream_credit, 0, sid, 0)

    @pytest.mark.parametrize("sid", ["abc", "é" * 10, ""])
    def test_truncated_header(self, sid: str) -> None:
        encoder = FrameEncoder()
        encoder.append_stream_credit(0, sid, 123)
        ((_, payload),) = decode_all(encoder.take())
        for cut in range(len(payload)):
            raises_reason("bad_stream_header", decode_stream_header, payload[:cut])
        assert decode_stream_header(payload)[1] == sid

    def test_id_not_utf8(self) -> None:
        payload = bytes([0, 2, 0xC3, 0x28]) + bytes(8)
        err = raises_reason("bad_stream_header", decode_stream_header, payload)
        assert isinstance(err, ProtocolError)


# --- payload ownership ---------------------------------------------------------------


class TestPayloadOwnership:
    @fuzz
    @given(st.lists(st.tuples(st.sampled_from([16, 2047, 2048, 2049, 5000, 70_000]),
                              st.sampled_from(as_piece), testing.frame_types()), max_size=10), st.binary())
    def test_large_payloads_interleaved_with_small(self, spec: list[tuple[int, Callable[[bytes], Piece], FrameType]],
                                                   salt: bytes) -> None:
        frames = [(t, bytes((i + j + len(salt)) % 251 for j in range(n))) for i, (n, _, t) in enumerate(spec)]
        encoder = FrameEncoder()
        for (t, payload), (_, kind, _) in zip(frames, spec):
            encoder.append(t, kind(payload))
        out = encoder.take()
        assert out == b"".join(encode_frame(t, p) for t, p in frames)
        assert decode_all(out) == [(int(t), p) for t, p in frames]

    @pytest.mark.parametrize("size", [100, 2048, 100_000])
    def test_bytearray_mutated_after_append(self, size: int) -> None:
        """Observed: a bytearray/memoryview payload is copied during ``append()`` (only ``bytes``
        of 2048+ bytes are kept by reference, and those are immutable), so mutating or resizing
        the bytearray afterwards — before or after ``take()`` — never changes the output, and
        the encoder holds no buffer export (resizing is allowed)."""
        original = bytes(i % 256 for i in range(size))
        buf = bytearray(original)
        encoder = FrameEncoder()
        encoder.append(FrameType.REQUEST, buf)
        encoder.append(FrameType.RESPONSE, memoryview(buf))
        buf[0] ^= 0xFF
        buf[-1] ^= 0xFF
        buf.extend(b"grown")  # would raise BufferError if the encoder still held an export
        first = encoder.take()
        buf[1] ^= 0xFF
        assert first == encode_frame(FrameType.REQUEST, original) + encode_frame(FrameType.RESPONSE, original)
        assert decode_all(first) == [(2, original), (3, original)]

    def test_large_bytes_kept_by_reference_are_copied_at_take(self) -> None:
        big = bytes(range(256)) * 40  # 10240 bytes: kept by reference until take()
        encoder = FrameEncoder()
        encoder.append(FrameType.EVENT, b"small")
        encoder.append(FrameType.EVENT, big)
        encoder.append(FrameType.EVENT, b"tail")
        out = encoder.take()
        del big
        encoder.append(FrameType.PING, b"")  # the encoder is reusable and starts empty
        assert encoder.take() == encode_frame(FrameType.PING, b"")
        assert [p for _, p in decode_all(out)] == [b"small", bytes(range(256)) * 40, b"tail"]

    def test_decoder_copies_payloads_out_of_the_fed_buffer(self) -> None:
        buf = bytearray(encode_frame(FrameType.REQUEST, b"abcdef") * 2)
        frames = FrameDecoder().feed(buf)
        buf[:] = bytes(len(buf))
        assert frames == [(2, b"abcdef"), (2, b"abcdef")]
        assert all(type(p) is bytes for _, p in frames)


def _mixed_frames(items: list[tuple[int, str, int, bytes]]) -> tuple[FrameEncoder, list[tuple[object, ...]]]:
    encoder = FrameEncoder()
    expected: list[tuple[object, ...]] = []
    for flags, sid, value, body in items:
        encoder.append_stream_data(flags, sid, value, body)
        expected.append((FrameType.STREAM_DATA, flags, sid, value, body))
        encoder.append_stream_credit(flags, sid, value)
        expected.append((FrameType.STREAM_CREDIT, flags, sid, value, None))
        encoder.append(FrameType.REQUEST, body)
        expected.append((FrameType.REQUEST, body))
    return encoder, expected


_stream_items = st.lists(
    st.tuples(st.integers(0, 7), st.text(max_size=40).filter(lambda t: len(t.encode()) <= 255),
              st.integers(0, 2**64 - 1), st.binary(max_size=3000)), max_size=8)


class TestSplitStreams:
    """``FrameDecoder(split_streams=True)``: stream frames come out parsed, chunk copied once."""

    @settings(max_examples=200, deadline=None)
    @given(_stream_items, st.data())
    def test_round_trip_at_any_split(self, items: list[tuple[int, str, int, bytes]], data: st.DataObject) -> None:
        encoder, expected = _mixed_frames(items)
        wire = encoder.take()
        decoder = FrameDecoder(split_streams=True)
        got: list[tuple[object, ...]] = []
        for piece in data.draw(testing.splits(wire)):
            got.extend(decoder.feed(piece))
        assert got == expected

    def test_bad_stream_header_is_a_frame_error(self) -> None:
        decoder = FrameDecoder(split_streams=True)
        raises_reason("bad_stream_header", decoder.feed, encode_frame(FrameType.STREAM_DATA, b"\x00\x09ab"))
        decoder = FrameDecoder(split_streams=True)
        raises_reason("bad_stream_header", decoder.feed, encode_frame(FrameType.STREAM_CREDIT, b""))


class TestDirectReceive:
    """A large STREAM_DATA frame is received straight into its chunk: by ``feed`` or by
    ``read_from(fd)`` (what the TCP reader does), which reads from a descriptor into it."""

    @settings(max_examples=300, deadline=None)
    @given(_stream_items, st.integers(17, 2000), st.data())
    def test_any_mix_of_feeds_and_direct_reads(self, items: list[tuple[int, str, int, bytes]],
                                               direct_min: int, data: st.DataObject) -> None:
        encoder, expected = _mixed_frames(items)
        wire = encoder.take()
        decoder = FrameDecoder(split_streams=True, direct_min=direct_min)
        got: list[tuple[object, ...]] = []
        a, b = socket.socketpair()
        try:
            b.setblocking(False)
            at = 0
            while at < len(wire):
                n = data.draw(st.integers(1, max(1, len(wire) - at)), label="piece")
                missing = decoder.direct_missing
                if missing and data.draw(st.booleans(), label="direct"):
                    a.sendall(wire[at:at + n])  # the peer sends n bytes; we read what fits
                    read, frames = decoder.read_from(b.fileno())
                    assert read == min(n, missing)
                    got.extend(frames)
                    rest = n - read
                    if rest:
                        got.extend(decoder.feed(b.recv(rest)))
                else:
                    got.extend(decoder.feed(wire[at:at + n]))
                at += n
        finally:
            a.close()
            b.close()
        assert got == expected
        assert decoder.direct_missing == 0 and decoder.buffered == 0
        assert all(type(item[4]) is bytes for item in got if item[0] == FrameType.STREAM_DATA)

    def test_a_large_chunk_is_read_in_place_and_handed_out_once_complete(self) -> None:
        body = bytes(range(256)) * 1024  # 256 KiB
        frame = FrameEncoder()
        frame.append_stream_data(STREAM_FLAG_RESPONSE, "call-1", 7, body)
        wire = frame.take()
        decoder = FrameDecoder(split_streams=True)
        assert decoder.feed(wire[:1000]) == []
        assert decoder.direct_missing == len(wire) - 1000
        assert decoder.buffered == 1000 - HEADER_LEN - 2 - len("call-1") - 8
        a, b = socket.socketpair()
        with a, b:
            b.setblocking(False)
            with pytest.raises(BlockingIOError):
                decoder.read_from(b.fileno())  # nothing sent yet
            a.sendall(wire[1000:5000])
            assert decoder.read_from(b.fileno()) == (4000, [])
            rest = wire[5000:] + b"next"  # the next frame's start stays in the socket
            a.setblocking(False)
            sent = 0
            items: list[Any] = []
            while decoder.direct_missing:
                if sent < len(rest):
                    with contextlib.suppress(BlockingIOError):
                        sent += a.send(rest[sent:sent + 65536])
                with contextlib.suppress(BlockingIOError):
                    items.extend(decoder.read_from(b.fileno())[1])
            a.setblocking(True)
            a.sendall(rest[sent:])
            assert items == [(FrameType.STREAM_DATA, STREAM_FLAG_RESPONSE, "call-1", 7, body)]
            assert b.recv(100) == b"next"
            a.close()
            assert decoder.feed(wire[:5000]) == []  # another large frame starts
            assert decoder.read_from(b.fileno()) == (0, [])  # end of file
        assert decoder.direct_missing == len(wire) - 5000

    def test_misuse_is_refused(self) -> None:
        decoder = FrameDecoder(split_streams=True)
        with pytest.raises(TypeError):
            memoryview(decoder)  # no writable view of a chunk is ever handed out
        with pytest.raises(ValueError):
            decoder.read_from(0)  # nothing is being received directly
        frame = FrameEncoder()
        frame.append_stream_data(0, "s", 0, bytes(100_000))
        wire = frame.take()
        decoder.feed(wire[:100])
        with pytest.raises(ValueError):
            decoder.read_from(-1)
        with pytest.raises(OSError):
            decoder.read_from(2**31 - 1)  # not an open descriptor
        assert decoder.feed(wire[100:])[0][4] == bytes(100_000)

    def test_below_direct_min_and_without_split_streams_nothing_is_direct(self) -> None:
        frame = FrameEncoder()
        frame.append_stream_data(0, "s", 0, bytes(1000))
        wire = frame.take()
        small = FrameDecoder(split_streams=True, direct_min=2000)
        plain = FrameDecoder(direct_min=100)
        for decoder in (small, plain):
            decoder.feed(wire[:500])
            assert decoder.direct_missing == 0 and decoder.buffered == 500
        assert small.feed(wire[500:])[0][4] == bytes(1000)
        assert plain.feed(wire[500:]) == [(FrameType.STREAM_DATA, wire[HEADER_LEN:])]

    def test_a_bad_stream_header_on_a_large_frame_is_a_frame_error(self) -> None:
        payload = b"\x00\x02\xff\xfe" + bytes(8) + bytes(200_000)  # id not UTF-8
        wire = encode_frame(FrameType.STREAM_DATA, payload)
        raises_reason("bad_stream_header", FrameDecoder(split_streams=True).feed, wire[:5000])

    def test_after_any_error_the_decoder_is_poisoned(self) -> None:
        """A bad small stream frame followed by the start of a large one: once the error is
        raised, nothing after it is parsed (a caller that catches it and feeds on must not see
        a chunk's body taken for frames)."""
        big = FrameEncoder()
        big.append_stream_data(0, "s", 0, encode_frame(FrameType.EVENT, b"SMUGGLED") * 10_000)
        bad = encode_frame(FrameType.STREAM_DATA, b"\x00\x02\xff\xfe" + bytes(8))
        wire = bad + big.take()
        decoder = FrameDecoder(split_streams=True)
        raises_reason("bad_stream_header", decoder.feed, wire[:50_000])
        for later in (wire[50_000:], b"", encode_frame(FrameType.PING, b"")):
            raises_reason("bad_stream_header", decoder.feed, later)
        with pytest.raises(FrameError):
            decoder.read_from(0)


def _poisoned_in_a_frame(wire: bytes) -> None:
    """What the TCP reader does: a decoder and a read buffer in a frame, a feed that raises."""
    decoder = FrameDecoder(split_streams=True)
    ballast = bytearray(1 << 20)  # the reader's read buffer
    decoder.feed(wire)
    del ballast


def test_a_poisoned_decoder_keeps_no_traceback_alive() -> None:
    """A poisoned decoder raises its error again, but must not keep the first exception: its
    traceback holds the frame that holds the decoder, a cycle through an object the garbage
    collector cannot traverse, so each failed connection's reader frame leaked (found by a
    5-minute live fuzz run: 423 MiB after 25,000 connections)."""
    bad = encode_frame(FrameType.STREAM_DATA, b"\x00\x02\xff\xfe" + bytes(8))
    gc.collect()
    tracemalloc.start()
    try:
        for _ in range(40):
            with pytest.raises(FrameError):
                _poisoned_in_a_frame(bad)
        gc.collect()
        current, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert current < 8 << 20, f"{current / (1 << 20):.1f} MiB still held after 40 poisoned decoders"


class TestTakeParts:
    """``take_parts``: the same bytes as ``take``, large immutable payloads not copied."""

    @fuzz
    @given(_stream_items)
    def test_parts_join_to_take(self, items: list[tuple[int, str, int, bytes]]) -> None:
        a, _ = _mixed_frames(items)
        b, _ = _mixed_frames(items)
        parts = a.take_parts()
        assert b"".join(bytes(p) for p in parts) == b.take()
        assert len(a) == 0 and a.frames == 0 and a.take_parts() == []

    def test_views_that_are_not_plain_bytes_are_copied(self) -> None:
        """A 2-D view (len() is not its size) or a view of non-bytes items is copied when
        appended, never kept as a part a partial write would cut by len()."""
        raw = bytes(range(256)) * 32
        flat = memoryview(raw)
        square = flat.cast("B", shape=[2, len(raw) // 2])
        encoder = FrameEncoder()
        encoder.append_stream_data(0, "s", 0, square)
        parts = encoder.take_parts()
        assert not any(p is square for p in parts)
        assert FrameDecoder(split_streams=True).feed(b"".join(bytes(p) for p in parts))[0][4] == raw

    def test_large_immutable_payloads_are_the_objects_given(self) -> None:
        big = bytes(range(256)) * 64
        view = memoryview(bytes(range(256)) * 64)[100:9000]
        mutable = bytearray(big)
        encoder = FrameEncoder()
        encoder.append_stream_data(0, "s", 0, big)
        encoder.append_stream_data(0, "s", 1, view)
        encoder.append_stream_data(0, "s", 2, mutable)
        encoder.append(FrameType.EVENT, b"tail")
        parts = encoder.take_parts()
        assert any(p is big for p in parts) and any(p is view for p in parts)
        assert not any(p is mutable for p in parts)
        mutable[0] ^= 0xFF  # copied when appended: the parts keep what was appended
        decoded = FrameDecoder(split_streams=True).feed(b"".join(bytes(p) for p in parts))
        assert [f[4] for f in decoded[:3]] == [big, bytes(view), big]
        assert decoded[3] == (FrameType.EVENT, b"tail")


class TestWritingParts:
    """``unwritten`` and ``writev_all``: the one way parts are written (TCP and transfer_to)."""

    @fuzz
    @given(st.lists(st.binary(max_size=50), max_size=20), st.data())
    def test_unwritten_is_what_follows_the_first_n_bytes(self, parts: list[bytes], data: st.DataObject) -> None:
        whole = b"".join(parts)
        n = data.draw(st.integers(0, len(whole)))
        assert b"".join(bytes(p) for p in unwritten(list(parts), n)) == whole[n:]

    def test_writev_all_takes_more_parts_than_one_writev_does(self, tmp_path: Any) -> None:
        parts = [bytes([i % 256]) * 3 for i in range(IOV_MAX * 3 + 7)]
        fd = os.open(tmp_path / "out.bin", os.O_WRONLY | os.O_CREAT)
        try:
            assert writev_all(fd, parts) == 3 * len(parts)
        finally:
            os.close(fd)
        assert (tmp_path / "out.bin").read_bytes() == b"".join(parts)
