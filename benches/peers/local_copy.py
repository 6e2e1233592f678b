"""The reference of the ``file`` scenarios: a local copy of the harness's file with fsync, in a
process of its own (no server: this client is the whole peer).

    python benches/peers/local_copy.py client --scenario file_upload --file SRC --dir DIR --sha256 HEX

What ``cp SRC DEST && sync`` does for the data, done the plain way: read the source in 1 MiB
blocks (``readinto`` one reused buffer) and write each block to the destination, then
``fsync`` and close. Like nerve's ``transfer_to``, the blocks go to a temporary name beside the
destination, which is renamed over it once fsynced, so both pay the same durability steps
(neither fsyncs the directory). Not ``shutil.copyfile`` (``sendfile``) nor coreutils ``cp``
(``copy_file_range``, which a reflink-capable file system answers by sharing the blocks, writing
no data at all): every byte goes through this process and is written to the file system, as it
must on a node that receives the file over the network.

The copy is the measured part (between the marks): MB/s = size / its wall time; CPU is this
process's (user + system). Afterwards, outside the marks, the destination's size and SHA-256
are checked against the source's (``--sha256``) and the destination is deleted. The scenario
name (``file_upload`` or ``file_download``) only says which nerve figure this one stands
beside: a local copy is the same in both directions.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import arm_deadline, mark, result  # noqa: E402

BLOCK = 1024 * 1024


def copy_fsync(src: Path, dest: Path, block: int = BLOCK) -> int:
    """Copy ``src`` to ``dest`` in ``block``-byte reads and writes, fsync, close, rename into
    place. Returns the bytes copied."""
    tmp = dest.with_name(f".{dest.name}.part")
    buf = bytearray(block)
    view = memoryview(buf)
    copied = 0
    fin = os.open(src, os.O_RDONLY)
    try:
        fout = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            while True:
                n = os.readv(fin, [buf])
                if not n:
                    break
                at = 0
                while at < n:
                    at += os.write(fout, view[at:n])
                copied += n
            os.fsync(fout)
        finally:
            os.close(fout)
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        os.close(fin)
    return copied


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(BLOCK), b""):
            h.update(block)
    return h.hexdigest()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["client"])
    p.add_argument("--scenario", choices=["file_upload", "file_download"], default="file_upload")
    p.add_argument("--file", required=True, help="the source file")
    p.add_argument("--dir", required=True, help="where the destination goes (then deleted)")
    p.add_argument("--size", type=int, required=True, help="the source's size in bytes (checked)")
    p.add_argument("--sha256", default="", help="the source's SHA-256: the destination must match it")
    p.add_argument("--deadline", type=float, default=120.0)
    p.add_argument("--port", type=int, default=0, help="ignored (no server)")
    args = p.parse_args()
    arm_deadline(args.deadline)
    src = Path(args.file)
    dest = Path(args.dir) / f"local-copy-{os.getpid()}.bin"
    cpu0 = mark("start")
    start = time.perf_counter()
    copied = copy_fsync(src, dest)
    elapsed = time.perf_counter() - start
    cpu = mark("end") - cpu0
    try:
        size = dest.stat().st_size
        if copied != args.size or size != args.size:
            raise SystemExit(f"local copy: copied {copied} bytes, destination has {size}, expected {args.size}")
        digest = sha256_of(dest) if args.sha256 else ""
        if args.sha256 and digest != args.sha256:
            raise SystemExit(f"local copy: the destination's SHA-256 is {digest}, the source's {args.sha256}")
    finally:
        dest.unlink(missing_ok=True)
    result(client_cpu_s=cpu, bytes=copied, seconds=elapsed, mb_per_s=copied / elapsed / 1e6,
           verified="sha256" if digest else "size", block=BLOCK)


if __name__ == "__main__":
    main()
