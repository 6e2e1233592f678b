"""nerve's HTTP gateway against moleculer-web, same machine, same run: JSON echo calls, streamed
uploads and downloads, a slow client, and the cost of HTTP over an in-process ``broker.call``.

    python -m benches.gateway               # full mode, about 5 minutes on 2 cores
    python -m benches.gateway --quick       # under a minute: never quote its figures
    python -m benches.gateway --client python --runs 5 --out /tmp/gw

Each server is a process of its own on 127.0.0.1, both up for the whole run: ``nerve gateway
--service benches.gateway:Bench`` (hypercorn + Starlette on the broker's trio run) and
``peers/web/server.js`` (moleculer-web 0.11 on moleculer.js 0.15; ``npm ci`` there if its
``node_modules`` is missing). Both serve the same ``bench`` service, local to the gateway's
node: ``echo`` (returns its params), ``upload`` (reads its request stream, returns the byte
count), ``download`` (a stream of ``size`` bytes from one 256 KiB block, with Content-Length).

Scenarios, the same client for both servers, rounds interleaved (nerve, web, nerve, web ..):

* ``echo``: keep-alive POSTs of a small JSON body at 1 and 32 requests in flight, by ``wrk``
  (one thread; a Lua ``done`` hook prints the figures) when installed, else a trio client of
  raw keep-alive sockets (``--client python``); calls/s, p50 / p99 latency, server CPU µs per
  call. nerve: ``POST /v1/call/bench.echo`` ``{"params": ...}``; web: ``POST /api/echo``.
* ``upload`` / ``download``: one request of ``--size`` bytes (1 GiB; 32 MiB quick) over a raw
  blocking socket from this process: MB/s (10^6 bytes), the server's peak RSS growth (its
  ``VmHWM`` reset through ``/proc/PID/clear_refs`` before, and a 10 ms ``VmRSS`` sampler, minus
  ``VmRSS`` before) and the server's CPU seconds per GB (``/proc/PID/stat``).
* ``slow-download`` / ``slow-upload``: the same, the client reading (sending) at a quarter of
  that server's full speed measured just before. The target: nerve's peak RSS growth in
  ``slow-download`` stays within 48 MiB (exit status 1 otherwise, or if a nerve scenario fails).
* ``inproc``: µs per ``broker.call("bench.echo")`` in-process (nerve in this process, moleculer.js
  in ``server.js direct``) beside µs per HTTP call at 1 in flight: what HTTP adds per call.

Writes ``<out>.json`` and ``<out>.md`` (default ``benches/results/DATE-vm-gateway``;
``benches/results/tmp/DATE-vm-gateway-quick`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import nerve
import trio

BENCHES = Path(__file__).resolve().parent
ROOT = BENCHES.parent
WEB_DIR = BENCHES / "peers" / "web"
RESULTS = BENCHES / "results"
MIB = 1024 * 1024
GIB = 1024 * MIB
CHUNK = 256 * 1024  # what both servers' download actions yield
SLOW_RSS_BOUND = 48 * MIB
SERVERS = ("nerve", "web")
LABELS = {"nerve": "nerve gateway", "web": "moleculer-web"}
#: the parameters of one echo call (as benches/peers/_common.py's PARAMS)
PARAMS: dict[str, Any] = {"id": 1, "name": "bench", "tags": ["a", "b", "c"], "values": [1, 2, 3, 4],
                          "nested": {"ok": True, "ratio": 0.5}}


# --- the service nerve's gateway hosts (nerve gateway --service benches.gateway:Bench) ------

@functools.cache
def _block() -> bytes:
    return bytes((i * 31 + 7) & 0xFF for i in range(CHUNK))


async def _blocks(size: int) -> AsyncIterator[bytes]:
    block = _block()
    left = size
    while left > 0:
        n = min(left, CHUNK)
        left -= n
        yield block if n == CHUNK else block[:n]


class Bench(nerve.Service):
    name = "bench"

    @nerve.action
    async def echo(self, ctx: nerve.Context) -> Any:
        return ctx.params

    @nerve.action
    async def upload(self, ctx: nerve.Context) -> dict[str, int]:
        if ctx.stream is None:
            raise nerve.errors.ValidationError("bench.upload needs a request stream")
        n = 0
        async for chunk in ctx.stream:
            n += len(chunk)
        return {"received": n}

    @nerve.action
    async def download(self, ctx: nerve.Context) -> nerve.PacketStream:
        size = int(ctx.params["size"])
        ctx.meta["size"] = size  # the gateway's Content-Length
        return nerve.PacketStream.from_iterable(_blocks(size))


# --- the servers ------------------------------------------------------------------------

@dataclass
class Server:
    name: str
    proc: subprocess.Popen[bytes]
    url: str
    stderr: Any

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def address(self) -> tuple[str, int]:
        parts = urlsplit(self.url)
        return parts.hostname or "127.0.0.1", parts.port or 80

    def routes(self) -> dict[str, Any]:
        """method, path, body of each scenario's request (download: a size placeholder)."""
        if self.name == "nerve":
            return {"echo": ("POST", "/v1/call/bench.echo", json.dumps({"params": PARAMS}).encode()),
                    "upload": ("POST", "/v1/call/bench.upload"),
                    "download": ("POST", "/v1/call/bench.download",
                                 lambda size: json.dumps({"params": {"size": size}}).encode())}
        return {"echo": ("POST", "/api/echo", json.dumps(PARAMS).encode()),
                "upload": ("POST", "/api/upload"),
                "download": ("GET", "/api/download?size={size}", None)}

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.stderr.close()

    def tail(self) -> str:
        self.stderr.flush()
        self.stderr.seek(0)
        return self.stderr.read().decode(errors="replace")[-2000:]


def _start(name: str, argv: list[str], cwd: Path) -> Server:
    err = tempfile.TemporaryFile()
    proc = subprocess.Popen(argv, cwd=cwd, stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL)
    assert proc.stdout is not None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        try:
            shown = json.loads(line)
        except ValueError:
            continue
        if isinstance(shown, dict) and shown.get("http"):
            # nothing more is read from stdout: keep the pipe from filling up
            threading.Thread(target=lambda: proc.stdout.read(), daemon=True).start()  # type: ignore[union-attr]
            return Server(name, proc, shown["http"], err)
    proc.kill()
    proc.wait()
    err.seek(0)
    raise RuntimeError(f"{name} did not start: {err.read().decode(errors='replace')[-2000:]}")


def start_nerve() -> Server:
    nerve_cli = Path(sys.executable).with_name("nerve")
    argv = [str(nerve_cli)] if nerve_cli.exists() else [sys.executable, "-m", "nerve.cli"]
    return _start("nerve", argv + ["gateway", "--http", "127.0.0.1:0", "--node-id", "gw",
                                   "--service", "benches.gateway:Bench"], ROOT)


def start_web() -> Server:
    if not (WEB_DIR / "node_modules" / "moleculer-web").is_dir():
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=WEB_DIR, check=True,
                       stdout=subprocess.DEVNULL)
    return _start("web", ["node", "server.js", "serve"], WEB_DIR)


# --- a server process seen from /proc ---------------------------------------------------

_TICK = os.sysconf("SC_CLK_TCK")


def status_kb(pid: int) -> dict[str, int]:
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, value = line.split(":", 1)
                out[key] = int(value.split()[0])
    return out


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK  # utime, stime


def reset_hwm(pid: int) -> bool:
    """Reset the process's VmHWM to its current RSS (Linux >= 4.0; needs the right to)."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class Watch:
    """A server process during one scenario: RSS before, peak (VmHWM after a reset and a
    10 ms sampler of VmRSS), after; CPU seconds used."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak_sampled = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> Watch:
        self.hwm_reset = reset_hwm(self.pid)
        self.before = status_kb(self.pid)["VmRSS"] * 1024
        self.cpu_before = cpu_seconds(self.pid)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.cpu = cpu_seconds(self.pid) - self.cpu_before
        st = status_kb(self.pid)
        self.after = st["VmRSS"] * 1024
        hwm = st["VmHWM"] * 1024 if self.hwm_reset else 0
        self.peak = max(hwm, self.peak_sampled, self.after, self.before)

    def _sample(self) -> None:
        while not self._stop.wait(0.01):
            try:
                self.peak_sampled = max(self.peak_sampled, status_kb(self.pid)["VmRSS"] * 1024)
            except (OSError, KeyError):
                return

    def memory(self) -> dict[str, Any]:
        return {"rss_before": self.before, "rss_peak": self.peak, "rss_after": self.after,
                "rss_growth": self.peak - self.before, "hwm_reset": self.hwm_reset}


# --- echo: wrk, or a trio client of raw keep-alive sockets ----------------------------------

_WRK_DONE = """
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('WRKJSON {"requests": %d, "duration_us": %d, "p50_us": %d, "p99_us": %d, '
    .. '"mean_us": %.1f, "max_us": %d, "errors": {"connect": %d, "read": %d, "write": %d, '
    .. '"status": %d, "timeout": %d}}\\n', summary.requests, summary.duration,
    latency:percentile(50), latency:percentile(99), latency.mean, latency.max,
    e.connect, e.read, e.write, e.status, e.timeout))
end
"""


def _lua_string(data: bytes) -> str:
    return '"' + "".join(f"\\{b:03d}" for b in data) + '"'


def echo_wrk(server: Server, inflight: int, seconds: float, tmp: Path) -> dict[str, Any]:
    method, path, body = server.routes()["echo"]
    script = tmp / f"echo-{server.name}.lua"
    script.write_text(f'wrk.method = "{method}"\nwrk.body = {_lua_string(body)}\n'
                      f'wrk.headers["Content-Type"] = "application/json"\n' + _WRK_DONE)
    argv = ["wrk", "-t1", f"-c{inflight}", f"-d{max(1, round(seconds))}s", "--timeout", "10s",
            "-s", str(script), server.url + path]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60)
    for line in out.stdout.splitlines():
        if line.startswith("WRKJSON "):
            got = json.loads(line[8:])
            secs = got["duration_us"] / 1e6
            errors = sum(got["errors"].values())
            return {"calls": got["requests"], "seconds": secs, "calls_per_s": got["requests"] / secs,
                    "p50_us": got["p50_us"], "p99_us": got["p99_us"], "mean_us": got["mean_us"],
                    "errors": errors, "error_kinds": got["errors"]}
    raise RuntimeError(f"wrk gave no figures: {out.stdout[-500:]} {out.stderr[-500:]}")


def _request(method: str, path: str, host: str, body: bytes | None = None, ctype: str = "application/json",
             length: int | None = None) -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: {host}\r\n"
    if body is not None or length is not None:
        head += f"Content-Type: {ctype}\r\nContent-Length: {len(body) if body is not None else length}\r\n"
    return (head + "\r\n").encode() + (body or b"")


def _content_length(head: bytes) -> int:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    raise RuntimeError(f"a response without Content-Length: {head[:300]!r}")


async def _echo_connection(address: tuple[str, int], request: bytes, until: float,
                           latencies: list[float], errors: list[str]) -> None:
    """Echo calls one after the other on a keep-alive connection, opened again when the server
    closes it between two calls (hypercorn does after ``keep_alive_max_requests``, 1000),
    as wrk does."""
    clock = time.perf_counter
    while clock() < until:
        stream = await trio.open_tcp_stream(*address)
        buf = bytearray()
        async with stream:
            try:
                while clock() < until:
                    t0 = clock()
                    await stream.send_all(request)
                    while (end := buf.find(b"\r\n\r\n")) < 0:
                        data = await stream.receive_some(65536)
                        if not data:
                            raise trio.BrokenResourceError
                        buf += data
                    need = end + 4 + _content_length(bytes(buf[:end]))
                    while len(buf) < need:
                        data = await stream.receive_some(65536)
                        if not data:
                            raise trio.BrokenResourceError
                        buf += data
                    if buf[9:12] != b"200":
                        errors.append(bytes(buf[9:12]).decode())
                    del buf[:need]
                    latencies.append(clock() - t0)
            except trio.BrokenResourceError:
                if buf:
                    errors.append("closed mid-response")
                    return


def echo_python(server: Server, inflight: int, seconds: float, tmp: Path) -> dict[str, Any]:
    method, path, body = server.routes()["echo"]
    host, port = server.address
    request = _request(method, path, f"{host}:{port}", body)
    latencies: list[float] = []
    errors: list[str] = []

    async def main() -> float:
        start = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for _ in range(inflight):
                nursery.start_soon(_echo_connection, (host, port), request, start + seconds, latencies, errors)
        return time.perf_counter() - start

    secs = trio.run(main)
    latencies.sort()
    n = len(latencies)
    return {"calls": n, "seconds": secs, "calls_per_s": n / secs,
            "p50_us": latencies[n // 2] * 1e6 if n else None,
            "p99_us": latencies[min(n - 1, int(n * 0.99))] * 1e6 if n else None,
            "mean_us": sum(latencies) / n * 1e6 if n else None,
            "errors": len(errors), "error_kinds": sorted(set(errors))[:5]}


def check_echo(server: Server) -> None:
    """One echo call, its answer checked, before anything is timed."""
    method, path, body = server.routes()["echo"]
    host, port = server.address
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(_request(method, path, f"{host}:{port}", body))
        head, rest = _read_head(sock)
        need = _content_length(head)
        while len(rest) < need:
            rest += sock.recv(65536)
    answer = json.loads(rest)
    got = answer.get("response") if server.name == "nerve" else answer
    if not head.startswith(b"HTTP/1.1 200") or got != PARAMS:
        raise RuntimeError(f"{server.name}: echo answered {head[:100]!r} {rest[:300]!r}")


def echo(server: Server, client: str, inflight: int, seconds: float, tmp: Path) -> dict[str, Any]:
    measure = echo_wrk if client == "wrk" else echo_python
    cpu0 = cpu_seconds(server.pid)
    got = measure(server, inflight, seconds, tmp)
    got["server_cpu_us_per_call"] = (cpu_seconds(server.pid) - cpu0) / max(1, got["calls"]) * 1e6
    return got


# --- streams: one raw blocking socket, paced or not ---------------------------------------

def _read_head(sock: socket.socket) -> tuple[bytes, bytearray]:
    buf = bytearray()
    while (end := buf.find(b"\r\n\r\n")) < 0:
        data = sock.recv(65536)
        if not data:
            raise RuntimeError(f"connection closed before a response head: {bytes(buf[:300])!r}")
        buf += data
    return bytes(buf[:end]), buf[end + 4:]


def _pace(done: int, rate: float | None, start: float) -> None:
    if rate:
        ahead = done / rate - (time.perf_counter() - start)
        if ahead > 0:
            time.sleep(ahead)


def download(server: Server, size: int, rate: float | None = None) -> dict[str, Any]:
    """GET (or POST) a stream of ``size`` bytes, read as fast as possible or at ``rate`` B/s."""
    route = server.routes()["download"]
    host, port = server.address
    if server.name == "nerve":
        request = _request(route[0], route[1], f"{host}:{port}", route[2](size))
    else:
        request = _request(route[0], route[1].format(size=size), f"{host}:{port}")
    piece = 64 * 1024 if rate else MIB
    buf = bytearray(piece)
    view = memoryview(buf)
    with socket.create_connection((host, port), timeout=60) as sock, Watch(server.pid) as watch:
        start = time.perf_counter()
        sock.sendall(request)
        head, rest = _read_head(sock)
        if not head.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(f"{server.name}: download answered {head[:200]!r} {bytes(rest[:300])!r}")
        need = _content_length(head)
        got = len(rest)
        while got < need:
            n = sock.recv_into(view, min(piece, need - got))
            if not n:
                raise RuntimeError(f"{server.name}: download closed after {got} of {need} bytes")
            got += n
            _pace(got, rate, start)
        seconds = time.perf_counter() - start
    return _transfer(size, got, seconds, watch, rate)


def upload(server: Server, size: int, rate: float | None = None) -> dict[str, Any]:
    """POST ``size`` bytes as the request body, sent as fast as possible or at ``rate`` B/s."""
    route = server.routes()["upload"]
    host, port = server.address
    request = _request(route[0], route[1], f"{host}:{port}", ctype="application/octet-stream", length=size)
    piece = 64 * 1024 if rate else MIB
    block = memoryview(bytes((i * 31 + 7) & 0xFF for i in range(256)) * (piece // 256))
    with socket.create_connection((host, port), timeout=60) as sock, Watch(server.pid) as watch:
        start = time.perf_counter()
        sock.sendall(request)
        sent = 0
        while sent < size:
            n = min(piece, size - sent)
            sock.sendall(block[:n])
            sent += n
            _pace(sent, rate, start)
        head, rest = _read_head(sock)
        need = _content_length(head)
        while len(rest) < need:
            rest += sock.recv(65536)
        seconds = time.perf_counter() - start
    answer = json.loads(rest)
    received = (answer.get("response") if server.name == "nerve" else answer) or {}
    if not head.startswith(b"HTTP/1.1 200") or received.get("received") != size:
        raise RuntimeError(f"{server.name}: upload answered {head[:200]!r} {bytes(rest[:300])!r}")
    return _transfer(size, sent, seconds, watch, rate)


def _transfer(size: int, moved: int, seconds: float, watch: Watch, rate: float | None) -> dict[str, Any]:
    return {"bytes": moved, "seconds": seconds, "mb_per_s": moved / seconds / 1e6,
            "target_mb_per_s": rate / 1e6 if rate else None,
            "server_cpu_s": watch.cpu, "server_cpu_s_per_gb": watch.cpu / (moved / 1e9),
            **watch.memory()}


# --- in-process call cost ----------------------------------------------------------------

def inproc_nerve(count: int) -> dict[str, Any]:
    async def main() -> float:
        async with nerve.Broker("inproc", services=[Bench()]) as broker:
            for _ in range(min(count, 2000)):
                await broker.call("bench.echo", PARAMS)
            t0 = time.perf_counter()
            for _ in range(count):
                await broker.call("bench.echo", PARAMS)
            return time.perf_counter() - t0

    return {"calls": count, "us_per_call": trio.run(main) / count * 1e6}


def inproc_web(count: int) -> dict[str, Any]:
    out = subprocess.run(["node", "server.js", "direct", "--count", str(count)], cwd=WEB_DIR,
                         capture_output=True, text=True, timeout=300, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


# --- the run -------------------------------------------------------------------------------

@dataclass
class Plan:
    quick: bool
    runs: int
    echo_seconds: float
    warmup_seconds: float
    size: int
    slow_size: int
    inproc_calls: int
    client: str


@dataclass
class Results:
    plan: Plan
    echo: dict[str, dict[str, list[dict[str, Any]]]] = field(default_factory=dict)
    streams: dict[str, dict[str, dict[str, Any] | None]] = field(default_factory=dict)
    inproc: dict[str, dict[str, Any]] = field(default_factory=dict)
    stream_runs: dict[str, dict[str, list[dict[str, Any]]]] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)


def _median_run(runs: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The run of median speed, with the largest RSS growth of all the runs."""
    if not runs:
        return None
    chosen = dict(sorted(runs, key=lambda r: r["mb_per_s"])[len(runs) // 2])
    chosen["rss_growth"] = max(r["rss_growth"] for r in runs)
    chosen["runs"] = len(runs)
    return chosen


def _step(what: str, fn: Callable[[], Any], results: Results, server: str) -> Any:
    t0 = time.monotonic()
    try:
        got = fn()
    except Exception as exc:  # a failed scenario is reported, the run goes on
        results.failures.append(f"{LABELS[server]} {what}: {type(exc).__name__}: {exc}")
        print(f"  {what:<14} {LABELS[server]:<14} FAILED: {exc}", flush=True)
        return None
    print(f"  {what:<14} {LABELS[server]:<14} {_brief(got)}  ({time.monotonic() - t0:.1f} s)", flush=True)
    return got


def _brief(got: dict[str, Any]) -> str:
    if "calls_per_s" in got:
        return (f"{got['calls_per_s']:9.0f} calls/s  p50 {got['p50_us']:7.0f} µs  p99 {got['p99_us']:7.0f} µs"
                f"  errors {got['errors']}")
    if "mb_per_s" in got:
        return (f"{got['mb_per_s']:8.1f} MB/s  RSS +{got['rss_growth'] / MIB:6.1f} MiB  "
                f"CPU {got['server_cpu_s_per_gb']:5.2f} s/GB")
    return json.dumps(got)


def run(plan: Plan, servers: dict[str, Server], tmp: Path) -> Results:
    res = Results(plan)
    for name, srv in servers.items():
        check_echo(srv)
        res.echo[name] = {"1": [], "32": []}
    print(f"echo: {plan.runs} round(s) of {plan.echo_seconds:g} s at 1 and 32 in flight, client {plan.client}",
          flush=True)
    for r in range(plan.runs):
        for inflight in (1, 32):
            for name, srv in servers.items():
                echo(srv, plan.client, inflight, plan.warmup_seconds, tmp)  # warm-up, not kept
                got = _step(f"echo@{inflight} #{r + 1}",
                            lambda: echo(srv, plan.client, inflight, plan.echo_seconds, tmp), res, name)
                if got is not None:
                    res.echo[name][str(inflight)].append(got)
    print(f"streams: {plan.size / MIB:g} MiB at full speed, {plan.slow_size / MIB:g} MiB at a quarter of it",
          flush=True)
    for name, srv in servers.items():
        s: dict[str, dict[str, Any] | None] = {}
        res.streams[name] = s
        for kind, fn in (("upload", upload), ("download", download)):
            runs = [got for r in range(plan.runs)
                    if (got := _step(f"{kind} #{r + 1}", lambda: fn(srv, plan.size), res, name)) is not None]
            res.stream_runs.setdefault(name, {})[kind] = runs
            s[kind] = _median_run(runs)
        for kind, fn in (("download", download), ("upload", upload)):
            full = s.get(kind)
            if full is None:
                continue
            rate = full["bytes"] / full["seconds"] / 4
            s[f"slow-{kind}"] = _step(f"slow-{kind}", lambda: fn(srv, plan.slow_size, rate), res, name)
    print(f"inproc: {plan.inproc_calls} sequential broker.call", flush=True)
    res.inproc["nerve"] = _step("inproc", lambda: inproc_nerve(plan.inproc_calls), res, "nerve")
    res.inproc["web"] = _step("inproc", lambda: inproc_web(plan.inproc_calls), res, "web")
    return res


# --- the report ---------------------------------------------------------------------------

def _median(runs: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(values) if values else None


def summarize(res: Results) -> dict[str, Any]:
    out: dict[str, Any] = {"echo": {}, "streams": res.streams, "inproc": {}}
    for name, by in res.echo.items():
        out["echo"][name] = {}
        for inflight, runs in by.items():
            out["echo"][name][inflight] = {
                k: _median(runs, k) for k in ("calls_per_s", "p50_us", "p99_us", "mean_us", "server_cpu_us_per_call")}
            out["echo"][name][inflight]["errors"] = sum(r["errors"] for r in runs)
            out["echo"][name][inflight]["runs"] = len(runs)
    for name in res.echo:
        direct = res.inproc.get(name)
        http = out["echo"][name]["1"].get("calls_per_s")
        if direct and http:
            http_us = 1e6 / http
            out["inproc"][name] = {"direct_us_per_call": direct["us_per_call"], "http_us_per_call": http_us,
                                   "http_minus_direct_us": http_us - direct["us_per_call"],
                                   "http_server_cpu_us_per_call": out["echo"][name]["1"]["server_cpu_us_per_call"]}
    slow = (res.streams.get("nerve") or {}).get("slow-download")
    out["target"] = {"slow_download_rss_bound": SLOW_RSS_BOUND,
                     "nerve_slow_download_rss_growth": slow["rss_growth"] if slow else None,
                     "met": slow is not None and slow["rss_growth"] <= SLOW_RSS_BOUND}
    return out


def _fmt(value: float | None, digits: int = 0, scale: float = 1.0) -> str:
    return "—" if value is None else f"{value / scale:,.{digits}f}"


def _ratio(a: float | None, b: float | None) -> str:
    return "—" if not a or not b else f"{a / b:.2f}×"


def markdown(summary: dict[str, Any], machine: dict[str, Any], plan: Plan, res: Results, took: float) -> str:
    e, st, ip = summary["echo"], summary["streams"], summary["inproc"]
    lines = [f"# nerve gateway vs moleculer-web — {machine['date']}{' (quick: do not quote)' if plan.quick else ''}",
             "",
             f"Machine: {machine['cpu']}, {machine['cores']} cores, {machine['memory_gib']:.1f} GiB, "
             f"Linux {machine['kernel']}; Python {machine['python']}, Node {machine['node']}; "
             f"nerve {machine['versions'].get('nerve')}, hypercorn {machine['versions'].get('hypercorn')}, "
             f"starlette {machine['versions'].get('starlette')}; moleculer {machine['versions'].get('moleculer')}, "
             f"moleculer-web {machine['versions'].get('moleculer-web')}. Load average before / after: "
             f"{machine['loadavg_before']} / {machine['loadavg_after']}; other processes used "
             f"{machine['other_processes_cores']:.2f} of the {machine['cores']} cores on average during the run.",
             "",
             f"Echo client: {machine['client']} (one thread, keep-alive); {plan.runs} round(s) of "
             f"{plan.echo_seconds:g} s per figure, medians, servers interleaved. Streams, over a raw socket: "
             f"{plan.runs} request(s) of {plan.size / MIB:g} MiB (the median speed, the largest RSS growth), "
             f"then one of {plan.slow_size / MIB:g} MiB at a quarter of that server's full speed. "
             f"MB = 10^6 bytes; RSS growth = peak RSS (VmHWM reset before, and a 10 ms "
             f"sampler) minus RSS before. Run took {took:.0f} s.",
             "",
             "| metric | nerve gateway | moleculer-web | nerve / web |",
             "| --- | ---: | ---: | ---: |"]

    def row(label: str, a: float | None, b: float | None, digits: int = 0, scale: float = 1.0) -> None:
        lines.append(f"| {label} | {_fmt(a, digits, scale)} | {_fmt(b, digits, scale)} | {_ratio(a, b)} |")

    def get(d: dict[str, Any], *path: str) -> Any:
        for p in path:
            d = d.get(p) if isinstance(d, dict) else None  # type: ignore[assignment]
        return d

    for c in ("1", "32"):
        row(f"echo @{c}: calls/s", get(e, "nerve", c, "calls_per_s"), get(e, "web", c, "calls_per_s"))
        row(f"echo @{c}: p50 latency (µs)", get(e, "nerve", c, "p50_us"), get(e, "web", c, "p50_us"))
        row(f"echo @{c}: p99 latency (µs)", get(e, "nerve", c, "p99_us"), get(e, "web", c, "p99_us"))
        row(f"echo @{c}: server CPU µs/call", get(e, "nerve", c, "server_cpu_us_per_call"),
            get(e, "web", c, "server_cpu_us_per_call"))
    for kind in ("upload", "download", "slow-upload", "slow-download"):
        row(f"{kind}: MB/s", get(st, "nerve", kind, "mb_per_s"), get(st, "web", kind, "mb_per_s"), 1)
        row(f"{kind}: server peak RSS growth (MiB)", get(st, "nerve", kind, "rss_growth"),
            get(st, "web", kind, "rss_growth"), 1, MIB)
        row(f"{kind}: server CPU s/GB", get(st, "nerve", kind, "server_cpu_s_per_gb"),
            get(st, "web", kind, "server_cpu_s_per_gb"), 2)
    row("in-process broker.call (µs)", get(ip, "nerve", "direct_us_per_call"), get(ip, "web", "direct_us_per_call"), 1)
    row("HTTP call at 1 in flight (µs, 1 / rate)", get(ip, "nerve", "http_us_per_call"), get(ip, "web", "http_us_per_call"), 1)
    row("HTTP minus in-process (µs)", get(ip, "nerve", "http_minus_direct_us"),
        get(ip, "web", "http_minus_direct_us"), 1)
    t = summary["target"]
    grown = t["nerve_slow_download_rss_growth"]
    lines += ["", f"Target: nerve gateway's peak RSS growth in slow-download ≤ {SLOW_RSS_BOUND // MIB} MiB: "
              + ("**met**" if t["met"] else "**NOT MET**")
              + (f" ({grown / MIB:.1f} MiB)." if grown is not None else " (no figure).")]
    if res.failures:
        lines += ["", "Failures:", ""] + [f"- {f}" for f in res.failures]
    return "\n".join(lines) + "\n"


def _version(argv: list[str], cwd: Path | None = None) -> str | None:
    try:
        return subprocess.run(argv, capture_output=True, text=True, cwd=cwd, timeout=30).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def machine(client: str) -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    cpu = platform.processor() or platform.machine()
    mem = 0.0
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) / MIB
    except OSError:
        pass
    versions: dict[str, str | None] = {}
    for pkg in ("nerve", "hypercorn", "starlette", "h11", "trio"):
        try:
            versions[pkg] = version(pkg)
        except PackageNotFoundError:
            versions[pkg] = None
    for pkg in ("moleculer", "moleculer-web"):
        pj = WEB_DIR / "node_modules" / pkg / "package.json"
        versions[pkg] = json.loads(pj.read_text())["version"] if pj.exists() else None
    wrk = _version(["wrk", "--version"]) if client == "wrk" else None
    return {"date": dt.date.today().isoformat(), "host": socket.gethostname(), "cpu": cpu,
            "cores": os.cpu_count(), "usable_cores": len(os.sched_getaffinity(0)), "memory_gib": mem,
            "kernel": platform.release(), "python": platform.python_version(),
            "node": (_version(["node", "--version"]) or "?").lstrip("v"), "versions": versions,
            "client": (wrk.splitlines()[0].split(" Copyright")[0] if wrk else "python trio raw sockets")}


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine spent busy since boot (all cores; /proc/stat)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle, iowait
    return (sum(fields[:8]) - idle) / _TICK


def own_cpu_seconds() -> float:
    """CPU seconds of this process and its children waited for (wrk, node direct, the servers)."""
    import resource

    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benches.gateway", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="under a minute (CI); its figures are not to be quoted")
    p.add_argument("--runs", type=int, default=None, help="echo rounds and full-speed transfers per figure (default 5; quick 1)")
    p.add_argument("--client", choices=["auto", "wrk", "python"], default="auto",
                   help="echo client: wrk if installed (auto), or the trio raw-socket client")
    p.add_argument("--out", default=None, help="output path without extension")
    args = p.parse_args(argv)
    client = args.client
    if client == "auto":
        client = "wrk" if shutil.which("wrk") else "python"
    plan = Plan(quick=args.quick, runs=args.runs or (1 if args.quick else 5),
                echo_seconds=2 if args.quick else 10, warmup_seconds=1 if args.quick else 2,
                size=32 * MIB if args.quick else GIB, slow_size=32 * MIB if args.quick else GIB,
                inproc_calls=20_000 if args.quick else 200_000, client=client)
    date = dt.date.today().isoformat()
    out = Path(args.out) if args.out else (RESULTS / "tmp" / f"{date}-vm-gateway-quick" if args.quick
                                           else RESULTS / f"{date}-vm-gateway")
    out.parent.mkdir(parents=True, exist_ok=True)
    info = machine(client)
    info["loadavg_before"] = "%.2f %.2f %.2f" % os.getloadavg()
    started = time.monotonic()
    busy0, own0 = machine_busy_seconds(), own_cpu_seconds()
    servers: dict[str, Server] = {}
    try:
        servers["nerve"] = start_nerve()
        servers["web"] = start_web()
        with tempfile.TemporaryDirectory(prefix="nerve-gw-bench-") as tmp:
            res = run(plan, servers, Path(tmp))
        for srv in servers.values():
            if srv.proc.poll() is not None:
                res.failures.append(f"{LABELS[srv.name]} exited ({srv.proc.returncode}): {srv.tail()}")
    finally:
        for srv in servers.values():
            srv.stop()
    took = time.monotonic() - started
    others = machine_busy_seconds() - busy0 - (own_cpu_seconds() - own0)
    info["other_processes_cores"] = round(max(0.0, others) / took, 2)
    info["loadavg_after"] = "%.2f %.2f %.2f" % os.getloadavg()
    summary = summarize(res)
    record = {"machine": info, "plan": plan.__dict__, "summary": summary,
              "echo_runs": res.echo, "stream_runs": res.stream_runs, "failures": res.failures, "seconds": took}
    out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    report = markdown(summary, info, plan, res, took)
    out.with_suffix(".md").write_text(report)
    print("\n" + report)
    print(f"written: {out.with_suffix('.md')}, {out.with_suffix('.json')}")
    nerve_failed = any(f.startswith(LABELS["nerve"]) for f in res.failures)
    return 0 if summary["target"]["met"] and not nerve_failed else 1


if __name__ == "__main__":
    raise SystemExit(main())
