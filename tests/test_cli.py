"""The ``nerve`` command: demo, call, upload and download against a node in another process."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any
from pathlib import Path

import pytest

from nats_server import ensure_nats

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


# --- issue 14: one error line, exit codes, Ctrl-C ------------------------------------------

TESTS = Path(__file__).parent


def nerve_exe() -> str:
    return shutil.which("nerve", path=os.path.dirname(sys.executable)) or "nerve"


def assert_one_error(out: subprocess.CompletedProcess[str], code: int = 1) -> str:
    """The run failed with ``code`` and said so in one ``error:`` line, with no traceback."""
    assert out.returncode == code, (out.returncode, out.stderr)
    assert "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr
    return lines[0]


class Lab:
    """A ``nerve run`` node hosting tests/cli_services.py's services, its stdout collected."""

    def __init__(self, *extra: str, node_id: str = "cli-lab") -> None:
        import queue
        import threading

        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "NERVE_PEER")}
        self.proc = subprocess.Popen(
            [nerve_exe(), "run", "--listen", "tcp://127.0.0.1:0", "--node-id", node_id,
             "--service", "cli_services:Lab", "--service", "cli_services:Other", *extra],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=TESTS, env=env)
        assert self.proc.stdout is not None
        first = self.proc.stdout.readline()
        assert first, self.proc.stderr.read() if self.proc.stderr else ""
        self.info = json.loads(first)
        self.address: str = self.info["address"]
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)

    def next_line(self, timeout: float = 10) -> dict[str, Any]:
        return json.loads(self.lines.get(timeout=timeout))  # type: ignore[no-any-return]

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=15)


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    node = Lab()
    try:
        yield node
    finally:
        node.stop()


def test_version() -> None:
    import nerve

    out = nerve_cmd("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"nerve {nerve.__version__}"


def test_usage_errors_exit_2() -> None:
    out = nerve_cmd("call")
    assert out.returncode == 2 and "Traceback" not in out.stderr and "error:" in out.stderr
    out = nerve_cmd("call", "a.b", "--transport", "tcp://127.0.0.1:4000")
    assert out.returncode == 2 and "--transport wants nats://" in out.stderr


def test_every_option_has_help_text() -> None:
    from nerve.cli import _parser

    def walk(parser: Any) -> Iterator[tuple[str, Any]]:
        for action in parser._actions:
            if action.choices and isinstance(action.choices, dict):  # subcommands
                for name, sub in action.choices.items():
                    yield from ((f"{name} {a}", act) for a, act in walk(sub))
            else:
                yield "/".join(action.option_strings) or action.dest, action

    missing = [name for name, action in walk(_parser()) if not action.help]
    assert not missing


def test_invalid_json_names_the_option_and_the_position(tmp_path: Path) -> None:
    line = assert_one_error(nerve_cmd("call", "a.b", '{"a": 1,', "--peer", "tcp://127.0.0.1:1"))
    assert "params: invalid JSON" in line and "line 1 column 9" in line
    line = assert_one_error(nerve_cmd("call", "a.b", "{}", "--meta", "[1 2]", "--peer", "tcp://127.0.0.1:1"))
    assert "--meta: invalid JSON" in line and "column 4" in line
    bad = tmp_path / "params.json"
    bad.write_text("\n{oops}")
    line = assert_one_error(nerve_cmd("call", "a.b", f"@{bad}", "--peer", "tcp://127.0.0.1:1"))
    assert f"(from {bad})" in line and "line 2 column 2" in line
    line = assert_one_error(nerve_cmd("call", "a.b", f"@{tmp_path / 'none.json'}", "--peer", "tcp://127.0.0.1:1"))
    assert "cannot read" in line and "no such file" in line


def test_missing_or_directory_upload_file(tmp_path: Path) -> None:
    line = assert_one_error(nerve_cmd("upload", str(tmp_path / "nope.bin"), "files.save", "--peer", "tcp://127.0.0.1:1"))
    assert "nope.bin" in line and "no such file" in line
    line = assert_one_error(nerve_cmd("upload", str(tmp_path), "files.save", "--peer", "tcp://127.0.0.1:1"))
    assert str(tmp_path) in line and "is a directory" in line


def test_a_port_in_use_is_named() -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"tcp://127.0.0.1:{taken.getsockname()[1]}"
        line = assert_one_error(nerve_cmd("run", "--listen", address))
    assert address in line and "in use" in line


def test_download_into_a_missing_directory_names_the_target(lab: Lab, tmp_path: Path) -> None:
    target = tmp_path / "missing" / "copy.bin"
    line = assert_one_error(nerve_cmd("download", "lab.blob", str(target), "--params", '{"size": 10}',
                                      "--peer", lab.address))
    assert str(target) in line and ".part" not in line and "does not exist" in line
    assert not (tmp_path / "missing").exists()


def test_a_refusing_peer_is_reported_at_once() -> None:
    start = time.monotonic()
    line = assert_one_error(nerve_cmd("call", "a.b", "--peer", "tcp://127.0.0.1:1"))
    assert time.monotonic() - start < 8  # not the default --wait of 10 s
    assert "connection refused" in line and "tcp://127.0.0.1:1" in line
    line = assert_one_error(nerve_cmd("nodes", "--peer", "tcp://127.0.0.1:1"))
    assert "connection refused" in line
    start = time.monotonic()
    line = assert_one_error(nerve_cmd("nodes", "--peer", "tcp://127.0.0.1:1", "--wait", "1.5"))
    assert "connection refused" in line and time.monotonic() - start >= 1.5  # an explicit --wait waits


def test_an_explicit_wait_waits_for_a_node_still_starting() -> None:
    """``nerve run &`` then ``nerve call --wait 20``: the call waits for the node to listen."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    address = f"tcp://127.0.0.1:{port}"
    call = subprocess.Popen([nerve_exe(), "call", "math.add", '{"a": 1, "b": 2}', "--peer", address,
                             "--wait", "30"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    node = None
    try:
        time.sleep(1.0)  # the call is refused meanwhile (nothing listens yet)
        node = subprocess.Popen([nerve_exe(), "run", "--listen", address, "--service", "nerve.demo:Math"],
                                stdout=subprocess.PIPE, text=True)
        out, err = call.communicate(timeout=60)
        assert call.returncode == 0, err
        assert json.loads(out)["result"] == {"sum": 3}
    finally:
        if call.poll() is None:
            call.kill()
        if node is not None:
            node.terminate()
            node.wait(15)


def test_no_peer_at_all_says_how_to_give_one() -> None:
    env = {k: v for k, v in os.environ.items() if k != "NERVE_PEER"}
    out = subprocess.run([nerve_exe(), "nodes"], capture_output=True, text=True, timeout=30, env=env)
    assert "--peer" in assert_one_error(out) and "NERVE_PEER" in out.stderr


def _interrupt(proc: subprocess.Popen[str], after: Callable[[], None]) -> tuple[str, str]:
    import signal

    after()
    proc.send_signal(signal.SIGINT)
    return proc.communicate(timeout=20)


def _joined(lab: Lab, proc: subprocess.Popen[str]) -> Callable[[], None]:
    """Wait until the CLI process ``proc`` has joined ``lab``'s cluster (its node, cli-<pid>,
    is listed), then a little more for its command to start: a signal sent before Python has
    even started nerve would test nothing of nerve's."""
    def wait() -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            out = nerve_cmd("call", "$node.list", "--peer", lab.address)
            if out.returncode == 0 and any(n["id"] == f"cli-{proc.pid}" and n["available"]
                                           for n in json.loads(out.stdout)["result"]):
                time.sleep(0.5)
                return
            time.sleep(0.1)
        raise AssertionError("the CLI never joined")
    return wait


def test_sigint_stops_nerve_run_with_130() -> None:
    proc = subprocess.Popen([nerve_exe(), "run", "--listen", "tcp://127.0.0.1:0", "--service", "nerve.demo:Math"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    _, err = _interrupt(proc, lambda: json.loads(proc.stdout.readline()))  # type: ignore[union-attr]
    assert proc.returncode == 130, err
    assert err.strip() == "error: interrupted"


def test_sigint_during_a_slow_call_exits_130(lab: Lab) -> None:
    proc = subprocess.Popen([nerve_exe(), "call", "lab.slow", '{"seconds": 60}', "--peer", lab.address],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    start = time.monotonic()
    _, err = _interrupt(proc, _joined(lab, proc))
    assert proc.returncode == 130, err
    assert err.strip() == "error: interrupted"
    assert time.monotonic() - start < 40


def test_sigint_during_a_download_leaves_nothing(lab: Lab, tmp_path: Path) -> None:
    target = tmp_path / "big.bin"
    proc = subprocess.Popen([nerve_exe(), "download", "lab.slow", str(target), "--peer", lab.address],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, err = _interrupt(proc, _joined(lab, proc))
    assert proc.returncode == 130 and err.strip() == "error: interrupted", err
    assert list(tmp_path.iterdir()) == []


# --- issue 14: commands and options --------------------------------------------------------


def test_call_params_from_a_file_and_stdin_target_and_env_peer(lab: Lab, tmp_path: Path) -> None:
    params = tmp_path / "p.json"
    params.write_text('{"x": [1, 2]}')
    out = nerve_cmd("call", "lab.echo", f"@{params}", "--meta", '{"m": 1}', "--peer", lab.address,
                    "--target", "cli-lab", "--retries", "1")
    assert out.returncode == 0, out.stderr
    answer = json.loads(out.stdout)
    assert answer["result"]["params"] == {"x": [1, 2]} and answer["result"]["node"] == "cli-lab"
    assert answer["result"]["meta"]["m"] == 1
    env = {**os.environ, "NERVE_PEER": lab.address}
    out = subprocess.run([nerve_exe(), "call", "lab.echo", "-"], input='{"from": "stdin"}', capture_output=True,
                         text=True, timeout=60, env=env)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["result"]["params"] == {"from": "stdin"}
    line = assert_one_error(nerve_cmd("call", "lab.echo", "--peer", lab.address, "--target", "nobody",
                                      "--wait", "2"))
    assert "nobody" in line


def test_call_of_a_stream_writes_its_bytes(lab: Lab, tmp_path: Path) -> None:
    sys.path.insert(0, str(TESTS))
    from cli_services import blob

    exe = nerve_exe()
    out = subprocess.run([exe, "call", "lab.blob", '{"size": 300001}', "--peer", lab.address],
                         capture_output=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout == blob(300001)
    target = tmp_path / "blob.bin"
    done = nerve_cmd("call", "lab.blob", '{"size": 5000}', "--peer", lab.address, "--output", str(target))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["written"] == 5000 and target.read_bytes() == blob(5000)


def test_listings_wait_for_discovery_and_leave_out_the_client(lab: Lab) -> None:
    out = nerve_cmd("actions", "--peer", lab.address, "--json")
    assert out.returncode == 0, out.stderr
    names = {row["name"] for row in json.loads(out.stdout)}
    assert {"lab.echo", "lab.slow", "lab.blob"} <= names and not any(n.startswith("$") for n in names)
    assert all(ep["nodeID"] == "cli-lab" for row in json.loads(out.stdout) for ep in row["endpoints"])
    table = nerve_cmd("actions", "--peer", lab.address, "--all")
    assert "$node.list" in table.stdout and "cli-lab" in table.stdout

    out = nerve_cmd("services", "--peer", lab.address, "--json")
    assert out.returncode == 0, out.stderr
    assert {row["fullName"]: row["nodes"] for row in json.loads(out.stdout)} == {"lab": ["cli-lab"],
                                                                               "other": ["cli-lab"]}
    out = nerve_cmd("events", "--peer", lab.address)
    assert out.returncode == 0, out.stderr
    rows = sorted(line.split() for line in out.stdout.splitlines())
    assert rows == [["lab.*", "lab", "cli-lab"], ["lab.*", "other", "cli-lab"]]

    nodes = nerve_cmd("nodes", "--peer", lab.address, "--node-id", "cli-lister")
    assert nodes.returncode == 0, nodes.stderr
    assert "cli-lab" in nodes.stdout and "cli-lister" not in nodes.stdout
    both = nerve_cmd("nodes", "--peer", lab.address, "--node-id", "cli-lister", "--all")
    assert "cli-lister" in both.stdout


def test_emit_and_broadcast_reach_the_handlers(lab: Lab) -> None:
    out = nerve_cmd("emit", "lab.hello", '{"n": 1}', "--group", "lab", "--peer", lab.address)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["groups"] == ["lab"]
    assert lab.next_line() == {"event": "lab.hello", "data": {"n": 1}, "groups": ["lab"]}
    out = nerve_cmd("broadcast", "lab.all", '{"n": 2}', "--peer", lab.address)
    assert out.returncode == 0, out.stderr
    got = [lab.next_line(), lab.next_line()]
    assert {"other": "lab.all", "data": {"n": 2}} in got
    assert any(line.get("event") == "lab.all" for line in got)
    line = assert_one_error(nerve_cmd("emit", "nobody.listens", "--peer", lab.address, "--wait", "1"))
    assert "no node subscribes to 'nobody.listens'" in line


def test_ping(lab: Lab) -> None:
    out = nerve_cmd("ping", "cli-lab", "--peer", lab.address, "--count", "2", "--interval", "0.1")
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("pong from cli-lab: ") == 2
    line = assert_one_error(nerve_cmd("ping", "cli-ghost", "--peer", lab.address, "--wait", "1"))
    assert "cli-ghost" in line and "not found" in line


def test_watch_prints_events_until_ctrl_c(lab: Lab) -> None:
    proc = subprocess.Popen([nerve_exe(), "watch", "lab.**", "--peer", lab.address],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stderr is not None
    try:
        assert "watching 'lab.**'" in proc.stderr.readline()
        sent = nerve_cmd("emit", "lab.deep.news", '{"n": 3}', "--peer", lab.address)
        assert sent.returncode == 0, sent.stderr
        seen = json.loads(proc.stdout.readline())
        assert seen["event"] == "lab.deep.news" and seen["data"] == {"n": 3}
    finally:
        _, err = _interrupt(proc, lambda: None)
    assert proc.returncode == 130 and err.strip() == "error: interrupted"


def test_run_imports_services_from_the_current_directory(lab: Lab) -> None:
    assert lab.info["nodeID"] == "cli-lab"  # tests/cli_services.py, with tests/ the cwd only
    out = subprocess.run([nerve_exe(), "run", "--service", "cli_services_missing:Lab"], capture_output=True,
                         text=True, timeout=30, cwd=TESTS)
    assert "cannot import 'cli_services_missing'" in assert_one_error(out)


def test_secret_namespace_and_serializer_must_match() -> None:
    node = Lab("--secret", "s3", "--namespace", "ns", "--serializer", "json", node_id="cli-secret")
    try:
        ok = nerve_cmd("call", "lab.echo", "{}", "--peer", node.address, "--secret", "s3", "--namespace", "ns",
                       "--serializer", "json")
        assert ok.returncode == 0, ok.stderr
        assert json.loads(ok.stdout)["result"]["node"] == "cli-secret"
        start = time.monotonic()
        line = assert_one_error(nerve_cmd("call", "lab.echo", "{}", "--peer", node.address, "--wait", "30",
                                          "--namespace", "ns", "--serializer", "json"))
        assert node.address in line and "authentication" in line and time.monotonic() - start < 10
        line = assert_one_error(nerve_cmd("call", "lab.echo", "{}", "--peer", node.address, "--secret", "s3",
                                          "--serializer", "json", "--wait", "30"))
        assert "namespace mismatch" in line and time.monotonic() - start < 20
    finally:
        node.stop()


def test_sigint_during_the_demo_stops_its_nodes() -> None:
    import re

    proc = subprocess.Popen([nerve_exe(), "demo", "--size", str(1 << 30)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    seen = ""
    while "1. discovery" not in seen:
        line = proc.stdout.readline()
        assert line, proc.stderr.read() if proc.stderr else ""
        seen += line
    pids = [int(p) for p in re.findall(r"\(pid (\d+)\)", seen)]
    assert len(pids) == 3
    _, err = _interrupt(proc, lambda: None)
    assert proc.returncode == 130 and err.strip() == "error: interrupted", err
    for pid in pids:  # every node was stopped (and reaped) before the demo exited
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_transport_nats() -> None:
    ensure_nats()  # the machine's server, started if it is down
    namespace = f"cli-{os.getpid()}"
    nats = "nats://127.0.0.1:4222"
    node = Lab("--listen", nats, "--namespace", namespace, node_id="cli-nats")
    try:
        out = nerve_cmd("call", "lab.echo", '{"over": "nats"}', "--transport", nats, "--namespace", namespace)
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["result"] == {"params": {"over": "nats"}, "node": "cli-nats", "meta": {}}
        listed = nerve_cmd("services", "--transport", nats, "--namespace", namespace, "--json")
        assert {row["fullName"] for row in json.loads(listed.stdout)} == {"lab", "other"}
    finally:
        node.stop()
    line = assert_one_error(nerve_cmd("call", "lab.echo", "--transport", "nats://127.0.0.1:1"))
    assert "nats://127.0.0.1:1" in line


def test_upload_hashes_while_sending_and_stops_on_sigint(lab: Lab, tmp_path: Path) -> None:
    src = tmp_path / "slow.bin"
    src.write_bytes(os.urandom(4 * 1024 * 1024))
    done = nerve_cmd("upload", str(src), "lab.digest", "--peer", lab.address)
    assert done.returncode == 0, done.stderr
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    assert f"sha256 {digest}  {4 * 1024 * 1024} bytes" in done.stdout
    assert json.loads(done.stdout.split("\n", 1)[1])["result"] == {"sha256": digest}
    proc = subprocess.Popen([nerve_exe(), "upload", str(src), "lab.digest", "--params", '{"rate": 200000}',
                             "--peer", lab.address], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = _interrupt(proc, _joined(lab, proc))
    assert proc.returncode == 130 and err.strip() == "error: interrupted", err
    assert "sha256" not in out
    line = assert_one_error(nerve_cmd("call", "lab.slow", '{"seconds": 30}', "--timeout", "0.5", "--peer",
                                      lab.address))
    assert "RequestTimeoutError" in line


def test_run_advertises_what_it_is_told() -> None:
    """``nerve run --advertise``: peers are told that address (seen by a client in $node.list)."""
    exe = shutil.which("nerve", path=os.path.dirname(sys.executable)) or "nerve"
    proc = subprocess.Popen([exe, "run", "--listen", "tcp://127.0.0.1:0", "--node-id", "cli-adv",
                             "--advertise", "tcp://10.1.2.3:4000", "--service", "nerve.demo:Math"],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        info = json.loads(proc.stdout.readline())
        out = nerve_cmd("call", "$node.list", "--peer", info["address"])
        assert out.returncode == 0, out.stderr
        nodes = {n["id"]: n for n in json.loads(out.stdout)["result"]}
        assert nodes["cli-adv"]["address"] == "tcp://10.1.2.3:4000"
    finally:
        proc.terminate()
        assert proc.wait(timeout=15) == 0
