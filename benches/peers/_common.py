"""Helpers shared by the Python benchmark peers (stdlib only: the MoleculerPy peer imports it
from another interpreter).

Every client prints exactly one JSON line of results (``result(...)``) on stdout. Transfer
clients first print an ``{"idle": ...}`` line once connected and warmed up, then wait for the
harness to answer ``go`` on stdin: the harness samples the server's idle RSS in between.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

#: The parameters of one RPC call / the data of one event: small and typical.
PARAMS: dict[str, Any] = {"id": 1, "name": "bench", "tags": ["a", "b", "c"], "values": [1, 2, 3, 4],
                          "nested": {"ok": True, "ratio": 0.5}}
MIB = 1024 * 1024


def read_status(pid: int | str = "self") -> dict[str, int]:
    """VmRSS / VmHWM (kB) of a process, from ``/proc/<pid>/status`` (empty if gone)."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    key, value = line.split(":", 1)
                    out[key] = int(value.split()[0])
    except OSError:
        pass
    return out


def rss_kb() -> int:
    return read_status().get("VmRSS", 0)


def peak_rss_kb() -> int:
    return read_status().get("VmHWM", 0)


def result(**fields: Any) -> None:
    """Print the client's one result line (with its own peak RSS) and flush."""
    fields.setdefault("client_rss_peak_kb", peak_rss_kb())
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


def idle_and_wait(timeout: float = 30.0) -> int:
    """Report idle RSS, then block until the harness says ``go`` (or stdin closes). Returns the
    idle RSS in kB. Blocking is fine: it happens before the measured part."""
    idle = rss_kb()
    sys.stdout.write(json.dumps({"idle": True, "client_rss_kb": idle}) + "\n")
    sys.stdout.flush()
    if os.environ.get("NERVE_BENCH_NO_SYNC"):
        return idle
    import select

    ready, _, _ = select.select([sys.stdin], [], [], timeout)
    if ready:
        sys.stdin.readline()
    return idle


def mark(name: str) -> float:
    """Tell the harness the measured part starts (``start``) or ends (``end``): it samples the
    server's CPU time then. Returns this process's CPU time (s) at the mark."""
    sys.stdout.write(json.dumps({"mark": name}) + "\n")
    sys.stdout.flush()
    return time.process_time()


def arm_deadline(seconds: float) -> None:
    """Kill this process (SIGALRM) after ``seconds``: a safety net that, unlike a deadline of
    the event loop, does not make every call carry a timeout."""
    import math
    import signal

    signal.alarm(max(1, math.ceil(seconds)))


def ready(**fields: Any) -> None:
    """A server's ``READY`` line: it accepts clients from now on."""
    fields["ready"] = True
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


def percentiles_us(latencies_ns: list[int]) -> dict[str, float]:
    if not latencies_ns:
        return {"p50_us": 0.0, "p99_us": 0.0}
    s = sorted(latencies_ns)
    n = len(s)

    def at(q: float) -> float:
        return s[min(n - 1, int(q * n))] / 1000.0

    return {"p50_us": round(at(0.50), 2), "p99_us": round(at(0.99), 2)}


class Pacer:
    """Caps a consumer at ``rate`` bytes/s: ``delay(consumed)`` says how long to sleep."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.start = time.perf_counter()

    def delay(self, consumed: int) -> float:
        if self.rate <= 0:
            return 0.0
        ahead = consumed / self.rate - (time.perf_counter() - self.start)
        return ahead if ahead > 0.001 else 0.0


def chunk_source(size: int, chunk: int) -> tuple[bytes, int, int]:
    """(chunk bytes, number of full chunks, size of the last partial chunk)."""
    block = bytes(range(256)) * (chunk // 256) + bytes(chunk % 256)
    return block, size // chunk, size % chunk


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("mode", choices=["server", "client"])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--scenario", default="rpc",
                   choices=["rpc", "events", "upload", "download", "slow", "inproc"])
    p.add_argument("--inflight", type=int, default=1, help="rpc: calls in flight")
    p.add_argument("--count", type=int, default=10_000, help="rpc: max calls; events: events sent")
    p.add_argument("--duration", type=float, default=3.0, help="rpc: measuring time cap (s)")
    p.add_argument("--warmup", type=int, default=500, help="rpc: calls before measuring")
    p.add_argument("--timeout", type=float, default=0.0,
                   help="rpc: a timeout on every call, in seconds (0: none)")
    p.add_argument("--size", type=int, default=64 * MIB, help="transfers: bytes")
    p.add_argument("--chunk", type=int, default=256 * 1024, help="transfers: bytes per message")
    p.add_argument("--rate", type=float, default=0.0, help="slow: consumer cap in bytes/s")
    p.add_argument("--tls-dir", default="",
                   help="TLS: directory with ca.pem, server.crt/.key, client.crt/.key (none: plaintext)")
    p.add_argument("--deadline", type=float, default=120.0,
                   help="the process stops by itself after this many seconds")
    return p
