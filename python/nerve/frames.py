"""Length-prefixed frames (Moleculer TCP's 6-byte header), implemented in the Rust core.

``FrameEncoder`` coalesces many frames into one ``bytes`` (``take``) or one list of parts for a
single ``writev`` (``take_parts``; :func:`writev_all` and :func:`unwritten` write such lists);
``FrameDecoder.feed`` turns received bytes, split anywhere, into ``(type, payload)`` frames.
Malformed input raises :class:`nerve.errors.FrameError` as soon as the 6 header bytes are in.
"""

from __future__ import annotations

import enum
import os
from typing import Any

from nerve._core import (
    DEFAULT_MAX_FRAME_SIZE,
    HEADER_LEN,
    STREAM_FLAG_END,
    STREAM_FLAG_ERROR,
    STREAM_FLAG_RESPONSE,
    FrameDecoder,
    FrameEncoder,
    decode_stream_header,
    encode_frame,
)
from nerve._core import FRAME_TYPES as _FRAME_TYPES
from nerve.errors import FrameError

__all__ = [
    "DEFAULT_MAX_FRAME_SIZE",
    "HEADER_LEN",
    "STREAM_FLAG_END",
    "STREAM_FLAG_ERROR",
    "STREAM_FLAG_RESPONSE",
    "FrameDecoder",
    "FrameEncoder",
    "FrameError",
    "FrameType",
    "decode_stream_header",
    "encode_frame",
    "IOV_MAX",
    "unwritten",
    "writev_all",
]

#: Most buffers one ``writev`` takes (Linux's IOV_MAX): give it ``parts[:IOV_MAX]``.
IOV_MAX = 1024


def unwritten(parts: list[Any], n: int) -> list[Any]:
    """What is left of ``parts`` (1-D byte buffers, e.g. ``FrameEncoder.take_parts()``) once
    their first ``n`` bytes were written."""
    for i, part in enumerate(parts):
        size = len(part)
        if n < size:
            rest = parts[i:]
            if n:
                rest[0] = memoryview(part)[n:]
            return rest
        n -= size
    return []


def writev_all(fd: int, parts: list[Any]) -> int:
    """Write every part to the blocking descriptor ``fd`` in order (``writev``, at most
    :data:`IOV_MAX` buffers a call); returns the bytes written."""
    total = 0
    while parts:
        n = os.writev(fd, parts[:IOV_MAX])
        total += n
        parts = unwritten(parts, n)
    return total


class FrameType(enum.IntEnum):
    """Frame type ids. 1..8 are Moleculer's TCP packet ids; 16.. are nerve's own."""

    EVENT = 1
    REQUEST = 2
    RESPONSE = 3
    PING = 4
    PONG = 5
    GOSSIP_REQUEST = 6
    GOSSIP_RESPONSE = 7
    GOSSIP_HELLO = 8
    HELLO = 16
    DISCOVER = 17
    INFO = 18
    HEARTBEAT = 19
    DISCONNECT = 20
    STREAM_DATA = 21
    STREAM_CREDIT = 22
    HELLO_ACK = 23
    PEERS = 24
    CANCEL = 25


def _check_types_match_core() -> None:
    core = {name: value for name, value in _FRAME_TYPES.items()}
    ours = {t.name.replace("_", "").lower(): t.value for t in FrameType}
    theirs = {name.lower(): value for name, value in core.items()}
    if ours != theirs:  # pragma: no cover - a build mismatch, caught by the tests
        raise ImportError(f"nerve.frames.FrameType does not match nerve._core: {ours} != {theirs}")


_check_types_match_core()
