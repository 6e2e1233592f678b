"""A burst of concurrent streams on one connection (issue 9), at CI size: 400 uploads and
400 downloads of 256 KiB-1 MiB started at once between two real processes on loopback TCP.

Every call must complete with the right SHA-256 (checked here again, from the content each
seed stands for), no connection may be dropped, and each process's peak RSS must stay under
a bound derived from the limits (below). The processes and the measuring are
``benches/soak_streams.py``'s (``python benches/soak_streams.py --streams 1000`` is the full
soak); this test runs its orchestrator in-process, which kills both nodes in ``finally``.

Why 400: each of the N producers used to queue one 256 KiB chunk before waiting for the
connection to drain, so a burst put N x 256 KiB in one write queue and the connection was
dropped as "not reading" past ``max_write_queue`` (64 MiB = 256 chunks). At 300 that happened
in about half the runs; at 400 in every run.

The memory bound (growth = peak RSS, ``VmHWM``, minus RSS once connected and idle), for a
process with C = max_chunk (256 KiB), HWM = the write queue's high-water mark (4 MiB), N
streams per direction:

* its write queue: producers are admitted by room under HWM, so at most HWM + C queued, and
  at most as much again while ``take()`` copies the queue into the one buffer it writes:
  2 (HWM + C);
* chunks in producers' hands: a ``from_iterable`` stream pulls its next chunk before it waits
  for credit or room, so each producing stream may hold one: N x C (the server produces N
  downloads; the client N uploads, fewer if uploads beyond the server's ``maxStreams`` wait
  before pulling, which the bound does not count on);
* data received and not yet consumed: consumers here hash and drop each chunk at once, so
  this is what one read brings beyond what the peer could have queued: HWM + C. The 4 MiB
  stream window is credit, not memory held, while the reader keeps up;
* 32 MiB for everything else: 800 calls' state, trio tasks, allocator slack (a 20-stream
  run, far from any limit, grows by about 25 MiB).

So growth <= 3 (HWM + C) + N C + 32 MiB = 144.75 MiB at N = 400. Not counted, so a failure:
the write queue growing toward ``max_write_queue`` (64 MiB), or windows filling as memory
(N x 4 MiB). Before the fix (nerve adbcbcc) a 300-stream run that escaped the drop grew by
160-209 MiB.
"""

from __future__ import annotations

import hashlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
STREAMS = 400
SIZE = "256KiB-1MiB"
DEADLINE = 25.0  # seconds for all 800 calls (about 2 s expected); then they count as unfinished
MIB = 1024 * 1024
CHUNK = 256 * 1024  # nerve's default max_chunk
HIGH_WATER = 4 * MIB  # the TCP write queue's high-water mark (default)
SLACK = 32 * MIB


def _load_soak() -> ModuleType:
    spec = importlib.util.spec_from_file_location("soak_streams", ROOT / "benches" / "soak_streams.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


soak = _load_soak()


def memory_bound(streams: int) -> int:
    """Bytes a process may grow by in the burst (see the module docstring)."""
    return 3 * (HIGH_WATER + CHUNK) + streams * CHUNK + SLACK


@pytest.fixture(scope="module")
def burst() -> dict[str, Any]:
    args = soak.build_parser().parse_args(
        ["--streams", str(STREAMS), "--size", SIZE, "--mode", "both", "--deadline", str(DEADLINE),
         "--grace", "10", "--records"])
    result: dict[str, Any] = soak.orchestrate(args)  # kills both processes in finally
    soak.print_table(result)  # shown by pytest when a test fails
    return result


def test_every_call_completes_with_the_right_digest(burst: dict[str, Any]) -> None:
    assert burst["errors"] == {}, (burst["errors"], burst["error_examples"], burst["drops"])
    assert burst["failed"] == 0 and burst["completed"] == 2 * STREAMS
    lo, hi = soak.parse_size_range(SIZE)
    planned = {(kind, i): (seed, size) for kind, i, seed, size in soak.plan(STREAMS, lo, hi, "both")}
    assert len(planned) == 2 * STREAMS
    records = {(r["kind"], r["i"]): r for r in burst["records"]}
    assert records.keys() == planned.keys()
    sizes = {size for _, size in planned.values()}
    assert min(sizes) == lo and max(sizes) == hi and len(sizes) > STREAMS // 2
    for key, (seed, size) in planned.items():
        r = records[key]
        # Uploads: the digest the server computed of what it read; downloads: the digest the
        # client computed of what it read. Both against the content the seed stands for.
        want = hashlib.sha256(soak.content(seed, size)).hexdigest()
        assert (r["seed"], r["size"], r["got_size"], r["digest"]) == (seed, size, size, want), key
        assert r["ok"] and r["server_ok"], key
    stats = burst["server_stats"]
    assert stats.get("upload_ok") == STREAMS and stats.get("download_ok") == STREAMS, stats
    assert not any(k.endswith("mismatch") or "error" in k for k in stats), stats


def test_the_connection_is_never_dropped(burst: dict[str, Any]) -> None:
    assert burst["drops"] == {"server": [], "client": []}
    for side in ("server", "client"):
        seen = burst["connections_seen"][side]
        assert seen in (None, 1), f"{side} saw {seen} connections (a reconnect)"
        tcp = burst["tcp_stats"][side]
        if tcp is not None and "not_reading" in tcp:
            assert tcp["not_reading"] == 0, tcp


def test_peak_rss_of_both_processes_stays_bounded(burst: dict[str, Any]) -> None:
    # A run cut short by a drop moved less data: its peak says nothing about the bound.
    assert burst["completed"] == 2 * STREAMS, "the burst did not complete (see the other tests)"
    bound = memory_bound(STREAMS)
    report = {}
    for side in ("server", "client"):
        rss = burst["rss_kb"][side]
        assert rss["before"] > 0 and rss["peak_hwm"] > 0, rss
        growth = (max(rss["peak_hwm"], rss["peak_sampled"]) - rss["before"]) * 1024
        report[side] = growth / MIB
    assert all(g * MIB <= bound for g in report.values()), \
        f"RSS growth (MiB) {report} over the bound of {bound / MIB:.2f} MiB"


def test_the_soak_counts_a_wrong_digest_as_a_failure() -> None:
    """The check the tests rely on can fail: a stream read with another seed's content, or one
    byte short, is not the content its seed stands for."""
    seed, size = 3, 700_000
    good = hashlib.sha256(soak.content(seed, size)).hexdigest()
    assert soak.content_digest(seed, size) == good
    assert soak.content_digest(seed + 1, size) != good
    assert soak.content_digest(seed, size - 1) != good
    assert len(soak.content(seed, size)) == size
    assert all(len(v) <= CHUNK for v in soak.content_views(seed, 5 * CHUNK + 1))
