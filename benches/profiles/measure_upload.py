"""Where a gigabyte goes (issue 15): one upload (client -> server, memory to memory, loopback)
per run, each peer's server and client started standalone exactly as benches/run.py starts
them, with one observer attached to both processes for the measured part only (between the
client's ``start`` and ``end`` marks; attached while the client waits for ``go``).

    python benches/profiles/measure_upload.py                      # everything, 1 GiB
    python benches/profiles/measure_upload.py --peers nerve --modes clean,strace

Modes (one per run, so that no observer distorts another's figures):
  clean   nothing attached: MB/s and CPU s/GB of each side (from /proc/PID/stat)
  strace  ``strace -c -f -p PID`` on each side: system calls by kind
  perf    ``perf stat`` (task-clock, context switches, faults) and ``perf record -e cpu-clock -g``
  pyspy   ``py-spy record --native -r 400 -f raw`` on each side
  copies  LD_PRELOAD=copycount.so (built from copycount.c): memcpy / memmove / moving realloc
          calls of >= 4 KiB and their bytes, per side
Raw outputs go to benches/profiles/out/ (``<peer>.<mode>.<run>.<side>.*``) and one JSON line
per run to out/runs.jsonl, with the load average at the start and end of each run.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
PEERS_DIR = ROOT / "benches" / "peers"
OUT = Path(os.environ.get("NERVE_PROFILE_OUT", HERE / "out"))  # (issue 15's "after" runs: out-after/)
PY = str(ROOT / ".venv" / "bin" / "python")
PYSPY = str(ROOT / ".venv" / "bin" / "py-spy")
GIB = 1 << 30
TICK = os.sysconf("SC_CLK_TCK")

PEERS = {"nerve": "nerve_peer.py", "raw-trio": "raw_trio.py", "pyzmq": "zmq_peer.py"}
MODES = ["clean", "strace", "perf", "pyspy", "copies"]


def loadavg() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def cpu_s(pid: int) -> float:
    """user + system CPU of the whole process (all threads), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def copy_counters(pid: int) -> list[int] | None:
    try:
        import struct

        return list(struct.unpack("6Q", Path(f"/tmp/copycount.{pid}").read_bytes()[:48]))
    except (OSError, ValueError):
        return None


def build_shim() -> str:
    so = "/tmp/copycount.so"
    subprocess.run(["gcc", "-O2", "-shared", "-fPIC", "-fno-builtin", "-fno-tree-loop-distribute-patterns",
                    "-o", so, str(HERE / "copycount.c"), "-ldl"], check=True)
    return so


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def next_json(proc: subprocess.Popen, timeout: float) -> dict | None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        line = proc.stdout.readline()
        if not line:
            return None
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                continue
    return None


def observers(mode: str, pid: int, stem: str) -> list[subprocess.Popen]:
    """Start this mode's observers on ``pid``; their outputs go to files named from ``stem``."""
    if mode == "strace":
        return [subprocess.Popen(["strace", "-c", "-f", "-o", f"{stem}.strace.txt", "-p", str(pid)],
                                 stderr=subprocess.DEVNULL)]
    if mode == "perf":
        return [subprocess.Popen(["perf", "stat", "-e", "task-clock,context-switches,cpu-migrations,page-faults",
                                  "-o", f"{stem}.perfstat.txt", "-p", str(pid)], stderr=subprocess.DEVNULL),
                subprocess.Popen(["perf", "record", "-e", "cpu-clock", "-F", "1999", "-g", "-o",
                                  f"{stem}.perf.data", "-p", str(pid)],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    if mode == "pyspy":
        return [subprocess.Popen([PYSPY, "record", "--native", "-r", "400", "-f", "raw", "-o",
                                  f"{stem}.pyspy.txt", "-p", str(pid)],
                                 stdout=subprocess.DEVNULL, stderr=open(f"{stem}.pyspy.log", "w"))]
    return []


def run(peer: str, mode: str, n: int, size: int, chunk: int, shim: str | None) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("NERVE_BENCH_NO_SYNC", None)
    if mode == "copies":
        assert shim
        env["LD_PRELOAD"] = shim
    script = str(PEERS_DIR / PEERS[peer])
    rec: dict = {"peer": peer, "mode": mode, "run": n, "size": size, "chunk": chunk, "load_start": loadavg()}
    port = free_port()
    server = subprocess.Popen([PY, script, "server", "--port", str(port), "--deadline", "900"], cwd=ROOT, env=env,
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    tools: list[subprocess.Popen] = []
    client = None
    try:
        ready = next_json(server, 60)
        assert ready and ready.get("ready"), ready
        client = subprocess.Popen([PY, script, "client", "--port", str(port), "--scenario", "upload",
                                   "--size", str(size), "--chunk", str(chunk), "--deadline", "900"],
                                  cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.DEVNULL, text=True)
        pids = {"server": server.pid, "client": client.pid}
        rec["pids"] = pids
        marks: dict = {}
        while True:
            msg = next_json(client, 900)
            if msg is None:
                break
            if msg.get("idle"):
                for side, pid in pids.items():
                    tools += observers(mode, pid, str(OUT / f"{peer}.{mode}.{n}.{side}"))
                time.sleep(1.5 if tools else 0.2)  # attached before the measured part
                client.stdin.write("go\n")
                client.stdin.flush()
            elif "mark" in msg:
                marks[msg["mark"]] = {"t": time.perf_counter(),
                                      **{f"{s}_cpu": cpu_s(p) for s, p in pids.items()},
                                      **{f"{s}_copies": copy_counters(p) for s, p in pids.items()}}
                if msg["mark"] == "end":
                    for t in tools:
                        t.send_signal(signal.SIGINT)
            else:
                rec["result"] = msg
        client.wait(60)
        for t in tools:
            try:
                t.wait(120)
            except subprocess.TimeoutExpired:
                t.kill()
        gb = size / 1e9
        s, e = marks["start"], marks["end"]
        rec["seconds"] = e["t"] - s["t"]
        rec["mb_per_s"] = rec["result"]["mb_per_s"]
        for side in ("server", "client"):
            rec[f"{side}_cpu_s_per_gb"] = (e[f"{side}_cpu"] - s[f"{side}_cpu"]) / gb
            if e[f"{side}_copies"] and s[f"{side}_copies"]:
                d = [b - a for a, b in zip(s[f"{side}_copies"], e[f"{side}_copies"])]
                rec[f"{side}_copies"] = {"memcpy_calls": d[0], "memcpy_bytes_per_byte": d[1] / size,
                                         "memmove_calls": d[2], "memmove_bytes_per_byte": d[3] / size,
                                         "realloc_moves": d[4], "realloc_bytes_per_byte": d[5] / size}
    finally:
        for p in (client, server):
            if p is not None and p.poll() is None:
                p.terminate()
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
        for t in tools:
            if t.poll() is None:
                t.kill()
    rec["load_end"] = loadavg()
    return rec


# --- summaries of the raw outputs ---------------------------------------------------------

def strace_calls(path: Path) -> dict[str, int]:
    calls: dict[str, int] = {}
    for line in path.read_text().splitlines():
        m = re.match(r"\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?(\w+)\s*$", line)
        if m and m.group(2) != "total":
            calls[m.group(2)] = int(m.group(1))
    return calls


def pyspy_top(path: Path, n: int = 15) -> list[tuple[str, float]]:
    own: dict[str, int] = {}
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        leaf = stack.split(";")[-1]
        own[leaf] = own.get(leaf, 0) + int(count)
        total += int(count)
    return [(k, 100 * v / total) for k, v in sorted(own.items(), key=lambda kv: -kv[1])[:n]]


def perf_top(path: Path, n: int = 20) -> str:
    r = subprocess.run(["perf", "report", "-i", str(path), "--no-children", "--sort", "dso,sym", "--stdio",
                        "-g", "none", "--percent-limit", "0.7"], capture_output=True, text=True)
    rows = [ln for ln in r.stdout.splitlines() if ln.strip() and not ln.startswith("#")]
    return "\n".join(rows[:n])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--peers", default=",".join(PEERS))
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--runs", type=int, default=3, help="runs of the clean mode (others: 1)")
    ap.add_argument("--size", type=int, default=GIB)
    ap.add_argument("--chunk", type=int, default=256 * 1024)
    ap.add_argument("--max-load", type=float, default=1.0,
                    help="wait (up to 20 s) for the 1-min load average to fall under this before a run")
    args = ap.parse_args()
    OUT.mkdir(exist_ok=True)
    shim = build_shim() if "copies" in args.modes else None
    log = (OUT / "runs.jsonl").open("a")
    for mode in args.modes.split(","):
        for n in range(args.runs if mode == "clean" else 1):
            for peer in args.peers.split(","):
                waited = time.monotonic()
                while loadavg()[0] > args.max_load and time.monotonic() - waited < 20:
                    time.sleep(5)
                rec = run(peer, mode, n, args.size, args.chunk, shim)
                log.write(json.dumps(rec) + "\n")
                log.flush()
                brief = {k: rec.get(k) for k in ("peer", "mode", "run", "mb_per_s", "server_cpu_s_per_gb",
                                                 "client_cpu_s_per_gb", "load_start", "load_end")}
                print(json.dumps(brief), flush=True)
                stem = OUT / f"{peer}.{mode}.{n}"
                for side in ("server", "client"):
                    if mode == "strace":
                        calls = strace_calls(Path(f"{stem}.{side}.strace.txt"))
                        per_gb = {k: round(v / (args.size / 1e9)) for k, v in
                                  sorted(calls.items(), key=lambda kv: -kv[1])}
                        print(f"  {side} syscalls/GB: {per_gb}", flush=True)
                    elif mode == "copies":
                        print(f"  {side} copies: {rec.get(f'{side}_copies')}", flush=True)
                    elif mode == "pyspy" and Path(f"{stem}.{side}.pyspy.txt").exists():
                        top = pyspy_top(Path(f"{stem}.{side}.pyspy.txt"))
                        Path(f"{stem}.{side}.pyspy-top.txt").write_text(
                            "\n".join(f"{pct:5.1f}%  {f}" for f, pct in top) + "\n")
                        print(f"  {side} py-spy own time: " + "; ".join(f"{f} {p:.0f}%" for f, p in top[:6]))
                    elif mode == "perf":
                        text = perf_top(Path(f"{stem}.{side}.perf.data"))
                        Path(f"{stem}.{side}.perf-top.txt").write_text(text + "\n")
                        print(f"  {side} perf:\n" + "\n".join("    " + ln for ln in text.splitlines()[:12]))
                        print("    " + " ".join(ln.strip() for ln in Path(f"{stem}.{side}.perfstat.txt")
                                               .read_text().splitlines() if "#" in ln or "msec" in ln), flush=True)


if __name__ == "__main__":
    sys.exit(main())
