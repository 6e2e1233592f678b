"""Stream-burst soak: N concurrent uploads and N concurrent downloads on ONE connection.

    python benches/soak_streams.py --streams 1000 --size 1MiB [--mode upload|download|both]
                                   [--json out.json] [--records] [--deadline 300]

Two fresh processes on loopback TCP (one nerve connection between them):

* a **server** node with a ``soak`` service: ``upload`` reads ``ctx.stream``, hashes it with
  SHA-256 and returns ``{"size", "sha256", "ok"}`` (``ok``: the digest the caller announced
  in its params matches what arrived); ``download`` returns a ``PacketStream`` of
  ``--size`` bytes of deterministic pseudo-random content for a seed, hashing what it sends
  and counting any mismatch with the caller's expectation;
* a **client** node that starts every upload and every download at once
  (``broker.call("soak.upload", stream=PacketStream.from_iterable(...))``), and checks each
  digest against the content it expects (uploads: the server's digest; downloads: the digest
  of what it read).

The orchestrator (this script without ``--role``) samples both processes' RSS every 50 ms
(``VmRSS``) and reads their ``VmHWM``; it reports completed / failed calls with the error
classes, wall time, MB/s, RSS before / peak / after for both processes, the write queue of
the connection on both sides (sampled every 5 ms in-process; diagnostic only), connection
drops seen in either node's log (``disconnecting ... not reading``) and reconnects. The exit
status is 0 only if every call completed with the right digest.

Content: stream ``seed`` of ``size`` bytes is a window of a fixed 8 MiB pseudo-random pool
(``random.Random(0x5EED)``) starting at an offset derived from the seed, wrapping around.
It costs a memcpy to produce and differs from one seed to the next, so a stream delivered
to the wrong call fails its digest. Expected digests are computed before the measured part.

Sizes: ``1MiB``, ``256KiB``, ``1000000``, or a range ``256KiB-1MiB`` (each call gets a
deterministic size in the range). The speed figures are for reading only (this machine's
absolute numbers swing); the test suite runs this script at CI size
(``tests/test_stream_bursts.py``) and asserts on completion, digests and memory only.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import hashlib
import json
import logging
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

MIB = 1024 * 1024
KIB = 1024
POOL_SIZE = 8 * MIB
CHUNK = 256 * KIB  # what the content generators yield (nerve's default max_chunk)
DOWNLOAD_SEED_BASE = 1_000_000  # download seeds differ from upload seeds
_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": KIB, "m": 1000 ** 2, "mb": 1000 ** 2,
          "mib": MIB, "g": 1000 ** 3, "gb": 1000 ** 3, "gib": 1024 * MIB}
HERE = Path(__file__).resolve()

# --- content, shared by both processes (and by the test) ------------------------------

_pool: bytes | None = None


def pool() -> bytes:
    global _pool
    if _pool is None:
        _pool = random.Random(0x5EED).randbytes(POOL_SIZE)
    return _pool


def offset(seed: int) -> int:
    return (seed * 2_654_435_761 + 12_345) % POOL_SIZE


def content_views(seed: int, size: int, chunk: int = CHUNK) -> Iterator[memoryview]:
    """The content of stream ``seed`` as views of the pool, at most ``chunk`` bytes each."""
    view = memoryview(pool())
    at = offset(seed)
    left = size
    while left > 0:
        n = min(chunk, left, POOL_SIZE - at)
        yield view[at:at + n]
        at = (at + n) % POOL_SIZE
        left -= n


def content_digest(seed: int, size: int) -> str:
    h = hashlib.sha256()
    for v in content_views(seed, size):
        h.update(v)
    return h.hexdigest()


def content(seed: int, size: int) -> bytes:
    return b"".join(bytes(v) for v in content_views(seed, size))


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 1MiB, 256KiB, 1000000)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def parse_size_range(text: str) -> tuple[int, int]:
    lo, sep, hi = text.partition("-")
    a = parse_size(lo)
    b = parse_size(hi) if sep else a
    if b < a:
        raise argparse.ArgumentTypeError(f"empty size range: {text!r}")
    return a, b


def sizes_for(n: int, lo: int, hi: int, salt: int) -> list[int]:
    """``n`` deterministic sizes in ``[lo, hi]`` (all ``lo`` if equal), ends included."""
    if lo == hi:
        return [lo] * n
    span = hi - lo + 1
    out = [lo + ((i + salt) * 2_654_435_761) % span for i in range(n)]
    if n >= 2:
        out[0], out[-1] = lo, hi
    return out


def plan(streams: int, lo: int, hi: int, mode: str) -> list[tuple[str, int, int, int]]:
    """The calls of a run: (kind, index, seed, size)."""
    calls: list[tuple[str, int, int, int]] = []
    if mode in ("upload", "both"):
        calls += [("upload", i, i, n) for i, n in enumerate(sizes_for(streams, lo, hi, 0))]
    if mode in ("download", "both"):
        calls += [("download", i, DOWNLOAD_SEED_BASE + i, n)
                  for i, n in enumerate(sizes_for(streams, lo, hi, 7))]
    return calls


def read_status(pid: int | str = "self") -> dict[str, int]:
    """VmRSS / VmHWM (kB) from ``/proc/<pid>/status`` (empty once the process is gone)."""
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


def _log_to_stderr() -> None:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(created).3f %(name)s %(levelname)s %(message)s")


class QueueProbe:
    """Samples the connection's write queue (``len(encoder)``) every 5 ms and counts
    connection objects seen (a new one = a reconnect). Diagnostic only: it reads transport
    attributes that may change, so it gives up quietly if they are not there."""

    def __init__(self, broker: Any) -> None:
        self.broker = broker
        self.peak = 0
        self.connections_seen = 0
        self._last: Any = None
        self.available = True
        self.rx_buffered_peak: int | None = None  # bytes received by streams, not read yet
        self.tcp_stats: dict[str, Any] | None = None  # the transport's statistics, last sample
        self.producers_waiting_peak: int | None = None
        self._ticks = 0

    async def run(self) -> None:
        import trio

        while True:
            try:
                conns = list(self.broker.transport.connections.values())
                for conn in conns:
                    q = len(conn.encoder)
                    if q > self.peak:
                        self.peak = q
                if conns and conns[0] is not self._last:
                    self._last = conns[0]
                    self.connections_seen += 1
            except Exception:
                self.available = False
                return
            try:
                buffered = sum(r.statistics().bytes_buffered for r in self.broker.transit.readers.values())
                self.rx_buffered_peak = max(self.rx_buffered_peak or 0, buffered)
            except Exception:
                pass
            self._ticks += 1
            if self._ticks % 20 == 0 and conns:  # every 100 ms, while connected
                self._sample_stats()
            await trio.sleep(0.005)

    def _sample_stats(self) -> None:
        statistics = getattr(self.broker.transport, "statistics", None)
        if not callable(statistics):
            return
        try:
            snap = statistics()
            is_record = dataclasses.is_dataclass(snap) and not isinstance(snap, type)
            self.tcp_stats = dataclasses.asdict(snap) if is_record else dict(snap)  # type: ignore[arg-type]
        except Exception:
            return
        waiting = self.tcp_stats.get("producers_waiting") if self.tcp_stats else None
        if isinstance(waiting, int):
            self.producers_waiting_peak = max(self.producers_waiting_peak or 0, waiting)

    def report(self) -> dict[str, Any]:
        """Call before the calls are cancelled: the statistics are the last ones sampled while
        connected (bytes queued and producers waiting for room, if the transport counts them)."""
        if self._last is not None and self._last in self.broker.transport.connections.values():
            self._sample_stats()
        return {"write_queue_peak": self.peak if self.available else None,
                "connections_seen": self.connections_seen if self.available else None,
                "tcp_stats": self.tcp_stats, "producers_waiting_peak": self.producers_waiting_peak,
                "rx_buffered_peak": self.rx_buffered_peak}


class AppendTrace:
    """``--trace``: wraps the TCP connection's ``send_stream_data`` (diagnostic, in this
    process only) to count the stream chunks queued while the write queue was already above
    its high-water mark, and how many distinct streams did so in one such episode (from the
    queue going above the mark until it is next found under it)."""

    def __init__(self) -> None:
        self.above = 0
        self.episode: set[Any] = set()
        self.max_episode_streams = 0
        self.max_queue_seen = 0
        self.installed = False

    def install(self) -> None:
        try:
            from nerve.transports.tcp import Connection
        except ImportError:
            return
        original = getattr(Connection, "send_stream_data", None)
        if original is None:
            return
        trace = self

        def send_stream_data(conn: Any, flags: int, stream_id: Any, seq: int, chunk: Any) -> None:
            q = len(conn.encoder)
            original(conn, flags, stream_id, seq, chunk)  # raises if the connection is closed
            trace.max_queue_seen = max(trace.max_queue_seen, q)
            if q <= conn.transport.high_water:
                trace.episode = set()
            else:
                trace.above += 1
                trace.episode.add(stream_id)
                trace.max_episode_streams = max(trace.max_episode_streams, len(trace.episode))

        setattr(Connection, "send_stream_data", send_stream_data)
        self.installed = True

    def report(self) -> dict[str, Any] | None:
        if not self.installed:
            return None
        return {"chunks_queued_above_high_water": self.above,
                "max_streams_queueing_in_one_episode_above_high_water": self.max_episode_streams,
                "max_queue_at_an_append": self.max_queue_seen}


# --- server process -------------------------------------------------------------------


def run_server(args: argparse.Namespace) -> None:
    import trio

    import nerve

    _log_to_stderr()
    stats: collections.Counter[str] = collections.Counter()
    trace = AppendTrace()
    if args.trace:
        trace.install()

    class Soak(nerve.Service):
        name = "soak"

        @nerve.action
        async def upload(self, ctx: nerve.Context) -> dict[str, Any]:
            assert ctx.stream is not None
            h = hashlib.sha256()
            n = 0
            try:
                async for chunk in ctx.stream:
                    h.update(chunk)
                    n += len(chunk)
                    del chunk  # hold no chunk while waiting for the next
            except BaseException as exc:
                stats[f"upload_error:{type(exc).__name__}"] += 1
                raise
            digest = h.hexdigest()
            ok = digest == ctx.params.get("sha256") and n == ctx.params.get("size")
            stats["upload_ok" if ok else "upload_mismatch"] += 1
            return {"size": n, "sha256": digest, "ok": ok}

        @nerve.action
        async def download(self, ctx: nerve.Context) -> nerve.PacketStream:
            seed, size, expected = int(ctx.params["seed"]), int(ctx.params["size"]), ctx.params.get("sha256")

            async def chunks() -> AsyncIterator[bytes]:
                h = hashlib.sha256()
                try:
                    for view in content_views(seed, size):
                        h.update(view)
                        yield bytes(view)  # a chunk of its own, as a real producer would hold
                except BaseException as exc:
                    stats[f"download_error:{type(exc).__name__}"] += 1
                    raise
                stats["download_ok" if h.hexdigest() == expected else "download_mismatch"] += 1

            stats["download_started"] += 1
            return nerve.PacketStream.from_iterable(chunks())

    async def main() -> None:
        pool()
        async with nerve.Broker("soak-server", transport="tcp://127.0.0.1:0", services=[Soak()]) as broker:
            probe = QueueProbe(broker)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(probe.run)
                print(json.dumps({"address": broker.address, "pid": os.getpid()}), flush=True)
                with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                    async for _ in signals:
                        break
                nursery.cancel_scope.cancel()
            print(json.dumps({"server": dict(stats), **probe.report(), "trace": trace.report(),
                              "nerve": _provenance(), "vm": read_status()}), flush=True)

    trio.run(main)


# --- client process -------------------------------------------------------------------


def run_client(args: argparse.Namespace) -> None:
    import trio

    import nerve

    _log_to_stderr()
    trace = AppendTrace()
    if args.trace:
        trace.install()
    lo, hi = args.size
    calls = plan(args.streams, lo, hi, args.mode)
    expected = {(kind, i): content_digest(seed, size) for kind, i, seed, size in calls}
    records: list[dict[str, Any]] = []
    errors: collections.Counter[str] = collections.Counter()
    examples: dict[str, str] = {}
    ends: dict[str, float] = {}
    first_error: list[float] = []

    async def main() -> None:
        async with nerve.Broker("soak-client", transport="tcp://127.0.0.1:0", peers=[args.peer]) as b:
            with trio.fail_after(30):
                await b.wait_for_services("soak")
            probe = QueueProbe(b)
            print(json.dumps({"ready": True, "pid": os.getpid(), "vm": read_status()}), flush=True)
            if not args.no_sync:
                await trio.to_thread.run_sync(sys.stdin.readline)
            started = trio.current_time()
            t0_epoch = time.time()

            async def one(kind: str, i: int, seed: int, size: int) -> None:
                want = expected[(kind, i)]
                rec: dict[str, Any] = {"kind": kind, "i": i, "seed": seed, "size": size}
                try:
                    if kind == "upload":
                        async def source() -> AsyncIterator[bytes]:
                            for view in content_views(seed, size):
                                yield bytes(view)

                        res = await b.call("soak.upload", {"seed": seed, "size": size, "sha256": want},
                                           stream=nerve.PacketStream.from_iterable(source()))
                        rec.update(got_size=res["size"], digest=res["sha256"], server_ok=res["ok"])
                    else:
                        meta: dict[str, Any] = {}
                        stream = await b.call("soak.download", {"seed": seed, "size": size, "sha256": want},
                                              meta=meta)
                        h = hashlib.sha256()
                        n = 0
                        async for chunk in stream:
                            h.update(chunk)
                            n += len(chunk)
                            del chunk  # hold no chunk while waiting for the next
                        rec.update(got_size=n, digest=h.hexdigest(), server_ok=True)
                    rec["ok"] = rec["digest"] == want and rec["got_size"] == size and rec["server_ok"]
                    if not rec["ok"]:
                        rec["error"] = "DigestMismatch"
                except Exception as exc:
                    rec["ok"] = False
                    rec["error"] = type(exc).__name__
                    examples.setdefault(rec["error"], str(exc)[:300])
                    if not first_error:
                        first_error.append(trio.current_time() - started)
                if not rec["ok"]:
                    errors[f"{kind}:{rec['error']}"] += 1
                rec["t"] = round(trio.current_time() - started, 4)
                ends[kind] = max(ends.get(kind, 0.0), rec["t"])
                records.append(rec)

            unfinished = 0
            stalled: dict[str, Any] = {}

            async def just_before_the_deadline() -> None:
                await trio.sleep(max(0.0, args.deadline - 0.1))
                stalled.update(probe.report())  # the transport's state while calls are stuck

            async with trio.open_nursery() as outer:
                outer.start_soon(probe.run)
                outer.start_soon(just_before_the_deadline)
                with trio.move_on_after(args.deadline) as scope:
                    async with trio.open_nursery() as nursery:
                        for call in calls:
                            nursery.start_soon(one, *call)
                outer.cancel_scope.cancel()
            wall = trio.current_time() - started
            if scope.cancelled_caught:
                done = {(r["kind"], r["i"]) for r in records}
                for kind, i, seed, size in calls:
                    if (kind, i) not in done:
                        unfinished += 1
                        errors[f"{kind}:Unfinished"] += 1
                        records.append({"kind": kind, "i": i, "seed": seed, "size": size, "ok": False,
                                        "error": "Unfinished", "t": None})
            out = {"wall_s": wall, "ends": ends, "errors": dict(errors), "examples": examples,
                   "first_error_s": first_error[0] if first_error else None, "unfinished": unfinished,
                   "records": sorted(records, key=lambda r: (r["kind"], r["i"])), "t0_epoch": t0_epoch,
                   **(stalled or probe.report()), "trace": trace.report(), "vm_end": read_status()}
            print(json.dumps(out), flush=True)  # before the broker stops (which may take a while)

    trio.run(main)


# --- orchestrator ---------------------------------------------------------------------


class Sampler(threading.Thread):
    """VmRSS of some processes every ``period`` seconds: peak and a short series."""

    def __init__(self, pids: dict[str, int], period: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.pids = pids
        self.period = period
        self.peak = {k: 0 for k in pids}
        self.series: list[tuple[float, dict[str, int]]] = []
        self.stop_flag = threading.Event()
        self.t0 = time.monotonic()

    def run(self) -> None:
        while not self.stop_flag.is_set():
            row = {}
            for name, pid in self.pids.items():
                rss = read_status(pid).get("VmRSS", 0)
                row[name] = rss
                self.peak[name] = max(self.peak[name], rss)
            self.series.append((round(time.monotonic() - self.t0, 3), row))
            self.stop_flag.wait(self.period)


def _kill(proc: subprocess.Popen[Any] | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        proc.kill()
    proc.wait()


def _readline(proc: subprocess.Popen[Any], timeout: float, what: str) -> dict[str, Any]:
    """One JSON line from the process's stdout, within ``timeout`` seconds."""
    box: list[bytes] = []
    assert proc.stdout is not None
    t = threading.Thread(target=lambda: box.append(proc.stdout.readline()), daemon=True)  # type: ignore[union-attr]
    t.start()
    t.join(timeout)
    if not box or not box[0]:
        raise RuntimeError(f"{what}: no output within {timeout:g}s (exit status {proc.poll()})")
    return json.loads(box[0])


def orchestrate(args: argparse.Namespace) -> dict[str, Any]:
    """Run the two processes and measure (both are killed, and their logs removed, whatever
    happens)."""
    tmp = Path(tempfile.mkdtemp(prefix="nerve-soak-"))
    try:
        return _orchestrate(args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _orchestrate(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    lo, hi = args.size
    size_arg = f"{lo}-{hi}"
    server_err = open(tmp / "server.log", "w+b")
    client_err = open(tmp / "client.log", "w+b")
    me = [sys.executable, str(HERE)]
    server = client = None
    sampler: Sampler | None = None
    hard = time.monotonic() + args.deadline + args.grace
    notes: list[str] = []
    try:
        extra = ["--trace"] if args.trace else []
        server = subprocess.Popen(me + ["--role", "server"] + extra, stdout=subprocess.PIPE, stderr=server_err,
                                  start_new_session=True)
        s_info = _readline(server, 30, "server")
        client = subprocess.Popen(me + ["--role", "client", "--peer", s_info["address"], "--streams", str(args.streams),
                                        "--size", size_arg, "--mode", args.mode, "--deadline", str(args.deadline)] + extra,
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=client_err,
                                  start_new_session=True)
        c_ready = _readline(client, 90, "client (ready)")
        before = {"server": read_status(server.pid), "client": read_status(client.pid)}
        sampler = Sampler({"server": server.pid, "client": client.pid})
        sampler.start()
        assert client.stdin is not None
        client.stdin.write(b"go\n")
        client.stdin.flush()
        c_out = _readline(client, max(1.0, hard - time.monotonic()), "client (result)")
        server_after = read_status(server.pid)
        sampler.stop_flag.set()
        sampler.join()
        try:
            client.wait(timeout=15)
        except subprocess.TimeoutExpired:
            notes.append("the client did not exit within 15 s of reporting (killed)")
        server.send_signal(signal.SIGTERM)
        s_out = _readline(server, 30, "server (stats)")
        server.wait(timeout=30)
    finally:
        if sampler is not None:
            sampler.stop_flag.set()
        _kill(client)
        _kill(server)
    logs = {}
    for name, f in (("server", server_err), ("client", client_err)):
        f.seek(0)
        logs[name] = f.read().decode(errors="replace")
        f.close()
    drop_re = re.compile(r"^(\d+\.\d+) .*disconnecting (\S+): (\d+) bytes queued.*not reading", re.M)
    drops = {name: [{"peer": m.group(2), "queued": int(m.group(3)),
                     "at_s": round(float(m.group(1)) - c_out["t0_epoch"], 3)} for m in drop_re.finditer(text)]
             for name, text in logs.items()}
    records = c_out.pop("records")
    kinds = [k for k in ("upload", "download") if args.mode in (k, "both")]
    per_kind = {}
    for k in kinds:
        rs = [r for r in records if r["kind"] == k]
        good = [r for r in rs if r["ok"]]
        end = c_out["ends"].get(k) or c_out["wall_s"]
        per_kind[k] = {"calls": len(rs), "completed": len(good), "failed": len(rs) - len(good),
                       "bytes": sum(r["size"] for r in good), "end_s": end,
                       "mb_s": sum(r["size"] for r in good) / 1e6 / end if end else 0.0}
    sampled_peak = sampler.peak if sampler is not None else {}
    result = {
        "config": {"streams": args.streams, "size": [lo, hi], "mode": args.mode, "deadline_s": args.deadline},
        "nerve": s_out.get("nerve"),
        "per_kind": per_kind,
        "completed": sum(v["completed"] for v in per_kind.values()),
        "failed": sum(v["failed"] for v in per_kind.values()),
        "errors": c_out["errors"],
        "error_examples": c_out["examples"],
        "first_error_s": c_out["first_error_s"],
        "wall_s": c_out["wall_s"],
        "mb_s": sum(v["bytes"] for v in per_kind.values()) / 1e6 / c_out["wall_s"] if c_out["wall_s"] else 0.0,
        "rss_kb": {
            "server": {"before": before["server"].get("VmRSS", 0), "peak_hwm": s_out["vm"].get("VmHWM", 0),
                       "peak_sampled": sampled_peak.get("server", 0), "after": server_after.get("VmRSS", 0)},
            "client": {"before": before["client"].get("VmRSS", 0), "peak_hwm": c_out["vm_end"].get("VmHWM", 0),
                       "peak_sampled": sampled_peak.get("client", 0), "after": c_out["vm_end"].get("VmRSS", 0)},
        },
        "write_queue_peak": {"server": s_out.get("write_queue_peak"), "client": c_out.get("write_queue_peak")},
        "connections_seen": {"server": s_out.get("connections_seen"), "client": c_out.get("connections_seen")},
        "tcp_stats": {"server": s_out.get("tcp_stats"), "client": c_out.get("tcp_stats")},
        "rx_buffered_peak": {"server": s_out.get("rx_buffered_peak"), "client": c_out.get("rx_buffered_peak")},
        "producers_waiting_peak": {"server": s_out.get("producers_waiting_peak"),
                                   "client": c_out.get("producers_waiting_peak")},
        "drops": drops,
        "server_stats": s_out["server"],
        "trace": {"server": s_out.get("trace"), "client": c_out.get("trace")},
        "notes": notes,
        "rss_series": sampler.series if sampler is not None else [],
        "logs_tail": {k: v[-4000:] for k, v in logs.items()},
    }
    if args.records:
        result["records"] = records
    return result


def _provenance() -> dict[str, Any]:
    """Which nerve this process imported: its directory, the git commit there and whether
    that tree has uncommitted changes under the package (a run on a dirty tree says so)."""
    import nerve

    pkg = Path(nerve.__file__).resolve().parent
    out: dict[str, Any] = {"path": str(pkg), "commit": None, "dirty": None}
    try:
        git = ["git", "-C", str(pkg)]
        out["commit"] = subprocess.run(git + ["rev-parse", "--short", "HEAD"], capture_output=True,
                                       text=True, timeout=5).stdout.strip() or None
        if out["commit"]:
            status = subprocess.run(git + ["status", "--porcelain", "--", "."], capture_output=True,
                                    text=True, timeout=5).stdout
            out["dirty"] = bool(status.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    return out


def _mib(kb: int | None) -> str:
    return "-" if kb is None else f"{kb / 1024:.1f}"


def print_table(r: dict[str, Any]) -> None:
    c = r["config"]
    lo, hi = c["size"]
    size = f"{lo / MIB:g} MiB" if lo == hi else f"{lo / KIB:g} KiB-{hi / KIB:g} KiB"
    nv = r["nerve"] or {}
    which = f"{nv.get('path')} @ {nv.get('commit')}" + (" + uncommitted changes" if nv.get("dirty") else "")
    print(f"\nstream-burst soak: {c['streams']} concurrent per direction, {size} each, mode {c['mode']}, "
          f"one TCP connection on loopback\nnerve: {which}\n")
    print(f"{'direction':<10} {'calls':>6} {'completed':>10} {'failed':>7} {'last done s':>12} {'MB/s':>8}")
    for k, v in r["per_kind"].items():
        print(f"{k:<10} {v['calls']:>6} {v['completed']:>10} {v['failed']:>7} {v['end_s']:>12.2f} {v['mb_s']:>8.1f}")
    print(f"{'total':<10} {sum(v['calls'] for v in r['per_kind'].values()):>6} {r['completed']:>10} "
          f"{r['failed']:>7} {r['wall_s']:>12.2f} {r['mb_s']:>8.1f}")
    if r["errors"]:
        print("\nerrors (direction:class count):")
        for k, n in sorted(r["errors"].items(), key=lambda kv: -kv[1]):
            print(f"  {k:<40} {n}")
        for cls, msg in r["error_examples"].items():
            print(f"  e.g. {cls}: {msg}")
        print(f"  first error after {r['first_error_s']}s" if r["first_error_s"] is not None else "")
    print(f"\n{'process':<8} {'RSS before':>11} {'peak VmHWM':>11} {'peak 50ms':>10} {'after':>8} {'growth':>8}  (MiB)")
    for name, v in r["rss_kb"].items():
        growth = max(v["peak_hwm"], v["peak_sampled"]) - v["before"]
        print(f"{name:<8} {_mib(v['before']):>11} {_mib(v['peak_hwm']):>11} {_mib(v['peak_sampled']):>10} "
              f"{_mib(v['after']):>8} {_mib(growth):>8}")
    wq = r["write_queue_peak"]
    print(f"\nwrite queue peak (sampled every 5 ms): server {_mib(None if wq['server'] is None else wq['server'] // 1024)} MiB, "
          f"client {_mib(None if wq['client'] is None else wq['client'] // 1024)} MiB; "
          f"connections seen: server {r['connections_seen']['server']}, client {r['connections_seen']['client']}")
    for name, ds in r["drops"].items():
        if ds:
            queued = ", ".join(f"{d['queued'] / MIB:.1f}" for d in ds[:8])
            at = ", ".join(f"{d['at_s']:.2f}" for d in ds[:8])
            print(f"{name} dropped the connection {len(ds)}x as 'not reading': queued at the drop {queued} MiB, "
                  f"at {at} s")
    if not any(r["drops"].values()):
        print("no connection dropped as 'not reading'")
    rx = r["rx_buffered_peak"]
    print(f"received and not yet read by the streams' consumers, peak (sampled every 5 ms): "
          f"server {_mib(None if rx['server'] is None else rx['server'] // 1024)} MiB, "
          f"client {_mib(None if rx['client'] is None else rx['client'] // 1024)} MiB")
    pw = r["producers_waiting_peak"]
    if any(v is not None for v in pw.values()):
        last = {k: (v or {}).get("producers_waiting") for k, v in r["tcp_stats"].items()}
        in_queue = {k: (v or {}).get("bytes_queued") for k, v in r["tcp_stats"].items()}
        print(f"producers waiting for room (transport statistics, every 100 ms): peak {pw}, "
              f"last {last} with bytes queued {in_queue}")
    print(f"server handler stats: {r['server_stats']}")
    for note in r["notes"]:
        print(f"note: {note}")
    for name, t in r["trace"].items():
        if t:
            print(f"trace ({name}): {t}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--role", choices=["orchestrate", "server", "client"], default="orchestrate")
    p.add_argument("--streams", type=int, default=1000, help="concurrent calls per direction")
    p.add_argument("--size", type=parse_size_range, default=(MIB, MIB), help="1MiB, or a range 256KiB-1MiB")
    p.add_argument("--mode", choices=["upload", "download", "both"], default="both")
    p.add_argument("--deadline", type=float, default=300.0, help="seconds for all calls (then: unfinished)")
    p.add_argument("--json", type=Path, help="write the full result here")
    p.add_argument("--records", action="store_true", help="include every call's record in --json")
    p.add_argument("--trace", action="store_true",
                   help="count chunks queued above the write queue's high-water mark (wraps a transport method)")
    p.add_argument("--grace", type=float, default=90.0,
                   help="seconds beyond --deadline before the processes are killed")
    p.add_argument("--peer", help=argparse.SUPPRESS)
    p.add_argument("--no-sync", action="store_true", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.role == "server":
        run_server(args)
        return 0
    if args.role == "client":
        run_client(args)
        return 0
    r = orchestrate(args)
    print_table(r)
    if args.json:
        args.json.write_text(json.dumps(r, indent=1))
        print(f"\nwrote {args.json}")
    return 0 if r["failed"] == 0 and r["completed"] > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
