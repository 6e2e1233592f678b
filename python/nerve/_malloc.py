"""glibc's allocator, set for stream chunks (issue 15).

A stream chunk is a ``bytes`` of up to 1 MiB (``max_chunk``); a busy stream allocates and frees
one per chunk, a few thousand per second. glibc serves such sizes with ``mmap`` until the first
one is freed, then from the heap, and gives the top of the heap back to the kernel as soon as
more than twice the last freed size is free there (its dynamic ``M_TRIM_THRESHOLD``). With a
window of chunks in flight that top is given back and taken again all the time, so every new
chunk's pages are faulted in and zeroed by the kernel before the data is copied in: measured
on a 2-core VM (docs/internals.md, "Bulk bytes"), about a third of a receiving node's CPU per
gigabyte, memory to memory, and a quarter of its file-to-file speed.

So when a broker starts, nerve fixes the two thresholds once for the process: blocks up to
4 MiB come from the heap (``M_MMAP_THRESHOLD``) and up to 16 MiB of free heap top is kept for
reuse (``M_TRIM_THRESHOLD``). The cost: a process may keep up to 16 MiB of freed memory instead
of returning it. Nothing is changed if the environment has any ``MALLOC_*`` variable or a
``GLIBC_TUNABLES`` naming a ``glibc.malloc.*`` tunable (the operator decided), if
``NERVE_MALLOC_TUNING=0``, or where the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import logging
import os
from collections.abc import Mapping

__all__ = ["tune_for_streams", "MMAP_THRESHOLD", "TRIM_THRESHOLD"]

log = logging.getLogger("nerve")

MMAP_THRESHOLD = 4 * 1024 * 1024
TRIM_THRESHOLD = 16 * 1024 * 1024
_M_TRIM_THRESHOLD = -1  # glibc malloc.h
_M_MMAP_THRESHOLD = -3

_done = False


def _operator_decided(environ: Mapping[str, str]) -> bool:
    """The environment sets malloc itself: a ``MALLOC_*`` variable, or a malloc tunable."""
    return any(name.startswith("MALLOC_") for name in environ) or \
        "glibc.malloc." in environ.get("GLIBC_TUNABLES", "")


def tune_for_streams() -> bool:
    """Set glibc's thresholds for stream chunks, once per process (see the module docstring).
    Returns True if this call set them."""
    global _done
    if _done:
        return False
    _done = True
    if os.environ.get("NERVE_MALLOC_TUNING", "1") == "0" or _operator_decided(os.environ):
        return False
    try:
        libc = ctypes.CDLL(None)
        if not hasattr(libc, "gnu_get_libc_version"):  # not glibc (musl, macOS...)
            return False
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):  # (TypeError: CDLL(None) on Windows)
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    mmap_set = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    trim_set = bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    done = mmap_set and trim_set
    log.debug("malloc thresholds for stream chunks: mmap %d, trim %d (%s)", MMAP_THRESHOLD, TRIM_THRESHOLD,
              "set" if done else "refused")
    return done
