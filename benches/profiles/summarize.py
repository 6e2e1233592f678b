"""Summaries of measure_upload.py's raw outputs (benches/profiles/out/): medians of the clean
runs, system calls per GB by kind, copies per byte, perf samples grouped by where the CPU goes
(CPU s/GB per group) and py-spy's top frames by own on-CPU time.

    python benches/profiles/summarize.py > benches/profiles/out/summary.txt
"""

from __future__ import annotations

import json
import re
import statistics
import subprocess
import os
from pathlib import Path

OUT = Path(os.environ.get("NERVE_PROFILE_OUT", Path(__file__).resolve().parent / "out"))
PEERS = ["nerve", "raw-trio", "pyzmq"]
SIDES = ["server", "client"]
FREQ = 1999  # perf record -F
IDLE = ("epoll_wait", "poll (", "select (", "pselect")

GROUPS = [  # (group, regex on "dso sym"), first match wins
    ("kernel copy (recv/send)", r"_copy_to_iter|_copy_from_iter|copy_user|__check_object_size|copyout|copyin"),
    ("user memcpy/memmove", r"__memmove|__memcpy"),
    ("user memset", r"__memset"),
    ("page faults, mm", r"page_fault|clear_page|do_anonymous_page|unmap_page|handle_mm_fault|do_user_addr_fault|"
                        r"__handle_mm|folio|lru|zap_|free_pages|rmqueue|alloc_pages|mmap|brk|madvise|"
                        r"__mod_memcg|memcg|release_pages|free_unref|tlb"),
    ("malloc (libc)", r"libc\.so.*(malloc|free|_int_|realloc|systrim|sysmalloc)"),
    ("Python interpreter", r"libpython"),
    ("nerve _core (Rust)", r"_core\.cpython"),
    ("libzmq / pyzmq", r"libzmq|_zmq\.cpython|zmq"),
    ("scheduler, wake-ups", r"finish_task_switch|schedule|_raw_spin_unlock|try_to_wake|futex|ep_poll|"
                            r"do_epoll|__wake_up|enqueue_task|dequeue_task|pick_next"),
    ("TCP/IP stack, syscalls (rest of kernel)", r"kernel"),
    ("other user space", r"."),
]


def medians() -> dict:
    runs = [json.loads(ln) for ln in (OUT / "runs.jsonl").read_text().splitlines() if ln.strip()]
    out: dict = {}
    for peer in PEERS:
        clean = [r for r in runs if r["peer"] == peer and r["mode"] == "clean"]
        if not clean:
            continue
        out[peer] = {k: (statistics.median(r[k] for r in clean), min(r[k] for r in clean), max(r[k] for r in clean))
                     for k in ("mb_per_s", "server_cpu_s_per_gb", "client_cpu_s_per_gb")}
        out[peer]["n"] = len(clean)
        out[peer]["load"] = sorted({r["load_start"][0] for r in clean} | {r["load_end"][0] for r in clean})
    return out


def strace_calls(path: Path) -> dict[str, int]:
    calls: dict[str, int] = {}
    for line in path.read_text().splitlines():
        m = re.match(r"\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?(\w+)\s*$", line)
        if m and m.group(2) != "total":
            calls[m.group(2)] = int(m.group(1))
    return calls


def perf_groups(path: Path, gb: float) -> tuple[dict[str, float], int]:
    r = subprocess.run(["perf", "report", "-i", str(path), "--no-children", "--sort", "dso,sym", "--stdio",
                        "-n", "-g", "none"], capture_output=True, text=True)
    groups: dict[str, float] = {}
    total = 0
    for line in r.stdout.splitlines():
        m = re.match(r"\s*[\d.]+%\s+(\d+)\s+(.*)$", line)
        if not m:
            continue
        n, rest = int(m.group(1)), m.group(2)
        total += n
        for g, rx in GROUPS:
            if re.search(rx, rest):
                groups[g] = groups.get(g, 0) + n
                break
    return {g: n / FREQ / gb for g, n in sorted(groups.items(), key=lambda kv: -kv[1])}, total


def pyspy_top(path: Path, n: int = 12) -> tuple[list[tuple[str, float]], float, list[tuple[str, float]]]:
    """(own on-CPU time by frame, % idle, inclusive on-CPU time by function): % of busy samples."""
    own: dict[str, int] = {}
    incl: dict[str, int] = {}
    total = idle = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        leaf = stack.split(";")[-1]
        c = int(count)
        total += c
        if leaf.startswith(IDLE):
            idle += c
            continue
        own[leaf] = own.get(leaf, 0) + c
        for fn in {re.sub(r":\d+\)$", ")", f) for f in stack.split(";") if "(" in f and ".so" not in f}:
            incl[fn] = incl.get(fn, 0) + c
    busy = max(total - idle, 1)
    top = [(k, 100 * v / busy) for k, v in sorted(own.items(), key=lambda kv: -kv[1])[:n]]
    inclusive = [(k, 100 * v / busy) for k, v in sorted(incl.items(), key=lambda kv: -kv[1])[:2 * n]]
    return top, 100 * idle / max(total, 1), inclusive


def main() -> None:
    runs = [json.loads(ln) for ln in (OUT / "runs.jsonl").read_text().splitlines() if ln.strip()]
    size = runs[0]["size"]
    gb = size / 1e9
    print(f"# {size} bytes per upload; per GB = per 1e9 bytes\n")
    print("## clean runs: median (min-max), 1-min load averages seen")
    for peer, m in medians().items():
        print(f"{peer}: n={m['n']} " + ", ".join(f"{k} {v[0]:.3g} ({v[1]:.3g}-{v[2]:.3g})"
                                              for k, v in m.items() if isinstance(v, tuple)) + f", load {m['load']}")
    print("\n## system calls per GB (strace -c -f)")
    for peer in PEERS:
        for side in SIDES:
            p = OUT / f"{peer}.strace.0.{side}.strace.txt"
            if p.exists():
                calls = strace_calls(p)
                print(f"{peer} {side}: " + ", ".join(f"{k} {v / gb:.0f}" for k, v in
                                                     sorted(calls.items(), key=lambda kv: -kv[1]) if v / gb >= 1))
    print("\n## user-space copies >= 4 KiB (LD_PRELOAD copycount.so): calls per chunk, bytes per byte")
    chunks = size / runs[0]["chunk"]
    for r in runs:
        if r["mode"] != "copies":
            continue
        for side in SIDES:
            c = r.get(f"{side}_copies") or {}
            print(f"{r['peer']} {side}: memcpy {c.get('memcpy_calls', 0) / chunks:.2f}/chunk "
                  f"{c.get('memcpy_bytes_per_byte', 0):.2f} B/B; memmove {c.get('memmove_bytes_per_byte', 0):.2f} B/B; "
                  f"moving realloc {c.get('realloc_moves', 0) / chunks:.2f}/chunk {c.get('realloc_bytes_per_byte', 0):.2f} B/B"
                  f" (run at load {r['load_start'][0]})")
    print("\n## perf record -e cpu-clock: CPU s/GB by group (the perf run's window includes ~1.5 s idle)")
    for peer in PEERS:
        for side in SIDES:
            p = OUT / f"{peer}.perf.0.{side}.perf.data"
            if p.exists():
                groups, total = perf_groups(p, gb)
                print(f"{peer} {side} ({total / FREQ / gb:.2f} s/GB sampled): "
                      + "; ".join(f"{g} {v:.3f}" for g, v in groups.items() if v >= 0.005))
            s = OUT / f"{peer}.perf.0.{side}.perfstat.txt"
            if s.exists():
                print("   perf stat: " + "; ".join(" ".join(ln.split()[:2]) for ln in s.read_text().splitlines()
                                                   if re.match(r"\s+[\d,.]+\s+(msec|context|cpu-mig|page)", ln)))
    print("\n## py-spy --native: top frames by own on-CPU time (% of non-idle samples)")
    for peer in PEERS:
        for side in SIDES:
            p = OUT / f"{peer}.pyspy.0.{side}.pyspy.txt"
            if p.exists():
                top, idle, inclusive = pyspy_top(p)
                print(f"{peer} {side} (idle in epoll/poll {idle:.0f}% of samples), own:")
                for f, pct in top:
                    print(f"   {pct:5.1f}%  {f}")
                print("  inclusive (Python functions):")
                for f, pct in inclusive:
                    print(f"   {pct:5.1f}%  {f}")


if __name__ == "__main__":
    main()
