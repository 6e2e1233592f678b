"""Real moleculer.js nodes for the interop tests: each installed version from its lock file (npm
ci when missing), run as ``tests/interop/moleculer_node.js`` on the machine's NATS server.

Also the generated content both sides of a stream test agree on: the byte at offset i is
``(i * 31 + seed) & 255`` (moleculer_node.js computes the same bytes on its own)."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from nats_server import URL as NATS_URL

ROOT = Path(__file__).resolve().parent.parent
NODE_SCRIPT = Path(__file__).with_name("interop") / "moleculer_node.js"


@dataclass(frozen=True)
class MoleculerRelease:
    """An installed moleculer.js and the protocol version a nerve broker must speak with it."""

    version: str
    folder: Path
    protocol_version: str

    @property
    def node_modules(self) -> Path:
        return self.folder / "node_modules"


RELEASES = {
    "0.15": MoleculerRelease("0.15", ROOT / "benches" / "peers" / "js", "5"),
    "0.14": MoleculerRelease("0.14", ROOT / "tests" / "interop" / "moleculer-0.14", "4"),
}
SERIALIZERS = {"json": "JSON", "msgpack": "MsgPack"}
READY_TIMEOUT = 30.0

_namespaces = itertools.count(1)


def unique_namespace(prefix: str = "nervetest") -> str:
    """A namespace no other test (of this run or a concurrent one) uses."""
    return f"{prefix}{os.getpid()}x{next(_namespaces)}x{time.monotonic_ns() % 1_000_000}"


def install(version: str) -> MoleculerRelease:
    """The release, installed from its lock file (``npm ci``) when it is not installed yet."""
    release = RELEASES[version]
    if not (release.node_modules / "moleculer").is_dir():
        npm = shutil.which("npm")
        assert npm, f"npm is needed to install moleculer.js {version} for the interop tests (npm ci in {release.folder})"
        subprocess.run([npm, "ci", "--prefix", str(release.folder), "--no-audit", "--no-fund", "--loglevel=error"],
                       check=True, timeout=300)
    return release


@dataclass
class MoleculerNode:
    """A running moleculer.js node (see :func:`moleculer_node`)."""

    node_id: str
    namespace: str
    release: MoleculerRelease
    serializer: str
    disable_balancer: bool
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def protocol_version(self) -> str:
        """What the nerve broker of the same cluster passes as ``protocol_version``."""
        return self.release.protocol_version

    def output(self) -> str:
        """What the node printed so far (stdout and stderr), for failure messages."""
        return self.log.read_text(errors="replace")


@contextmanager
def moleculer_node(
    version: str = "0.15",
    serializer: str = "json",
    *,
    disable_balancer: bool = False,
    node_id: str = "js-node",
    namespace: str | None = None,
    nats_url: str = NATS_URL,
) -> Iterator[MoleculerNode]:
    """Start a moleculer.js ``version`` node and wait until it has started; terminate it at the end.

    ``serializer`` is nerve's name ("json" or "msgpack"); the node's output goes to a log file
    that failure messages quote."""
    assert serializer in SERIALIZERS, f"serializer must be one of {sorted(SERIALIZERS)}"
    assert shutil.which("node"), "node is needed for the moleculer.js interop tests"
    release = install(version)
    namespace = namespace if namespace is not None else unique_namespace()
    log = Path(os.environ.get("TMPDIR", "/tmp")) / f"moleculer-{namespace}-{node_id}.log"
    env = dict(os.environ, NODE_PATH=str(release.node_modules), MOLECULER_TRANSPORTER=nats_url)
    args = ["node", str(NODE_SCRIPT), node_id, namespace, SERIALIZERS[serializer], str(disable_balancer).lower()]
    with open(log, "wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env)
    node = MoleculerNode(node_id, namespace, release, serializer, disable_balancer, proc, log)
    try:
        _wait_ready(node)
        yield node
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.unlink(missing_ok=True)


def _wait_ready(node: MoleculerNode) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    while True:
        for line in node.output().splitlines():
            try:
                if json.loads(line) == {"ready": True}:
                    return
            except ValueError:
                pass
        assert node.proc.poll() is None, (
            f"moleculer.js {node.release.version} node exited ({node.proc.returncode}):\n{node.output()}")
        assert time.monotonic() < deadline, (
            f"moleculer.js {node.release.version} node not ready after {READY_TIMEOUT} s:\n{node.output()}")
        time.sleep(0.05)


# --- generated content -------------------------------------------------------------------

_PERIOD = 256  # (i * 31 + seed) & 255 repeats every 256 bytes


def _pattern(seed: int) -> bytes:
    return bytes((i * 31 + seed) & 255 for i in range(_PERIOD))


def generated_bytes(offset: int, n: int, seed: int) -> bytes:
    """Bytes ``offset .. offset + n`` of the generated content for ``seed``."""
    tile = _pattern(seed)
    start = offset % _PERIOD
    reps = (start + n) // _PERIOD + 1
    return (tile * reps)[start:start + n]


async def generated_chunks(size: int, seed: int, chunk: int = 100_000) -> AsyncIterator[bytes]:
    """The generated content in chunks of ``chunk`` bytes (not a power of two on purpose)."""
    for offset in range(0, size, chunk):
        yield generated_bytes(offset, min(chunk, size - offset), seed)


def generated_sha256(size: int, seed: int) -> str:
    """SHA-256 of ``size`` bytes of the generated content for ``seed``."""
    h = hashlib.sha256()
    step = _PERIOD * 4096  # 1 MiB, a whole number of periods
    block = generated_bytes(0, step, seed)
    for offset in range(0, size, step):
        h.update(block[:min(step, size - offset)])
    return h.hexdigest()
