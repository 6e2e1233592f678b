"""nerve against its peers, side by side in one run: RPC, events, transfers, file to file against
a local copy, RPC latency under a transfer, slow consumer and in-process call cost, with a JSON
record, a Markdown table and PNG charts.

    python -m benches                 # full mode (tens of minutes)
    python -m benches --quick         # tiny counts, a couple of minutes: CI keeps it from rotting
    python -m benches --only rpc,slow --runs 3 --out /tmp/b
    python -m benches --only rpc_1,rpc_64 --baseline 07b3f3e   # nerve at that commit, side by side
    python -m benches --only file,rpc_under_transfer --file-size 1G

``benches/run.sh`` installs the peers first (bench extra, npm ci, NATS, MoleculerPy venv) and
then runs this. Method: every run is a fresh server process and a fresh client process on
127.0.0.1; in each round nerve runs first and then every peer (A B C .. A B C ..); several
rounds; each figure is the median with its min-max, and each peer's column gives
``nerve / peer`` for that metric. Peers that cannot run are reported (with the reason or the
tail of their stderr) and never stop the harness; a nerve failure makes the exit status 1.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import queue
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCHES = Path(__file__).resolve().parent
ROOT = BENCHES.parent
PEERS_DIR = BENCHES / "peers"
JS_DIR = PEERS_DIR / "js"
RESULTS = BENCHES / "results"
MIB = 1024 * 1024
GIB = 1024 * MIB
NATS_URL = ("127.0.0.1", 4222)
NATS_START = ("start-stop-daemon --start --oknodo --background --exec /usr/sbin/nats-server -- "
              "-a 127.0.0.1 -p 4222 -js -sd /var/lib/nats-server -l /var/log/nats-server.log")
MOLECULERPY_VERSION = "0.14.22"
FAMILIES = ("rpc", "events", "transfer", "file", "mixed", "tls", "slow", "inproc")
SLOW_BUDGET_EXTRA = 16 * MIB  # target: peak RSS <= idle RSS + window + 16 MiB


# --- what is measured ---------------------------------------------------------------------

@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    unit: str
    higher_better: bool


REQ_S = Metric("req_per_s", "req/s", "req/s", True)
P50 = Metric("p50_us", "p50 latency", "µs", False)
P99 = Metric("p99_us", "p99 latency", "µs", False)
EV_S = Metric("events_per_s", "events/s", "events/s", True)
LOST = Metric("lost", "events lost", "events", False)
MB_S = Metric("mb_per_s", "MB/s", "MB/s", True)
SRV_PEAK = Metric("server_rss_peak_mib", "server peak RSS", "MiB", False)
CLI_PEAK = Metric("client_rss_peak_mib", "client peak RSS", "MiB", False)
SRV_GROWTH = Metric("server_rss_growth_mib", "server peak − idle RSS", "MiB", False)
CLI_GROWTH = Metric("client_rss_growth_mib", "client peak − idle RSS", "MiB", False)
NS_CALL = Metric("ns_per_call", "cost per call", "ns", False)
SRV_CPU_OP = Metric("server_cpu_us_per_op", "server CPU per call/event", "µs", False)
CLI_CPU_OP = Metric("client_cpu_us_per_op", "client CPU per call/event", "µs", False)
SRV_CPU_GB = Metric("server_cpu_s_per_gb", "server CPU per GB", "s/GB", False)
CLI_CPU_GB = Metric("client_cpu_s_per_gb", "client CPU per GB", "s/GB", False)
CPU_GB = Metric("cpu_s_per_gb", "CPU per GB, all processes", "s/GB", False)
# rpc_under_transfer: the calls' figures while the upload runs, and the same load just before
UT_P50 = Metric("p50_us", "p50 latency during the transfer", "µs", False)
UT_P99 = Metric("p99_us", "p99 latency during the transfer", "µs", False)
UT_P999 = Metric("p999_us", "p99.9 latency during the transfer", "µs", False)
UT_REQ_S = Metric("req_per_s", "calls/s during the transfer", "req/s", True)
UT_MB_S = Metric("mb_per_s", "the transfer's speed, with the calls", "MB/s", True)
IDLE_P50 = Metric("idle_p50_us", "p50 latency, no transfer", "µs", False)
IDLE_P99 = Metric("idle_p99_us", "p99 latency, no transfer", "µs", False)
IDLE_REQ_S = Metric("idle_req_per_s", "calls/s, no transfer", "req/s", True)
P99_RISE = Metric("p99_rise", "p99 during ÷ p99 without the transfer", "×", False)


@dataclass(frozen=True)
class Side:
    """One process of a peer: its runtime (python | node | moleculerpy), script and options."""

    runtime: str
    script: str
    args: tuple[str, ...] = ()


@dataclass
class Peer:
    id: str
    label: str
    runtime: str  # python | node | moleculerpy
    script: str
    args: tuple[str, ...] = ()
    client: Side | None = None  # a mixed pair: the client process, when it is not the server's kind
    chunk: int = 256 * 1024  # bytes per message in transfers
    nats: bool = False
    note: str = ""
    pythonpath: str = ""  # prepended to PYTHONPATH (a baseline's tree: nerve is imported from there)
    nerve_under: str = ""  # a nerve peer must report nerve.__file__ under this directory
    probe: bool = False  # ask the peer (nerve_peer.py --probe) whether this nerve can run it
    # a producer without flow control (moleculer.js) feeds a nerve reader: a stream failed with
    # StreamOverflowError (max_stream_buffer) is an outcome to record, not a failed run
    may_overflow: bool = False
    serverless: bool = False  # no server process: the client is the whole peer (local-copy)

    def side(self, mode: str) -> Side:
        """The server's or the client's process."""
        if mode == "client" and self.client is not None:
            return self.client
        return Side(self.runtime, self.script, self.args)

    @property
    def runtimes(self) -> set[str]:
        return {self.side("server").runtime, self.side("client").runtime}


PEERS: dict[str, Peer] = {p.id: p for p in [
    Peer("nerve", "nerve", "python", "nerve_peer.py", chunk=MIB,
         note="nerve Broker over its native TCP transport, msgpack, one connection; streams: "
              "PacketStream, 1 MiB chunks (the default max_chunk), 4 MiB credit window"),
    Peer("nerve+3mw", "nerve + 3 no-op mw", "python", "nerve_peer.py", ("--middlewares", "3mw"),
         probe=True,
         note="nerve with three do-nothing middlewares on both brokers (each wraps call, local_action "
              "and remote_action and just awaits next)"),
    Peer("nerve+ft", "nerve + breaker/bulkhead", "python", "nerve_peer.py", ("--middlewares", "ft"),
         probe=True,
         note="nerve with nerve.middlewares.CircuitBreaker() on the client and "
              "nerve.middlewares.Bulkhead() on the server (defaults)"),
    Peer("nerve+metrics", "nerve + metrics", "python", "nerve_peer.py", ("--middlewares", "metrics"),
         probe=True,
         note="nerve with metrics=True on both brokers (counts per action inline; the server's "
              "metrics are scraped once, broker.metrics.exposition(), after the measured part)"),
    Peer("nerve+tracing", "nerve + tracing (SDK)", "python", "nerve_peer.py", ("--middlewares", "tracing"),
         probe=True,
         note="nerve with nerve.tracing.Tracing(tracer_provider=...) on both brokers: an OpenTelemetry "
              "SDK TracerProvider with a BatchSpanProcessor (defaults) whose exporter drops the spans, "
              "so the figure is nerve's spans and the SDK's recording, not an exporter's I/O"),
    Peer("nerve+otel-nosdk", "nerve + Tracing, no SDK", "python", "nerve_peer.py",
         ("--middlewares", "otel-nosdk"), probe=True,
         note="nerve with nerve.tracing.Tracing() on both brokers and only the OpenTelemetry API (no "
              "tracer provider set): no span is made, no handler wrapped"),
    Peer("raw-trio", "raw trio+msgspec", "python", "raw_trio.py",
         note="length-prefixed msgspec frames on trio, reader task + batching writer task; "
              "one-way transfer of 256 KiB raw frames"),
    Peer("grpc-aio", "grpc.aio", "python", "grpc_peer.py", chunk=MIB,
         note="grpcio asyncio API, generic handlers on msgpack bytes, one channel; events are "
              "messages of one client stream; transfers are 1 MiB stream messages"),
    Peer("pyzmq", "pyzmq", "python", "zmq_peer.py", chunk=MIB,
         note="DEALER/ROUTER, blocking API, msgpack bodies, default HWM; 1 MiB zero-copy transfer "
              "messages"),
    Peer("moljs-tcp-json", "moleculer.js tcp/json", "node", "server.js",
         ("--transport", "tcp", "--serializer", "JSON"),
         note="moleculer.js 0.15 TCP transporter (no UDP discovery), JSON serializer"),
    Peer("moljs-nats-json", "moleculer.js nats/json", "node", "server.js",
         ("--transport", "nats", "--serializer", "JSON"), nats=True,
         note="moleculer.js 0.15 NATS transporter, JSON serializer"),
    Peer("moljs-tcp-msgpack", "moleculer.js tcp/msgpack", "node", "server.js",
         ("--transport", "tcp", "--serializer", "MsgPack"),
         note="moleculer.js 0.15 TCP transporter, MsgPack (msgpack5), 0.15 streams, 256 KiB chunks"),
    Peer("moljs-nats-msgpack", "moleculer.js nats/msgpack", "node", "server.js",
         ("--transport", "nats", "--serializer", "MsgPack"), nats=True,
         note="moleculer.js 0.15 NATS transporter, MsgPack (msgpack5), 0.15 streams, 256 KiB chunks"),
    Peer("nerve-nats-msgpack", "nerve nats/msgpack", "python", "nerve_peer.py",
         ("--transport", "nats", "--serializer", "msgpack"), nats=True,
         note="nerve Broker over NATS (a namespace of the run's own), msgpack; streams between the "
              "two nerve nodes are nerve's credited binary frames on NSTREAM.<node>, 256 KiB "
              "chunks, 4 MiB credit window"),
    Peer("nerve-client-moljs-nats", "nerve client → moleculer.js server, nats/msgpack", "node", "server.js",
         ("--transport", "nats", "--serializer", "MsgPack"), nats=True,
         client=Side("python", "nerve_peer.py",
                     ("--transport", "nats", "--serializer", "msgpack", "--actions", "file")),
         may_overflow=True,
         note="nerve_peer.py client (NATS, msgpack) calling js/server.js's file.save (request stream) "
              "and file.get (response stream) on moleculer.js 0.15: Moleculer's stream packets, "
              "no flow control; nerve's reader holds at most max_stream_buffer (16 MiB) unread, "
              "beyond it the stream fails with StreamOverflowError"),
    Peer("moljs-client-nerve-nats", "moleculer.js client → nerve server, nats/msgpack", "python",
         "nerve_peer.py", ("--transport", "nats", "--serializer", "msgpack"), nats=True,
         client=Side("node", "client.js", ("--transport", "nats", "--serializer", "MsgPack")),
         may_overflow=True,
         note="js/client.js (moleculer.js 0.15, NATS, MsgPack) calling the nerve server's file.save "
              "and file.get: Moleculer's stream packets both ways, no flow control (a slow "
              "moleculer.js reader buffers what nerve sends)"),
    Peer("moleculerpy-nats-json", "MoleculerPy nats/json", "moleculerpy", "moleculerpy_peer.py",
         nats=True, note=f"MoleculerPy {MOLECULERPY_VERSION} (asyncio) NATS transporter, JSON"),
    Peer("bare-await", "bare await + msgspec", "python", "raw_trio.py",
         note="await handler(ctx) plus a msgspec msgpack round trip of the params, in process"),
    Peer("local-copy", "local copy + fsync", "python", "local_copy.py", serverless=True,
         note="one Python process copying the same file to the same directory: 1 MiB os.readv into "
              "one buffer, os.write to a temporary name beside the destination, os.fsync, close, "
              "os.replace (the data steps of cp + sync, and the durability steps of nerve's "
              "transfer_to); not sendfile or copy_file_range, which can skip user space or (reflink) "
              "the data. Both this and nerve read a warm source (in the page cache: dropping it "
              "needs root)"),
]}

# run right after nerve (and its baselines) in rpc_1 and rpc_64
NERVE_VARIANTS = ["nerve+3mw", "nerve+ft", "nerve+metrics", "nerve+tracing", "nerve+otel-nosdk"]
RPC_PEERS = ["raw-trio", "grpc-aio", "pyzmq", "moljs-tcp-json", "moljs-nats-json",
             "moleculerpy-nats-json"]
#: streams over NATS: nerve ↔ nerve, moleculer.js ↔ moleculer.js and the two mixed pairs
NATS_STREAM_PEERS = ["nerve-nats-msgpack", "moljs-nats-msgpack", "nerve-client-moljs-nats",
                     "moljs-client-nerve-nats"]
TRANSFER_PEERS = ["raw-trio", "grpc-aio", "pyzmq", "moljs-tcp-msgpack", *NATS_STREAM_PEERS]
SLOW_PEERS = ["raw-trio", "grpc-aio", "pyzmq", "moljs-tcp-msgpack", *NATS_STREAM_PEERS]
#: nerve on both sides: a failure of theirs is nerve's (exit status 1), like nerve's own
NERVE_PEERS = ("nerve", "nerve-nats-msgpack")
#: (a, b): the report divides a's medians by b's (same transport, same run)
SIDE_BY_SIDE = [("nerve-nats-msgpack", "moljs-nats-msgpack")]
TLS_PEERS = ["grpc-aio"]
FILE_PEERS = ["local-copy"]


def _revisions(values: list[str] | None) -> list[str]:
    revs: list[str] = []
    for v in values or []:
        revs += [r.strip() for r in v.split(",") if r.strip() and r.strip() not in revs]
    return revs


def _short(text: str, n: int) -> str:
    return text if len(text) <= n else text[:n - 1].rstrip() + "…"


def register_baseline(rev: str, core: str) -> Any:
    """Prepare nerve at ``rev`` (see benches/baseline.py) and add it to PEERS as ``nerve@rev``."""
    from benches.baseline import BaselineError, prepare

    try:
        b = prepare(rev, ROOT, core=core, log=lambda text: print(text, flush=True))
    except BaselineError as exc:
        raise SystemExit(f"--baseline {rev}: {exc}") from None
    PEERS[b.peer_id] = Peer(
        b.peer_id, b.peer_id, "python", "nerve_peer.py", pythonpath=str(b.python_path),
        nerve_under=str(b.python_path / "nerve"), probe=True,
        note=f"nerve at {_short(b.subject, 90)} ({b.sha[:12]}): its python/ from {b.tree}, "
             f"{b.core_text()}; run by the current benches/peers/nerve_peer.py")
    return b


@dataclass
class Scenario:
    name: str
    family: str
    title: str
    client: dict[str, dict[str, Any]]  # mode -> client options
    peers: list[str]
    metrics: list[Metric]
    server: bool = True
    full_runs: int | None = None  # default number of runs in full mode (else --runs default)
    tls: bool = False  # server and client get --tls-dir (certificates made at run time)
    base: str | None = None  # the plaintext scenario this one repeats (TLS cost = this / base)

    def opts(self, mode: str) -> dict[str, Any]:
        return dict(self.client[mode])


def _size_label(n: int) -> str:
    if n % MIB:
        return f"{n} bytes"
    return f"{n // GIB} GiB" if n >= GIB and n % GIB == 0 else f"{n // MIB} MiB"


def parse_size(text: str) -> int:
    """A size in bytes, or with a binary suffix: ``256M`` (MiB), ``1G``/``1GiB``, ``64k``."""
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    scale = {"k": 1024, "m": MIB, "g": GIB}.get(t[-1:], 1)
    try:
        n = int(float(t[:-1] if scale > 1 else t) * scale)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (bytes, or 256M, 1G)") from None
    if n <= 0:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (must be > 0)")
    return n


SCENARIOS: list[Scenario] = [
    Scenario("rpc_1", "rpc", "RPC, 1 in flight, one connection",
             {"full": dict(scenario="rpc", inflight=1, duration=3.0, count=1_000_000, warmup=2000),
              "quick": dict(scenario="rpc", inflight=1, duration=0.4, count=20_000, warmup=200)},
             NERVE_VARIANTS + RPC_PEERS, [REQ_S, P50, P99, SRV_CPU_OP, CLI_CPU_OP]),
    Scenario("rpc_64", "rpc", "RPC, 64 in flight, one connection",
             {"full": dict(scenario="rpc", inflight=64, duration=3.0, count=1_000_000, warmup=5000),
              "quick": dict(scenario="rpc", inflight=64, duration=0.4, count=50_000, warmup=500)},
             NERVE_VARIANTS + RPC_PEERS, [REQ_S, P50, P99, SRV_CPU_OP, CLI_CPU_OP]),
    Scenario("rpc_64_timeout", "rpc", "RPC, 64 in flight, one connection, timeout=30 s on every call",
             {"full": dict(scenario="rpc", inflight=64, duration=3.0, count=1_000_000, warmup=5000,
                           timeout=30.0),
              "quick": dict(scenario="rpc", inflight=64, duration=0.4, count=50_000, warmup=500,
                            timeout=30.0)},
             ["raw-trio", "moljs-tcp-json"], [REQ_S, P50, P99, SRV_CPU_OP, CLI_CPU_OP]),
    Scenario("events", "events", "fire-and-forget events (all counted at the receiver)",
             {"full": dict(scenario="events", count=100_000, warmup=1000),
              "quick": dict(scenario="events", count=5_000, warmup=200)},
             RPC_PEERS, [EV_S, LOST, SRV_CPU_OP, CLI_CPU_OP]),
    Scenario("upload", "transfer", "upload (client → server stream)",
             {"full": dict(scenario="upload", size=GIB), "quick": dict(scenario="upload", size=32 * MIB)},
             TRANSFER_PEERS, [MB_S, SRV_CPU_GB, CLI_CPU_GB, SRV_GROWTH, CLI_GROWTH, SRV_PEAK, CLI_PEAK]),
    Scenario("download", "transfer", "download (server → client stream)",
             {"full": dict(scenario="download", size=GIB),
              "quick": dict(scenario="download", size=32 * MIB)},
             TRANSFER_PEERS, [MB_S, SRV_CPU_GB, CLI_CPU_GB, SRV_GROWTH, CLI_GROWTH, SRV_PEAK, CLI_PEAK]),
    # file to file: one file of random bytes made once per harness run (--file-size), moved by
    # nerve with fsync, beside a local copy of it with fsync; sizes here are the defaults
    Scenario("file_upload", "file", "file upload: PacketStream.from_file → transfer_to (fsync)",
             {"full": dict(scenario="file_upload", size=256 * MIB),
              "quick": dict(scenario="file_upload", size=8 * MIB)},
             FILE_PEERS, [MB_S, CPU_GB, SRV_CPU_GB, CLI_CPU_GB, SRV_PEAK, CLI_PEAK]),
    Scenario("file_download", "file", "file download: from_file returned by the handler → transfer_to (fsync)",
             {"full": dict(scenario="file_download", size=256 * MIB),
              "quick": dict(scenario="file_download", size=8 * MIB)},
             FILE_PEERS, [MB_S, CPU_GB, SRV_CPU_GB, CLI_CPU_GB, SRV_PEAK, CLI_PEAK]),
    # nerve only (and its --baseline builds): the latency of calls sharing the connection
    Scenario("rpc_under_transfer", "mixed", "RPC, 64 in flight, during an upload on the same connection",
             {"full": dict(scenario="rpc_under_transfer", inflight=64, duration=3.0, warmup=5000, size=GIB),
              "quick": dict(scenario="rpc_under_transfer", inflight=64, duration=0.4, warmup=500,
                            size=32 * MIB)},
             [], [UT_P99, UT_P50, UT_P999, UT_REQ_S, UT_MB_S, IDLE_P50, IDLE_P99, IDLE_REQ_S, P99_RISE]),
    # TLS: the same clients over TLS (server authentication, not mutual; a throwaway CA made
    # with trustme at run time). Quick mode keeps RPC to 0.3 s and transfers to 16 MiB.
    Scenario("rpc_1_tls", "tls", "RPC over TLS, 1 in flight, one connection",
             {"full": dict(scenario="rpc", inflight=1, duration=3.0, count=1_000_000, warmup=2000),
              "quick": dict(scenario="rpc", inflight=1, duration=0.3, count=20_000, warmup=200)},
             TLS_PEERS, [REQ_S, P50, P99, SRV_CPU_OP, CLI_CPU_OP], tls=True, base="rpc_1"),
    Scenario("rpc_64_tls", "tls", "RPC over TLS, 64 in flight, one connection",
             {"full": dict(scenario="rpc", inflight=64, duration=3.0, count=1_000_000, warmup=5000),
              "quick": dict(scenario="rpc", inflight=64, duration=0.3, count=50_000, warmup=500)},
             TLS_PEERS, [REQ_S, P50, P99, SRV_CPU_OP, CLI_CPU_OP], tls=True, base="rpc_64"),
    Scenario("upload_tls", "tls", "upload over TLS (client → server stream)",
             {"full": dict(scenario="upload", size=GIB), "quick": dict(scenario="upload", size=16 * MIB)},
             TLS_PEERS, [MB_S, SRV_PEAK, CLI_PEAK, SRV_CPU_GB, CLI_CPU_GB], tls=True, base="upload"),
    Scenario("download_tls", "tls", "download over TLS (server → client stream)",
             {"full": dict(scenario="download", size=GIB), "quick": dict(scenario="download", size=16 * MIB)},
             TLS_PEERS, [MB_S, SRV_PEAK, CLI_PEAK, SRV_CPU_GB, CLI_CPU_GB], tls=True, base="download"),
    Scenario("slow_1g", "slow", "slow consumer (reads at 1/4 of the producer's speed), download",
             {"full": dict(scenario="slow", size=GIB), "quick": dict(scenario="slow", size=16 * MIB)},
             SLOW_PEERS, [SRV_GROWTH, CLI_GROWTH, SRV_PEAK, CLI_PEAK, MB_S], full_runs=3),
    Scenario("slow_4g", "slow", "slow consumer (reads at 1/4 of the producer's speed), download",
             {"full": dict(scenario="slow", size=4 * GIB),
              "quick": dict(scenario="slow", size=64 * MIB)},
             SLOW_PEERS, [SRV_GROWTH, CLI_GROWTH, SRV_PEAK, CLI_PEAK, MB_S], full_runs=3),
    Scenario("inproc", "inproc", "in-process call cost (trivial handler)",
             {"full": dict(scenario="inproc", count=300_000, warmup=5000),
              "quick": dict(scenario="inproc", count=20_000, warmup=500)},
             ["bare-await"], [NS_CALL], server=False),
]
SCENARIO_BY_NAME = {s.name: s for s in SCENARIOS}


@dataclass(frozen=True)
class Target:
    scenario: str
    metric: str
    peer: str
    op: str  # ">=", "<=", "within" (|ratio - 1| <= goal) or "cost" (1 - peer / nerve <= goal)
    goal: float
    text: str

    def met(self, ratio: float) -> bool:
        if self.op == "within":
            return abs(ratio - 1.0) <= self.goal
        if self.op == "cost":
            return cost_of(ratio) <= self.goal
        return ratio >= self.goal if self.op == ">=" else ratio <= self.goal

    def goal_text(self) -> str:
        if self.op == "cost":
            return f"costs ≤ {self.goal:.0%} of nerve's"
        return f"within ±{self.goal:.0%}" if self.op == "within" else f"{self.op} {self.goal:g}x"


def cost_of(ratio: float) -> float:
    """What a variant costs, as a fraction of nerve's throughput, from ratio = nerve / variant
    (0.05: the variant does 5% fewer req/s; negative: it was faster in this run)."""
    return 1.0 - 1.0 / ratio


UNDER_TRANSFER = "rpc_under_transfer"
UNDER_TRANSFER_TARGET = "RPC p99 at 64 in flight during a transfer no worse than the baseline's"


def baseline_targets(peer_id: str) -> list[Target]:
    """A baseline build and this one, no middleware: within 5% of each other (issue 10); the
    calls' p99 during a transfer no worse than the baseline's."""
    return [*(Target(sc, "req_per_s", peer_id, "within", 0.05,
                     f"RPC {n} in flight: nerve vs {peer_id} (same harness, no middleware)")
              for sc, n in (("rpc_64", 64), ("rpc_1", 1))),
            Target(UNDER_TRANSFER, "p99_us", peer_id, "<=", 1.0,
                   f"RPC p99 at 64 in flight during a transfer: nerve vs {peer_id} (no worse)")]


TARGETS = [
    Target("rpc_64", "req_per_s", "moljs-tcp-json", ">=", 1.0,
           "RPC 64 in flight: nerve vs moleculer.js TCP (JSON)"),
    Target("rpc_64", "req_per_s", "raw-trio", ">=", 0.6,
           "RPC 64 in flight: nerve vs raw trio+msgspec pipelined echo"),
    Target("rpc_1", "req_per_s", "raw-trio", ">=", 0.8,
           "RPC 1 in flight: nerve vs raw trio echo (reader + writer task)"),
    Target("rpc_64", "req_per_s", "nerve+metrics", "cost", 0.05,
           "RPC 64 in flight: counting (metrics=True on both nodes) against nerve's req/s"),
    Target("inproc", "ns_per_call", "bare-await", "<=", 3.0,
           "in-process broker.call cost vs bare await + msgspec round trip"),
    Target("upload", "mb_per_s", "grpc-aio", ">=", 1.5, "1 GiB upload: nerve vs grpc.aio (1 MiB msgs)"),
    Target("download", "mb_per_s", "grpc-aio", ">=", 1.5, "1 GiB download: nerve vs grpc.aio (1 MiB msgs)"),
    Target("upload", "mb_per_s", "moljs-tcp-msgpack", ">=", 10.0,
           "1 GiB upload: nerve vs moleculer.js streams, TCP + MsgPack"),
    Target("download", "mb_per_s", "moljs-tcp-msgpack", ">=", 10.0,
           "1 GiB download: nerve vs moleculer.js streams, TCP + MsgPack"),
    Target("file_upload", "mb_per_s", "local-copy", ">=", 0.8,
           "file to file, upload (from_file → transfer_to, fsync): nerve vs a local copy with fsync"),
    Target("file_download", "mb_per_s", "local-copy", ">=", 0.8,
           "file to file, download (from_file → transfer_to, fsync): nerve vs a local copy with fsync"),
]


# --- processes ----------------------------------------------------------------------------

class RunFailed(Exception):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of a process (all its threads), from /proc/<pid>/stat."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def proc_status(pid: int) -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    k, v = line.split(":", 1)
                    out[k] = int(v.split()[0])
    except OSError:
        pass
    return out


class Proc:
    """A benchmark process in its own session (so its whole group can be killed), its stdout
    read line by line by a thread, its stderr kept in a temporary file."""

    def __init__(self, cmd: list[str], env: dict[str, str]) -> None:
        self.cmd = cmd
        self.stderr = tempfile.TemporaryFile()
        self.p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=self.stderr, cwd=ROOT, env=env, start_new_session=True)
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.p.stdout is not None
        for raw in self.p.stdout:
            self.lines.put(raw.decode("utf-8", "replace").rstrip("\n"))
        self.lines.put(None)

    @property
    def pid(self) -> int:
        return self.p.pid

    def next_json(self, deadline: float) -> dict[str, Any] | None:
        """The next JSON object line (other lines are ignored), None at EOF; raises on timeout."""
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RunFailed(f"timed out: {' '.join(self.cmd[-12:])}")
            try:
                line = self.lines.get(timeout=min(left, 1.0))
            except queue.Empty:
                continue
            if line is None:
                return None
            line = line.strip()
            if line.startswith("{"):
                try:
                    return json.loads(line)
                except json.JSONDecodeError:
                    continue

    def say(self, text: str) -> None:
        try:
            assert self.p.stdin is not None
            self.p.stdin.write(text.encode())
            self.p.stdin.flush()
        except (BrokenPipeError, OSError):
            pass

    def stderr_tail(self, n: int = 15) -> str:
        try:
            self.stderr.seek(0)
            lines = self.stderr.read().decode("utf-8", "replace").splitlines()
        except (OSError, ValueError):
            return ""
        return "\n".join(lines[-n:])

    def stop(self, grace: float = 5.0) -> None:
        if self.p.poll() is None:
            try:
                os.killpg(self.p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.p.wait(grace)
            except subprocess.TimeoutExpired:
                pass
        # kill whatever is left of the group (the leader and any straggler it started)
        try:
            os.killpg(self.p.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.p.wait(5)
        except subprocess.TimeoutExpired:  # pragma: no cover - unkillable
            pass
        for f in (self.p.stdin, self.p.stdout):
            try:
                if f is not None:
                    f.close()
            except OSError:
                pass


@dataclass
class Env:
    """What this machine has for the peers, and why a peer is skipped."""

    python: str = sys.executable
    node: str | None = None
    moleculerpy_python: str | None = None
    skipped: dict[str, str] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    tls_dir: str | None = None  # certificates for the TLS scenarios (made by make_tls_dir)
    tls_skipped: str = ""  # why the TLS scenarios cannot run
    nerve_files: dict[str, str] = field(default_factory=dict)  # nerve peer -> nerve.__file__ it imports


def make_tls_dir() -> tuple[str | None, str]:
    """A temporary directory with a throwaway CA (``ca.pem``) and two certificates signed by it:
    ``server.crt/.key`` naming node ``bench-server``, 127.0.0.1 and localhost (nerve's client
    checks the node id or the dialled host, grpc the host), ``client.crt/.key`` naming
    ``bench-client``. Returns (directory, "") or (None, why not). The caller removes it."""
    try:
        import trustme
    except ImportError:
        return None, "trustme is not installed (a dev dependency: pip install -e '.[dev]')"
    d = Path(tempfile.mkdtemp(prefix="nerve-bench-tls-"))
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(d / "ca.pem"))
    for side, names in (("server", ("bench-server", "127.0.0.1", "localhost")), ("client", ("bench-client",))):
        cert = ca.issue_cert(*names)
        for i, pem in enumerate(cert.cert_chain_pems):
            pem.write_to_path(str(d / f"{side}.crt"), append=i > 0)
        cert.private_key_pem.write_to_path(str(d / f"{side}.key"))
    return str(d), ""


SOURCE_NAME = "source.bin"


def make_source_file(size: int, parent: str | None = None) -> dict[str, Any]:
    """A temporary directory (under ``parent``, or the system's) with ``source.bin``: ``size``
    random bytes, fsynced, so no writeback of it runs during the measured copies. Returns its
    path, directory, size, SHA-256, file system and how long it took. The caller removes it."""
    import hashlib

    t0 = time.monotonic()
    d = Path(tempfile.mkdtemp(prefix="nerve-bench-file-", dir=parent))
    path = d / SOURCE_NAME
    h = hashlib.sha256()
    try:
        with open(path, "wb") as f:
            left = size
            while left:
                block = os.urandom(min(left, MIB))
                f.write(block)
                h.update(block)
                left -= len(block)
            f.flush()
            os.fsync(f.fileno())
    except OSError:
        shutil.rmtree(d, ignore_errors=True)
        raise
    return {"path": str(path), "dir": str(d), "size": size, "sha256": h.hexdigest(),
            "fs": filesystem_of(d), "make_s": round(time.monotonic() - t0, 2)}


def sweep_file_dir(source: dict[str, Any] | None) -> None:
    """Delete whatever a run left beside the source (a failed run's destination or its
    temporary ``.part`` file): every run starts with only the source there."""
    if not source:
        return
    for f in Path(source["dir"]).iterdir():
        if f.name != SOURCE_NAME:
            try:
                f.unlink()
            except OSError:
                pass


def filesystem_of(path: Path) -> str:
    """"<type> on <device> (<mount point>)" of the mount holding ``path``, from /proc/self/mounts."""
    best: tuple[str, str, str] | None = None
    target = path.resolve()
    try:
        lines = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return "file system unknown"
    for line in lines:
        parts = line.split()
        if len(parts) < 3:
            continue
        dev, mnt, fstype = (x.replace("\\040", " ") for x in parts[:3])
        if target.is_relative_to(mnt) and (best is None or len(mnt) >= len(best[1])):
            best = (dev, mnt, fstype)
    if best is None:
        return "file system unknown"
    return f"{best[2]} on {best[0]} ({best[1]})"


def _cmd_output(cmd: list[str], timeout: float = 20.0) -> str:
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
        return (r.stdout or r.stderr).strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""


def nats_up() -> bool:
    try:
        with socket.create_connection(NATS_URL, timeout=1.0) as s:
            s.settimeout(2.0)
            return s.recv(4) == b"INFO"
    except OSError:
        return False


def find_moleculerpy_python() -> tuple[str | None, str]:
    """(interpreter with moleculerpy importable, reason if none)."""
    candidates = []
    if os.environ.get("NERVE_BENCH_MOLECULERPY_PYTHON"):
        candidates.append(os.environ["NERVE_BENCH_MOLECULERPY_PYTHON"])
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "nerve-bench"
    candidates += sorted(str(p) for p in cache.glob("moleculerpy-py3.*/bin/python"))
    for c in candidates:
        check = "import moleculerpy, sys; print(sys.version_info >= (3, 12))"
        if Path(c).exists() and _cmd_output([c, "-c", check]) == "True":
            return c, ""
    if sys.version_info >= (3, 12) and _cmd_output([sys.executable, "-c", "import moleculerpy; print(1)"]) == "1":
        return sys.executable, ""
    if not find_python312():
        return None, "no Python >= 3.12 on this machine (MoleculerPy needs one)"
    return None, ("MoleculerPy is not installed: benches/run.sh makes its virtualenv "
                  f"({cache}/moleculerpy-py3.X, moleculerpy=={MOLECULERPY_VERSION})")


def find_python312() -> str | None:
    names = ["python3.14", "python3.13", "python3.12"]
    cands = [shutil.which(n) for n in names]
    cands += sorted((str(p) for p in Path("/root/.pyenv/versions").glob("3.1[2-9]*/bin/python3")), reverse=True)
    for c in cands:
        if c and _cmd_output([c, "-c", "import sys; print(sys.version_info >= (3, 12))"]) == "True":
            return c
    return None


def probe_env(selected_peers: set[str]) -> Env:
    env = Env()
    env.versions["python"] = platform.python_version()
    for mod in ("nerve", "trio", "msgspec", "grpc", "zmq", "matplotlib"):
        try:
            m = __import__(mod)
            env.versions[mod] = getattr(m, "__version__", "") or _dist_version(mod)
        except Exception as exc:  # noqa: BLE001 - any import failure makes the peer unusable
            env.versions[mod] = f"missing ({exc.__class__.__name__})"
    if env.versions["grpc"].startswith("missing"):
        env.skipped["grpc-aio"] = "grpcio is not installed (pip install -e '.[bench]')"
    if env.versions["zmq"].startswith("missing"):
        env.skipped["pyzmq"] = "pyzmq is not installed (pip install -e '.[bench]')"
    node = shutil.which("node")
    js_peers = [p for p in PEERS.values() if "node" in p.runtimes]
    if node is None:
        for p in js_peers:
            env.skipped[p.id] = "node is not on PATH"
    elif not (JS_DIR / "node_modules" / "moleculer").is_dir():
        for p in js_peers:
            env.skipped[p.id] = "moleculer.js is not installed (npm ci --prefix benches/peers/js)"
    else:
        env.node = node
        env.versions["node"] = _cmd_output([node, "--version"])
        for pkg in ("moleculer", "nats", "msgpack5"):
            try:
                meta = json.loads((JS_DIR / "node_modules" / pkg / "package.json").read_text())
                env.versions[f"npm:{pkg}"] = meta.get("version", "?")
            except (OSError, ValueError):
                env.versions[f"npm:{pkg}"] = "missing"
    if any(PEERS[p].nats for p in selected_peers):
        if nats_up():
            env.versions["nats-server"] = (_cmd_output(["/usr/sbin/nats-server", "--version"])
                                           .replace("nats-server:", "").strip() or "?")
        else:
            for p in PEERS.values():
                if p.nats:
                    env.skipped.setdefault(p.id, f"NATS is not reachable at 127.0.0.1:4222 (start it: {NATS_START})")
    if "moleculerpy-nats-json" in selected_peers and "moleculerpy-nats-json" not in env.skipped:
        py, reason = find_moleculerpy_python()
        if py is None:
            env.skipped["moleculerpy-nats-json"] = reason
        else:
            env.moleculerpy_python = py
            env.versions["moleculerpy"] = _cmd_output([py, "-c", "import moleculerpy; print(moleculerpy.__version__)"])
            env.versions["moleculerpy-python"] = _cmd_output(
                [py, "-c", "import platform; print(platform.python_version())"])
    for pid in sorted(selected_peers):
        peer = PEERS[pid]
        if peer.probe and pid not in env.skipped:
            nerve_file, why = probe_nerve_peer(peer, env)
            if nerve_file:
                env.nerve_files[pid] = nerve_file
            if why:
                env.skipped[pid] = why
    return env


def peer_env(peer: Peer) -> dict[str, str]:
    """The environment of a peer's processes: ours, unbuffered, and a baseline's tree first on
    PYTHONPATH (so ``import nerve`` finds that revision before the installed one)."""
    env = dict(os.environ)
    env.pop("NERVE_BENCH_NO_SYNC", None)
    env["PYTHONUNBUFFERED"] = "1"
    if peer.pythonpath:
        env["PYTHONPATH"] = os.pathsep.join(x for x in (peer.pythonpath, env.get("PYTHONPATH")) if x)
    return env


def nerve_file_ok(peer: Peer, nerve_file: str | None) -> bool:
    """Did a nerve peer import nerve from where it should (a baseline: from its own tree)?"""
    if not peer.nerve_under:
        return True
    if not nerve_file:
        return False
    return Path(nerve_file).resolve().is_relative_to(Path(peer.nerve_under).resolve())


def probe_nerve_peer(peer: Peer, env: Env) -> tuple[str | None, str]:
    """Ask nerve_peer.py (``--probe``) whether the nerve this peer imports can run it:
    (nerve.__file__, why it is skipped or ""). Only a clean answer skips a peer: one that lacks
    the middleware API, or a baseline that did not import its own tree."""
    cmd = command(peer, env, "server", ["--probe"])
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=ROOT, env=peer_env(peer))
    except (OSError, subprocess.TimeoutExpired):
        return None, ""
    msg: dict[str, Any] = {}
    for line in r.stdout.splitlines():
        if line.startswith("{"):
            try:
                msg = json.loads(line)
            except ValueError:
                continue
    if not msg.get("probe"):
        # a crash is not a reason to skip: its runs will fail and the report shows why
        return None, ""
    nerve_file = msg.get("nerve")
    if not nerve_file_ok(peer, nerve_file):
        return nerve_file, f"imports nerve from {nerve_file}, not from {peer.nerve_under}"
    return nerve_file, msg.get("skipped", "")


def _dist_version(mod: str) -> str:
    try:
        from importlib.metadata import version

        return version({"grpc": "grpcio", "zmq": "pyzmq"}.get(mod, mod))
    except Exception:  # noqa: BLE001
        return "?"


def command(peer: Peer, env: Env, mode: str, extra: list[str]) -> list[str]:
    side = peer.side(mode)
    if side.runtime == "node":
        assert env.node is not None
        script = JS_DIR / ("server.js" if mode == "server" else "client.js")
        return [env.node, str(script), mode, *side.args, *extra]
    python = env.moleculerpy_python if side.runtime == "moleculerpy" else env.python
    assert python is not None
    return [python, str(PEERS_DIR / side.script), mode, *side.args, *extra]


def client_deadline(opts: dict[str, Any]) -> float:
    sc = opts["scenario"]
    if sc == "rpc":
        return opts["duration"] + 90.0
    if sc == "events":
        return 60.0 + opts["count"] / 2000.0
    if sc == "inproc":
        return 60.0 + opts["count"] / 20000.0
    if sc == "slow":
        return 90.0 + 2.5 * opts["size"] / max(opts["rate"], 1.0)
    if sc == UNDER_TRANSFER:
        return 90.0 + opts["duration"] + opts["size"] / (4 * 1e6)  # the upload: at least 4 MB/s
    return 90.0 + opts["size"] / (8 * 1e6)  # transfers (and file to file): at least 8 MB/s


def run_once(peer: Peer, scenario: Scenario, opts: dict[str, Any], env: Env) -> dict[str, Any]:
    """One server + one client; returns the client's result with RSS figures added."""
    opts = dict(opts)
    if opts["scenario"] in ("upload", "download", "slow", UNDER_TRANSFER):
        opts.setdefault("chunk", peer.chunk)
    deadline = client_deadline(opts)
    opts["deadline"] = round(deadline, 1)
    proc_env = peer_env(peer)
    namespace = f"nervebench-{os.getpid()}-{time.monotonic_ns() % 10**9}"
    server: Proc | None = None
    client: Proc | None = None
    out: dict[str, Any] = {}
    try:
        port = free_port()
        common = ["--port", str(port)]
        if peer.nats or peer.runtimes & {"node", "moleculerpy"}:
            common += ["--namespace", namespace]
        if scenario.tls:
            assert env.tls_dir is not None
            common += ["--tls-dir", env.tls_dir]
        if scenario.server and not peer.serverless:
            srv_opts = ["--deadline", str(round(deadline + 60))]
            server = Proc(command(peer, env, "server", common + srv_opts), proc_env)
            msg = server.next_json(time.monotonic() + 60)
            if not msg or not msg.get("ready"):
                raise RunFailed("the server did not start:\n" + server.stderr_tail())
            if "nerve" in msg:
                out["server_nerve"] = msg["nerve"]
        args = list(common)
        for k, v in opts.items():
            args += [f"--{k}", str(int(v) if isinstance(v, float) and v.is_integer() and k != "duration" else v)]
        client = Proc(command(peer, env, "client", args), proc_env)
        hard = time.monotonic() + deadline + 30
        marks: dict[str, float | None] = {}
        result: dict[str, Any] | None = None
        while True:
            msg = client.next_json(hard)
            if msg is None:
                break
            if "mark" in msg:
                if server is not None:
                    marks[msg["mark"]] = proc_cpu_s(server.pid)
            elif msg.get("idle"):
                if server is not None:
                    st = proc_status(server.pid)
                    out["server_rss_idle_kb"] = st.get("VmRSS", 0)
                client.say("go\n")
            else:
                result = msg
        try:
            rc = client.p.wait(max(1.0, hard - time.monotonic()))
        except subprocess.TimeoutExpired:
            raise RunFailed("the client did not exit in time") from None
        if rc != 0 or result is None:
            raise RunFailed(f"the client failed (exit {rc}):\n" + client.stderr_tail())
        out.update(result)
        if out.get("stream_error") and not peer.may_overflow:
            raise RunFailed(f"the stream failed: {out['stream_error']}")
        if "nerve" in out:
            out["client_nerve"] = out.pop("nerve")
        for side in ("server", "client") if server is not None else ("client",):
            if peer.nerve_under and not nerve_file_ok(peer, out.get(f"{side}_nerve")):
                raise RunFailed(f"the {side} imported nerve from {out[f'{side}_nerve']}, "
                                f"not from {peer.nerve_under}")
        if server is not None:
            if server.p.poll() is not None:
                raise RunFailed("the server exited during the run:\n" + server.stderr_tail())
            st = proc_status(server.pid)
            out["server_rss_peak_kb"] = st.get("VmHWM", 0)
            if marks.get("start") is not None and marks.get("end") is not None:
                out["server_cpu_s"] = marks["end"] - marks["start"]  # type: ignore[operator]
    except RunFailed as exc:
        tail = server.stderr_tail() if server is not None else ""
        if tail and "--- server stderr ---" not in str(exc) and not str(exc).startswith("the server"):
            exc = RunFailed(f"{exc}\n--- server stderr ---\n{tail}")
        raise exc from None
    finally:
        for p in (client, server):
            if p is not None:
                p.stop()
    _derive(out)
    if scenario.family == "file":
        # CPU of every process per GB: nerve's client + server beside the local copy's one process
        cpu = [out.get(f"{side}_cpu_s") for side in ("server", "client") if server is not None or side == "client"]
        if out.get("bytes") and all(c is not None for c in cpu):
            out["cpu_s_per_gb"] = round(sum(cpu) / (out["bytes"] / 1e9), 4)  # type: ignore[arg-type]
    return out


def _derive(out: dict[str, Any]) -> None:
    ops = out.get("calls") or out.get("received")
    gb = out.get("bytes", 0) / 1e9
    for side in ("server", "client"):
        cpu = out.get(f"{side}_cpu_s")
        if cpu is None:
            continue
        if ops and "bytes" not in out:
            out[f"{side}_cpu_us_per_op"] = round(cpu / ops * 1e6, 3)
        if gb:
            out[f"{side}_cpu_s_per_gb"] = round(cpu / gb, 4)
    for side in ("server", "client"):
        peak = out.get(f"{side}_rss_peak_kb")
        idle = out.get(f"{side}_rss_idle_kb")
        if peak:
            out[f"{side}_rss_peak_mib"] = round(peak / 1024, 2)
        if peak and idle:
            out[f"{side}_rss_idle_mib"] = round(idle / 1024, 2)
            out[f"{side}_rss_growth_mib"] = round((peak - idle) / 1024, 2)


# --- the run ------------------------------------------------------------------------------

def fmt(v: float | None) -> str:
    if v is None:
        return "—"
    a = abs(v)
    if a >= 1e6:
        return f"{v / 1e6:.3g}M"
    if a >= 1e4:
        return f"{v / 1e3:.3g}k"
    if a >= 99.5:
        return f"{v:.0f}"
    if a >= 9.995:
        return f"{v:.1f}"
    return f"{v:.2f}"


def summarize(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


class Harness:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.mode = "quick" if args.quick else "full"
        self.scenarios = select_scenarios(args.only)
        wanted = {"nerve"} | {p for s in self.scenarios for p in s.peers}
        if args.peers:
            keep = {p.strip() for p in args.peers.split(",") if p.strip() not in ("", "none")} | {"nerve"}
            unknown = keep - set(PEERS)
            if unknown:
                raise SystemExit(f"unknown peers: {', '.join(sorted(unknown))}; known: {', '.join(PEERS)}")
            wanted &= keep
        self.baselines = [register_baseline(rev, args.baseline_core) for rev in _revisions(args.baseline)]
        wanted |= {b.peer_id for b in self.baselines}
        self.wanted = wanted
        self.env = probe_env(wanted)
        if any(s.tls for s in self.scenarios):
            self.env.tls_dir, self.env.tls_skipped = make_tls_dir()
        self.results: dict[str, dict[str, Any]] = {}
        self.nerve_failed: list[str] = []
        self.started = dt.datetime.now().astimezone()
        self.load_start = _loadavg()
        self.slow_rates: dict[str, float] = {}
        self.file: dict[str, Any] | None = None  # the file scenarios' source (make_source_file)
        self.file_skipped = ""  # why it could not be made

    def log(self, text: str) -> None:
        print(text, flush=True)

    def runs_for(self, sc: Scenario) -> int:
        if self.args.runs:
            return self.args.runs
        if self.mode == "quick":
            return 1
        return sc.full_runs or 5

    def peers_for(self, sc: Scenario) -> list[str]:
        """nerve, the baseline builds (every scenario), then the scenario's peers, in this order
        in every round."""
        out = ["nerve", *(b.peer_id for b in self.baselines)]
        for p in sc.peers:
            if p in self.wanted:
                out.append(p)
        return out

    def run(self) -> int:
        for b in self.baselines:
            self.log(f"baseline {b.peer_id}: {b.subject}; nerve from {self.env.nerve_files.get(b.peer_id, '?')}; "
                     f"{b.core_text()}")
        self.log(f"nerve benchmarks, {self.mode} mode, on {socket.gethostname()} "
                 f"({os.cpu_count()} cores); peers skipped: "
                 + (", ".join(f"{k} ({v})" for k, v in self.env.skipped.items() if k in self.wanted) or "none"))
        try:
            for sc in self.scenarios:
                self.run_scenario(sc)
        finally:
            if self.env.tls_dir:
                shutil.rmtree(self.env.tls_dir, ignore_errors=True)
            if self.file:
                shutil.rmtree(self.file["dir"], ignore_errors=True)
        self.finished = dt.datetime.now().astimezone()
        self.write_outputs()
        if self.nerve_failed:
            self.log("\nnerve FAILED in: " + ", ".join(self.nerve_failed))
            return 1
        return 0

    def slow_rate(self, peer: Peer, sc: Scenario) -> float:
        """A quarter of this peer's own download speed (measured in this run, or now)."""
        if peer.id in self.slow_rates:
            return self.slow_rates[peer.id]
        if self.args.slow_rate:
            rate = self.args.slow_rate * 1e6
        else:
            dl = self.results.get("download", {}).get("peers", {}).get(peer.id, {})
            med = (dl.get("summary") or {}).get("mb_per_s", {}).get("median")
            if not med:
                size = 32 * MIB if self.mode == "quick" else 256 * MIB
                calib = SCENARIO_BY_NAME["download"]
                try:
                    r = run_once(peer, calib, dict(scenario="download", size=size), self.env)
                    med = r["mb_per_s"]
                    self.log(f"  [calibration] {peer.label}: download {fmt(med)} MB/s")
                except RunFailed as exc:
                    raise RunFailed(f"calibration download failed: {exc}") from None
            rate = med * 1e6 / 4
        self.slow_rates[peer.id] = rate
        return rate

    def source_file(self, size: int) -> dict[str, Any] | None:
        """The file scenarios' source, made on first use (then shared by file_upload and
        file_download); None when it cannot be made (``file_skipped`` says why)."""
        if self.file is None and not self.file_skipped:
            try:
                self.file = make_source_file(size, self.args.file_dir)
            except OSError as exc:
                self.file_skipped = f"could not make the {_size_label(size)} source file: {exc}"
            else:
                self.log(f"\nsource file: {_size_label(size)} of random bytes, {self.file['path']} "
                         f"({self.file['fs']}), made and fsynced in {self.file['make_s']:.1f} s")
        return self.file

    def run_scenario(self, sc: Scenario) -> None:
        runs = self.runs_for(sc)
        base = sc.opts(self.mode)
        if sc.family == "file" and self.args.file_size:
            base["size"] = self.args.file_size
        entry: dict[str, Any] = {"family": sc.family, "title": sc.title, "options": base,
                                 "metrics": [m.__dict__ for m in sc.metrics], "peers": {}}
        if "size" in base:
            entry["title"] = f"{sc.title}, {_size_label(base['size'])}"
        if sc.tls:
            entry["tls"] = True
            entry["base"] = sc.base
        self.results[sc.name] = entry
        skipped = ""
        if sc.tls and not self.env.tls_dir:
            skipped = self.env.tls_skipped
        if sc.family == "file":
            source = self.source_file(base["size"])
            if source is None:
                skipped = self.file_skipped
            else:
                entry["file"] = {k: v for k, v in source.items() if k != "dir"}
        if skipped:
            entry["skipped"] = skipped
            for p in self.peers_for(sc):
                entry["peers"][p] = {"status": "skipped", "reason": skipped, "runs": []}
            self.log(f"\n== {sc.name}: skipped: {skipped}")
            return
        peers = [p for p in self.peers_for(sc) if p not in self.env.skipped]
        for p in self.peers_for(sc):
            if p in self.env.skipped:
                entry["peers"][p] = {"status": "skipped", "reason": self.env.skipped[p], "runs": []}
            else:
                entry["peers"][p] = {"status": "ok", "runs": [], "failures": []}
        failures: dict[str, int] = {p: 0 for p in peers}
        max_failures = 1 if self.mode == "quick" else 2
        self.log(f"\n== {sc.name}: {entry['title']} — {runs} run(s) of {', '.join(peers)}")
        builds = [p for p in peers if p == "nerve" or p.startswith("nerve@")]
        for r in range(runs):
            order = peers
            if r % 2 and len(builds) > 1:
                # nerve and its baseline revisions swap places every other round: neither always
                # runs first (or right after another server's teardown)
                order = builds[::-1] + [p for p in peers if p not in builds]
            for pid in order:
                if failures[pid] >= max_failures:
                    continue
                peer = PEERS[pid]
                opts = dict(base)
                if sc.family == "file":
                    assert self.file is not None
                    sweep_file_dir(self.file)  # only the source there (a failed run may leave a file)
                    opts.update(file=self.file["path"], dir=self.file["dir"], sha256=self.file["sha256"])
                rec = entry["peers"][pid]
                t0 = time.monotonic()
                try:
                    if sc.family == "slow":
                        opts["rate"] = round(self.slow_rate(peer, sc))
                        rec["rate_mb_per_s"] = opts["rate"] / 1e6
                    res = run_once(peer, sc, opts, self.env)
                    if sc.family == "events" and res.get("lost"):
                        raise RunFailed(f"{res['lost']} of {res['sent']} events lost")
                except RunFailed as exc:
                    failures[pid] += 1
                    rec["failures"].append({"run": r + 1, "error": str(exc)[-3000:]})
                    self.log(f"  [{r + 1}/{runs}] {PEERS[pid].label:<26} FAILED ({time.monotonic() - t0:.1f}s): "
                             + _gist(str(exc)))
                    if pid in NERVE_PEERS and sc.name not in self.nerve_failed:
                        self.nerve_failed.append(sc.name)
                    continue
                rec["runs"].append(res)
                m0 = sc.metrics[0]
                what = (f"stream failed: {res['stream_error'].split(':', 1)[0]} (outcome recorded)"
                        if res.get("stream_error") else f"{fmt(res.get(m0.key)):>8} {m0.unit}")
                self.log(f"  [{r + 1}/{runs}] {PEERS[pid].label:<26} {what}  ({time.monotonic() - t0:.1f}s)")
        for pid in peers:
            rec = entry["peers"][pid]
            rec["summary"] = {}
            for m in sc.metrics:
                s = summarize([x[m.key] for x in rec["runs"] if isinstance(x.get(m.key), (int, float))])
                if s:
                    rec["summary"][m.key] = s
            if not rec["runs"]:
                rec["status"] = "failed"
            if pid in NERVE_PEERS and not rec["runs"] and sc.name not in self.nerve_failed:
                self.nerve_failed.append(sc.name)
        nerve = entry["peers"].get("nerve", {}).get("summary", {})
        for pid in peers:
            if pid == "nerve":
                continue
            rec = entry["peers"][pid]
            rec["ratio"] = {}
            for m in sc.metrics:
                a = nerve.get(m.key, {}).get("median")
                b = rec["summary"].get(m.key, {}).get("median")
                if a is not None and b:
                    rec["ratio"][m.key] = a / b

    # --- outputs ------------------------------------------------------------------------

    def targets(self) -> list[dict[str, Any]]:
        out = []
        for t in TARGETS + [t for b in self.baselines for t in baseline_targets(b.peer_id)]:
            sc = self.results.get(t.scenario)
            if sc is None:
                continue
            rec = sc["peers"].get(t.peer, {})
            ratio = rec.get("ratio", {}).get(t.metric)
            met = None if ratio is None else t.met(ratio)
            out.append({"target": t.text, "scenario": t.scenario, "metric": t.metric, "peer": t.peer,
                        "ratio": ratio, "goal": t.goal_text(), "met": met,
                        **({"cost": cost_of(ratio)} if t.op == "cost" and ratio else {}),
                        "why_missing": None if ratio is not None else rec.get("reason") or "not measured"})
        sc = self.results.get(UNDER_TRANSFER)
        if sc is not None and not self.baselines:
            # the figure only: "no worse than the baseline's" needs a baseline in the same run
            med = {k: ((sc["peers"].get("nerve", {}).get("summary") or {}).get(k) or {}).get("median")
                   for k in ("p99_us", "idle_p99_us", "p99_rise")}
            value = None
            if med["p99_us"] is not None:
                value = f"p99 {fmt(med['p99_us'])} µs"
                if med["idle_p99_us"] and med["p99_rise"]:
                    value += (f" ({fmt(med['idle_p99_us'])} µs with no transfer; during ÷ without, "
                              f"per run: {med['p99_rise']:.2f}×)")
            out.append({"target": UNDER_TRANSFER_TARGET, "scenario": UNDER_TRANSFER, "metric": "p99_us",
                        "peer": None, "ratio": None, "value_text": value or "—", "goal": "<= 1x nerve@REV's",
                        "met": None, "why_missing": "needs --baseline REV; the figure only"})
        for name in ("slow_1g", "slow_4g"):
            sc = self.results.get(name)
            if sc is None:
                continue
            for pid in NERVE_PEERS:
                if pid not in sc["peers"]:
                    continue
                runs = sc["peers"][pid].get("runs", [])
                window = max((r.get("window", 0) for r in runs), default=0) or 4 * MIB
                budget = (window + SLOW_BUDGET_EXTRA) / MIB
                who = "nerve" if pid == "nerve" else PEERS[pid].label
                for side in ("server", "client"):
                    worst = max((r.get(f"{side}_rss_growth_mib", 0) for r in runs), default=None)
                    out.append({"target": f"{sc['title']}: {who} {side} peak RSS ≤ idle + window + 16 MiB",
                                "scenario": name, "metric": f"{side}_rss_growth_mib",
                                "peer": None if pid == "nerve" else pid,
                                "value_mib": worst, "budget_mib": budget,
                                "goal": f"<= {budget:g} MiB (worst run)",
                                "met": None if worst is None else worst <= budget})
        return out

    def machine(self) -> dict[str, Any]:
        cpu = "?"
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
        mem = "?"
        try:
            for line in Path("/proc/meminfo").read_text().splitlines():
                if line.startswith("MemTotal"):
                    mem = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
        except OSError:
            pass
        commit = _cmd_output(["git", "rev-parse", "--short=12", "HEAD"])
        dirty = bool(_cmd_output(["git", "status", "--porcelain", "--", "python", "rust"]))
        return {"host": socket.gethostname(), "cpu": cpu, "cores": os.cpu_count(), "memory": mem,
                "kernel": platform.release(), "os": _os_name(),
                "git_commit": commit + ("+dirty" if dirty else ""),
                **_nerve_origin(),
                "loadavg_start": self.load_start, "loadavg_end": _loadavg()}

    def write_outputs(self) -> None:
        args = self.args
        stamp = self.started.strftime("%Y-%m-%d")
        host = socket.gethostname().split(".")[0]
        if args.out:
            out_dir = Path(args.out)
        elif self.mode == "quick":
            out_dir = RESULTS / "tmp"
        else:
            out_dir = RESULTS
        out_dir.mkdir(parents=True, exist_ok=True)
        stem = f"{stamp}-{host}" + ("-quick" if self.mode == "quick" else "")
        if self.mode == "full" and not args.out:
            # a second full run the same day keeps the first one's files (they are committed)
            base, n = stem, 1
            while (out_dir / f"{stem}.json").exists():
                n += 1
                stem = f"{base}-{n}"
        doc = {
            "schema": 1,
            "mode": self.mode,
            "command": " ".join(["python -m benches", *sys.argv[1:]]),
            "started": self.started.isoformat(timespec="seconds"),
            "finished": self.finished.isoformat(timespec="seconds"),
            "duration_s": round((self.finished - self.started).total_seconds(), 1),
            "machine": self.machine(),
            "versions": self.env.versions,
            "method": ("fresh server + client processes per run on 127.0.0.1; rounds of nerve then "
                       "each peer; median and min-max over runs; ratio = nerve / peer"),
            "peers": {p.id: {"label": p.label, "note": p.note,
                             **({"nerve_file": self.env.nerve_files[p.id]} if p.id in self.env.nerve_files else {}),
                             **({"skipped": self.env.skipped[p.id]} if p.id in self.env.skipped else {})}
                      for p in PEERS.values() if p.id in self.wanted},
            "baselines": {b.peer_id: {"rev": b.rev, "commit": b.sha, "subject": b.subject, "tree": str(b.tree),
                                      "core": b.core, "core_file": b.core_file, "core_text": b.core_text(),
                                      "rust_differs_from_work_tree": b.rust_differs}
                          for b in self.baselines},
            "scenarios": self.results,
            "targets": self.targets(),
            "nerve_failed": self.nerve_failed,
        }
        json_path = out_dir / f"{stem}.json"
        json_path.write_text(json.dumps(doc, indent=1, default=str) + "\n")
        charts = write_charts(doc, out_dir, stem)
        md_path = out_dir / f"{stem}.md"
        md_path.write_text(markdown(doc, charts, md_path.parent))
        self.log(f"\nwrote {json_path.relative_to(ROOT) if json_path.is_relative_to(ROOT) else json_path}, "
                 f"{md_path.name}, {len(charts)} chart(s) in {out_dir}")
        self.log("\n" + markdown(doc, charts, md_path.parent, title=False))


def _nerve_origin() -> dict[str, str]:
    """Where the nerve under test (and its variants) is imported from, when that is not this
    work tree's python/ (PYTHONPATH set to a snapshot, say, while python/ is being edited): the
    work tree's commit and state then say nothing about it."""
    try:
        import nerve
    except ImportError:
        return {}
    here = Path(nerve.__file__).resolve().parent
    if here.is_relative_to((ROOT / "python").resolve()):
        return {}
    return {"nerve_imported_from": str(here)}


def _origin_text(m: dict[str, Any]) -> str:
    where = m.get("nerve_imported_from")
    return f" (**but nerve, and its variants, imported from `{where}`**)" if where else ""


def _loadavg() -> list[float] | None:
    """The 1-, 5- and 15-minute load averages: other work on the CPUs skews every figure."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _load_text(m: dict[str, Any]) -> str:
    a, b = m.get("loadavg_start"), m.get("loadavg_end")
    if not a or not b:
        return ""
    busy = " (**other work was running: compare with care**)" if a[0] > 0.5 * (m.get("cores") or 1) else ""
    return f"Load average (1 min) {a[0]:g} before the run{busy}, {b[0]:g} after (with the run's own). "


def _os_name() -> str:
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip('"')
    except OSError:
        pass
    return platform.platform()


def select_scenarios(only: str | None) -> list[Scenario]:
    if not only:
        return list(SCENARIOS)
    picked: list[Scenario] = []
    for item in only.split(","):
        item = item.strip()
        if item in FAMILIES:
            picked += [s for s in SCENARIOS if s.family == item and s not in picked]
        elif item in SCENARIO_BY_NAME:
            if SCENARIO_BY_NAME[item] not in picked:
                picked.append(SCENARIO_BY_NAME[item])
        else:
            raise SystemExit(f"--only: unknown family or scenario {item!r}; families: {', '.join(FAMILIES)}; "
                             f"scenarios: {', '.join(SCENARIO_BY_NAME)}")
    order = {s.name: i for i, s in enumerate(SCENARIOS)}
    return sorted(picked, key=lambda s: order[s.name])


# --- Markdown -------------------------------------------------------------------------------

def _cell(summary: dict[str, Any] | None, ratio: float | None = None, *, with_ratio: bool) -> str:
    if not summary:
        return "—"
    text = f"{fmt(summary['median'])} [{fmt(summary['min'])}–{fmt(summary['max'])}]"
    if with_ratio and ratio is not None:
        text += f" · **{ratio:.2f}×**"
    return text


def markdown(doc: dict[str, Any], charts: dict[str, str], base: Path, *, title: bool = True) -> str:
    m = doc["machine"]
    lines: list[str] = []
    if title:
        lines.append(f"# nerve benchmarks: {doc['started'][:10]} on {m['host']} ({doc['mode']} mode)")
        lines.append("")
    lines.append(f"Machine: {m['host']}, {m['cpu']}, {m['cores']} cores, {m['memory']}, {m['os']}, "
                 f"kernel {m['kernel']}. nerve {m['git_commit']}{_origin_text(m)}. {_load_text(m)}Run {doc['started']} "
                 f"({doc['duration_s']:.0f} s, `{doc['command']}`).")
    v = doc["versions"]
    vers = ", ".join(f"{k} {v[k]}" for k in ("python", "trio", "msgspec", "grpc", "zmq", "node", "npm:moleculer",
                                             "npm:nats", "npm:msgpack5", "moleculerpy", "nats-server") if k in v)
    lines.append(f"Versions: {vers}.")
    lines.append("")
    lines.append("Each cell: median [min–max] over the runs; in a peer's cell, **nerve ÷ peer** for that "
                 "metric (above 1 means nerve is higher: better for throughput, worse for latency, "
                 "cost and memory). Fresh server and client processes per run on 127.0.0.1; rounds "
                 "alternate nerve and every peer.")
    if doc["mode"] == "quick":
        lines.append("")
        lines.append("**Quick mode: tiny counts to keep the harness working; never quote these figures.**")
    lines.append("")
    targets = doc.get("targets") or []
    if targets:
        lines.append("## Targets")
        lines.append("")
        lines.append("| target | measured | goal | met |")
        lines.append("|---|---|---|---|")
        for t in targets:
            if "value_mib" in t:
                val = "—" if t["value_mib"] is None else f"{t['value_mib']:.1f} MiB"
            elif "value_text" in t:
                val = t["value_text"]
            else:
                val = "—" if t["ratio"] is None else f"{t['ratio']:.2f}×"
                if t.get("cost") is not None:
                    val += f" (costs {t['cost']:+.1%})"
            met = {True: "yes", False: "**no**", None: f"n/a ({t.get('why_missing') or 'not measured'})"}[t["met"]]
            lines.append(f"| {t['target']} | {val} | {t['goal']} | {met} |")
        lines.append("")
    scenarios = doc["scenarios"]
    for fam in FAMILIES:
        names = [n for n, s in scenarios.items() if s["family"] == fam]
        if not names:
            continue
        peer_ids: list[str] = []
        for n in names:
            for p in scenarios[n]["peers"]:
                if p != "nerve" and p not in peer_ids:
                    peer_ids.append(p)
        labels = [PEERS[p].label for p in peer_ids]
        lines.append(f"## {FAMILY_TITLES[fam]}")
        lines.append("")
        # (a nerve-only scenario, rpc_under_transfer with no --baseline, has no peer column)
        lines.append("| scenario | metric | nerve |" + "".join(f" {x} |" for x in labels))
        lines.append("|---|---|---|" + "---|" * len(labels))
        for n in names:
            sc = scenarios[n]
            nerve = sc["peers"].get("nerve", {})
            for met in sc["metrics"]:
                row = [f"{n}", f"{met['label']} ({met['unit']})",
                       _cell(nerve.get("summary", {}).get(met["key"]), with_ratio=False)]
                for p in peer_ids:
                    rec = sc["peers"].get(p)
                    if rec is None:
                        row.append("")
                    elif rec.get("status") == "skipped":
                        row.append("skipped")
                    elif rec.get("status") == "failed":
                        row.append("failed")
                    else:
                        cell = _cell(rec.get("summary", {}).get(met["key"]), rec.get("ratio", {}).get(met["key"]),
                                     with_ratio=True)
                        outcome = _stream_outcome(rec) if met["key"] == "mb_per_s" else None
                        row.append(outcome if outcome and cell == "—" else
                                   f"{cell}; {outcome}" if outcome else cell)
                lines.append("| " + " | ".join(row) + " |")
        lines.append("")
        for n in names:
            sc = scenarios[n]
            lines.append(f"- `{n}`: {sc['title']}. " + _options_text(sc))
        if fam == "rpc":
            lines.extend(_build_lines(doc, names))
        if fam == "tls":
            lines.extend(_tls_cost_lines(scenarios, names))
        if fam == "file":
            lines.extend(_file_lines(scenarios, names))
        if fam in ("transfer", "slow"):
            lines.extend(_outcome_lines(doc, names))
            lines.extend(_side_by_side_lines(doc, names))
        if fam in charts:
            rel = os.path.relpath(charts[fam], base)
            lines.append("")
            lines.append(f"![{fam}]({rel})")
        lines.append("")
    problems = []
    for n, sc in scenarios.items():
        for p, rec in sc["peers"].items():
            if rec.get("status") == "skipped":
                continue
            for f in rec.get("failures", []):
                problems.append(f"- `{n}` / {PEERS[p].label}, run {f['run']}: {_gist(f['error'])}")
    skipped = {p: info["skipped"] for p, info in doc["peers"].items() if "skipped" in info}
    if skipped or problems or any(sc.get("skipped") for sc in scenarios.values()):
        lines.append("## Skipped and failed")
        lines.append("")
        for p, why in skipped.items():
            lines.append(f"- {PEERS[p].label}: skipped: {why}")
        for n, sc in scenarios.items():
            if sc.get("skipped"):
                lines.append(f"- `{n}`: skipped: {sc['skipped']}")
        lines.extend(problems)
        lines.append("")
    lines.append("## Peers")
    lines.append("")
    for info in doc["peers"].values():
        lines.append(f"- **{info['label']}**: {info['note']}")
    lines.append("")
    return "\n".join(lines)


def _reader_bound(run: dict[str, Any]) -> tuple[float | None, float]:
    """A run whose stream failed: the reading side's peak − idle RSS (MiB) and what nerve's
    bound allows it (max_stream_buffer + 16 MiB, as the slow-consumer target allows the window)."""
    side = run.get("stream_reader", "client")
    buffer = run.get("max_stream_buffer") or 16 * MIB
    return run.get(f"{side}_rss_growth_mib"), (buffer + SLOW_BUDGET_EXTRA) / MIB


def _stream_outcome(rec: dict[str, Any]) -> str | None:
    """The cell "failed: StreamOverflowError (bound held)" of a peer whose runs ended that way
    (a producer without flow control ahead of a nerve reader), else None."""
    failed = [r for r in rec.get("runs", []) if r.get("stream_error")]
    if not failed:
        return None
    name = failed[0]["stream_error"].split(":", 1)[0]
    held = all(g is not None and g <= b for g, b in map(_reader_bound, failed))
    runs = "" if len(failed) == len(rec["runs"]) else f", {len(failed)} of {len(rec['runs'])} runs"
    return f"failed: {name} (bound {'held' if held else '**not held**'}{runs})"


def _outcome_lines(doc: dict[str, Any], names: list[str]) -> list[str]:
    """What the streams that failed by design (StreamOverflowError) read first and held."""
    out = []
    for n in names:
        sc = doc["scenarios"][n]
        for pid, rec in sc["peers"].items():
            failed = [r for r in rec.get("runs", []) if r.get("stream_error")]
            if not failed:
                continue
            label = doc["peers"].get(pid, {}).get("label", pid)
            side = failed[0].get("stream_reader", "client")
            read = [r["bytes_read"] / MIB for r in failed if r.get("bytes_read") is not None]
            growth = [g for g, _ in map(_reader_bound, failed) if g is not None]
            budget = _reader_bound(failed[0])[1]
            text = (f"- `{n}`, {label}: {len(failed)} of {len(rec['runs'])} runs ended with "
                    f"{failed[0]['stream_error'].split(':', 1)[0]} on the nerve {side} (the producer, "
                    "moleculer.js, has no flow control and got more than max_stream_buffer ahead)")
            if read:
                text += f" after {_span(read, '.0f')} MiB read"
            if growth:
                text += (f"; the nerve {side}'s peak − idle RSS {_span(growth, '.1f')} MiB "
                         f"(bound: max_stream_buffer + 16 MiB = {budget:g} MiB)")
            out.append(text + ". MB/s and CPU per GB are not given for these runs.")
    return ["", *out] if out else []


def _span(values: list[float], spec: str) -> str:
    """Some runs' values as a range ("2–5"), or one value when they agree."""
    lo, hi = format(min(values), spec), format(max(values), spec)
    return lo if lo == hi else f"{lo}–{hi}"


def _side_by_side_lines(doc: dict[str, Any], names: list[str]) -> list[str]:
    """SIDE_BY_SIDE pairs (nerve over NATS ÷ moleculer.js over NATS), from the runs above."""
    rows = []
    for a, b in SIDE_BY_SIDE:
        for n in names:
            sc = doc["scenarios"][n]
            ra, rb = sc["peers"].get(a, {}), sc["peers"].get(b, {})
            for met in sc["metrics"]:
                x = (ra.get("summary") or {}).get(met["key"], {}).get("median")
                y = (rb.get("summary") or {}).get(met["key"], {}).get("median")
                if x is None or y is None:
                    continue
                rows.append(f"| {n} | {met['label']} ({met['unit']}) | {fmt(x)} | {fmt(y)} | "
                            + ("—" if not y else f"{x / y:.2f}×") + " |")
        if rows:
            la, lb = (doc["peers"].get(p, {}).get("label", p) for p in (a, b))
            return ["", f"Same transport, same run (medians): {la} ÷ {lb}.", "",
                    f"| scenario | metric | {la} | {lb} | ÷ |", "|---|---|---|---|---|", *rows]
    return []


def _gist(error: str) -> str:
    """The first line of a failure and, if different, its last (the exception, usually)."""
    lines = [ln.strip() for ln in error.strip().splitlines() if ln.strip() and not ln.startswith("---")]
    if not lines:
        return "failed"
    text = lines[0] if len(lines) == 1 else f"{lines[0]} … {lines[-1]}"
    return text[:400].replace("|", "\\|")


FAMILY_TITLES = {
    "rpc": "RPC over loopback TCP",
    "events": "Fire-and-forget events",
    "transfer": "Streams: upload and download",
    "tls": "TLS: RPC and streams over TLS",
    "slow": "Slow consumer: memory",
    "inproc": "In-process call cost",
    "file": "File to file, against a local copy with fsync",
    "mixed": "RPC latency under a concurrent transfer",
}


BUILD_REFERENCES = ("raw-trio", "moljs-tcp-json")  # each nerve build's req/s is divided by these


def _is_nerve_build(pid: str) -> bool:
    """nerve itself, a baseline revision (nerve@REV) or a middleware variant (nerve+...)."""
    return pid == "nerve" or pid.startswith(("nerve@", "nerve+"))


def _build_lines(doc: dict[str, Any], names: list[str]) -> list[str]:
    """nerve, its baseline revisions and its middleware variants side by side: each one's
    req/s against nerve (%), raw trio and moleculer.js (÷), and its CPU per call (client +
    server) against nerve's, from the same runs as the tables above."""
    scenarios = doc["scenarios"]
    rows: list[str] = []
    refs = [r for r in BUILD_REFERENCES if any(r in scenarios[n]["peers"] for n in names)]

    def med(rec: dict[str, Any], key: str) -> float | None:
        return (rec.get("summary") or {}).get(key, {}).get("median")

    def cpu(rec: dict[str, Any]) -> float | None:
        a, b = med(rec, "client_cpu_us_per_op"), med(rec, "server_cpu_us_per_op")
        return None if a is None or b is None else a + b

    for n in names:
        sc = scenarios[n]
        builds = [p for p in sc["peers"] if _is_nerve_build(p)]
        if len(builds) < 2:
            continue
        nerve = sc["peers"].get("nerve", {})
        n_rps, n_cpu = med(nerve, "req_per_s"), cpu(nerve)
        for p in builds:
            rec = sc["peers"][p]
            label = doc["peers"].get(p, {}).get("label", p)
            if rec.get("status") in ("skipped", "failed"):
                why = (rec.get("reason") or doc["peers"].get(p, {}).get("skipped")
                       or "; ".join(f["error"] for f in rec.get("failures", [])[:1]) or rec["status"])
                rows.append(f"| {n} | {label} | {rec['status']}: {_short(_gist(why), 160)} |"
                            + " |" * (5 + len(refs)))
                continue
            rps, c = med(rec, "req_per_s"), cpu(rec)
            cells = [n, label, fmt(rps),
                     "—" if p == "nerve" or rps is None or not n_rps else f"{(rps / n_rps - 1) * 100:+.1f}%"]
            for r in refs:
                b = med(sc["peers"].get(r, {}), "req_per_s")
                cells.append("—" if rps is None or not b else f"{rps / b:.2f}×")
            cells += [fmt(med(rec, "p50_us")), fmt(med(rec, "p99_us")), fmt(c),
                      "—" if p == "nerve" or c is None or n_cpu is None else f"{c - n_cpu:+.2f}"]
            rows.append("| " + " | ".join(cells) + " |")
    if not rows:
        return []
    notes = _variant_notes(doc, names)
    ref_labels = [doc["peers"].get(r, {}).get("label", r) for r in refs]
    warn = [f"**{p}: {b['core_text']}.**" for p, b in (doc.get("baselines") or {}).items()
            if b.get("core") == "current" and b.get("rust_differs_from_work_tree")]
    return [*([""] + warn if warn else []), "", "nerve builds and middleware variants, from the runs above (medians): req/s against "
            "nerve's, each build's req/s ÷ the reference peers' (as nerve's ratio in the table), and "
            "CPU per call of client + server.", "",
            "| scenario | build | req/s | vs nerve | " + "".join(f"÷ {x} | " for x in ref_labels)
            + "p50 (µs) | p99 (µs) | CPU/call (µs) | Δ CPU/call vs nerve (µs) |",
            "|---|---|---|---|" + "---|" * len(refs) + "---|---|---|---|", *rows, *notes]


def _variant_notes(doc: dict[str, Any], names: list[str]) -> list[str]:
    """What the metrics and tracing variants' runs reported after their measured part (each
    run checks that every call was counted, or traced): the spans the SDK dropped, if any
    (then the tracing figure understates its cost), else that none was."""
    out = []
    for n in names:
        for pid, rec in doc["scenarios"][n]["peers"].items():
            reports = [r["variant"] for r in rec.get("runs", []) if r.get("variant")]
            if not reports:
                continue
            label = doc["peers"].get(pid, {}).get("label", pid)
            if any("spans" in rep.get("server", {}) for rep in reports):
                made = sum(rep[side].get("spans_expected", 0) for rep in reports for side in ("server", "client"))
                dropped = sum(rep[side].get("spans_dropped", 0) for rep in reports for side in ("server", "client"))
                out.append(f"- `{n}`, {label}: {made} spans expected over the runs (client + server), "
                           + (f"**{dropped} dropped by the SDK** (queue full: the figure understates "
                              "the cost of tracing)" if dropped else "none dropped") + ".")
            elif any("exposition_bytes" in rep.get("server", {}) for rep in reports):
                size = max(rep["server"]["exposition_bytes"] for rep in reports)
                out.append(f"- `{n}`, {label}: every call counted on both nodes; the server's "
                           f"exposition after the run: {size} bytes.")
    return ["", *out] if out else []


def _tls_cost_lines(scenarios: dict[str, Any], names: list[str]) -> list[str]:
    """Each peer's TLS figure ÷ its own plaintext figure (same run), where both were measured."""
    rows = []
    for n in names:
        sc = scenarios[n]
        plain = scenarios.get(sc.get("base") or "")
        if plain is None:
            continue
        for met in sc["metrics"]:
            cells = []
            for p in sc["peers"]:
                a = sc["peers"][p].get("summary", {}).get(met["key"], {}).get("median")
                b = plain["peers"].get(p, {}).get("summary", {}).get(met["key"], {}).get("median")
                cells.append((p, None if a is None or not b else a / b))
            if any(r is not None for _, r in cells):
                rows.append((n, sc["base"], met, cells))
    if not rows:
        return []
    peers = list(dict.fromkeys(p for *_, cells in rows for p, _ in cells))
    out = ["", "TLS cost: each peer's median over TLS ÷ its own plaintext median in this run "
           "(below 1 for throughput, above 1 for latency and CPU, means TLS costs that much).", "",
           "| scenario | metric | " + " | ".join(PEERS[p].label for p in peers) + " |",
           "|---|---|" + "---|" * len(peers)]
    for n, base, met, cells in rows:
        got = dict(cells)
        out.append(f"| {n} ÷ {base} | {met['label']} | "
                   + " | ".join("—" if got.get(p) is None else f"{got[p]:.2f}×" for p in peers) + " |")
    return out


def _file_lines(scenarios: dict[str, Any], names: list[str]) -> list[str]:
    """What the file scenarios moved, where, and what that means for the figures."""
    info = next((scenarios[n]["file"] for n in names if scenarios[n].get("file")), None)
    if info is None:
        return []
    text = (f"The source: {_size_label(info['size'])} of random bytes (`os.urandom`), made and fsynced once "
            f"before the first run in `{info['path']}` ({info['fs']}), then read by every run of nerve and "
            "of the local copy **warm, from the page cache** (dropping it needs root): neither figure "
            "includes reading a disk; both include writing the copy and its fsync. Every destination "
            "was checked after its run, outside the timed part (size and SHA-256 against the "
            "source's), and deleted.")
    if info["fs"].startswith(("tmpfs", "ramfs")):
        text += " **The directory is in memory (tmpfs): fsync writes nothing to a disk here.**"
    return ["", text]


def _options_text(sc: dict[str, Any]) -> str:
    text = _plain_options_text(sc)
    if sc.get("tls"):
        text += (" Over TLS (server authentication; TLS 1.2+; a throwaway CA and certificates made with "
                 f"trustme at run time); the plaintext figures are `{sc.get('base')}`.")
    return text


def _plain_options_text(sc: dict[str, Any]) -> str:
    o = sc["options"]
    if o["scenario"] == "rpc":
        timeout = (f" Every call has timeout={o['timeout']:g} s: nerve's option (its budget travels "
                   "to the callee, whose handler runs under it), moleculer.js's option, and for "
                   "the raw echo a trio.fail_after around each call.") if o.get("timeout") else ""
        return (f"{o['inflight']} in flight, {o['duration']:g} s per run after {o['warmup']} warm-up "
                f"calls.{timeout}")
    if o["scenario"] == "events":
        return f"{o['count']} events per run, throughput until the receiver has counted them all."
    if o["scenario"] in ("upload", "download"):
        return f"{_size_label(o['size'])} per run, data from memory, counted and dropped by the reader."
    if o["scenario"] == "slow":
        rates = {p: r.get("rate_mb_per_s") for p, r in sc["peers"].items() if r.get("rate_mb_per_s")}
        rtext = ", ".join(f"{PEERS[p].label} {v:.0f}" for p, v in rates.items())
        return (f"{_size_label(o['size'])}; the client reads at a quarter of that peer's download speed "
                f"(MB/s: {rtext}); growth = peak − RSS once connected and warmed up.")
    if o["scenario"] == "inproc":
        return f"{o['count']} sequential calls after {o['warmup']} warm-up calls, one process."
    if o["scenario"] == "file_upload":
        return ("nerve's client calls an action with `stream=PacketStream.from_file(src)`; the handler does "
                "`await ctx.stream.transfer_to(dest)` (a temporary file beside dest, fsynced, renamed) "
                "and returns the byte count. MB/s = size ÷ wall time of that call.")
    if o["scenario"] == "file_download":
        return ("The handler returns `PacketStream.from_file(src)`; nerve's client does "
                "`await stream.transfer_to(dest)` (fsynced, renamed). MB/s = size ÷ wall time of the call "
                "and transfer_to.")
    if o["scenario"] == UNDER_TRANSFER:
        return (f"{o['inflight']} calls of `echo.echo` (rpc_64's action and params) in flight on the one "
                f"connection: {o['duration']:g} s with no transfer (after {o['warmup']} warm-up calls), "
                f"then for as long as a {_size_label(o['size'])} upload from memory (`storage.upload`, "
                "counted and dropped) runs on the same connection, in the same process. Latencies are "
                "those of the calls started during the upload; calls/s = calls ended during it ÷ its time; "
                "MB/s is the upload's while the calls run (the `upload` scenario has it alone).")
    return ""


# --- charts -------------------------------------------------------------------------------

def write_charts(doc: dict[str, Any], out_dir: Path, stem: str) -> dict[str, str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import EngFormatter
    except Exception as exc:  # noqa: BLE001
        print(f"charts skipped: matplotlib unavailable ({exc})", flush=True)
        return {}
    charts: dict[str, str] = {}
    scenarios = doc["scenarios"]
    colors = ["#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf",
              "#7f7f7f", "#bcbd22", "#ff9896", "#aec7e8", "#98df8a", "#c5b0d5", "#c49c94"]
    # one color per peer of this run (the same in every chart): nerve, its baselines, the others
    order = list(dict.fromkeys(["nerve", *(doc.get("baselines") or {}), *doc["peers"]]))
    color_of = {pid: colors[i % len(colors)] for i, pid in enumerate(order)}
    for fam in FAMILIES:
        names = [n for n, s in scenarios.items() if s["family"] == fam]
        if not names:
            continue
        metric_keys: list[dict[str, Any]] = []
        for n in names:
            for met in scenarios[n]["metrics"]:
                if met["key"] not in [x["key"] for x in metric_keys] and met["key"] != "lost":
                    metric_keys.append(met)
        peer_ids: list[str] = []
        for n in names:
            for p, rec in scenarios[n]["peers"].items():
                if rec.get("summary") and p not in peer_ids:
                    peer_ids.append(p)
        if not peer_ids:
            continue
        ncols = min(3, len(metric_keys))
        nrows = (len(metric_keys) + ncols - 1) // ncols
        fig, axes = plt.subplots(nrows, ncols, figsize=(max(6.0, 4.8 * ncols), 0.6 + 4.0 * nrows),
                                 squeeze=False)
        flat = [ax for row in axes for ax in row]
        for ax in flat[len(metric_keys):]:
            ax.set_visible(False)
        for ax, met in zip(flat, metric_keys, strict=False):
            width = 0.8 / len(peer_ids)
            values: list[float] = []
            for j, p in enumerate(peer_ids):
                xs, meds, lo, hi = [], [], [], []
                for i, n in enumerate(names):
                    s = scenarios[n]["peers"].get(p, {}).get("summary", {}).get(met["key"])
                    if not s:
                        continue
                    xs.append(i - 0.4 + width * (j + 0.5))
                    meds.append(s["median"])
                    lo.append(s["median"] - s["min"])
                    hi.append(s["max"] - s["median"])
                    values.append(s["median"])
                if xs:
                    ax.bar(xs, meds, width, yerr=[lo, hi], capsize=2, label=PEERS[p].label,
                           color=color_of[p], edgecolor="black" if p == "nerve" else None, linewidth=0.8)
            ax.set_xticks(range(len(names)))
            ax.set_xticklabels(names)
            ax.set_title(f"{met['label']} ({'higher' if met['higher_better'] else 'lower'} is better)",
                         fontsize=10)
            ax.set_ylabel(met["unit"])
            positive = [v for v in values if v > 0]
            if positive and max(positive) / min(positive) > 30:
                ax.set_yscale("log")
            ax.yaxis.set_major_formatter(EngFormatter(sep=""))
            if fam == "slow" and met["key"].endswith("growth_mib"):
                budget = _slow_budget(doc)
                ax.axhline(budget, color="black", linestyle="--", linewidth=0.8)
                ax.text(len(names) - 0.5, budget, f" window + 16 MiB = {budget:g} MiB", va="bottom",
                        ha="right", fontsize=7)
            ax.grid(axis="y", alpha=0.3)
        handles, labels = flat[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 5), fontsize=8, frameon=False)
        fig.suptitle(f"{FAMILY_TITLES[fam]} — {doc['machine']['host']}, {doc['started'][:10]} "
                     f"({doc['mode']} mode; median, bars min–max)", fontsize=11)
        height = 0.6 + 4.0 * nrows
        fig.tight_layout(rect=(0, 0.45 / height, 1, 1 - 0.35 / height))
        path = out_dir / f"{stem}-{fam}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        charts[fam] = str(path)
    return charts


def _slow_budget(doc: dict[str, Any]) -> float:
    for t in doc.get("targets", []):
        if t.get("budget_mib"):
            return float(t["budget_mib"])
    return (4 * MIB + SLOW_BUDGET_EXTRA) / MIB


# --- entry point ----------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benches", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny counts (CI): figures are never quoted")
    p.add_argument("--only", help=f"comma-separated families ({', '.join(FAMILIES)}) or scenarios "
                                  f"({', '.join(SCENARIO_BY_NAME)})")
    p.add_argument("--peers", help="comma-separated peer ids to run besides nerve "
                                   f"({', '.join(p for p in PEERS if p != 'nerve')})")
    p.add_argument("--runs", type=int, help="runs per peer and scenario (default: 5, slow consumer 3; quick 1)")
    p.add_argument("--out", help="output directory (default: benches/results, quick: benches/results/tmp)")
    p.add_argument("--baseline", action="append", metavar="REV",
                   help="also run nerve at this git revision, as peer nerve@REV in every scenario "
                        "(exported to the cache, see --baseline-core); repeatable or comma-separated")
    p.add_argument("--baseline-core", choices=["build", "current"], default="build",
                   help="the baseline's Rust extension: built from that revision's rust/ (default; once, "
                        "cached) or copied from the current build (only right while rust/ is unchanged)")
    p.add_argument("--slow-rate", type=float, help="slow consumer read rate in MB/s for every peer "
                                                   "(default: a quarter of each peer's download speed)")
    p.add_argument("--file-size", type=parse_size, metavar="SIZE",
                   help="the file scenarios' file: bytes, or 256M, 1G (default: 256M; quick 8M)")
    p.add_argument("--file-dir", metavar="DIR",
                   help="where the file scenarios' temporary directory goes (default: the system's "
                        "temporary directory); its file system is named in the report")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.runs is not None and args.runs < 1:
        raise SystemExit("--runs must be >= 1")
    return Harness(args).run()


if __name__ == "__main__":
    if __package__ in (None, ""):
        sys.path.insert(0, str(ROOT))
    raise SystemExit(main())
