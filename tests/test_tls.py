"""TLS on the native TCP transport: encrypted calls and streams between processes, mutual TLS
with the node id checked against the certificate, and peers that fail it refused without
harm to the node. Certificates come from a throwaway CA (trustme)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
import trustme

import nerve
from nerve.errors import BrokerOptionsError, RequestTimeoutError

pytestmark = pytest.mark.anyio

NODE = """
import hashlib, nerve

class Store(nerve.Service):
    name = "store"

    @nerve.action
    async def echo(self, ctx):
        return ctx.params

    @nerve.action
    async def upload(self, ctx):
        digest = hashlib.sha256()
        size = 0
        async for chunk in ctx.stream:
            digest.update(chunk)
            size += len(chunk)
        return {"size": size, "sha256": digest.hexdigest()}

    @nerve.action
    async def download(self, ctx):
        async def chunks():
            for i in range(ctx.params["n"]):
                yield bytes([i % 256]) * 65536
        return nerve.PacketStream.from_iterable(chunks())
"""


class Certs:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.ca = trustme.CA()
        self.ca_path = tmp / "ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_path))

    def issue(self, name: str, ca: trustme.CA | None = None) -> tuple[str, str]:
        cert = (ca or self.ca).issue_cert(name)
        cert_path, key_path = self.tmp / f"{name}.crt", self.tmp / f"{name}.key"
        cert.cert_chain_pems[0].write_to_path(str(cert_path))
        for pem in cert.cert_chain_pems[1:]:
            pem.write_to_path(str(cert_path), append=True)
        cert.private_key_pem.write_to_path(str(key_path))
        return str(cert_path), str(key_path)

    def options(self, name: str, *, mutual: bool = False) -> dict[str, Any]:
        cert, key = self.issue(name)
        return {"tls_cert": cert, "tls_key": key, "tls_ca": str(self.ca_path), "tls_mutual": mutual}


@pytest.fixture
def certs(tmp_path: Path) -> Certs:
    return Certs(tmp_path)


@pytest.fixture
def node_process(tmp_path: Path, certs: Certs) -> Iterator[Any]:
    """Start ``nerve run`` with TLS flags in its own process; yields (start(**kw) -> address)."""
    (tmp_path / "tlsnode.py").write_text(NODE)
    procs: list[subprocess.Popen[str]] = []

    def start(node_id: str, *, mutual: bool) -> str:
        cert, key = certs.issue(node_id)
        cmd = [sys.executable, "-m", "nerve.cli", "run", "--node-id", node_id, "--service", "tlsnode:Store",
               "--tls-cert", cert, "--tls-key", key, "--tls-ca", str(certs.ca_path)]
        if mutual:
            cmd.append("--tls-mutual")
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
        procs.append(proc)
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line, "the node did not start"
        return str(json.loads(line)["address"])

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


async def _upload_and_download(b: nerve.Broker) -> None:
    data = os.urandom(3 * 1024 * 1024 + 17)

    async def chunks() -> Any:
        for at in range(0, len(data), 100_000):
            yield data[at:at + 100_000]

    res = await b.call("store.upload", stream=nerve.PacketStream.from_iterable(chunks()), timeout=30)
    assert res == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    stream = await b.call("store.download", {"n": 40}, timeout=30)
    got = await stream.read_all()
    assert got == b"".join(bytes([i]) * 65536 for i in range(40))


@pytest.mark.parametrize("mutual", [False, True], ids=["tls", "mutual-tls"])
async def test_calls_and_streams_over_tls_between_processes(node_process: Any, certs: Certs,
                                                            mutual: bool) -> None:
    address = node_process("tls-server", mutual=mutual)
    async with nerve.Broker("tls-client", transport="tcp://127.0.0.1:0", peers=[address],
                            **certs.options("tls-client", mutual=mutual)) as b:
        await b.wait_for_services("store", timeout=10)
        conn = b.transport.connections["tls-server"]  # type: ignore[attr-defined]
        assert isinstance(conn.stream, trio.SSLStream)  # encrypted, not plain TCP
        assert conn.stream.getpeercert() is not None
        assert await b.call("store.echo", {"x": [1, 2, 3]}) == {"x": [1, 2, 3]}
        await _upload_and_download(b)


async def test_mutual_tls_refuses_a_client_whose_certificate_names_another_node(
        node_process: Any, certs: Certs, caplog: pytest.LogCaptureFixture) -> None:
    address = node_process("mtls-server", mutual=True)
    cert, key = certs.issue("somebody-else")
    async with nerve.Broker("impostor", transport="tcp://127.0.0.1:0", peers=[address],
                            tls_cert=cert, tls_key=key, tls_ca=str(certs.ca_path), tls_mutual=True) as bad:
        with pytest.raises(RequestTimeoutError):
            await bad.wait_for_services("store", timeout=1.5)
        assert "mtls-server" not in bad.transport.connected()
    # The node is unharmed: a client with its own certificate gets in.
    async with nerve.Broker("honest", transport="tcp://127.0.0.1:0", peers=[address],
                            **certs.options("honest", mutual=True)) as good:
        await good.wait_for_services("store", timeout=10)
        assert await good.call("store.echo", 7) == 7


async def test_peers_without_a_valid_certificate_are_refused(node_process: Any, certs: Certs,
                                                             tmp_path: Path) -> None:
    address = node_process("strict-server", mutual=True)
    host, port = address.removeprefix("tcp://").split(":")
    # 1. Plain TCP speaking nerve's HELLO to a TLS node: closed, nothing answered in clear.
    from nerve.frames import FrameType, encode_frame
    from nerve.transports.tcp import Hello, _hello_encoder

    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(encode_frame(FrameType.HELLO, _hello_encoder.encode(
            Hello(node_id="plain", window=1 << 20, max_chunk=1 << 16))))
        try:
            answer = sock.recv(65536)
        except (ConnectionResetError, socket.timeout):
            answer = b""
        assert b"nodeID" not in answer  # no HELLO_ACK in the clear (a TLS alert at most)
    # 2. A certificate from another CA.
    other = trustme.CA()
    cert, key = certs.issue("rogue", ca=other)
    async with nerve.Broker("rogue", transport="tcp://127.0.0.1:0", peers=[address],
                            tls_cert=cert, tls_key=key, tls_ca=str(certs.ca_path), tls_mutual=True) as rogue:
        with pytest.raises(RequestTimeoutError):
            await rogue.wait_for_services("store", timeout=1.5)
    # 3. No client certificate at all, against mutual TLS (TLS without --tls-mutual on our side
    #    still presents one, so use a bare TLS socket).
    import ssl

    ctx = ssl.create_default_context(cafile=str(certs.ca_path))
    ctx.check_hostname = False
    with socket.create_connection((host, int(port)), timeout=5) as raw:
        try:
            with ctx.wrap_socket(raw, server_hostname="strict-server") as tls:
                tls.sendall(encode_frame(FrameType.HELLO, _hello_encoder.encode(
                    Hello(node_id="nocert", window=1 << 20, max_chunk=1 << 16))))
                data = tls.recv(65536)
                assert data == b""
        except (ssl.SSLError, ConnectionResetError, BrokenPipeError):
            pass  # refused in the TLS handshake
    # The node still serves a proper client.
    async with nerve.Broker("proper", transport="tcp://127.0.0.1:0", peers=[address],
                            **certs.options("proper", mutual=True)) as good:
        await good.wait_for_services("store", timeout=10)
        assert await good.call("store.echo", "ok") == "ok"


def test_tls_options_are_checked(certs: Certs) -> None:
    with pytest.raises(BrokerOptionsError, match="tls_mutual needs"):
        nerve.Broker("x", transport="tcp://127.0.0.1:0", tls_mutual=True)
    with pytest.raises(BrokerOptionsError, match="TLS needs"):
        nerve.Broker("x", transport="tcp://127.0.0.1:0", tls_ca=str(certs.ca_path))
    with pytest.raises(BrokerOptionsError, match="cannot load"):
        nerve.Broker("x", transport="tcp://127.0.0.1:0", tls_cert="/nonexistent.pem", tls_ca=str(certs.ca_path))
    with pytest.raises(BrokerOptionsError, match="need a tcp"):
        nerve.Broker("x", tls_ca=str(certs.ca_path))


async def test_a_tls_cluster_learns_peers_through_one_seed(certs: Certs) -> None:
    async with nerve.Broker("seed", transport="tcp://127.0.0.1:0", **certs.options("seed", mutual=True)) as seed:
        async with nerve.Broker("a", transport="tcp://127.0.0.1:0", peers=[seed.address],
                                **certs.options("a", mutual=True)) as a:
            async with nerve.Broker("b", transport="tcp://127.0.0.1:0", peers=[seed.address],
                                    **certs.options("b", mutual=True)) as b:
                with trio.fail_after(10):
                    while "a" not in b.transport.connected() or "b" not in a.transport.connected():
                        await trio.sleep(0.05)
                assert await b.ping("a") >= 0
