"""The ``nerve`` command: demo, call, upload and download against a node in another process."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

NODE = Path(__file__).with_name("stream_node.py")


def nerve_cmd(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("nerve", path=os.path.dirname(sys.executable)) or "nerve"
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def node(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    root = tmp_path / "root"
    root.mkdir()
    proc = subprocess.Popen([sys.executable, str(NODE), "--node-id", "cli-files", "--root", str(root)],
                            stdout=subprocess.PIPE)
    assert proc.stdout is not None
    deadline = time.monotonic() + 30
    line = b""
    while not line and time.monotonic() < deadline:
        line = proc.stdout.readline()
    try:
        yield json.loads(line)["address"], root
    finally:
        proc.terminate()
        proc.wait(timeout=15)


def test_demo_runs_and_checks_its_streams() -> None:
    out = nerve_cmd("demo", "--size", str(1 << 20), timeout=120)
    assert out.returncode == 0, out.stderr
    assert "now see ['alpha', 'beta', 'demo-client', 'gamma']" in out.stdout
    assert "'computed_by': 'beta'" in out.stdout  # meta from the nested call came back
    assert out.stdout.count("matches") == 2
    assert "nodes exited with [0, 0, 0]" in out.stdout


def test_call_upload_download(node: tuple[str, Path], tmp_path: Path) -> None:
    address, root = node
    called = nerve_cmd("call", "files.ping", "--peer", address)
    assert called.returncode == 0, called.stderr
    assert isinstance(json.loads(called.stdout)["result"], int)

    src = tmp_path / "big.bin"
    src.write_bytes(os.urandom(3 * 1024 * 1024 + 17))
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    up = nerve_cmd("upload", str(src), "files.save", "--peer", address)
    assert up.returncode == 0, up.stderr
    assert f"sha256 {digest}" in up.stdout
    assert hashlib.sha256((root / "big.bin").read_bytes()).hexdigest() == digest

    dst = tmp_path / "copy.bin"
    down = nerve_cmd("download", "files.load", str(dst), "--params", '{"name": "big.bin"}', "--peer", address)
    assert down.returncode == 0, down.stderr
    assert f"sha256 {digest}" in down.stdout
    assert dst.read_bytes() == src.read_bytes()


def test_errors_are_reported_with_their_type(node: tuple[str, Path]) -> None:
    address, _ = node
    out = nerve_cmd("call", "files.missing", "--peer", address, "--wait", "5")
    assert out.returncode == 1
    assert "ServiceNotFoundError" in out.stderr and "code 404" in out.stderr


def test_run_a_node_then_call_it_and_list_nodes() -> None:
    exe = shutil.which("nerve", path=os.path.dirname(sys.executable)) or "nerve"
    proc = subprocess.Popen([exe, "run", "--listen", "tcp://127.0.0.1:0", "--node-id", "cli-run",
                             "--service", "nerve.demo:Math"], stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        info = json.loads(proc.stdout.readline())
        assert info["nodeID"] == "cli-run"
        called = nerve_cmd("call", "math.add", '{"a": 1, "b": 2}', "--peer", info["address"])
        assert called.returncode == 0, called.stderr
        assert json.loads(called.stdout)["result"] == {"sum": 3}
        nodes = nerve_cmd("nodes", "--peer", info["address"])
        assert nodes.returncode == 0, nodes.stderr
        assert "cli-run" in nodes.stdout and "up" in nodes.stdout
    finally:
        proc.terminate()
        assert proc.wait(timeout=15) == 0


def test_run_serves_metrics_and_logs_json() -> None:
    """``nerve run --metrics``: Prometheus text over HTTP (httpx); ``--log-format json``: each
    log line a JSON object carrying the node's id."""
    import httpx

    exe = shutil.which("nerve", path=os.path.dirname(sys.executable)) or "nerve"
    proc = subprocess.Popen([exe, "-v", "--log-format", "json", "run", "--listen", "tcp://127.0.0.1:0",
                             "--node-id", "cli-metrics", "--service", "nerve.demo:Math",
                             "--metrics", "127.0.0.1:0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout is not None
        info = json.loads(proc.stdout.readline())
        assert info["metrics"].startswith("http://127.0.0.1:") and info["metrics"].endswith("/metrics")
        for _ in range(2):
            called = nerve_cmd("call", "math.add", '{"a": 1, "b": 2}', "--peer", info["address"])
            assert called.returncode == 0, called.stderr
        text = httpx.get(info["metrics"], timeout=10).text
        assert 'moleculer_request_total{action="math.add",service="math",type="local"} 2.0' in text
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=15)
    assert proc.returncode == 0, err
    lines = [json.loads(line) for line in err.splitlines() if line.strip()]
    started = [x for x in lines if x["message"].startswith("node cli-metrics started")]
    assert started and started[0]["node_id"] == "cli-metrics" and started[0]["level"] == "INFO"
    assert any(x["message"] == "node cli-metrics stopped" for x in lines)


def test_run_with_a_bad_metrics_address_says_so() -> None:
    out = nerve_cmd("run", "--listen", "tcp://127.0.0.1:0", "--metrics", "nowhere")
    assert out.returncode == 1
    assert "metrics address 'nowhere'" in out.stderr and "Traceback" not in out.stderr
