"""Frame decoding throughput: the Rust ``FrameDecoder`` against a pure-Python ``struct``
decoder of the same format and checks, on a large buffer of small REQ-sized frames fed in
64 KiB pieces, alternating A B A B in one process. Run: ``python benches/bench_frame_decoder.py``.
"""

from __future__ import annotations

import argparse
import gc
import random
import statistics
import struct
import sys
import time
from collections.abc import Callable
from typing import Protocol

from nerve.errors import FrameError
from nerve.frames import DEFAULT_MAX_FRAME_SIZE, HEADER_LEN, FrameDecoder, FrameEncoder, FrameType

PIECE = 64 * 1024
_HEADER = struct.Struct(">BIB")
_TYPES = frozenset(int(t) for t in FrameType)


class Decoder(Protocol):
    def feed(self, data: bytes) -> list[tuple[int, bytes]]: ...


class PyFrameDecoder:
    """The same format and checks as the Rust decoder, in plain Python: XOR checksum of bytes
    1..5, length within ``[HEADER_LEN, max_frame_size]``, known type; checked as soon as the
    6 header bytes are in; poisoned after the first error."""

    def __init__(self, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE) -> None:
        self.max_frame_size = max_frame_size
        self.pending = b""
        self.error: FrameError | None = None

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        if self.error is not None:
            raise self.error
        if self.pending:
            data = self.pending + data
        out: list[tuple[int, bytes]] = []
        append = out.append
        unpack_from = _HEADER.unpack_from
        maximum = self.max_frame_size
        types = _TYPES
        end = len(data)
        pos = 0
        while end - pos >= HEADER_LEN:
            crc, length, type_id = unpack_from(data, pos)
            check = (length ^ (length >> 8) ^ (length >> 16) ^ (length >> 24) ^ type_id) & 0xFF
            if check != crc:
                self._fail(f"bad frame header checksum: expected 0x{check:02x}, found 0x{crc:02x}",
                           "bad_checksum")
            if length < HEADER_LEN:
                self._fail(f"frame length {length} is below the header size", "length_below_header")
            if length > maximum:
                self._fail(f"frame length {length} is above the maximum {maximum}", "length_above_maximum")
            if type_id not in types:
                self._fail(f"unknown frame type {type_id}", "unknown_type")
            if end - pos < length:
                break
            append((type_id, data[pos + HEADER_LEN : pos + length]))
            pos += length
        self.pending = data[pos:]
        return out

    def _fail(self, message: str, reason: str) -> None:
        self.error = FrameError(message, reason)
        self.pending = b""
        raise self.error


def make_stream(size: int, seed: int = 1) -> tuple[bytes, int]:
    """About ``size`` bytes of frames with 16..256-byte payloads (REQ/RES/EVENT mostly)."""
    rng = random.Random(seed)
    pool = rng.randbytes(1 << 16)
    kinds = [FrameType.REQUEST] * 5 + [FrameType.RESPONSE] * 4 + [FrameType.EVENT, FrameType.HEARTBEAT]
    encoder = FrameEncoder()
    total = count = 0
    while total < size:
        n = rng.randint(16, 256)
        at = rng.randrange(len(pool) - n)
        encoder.append(rng.choice(kinds), pool[at : at + n])
        total += HEADER_LEN + n
        count += 1
    return encoder.take(), count


def pieces_of(stream: bytes) -> list[bytes]:
    return [stream[i : i + PIECE] for i in range(0, len(stream), PIECE)]


def verify(pieces: list[bytes], expected_frames: int) -> None:
    """Both decoders, fed the same pieces, return identical frames, piece by piece."""
    rust, py = FrameDecoder(), PyFrameDecoder()
    count = 0
    for piece in pieces:
        a, b = rust.feed(piece), py.feed(piece)
        if a != b:
            sys.exit(f"decoders disagree after {count} frames")
        count += len(a)
    if count != expected_frames or rust.buffered or py.pending:
        sys.exit(f"decoded {count} frames, expected {expected_frames}")
    # And they refuse the same corruption with the same reason.
    bad = bytearray(pieces[0])
    bad[0] ^= 0xFF
    reasons = []
    for dec in (FrameDecoder(), PyFrameDecoder()):
        try:
            dec.feed(bytes(bad))
        except FrameError as exc:
            reasons.append(exc.reason)
    if reasons != ["bad_checksum", "bad_checksum"]:
        sys.exit(f"decoders disagree on a corrupt header: {reasons}")


def run(factory: Callable[[], Decoder], pieces: list[bytes]) -> tuple[float, int]:
    gc.collect()
    decoder = factory()
    frames = 0
    start = time.perf_counter()
    for piece in pieces:
        frames += len(decoder.feed(piece))
    return time.perf_counter() - start, frames


def fmt(rates: list[float]) -> str:
    return f"{statistics.median(rates) / 1e6:7.2f} M frames/s  (min {min(rates) / 1e6:.2f}, max {max(rates) / 1e6:.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny run (1 MiB, 3 rounds) as a smoke test")
    parser.add_argument("--mib", type=int, default=64, help="size of the buffer in MiB (default 64)")
    parser.add_argument("--rounds", type=int, default=5, help="A B rounds (default 5)")
    args = parser.parse_args()
    size_mib, n_rounds = (1, 3) if args.quick else (args.mib, args.rounds)

    stream, n_frames = make_stream(size_mib * 1024 * 1024)
    pieces = pieces_of(stream)
    print(f"{len(stream) / 2**20:.1f} MiB, {n_frames} frames (payload 16-256 B), "
          f"{len(pieces)} pieces of {PIECE // 1024} KiB; Python {sys.version.split()[0]}")
    verify(pieces, n_frames)
    print("verified: both decoders return identical frames")

    rust_rates: list[float] = []
    py_rates: list[float] = []
    for r in range(1, n_rounds + 1):
        for name, factory, rates in (("rust  ", FrameDecoder, rust_rates), ("python", PyFrameDecoder, py_rates)):
            elapsed, frames = run(factory, pieces)
            assert frames == n_frames
            rates.append(frames / elapsed)
            print(f"  round {r} {name} {elapsed * 1e3:8.1f} ms  {frames / elapsed / 1e6:6.2f} M frames/s")
    print(f"rust   FrameDecoder.feed : {fmt(rust_rates)}")
    print(f"python struct decoder    : {fmt(py_rates)}")
    print(f"ratio (median rust / median python): {statistics.median(rust_rates) / statistics.median(py_rates):.1f}x")


if __name__ == "__main__":
    main()
