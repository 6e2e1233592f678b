"""NATS connection options: server lists and credentials parsed from URLs, user/password and
token authentication, TLS, dead and silent servers, and the client's queue accounting, all
against real nats-server processes (our own, on free ports, for auth and TLS)."""

from __future__ import annotations

import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import trustme
from hypothesis import given
from hypothesis import strategies as st

from nats_server import ensure_nats
from nerve.errors import BrokerOptionsError, ProtocolError
from nerve.transports.nats_client import NatsClient, NatsOptions, parse_nats_url

NATS_SERVER = "/usr/sbin/nats-server"
PASSWORD = "s3cret"
TOKEN = "t0ken"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def server_up(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            return s.recv(4) == b"INFO"
    except OSError:
        return False


def start_server(tmp: Path, config: str) -> Iterator[int]:
    """Run a nats-server with ``config`` on a free port until the fixture's end."""
    port = free_port()
    conf = tmp / "nats.conf"
    conf.write_text(f"listen: 127.0.0.1:{port}\n{config}\n")
    log = (tmp / "nats.log").open("wb")
    proc = subprocess.Popen([NATS_SERVER, "-c", str(conf)], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 15
        while not server_up(port):
            assert proc.poll() is None, (tmp / "nats.log").read_text()
            assert time.monotonic() < deadline, "nats-server did not come up"
            time.sleep(0.05)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture(scope="module")
def user_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    yield from start_server(tmp_path_factory.mktemp("nats-user"),
                            f'authorization {{ user: alice, password: "{PASSWORD}" }}')


@pytest.fixture(scope="module")
def token_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    yield from start_server(tmp_path_factory.mktemp("nats-token"), f'authorization {{ token: "{TOKEN}" }}')


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory, ca: trustme.CA) -> Iterator[int]:
    tmp = tmp_path_factory.mktemp("nats-tls")
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert.private_key_pem.write_to_path(str(tmp / "key.pem"))
    with (tmp / "cert.pem").open("wb") as f:
        for pem in cert.cert_chain_pems:
            f.write(pem.bytes())
    yield from start_server(tmp, f'tls {{ cert_file: "{tmp / "cert.pem"}", key_file: "{tmp / "key.pem"}" }}')


@pytest.fixture
def client_tls(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


async def round_trip(client: NatsClient, subject: str, payload: bytes) -> tuple[str, bytes]:
    """Subscribe to ``subject``, publish ``payload`` to it, and return what comes back."""
    client.subscribe(subject)
    client.publish(subject, payload)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.writer)
        with trio.fail_after(5):
            async for message in client.messages():
                nursery.cancel_scope.cancel()
                return message
    raise AssertionError("messages() ended")


# ---- user / password and token -------------------------------------------------------------

@pytest.mark.anyio
async def test_user_and_password_from_the_url_are_accepted(user_server: int) -> None:
    options = parse_nats_url(f"nats://alice:{PASSWORD}@127.0.0.1:{user_server}")
    assert (options.user, options.password) == ("alice", PASSWORD)
    async with await NatsClient.connect(options.servers[0], name="n1", options=options) as client:
        assert client.server_info.get("auth_required") is True
        assert await round_trip(client, "auth.user", b"hi") == ("auth.user", b"hi")


@pytest.mark.anyio
async def test_old_call_form_parses_the_credentials_from_the_url(user_server: int) -> None:
    async with await NatsClient.connect(f"nats://alice:{PASSWORD}@127.0.0.1:{user_server}", name="n1") as c:
        assert await round_trip(c, "auth.old", b"x") == ("auth.old", b"x")


@pytest.mark.anyio
@pytest.mark.parametrize("user, password", [("alice", "wr0ngpass"), ("mallory", PASSWORD), (None, None)])
async def test_bad_credentials_are_refused_as_nats_auth_without_the_password(
        user_server: int, user: str | None, password: str | None) -> None:
    options = parse_nats_url(f"127.0.0.1:{user_server}", user=user, password=password)
    with trio.fail_after(10), pytest.raises(ProtocolError) as info:
        await NatsClient.connect(options.servers[0], name="n1", options=options)
    assert info.value.reason == "nats_auth"
    assert "Authorization Violation" in str(info.value)
    assert f"127.0.0.1:{user_server}" in str(info.value)
    if password is not None:
        assert password not in str(info.value)


@pytest.mark.anyio
async def test_a_token_in_the_url_is_accepted(token_server: int) -> None:
    options = parse_nats_url(f"nats://{TOKEN}@127.0.0.1:{token_server}")
    assert (options.token, options.user) == (TOKEN, None)
    async with await NatsClient.connect(options.servers[0], name="n1", options=options) as client:
        assert await round_trip(client, "auth.token", b"t") == ("auth.token", b"t")


@pytest.mark.anyio
async def test_a_wrong_token_is_refused_as_nats_auth(token_server: int) -> None:
    options = parse_nats_url(f"127.0.0.1:{token_server}", token="n0tit")
    with trio.fail_after(10), pytest.raises(ProtocolError) as info:
        await NatsClient.connect(options.servers[0], name="n1", options=options)
    assert info.value.reason == "nats_auth"
    assert "n0tit" not in str(info.value)


# ---- TLS -----------------------------------------------------------------------------------

@pytest.mark.anyio
@pytest.mark.parametrize("scheme", ["tls", "nats"])
async def test_tls_connect_publish_and_receive(tls_server: int, client_tls: ssl.SSLContext,
                                                scheme: str) -> None:
    options = parse_nats_url(f"{scheme}://127.0.0.1:{tls_server}", tls=client_tls)
    async with await NatsClient.connect(options.servers[0], name="n1", options=options) as client:
        assert isinstance(client.stream, trio.SSLStream)
        assert client.server_info.get("tls_required") is True
        payload = bytes(range(256)) * 300
        assert await round_trip(client, "tls.echo", payload) == ("tls.echo", payload)


@pytest.mark.anyio
async def test_tls_demanded_by_the_server_uses_the_default_context(tls_server: int) -> None:
    # plain nats:// and no context: the server demands TLS, the default context does not trust
    # our throwaway CA, so the handshake is attempted and fails with a clear message
    options = parse_nats_url(f"nats://127.0.0.1:{tls_server}")
    with trio.fail_after(10), pytest.raises(trio.BrokenResourceError, match="TLS handshake"):
        await NatsClient.connect(options.servers[0], name="n1", options=options)


@pytest.mark.anyio
async def test_tls_hostname_is_checked(tls_server: int, client_tls: ssl.SSLContext) -> None:
    options = parse_nats_url(f"tls://127.0.0.1:{tls_server}", tls=client_tls, tls_hostname="elsewhere.example")
    with trio.fail_after(10), pytest.raises(trio.BrokenResourceError, match="TLS handshake"):
        await NatsClient.connect(options.servers[0], name="n1", options=options)
    options = parse_nats_url(f"tls://127.0.0.1:{tls_server}", tls=client_tls, tls_hostname="localhost")
    async with await NatsClient.connect(options.servers[0], name="n1", options=options) as client:
        assert isinstance(client.stream, trio.SSLStream)


@pytest.mark.anyio
async def test_tls_required_by_us_and_not_offered_fails_clearly(client_tls: ssl.SSLContext) -> None:
    ensure_nats()
    for options in (parse_nats_url("tls://127.0.0.1:4222"), parse_nats_url("127.0.0.1:4222", tls=client_tls)):
        with trio.fail_after(10), pytest.raises(ProtocolError, match="does not offer TLS") as info:
            await NatsClient.connect(options.servers[0], name="n1", options=options)
        assert info.value.reason == "nats_tls"


# ---- dead and silent servers, rotation -----------------------------------------------------

@pytest.mark.anyio
async def test_a_caller_rotating_over_the_list_skips_a_dead_server() -> None:
    ensure_nats()
    dead = free_port()
    options = parse_nats_url(f"nats://127.0.0.1:{dead},127.0.0.1:4222")
    assert options.servers == (f"nats://127.0.0.1:{dead}", "nats://127.0.0.1:4222")
    failures: list[BaseException] = []
    connected = None
    start = trio.current_time()
    for server in options.servers:
        try:
            connected = await NatsClient.connect(server, name="n1", options=options, connect_timeout=2)
            break
        except OSError as exc:
            failures.append(exc)
    assert connected is not None
    assert len(failures) == 1 and isinstance(failures[0], OSError)
    assert trio.current_time() - start < 2
    async with connected:
        assert await round_trip(connected, "rotate.ok", b"r") == ("rotate.ok", b"r")


@pytest.mark.anyio
async def test_a_server_that_never_says_info_times_out_as_oserror() -> None:
    with socket.socket() as silent:  # accepts TCP (in the backlog) and never speaks
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        start = trio.current_time()
        with trio.fail_after(5), pytest.raises(OSError, match="no answer in 0.3s") as info:
            await NatsClient.connect(f"nats://127.0.0.1:{port}", name="n1", connect_timeout=0.3)
        assert f"127.0.0.1:{port}" in str(info.value)
        assert trio.current_time() - start < 2


# ---- queue accounting and unsubscribe ------------------------------------------------------

@pytest.mark.anyio
async def test_pending_bytes_counts_the_queue_and_drained_waits_for_the_writer() -> None:
    async with await NatsClient.connect(ensure_nats(), name="n1") as client:
        assert client.pending_bytes == 0
        await client.drained()  # nothing queued: returns at once
        client.publish("pending.a", b"12345")
        assert client.pending_bytes == len(b"PUB pending.a 5\r\n12345\r\n")
        done = False
        async with trio.open_nursery() as nursery:
            async def wait() -> None:
                nonlocal done
                await client.drained()
                done = True
            nursery.start_soon(wait)
            await trio.sleep(0.05)
            assert not done  # no writer yet: nothing leaves
            nursery.start_soon(client.writer)
            with trio.fail_after(5):
                while not done:
                    await trio.sleep(0.01)
            assert client.pending_bytes == 0
            client.publish("pending.b", b"x" * 100_000)
            assert client.pending_bytes > 100_000
            with trio.fail_after(5):
                await client.drained()
            assert client.pending_bytes == 0
            nursery.cancel_scope.cancel()


@pytest.mark.anyio
async def test_unsubscribe_tells_the_server() -> None:
    # two members of a queue group; once one unsubscribes, the server gives every message to
    # the other (were UNSUB not sent, about half would go to the first and be dropped there)
    url = ensure_nats()
    async with await NatsClient.connect(url, name="a") as a, await NatsClient.connect(url, name="b") as b:
        gone = a.subscribe("unsub.q", queue="workers")
        b.subscribe("unsub.q", queue="workers")
        a.unsubscribe(gone)
        a.unsubscribe(gone)  # a second time: ignored
        got = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(a.writer)
            nursery.start_soon(b.writer)
            with trio.fail_after(5):
                await a.drained()
                await b.drained()
                await trio.sleep(0.1)  # b's SUB is processed before a's PUBs (other connection)
                for i in range(20):
                    a.publish("unsub.q", b"%d" % i)
                async for message in b.messages():
                    got.append(message[1])
                    if len(got) == 20:
                        break
            nursery.cancel_scope.cancel()
        assert got == [b"%d" % i for i in range(20)]


@pytest.mark.anyio
async def test_messages_in_flight_for_an_ended_subscription_are_dropped() -> None:
    async with await NatsClient.connect(ensure_nats(), name="n1") as client:
        late = client.subscribe("inflight.late")
        client.subscribe("inflight.kept")
        client.publish("inflight.late", b"already on its way")
        got = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.writer)
            with trio.fail_after(5):
                await client.drained()
                await trio.sleep(0.2)  # the server has delivered it into our socket by now
                client.unsubscribe(late)
                client.publish("inflight.kept", b"sentinel")
                async for message in client.messages():
                    got.append(message)
                    if message[0] == "inflight.kept":
                        break
            nursery.cancel_scope.cancel()
        assert got == [("inflight.kept", b"sentinel")]


# ---- parse_nats_url ------------------------------------------------------------------------

GOOD = [
    ("nats://host:4222", ("nats://host:4222",), None, None, None),
    ("nats://host", ("nats://host:4222",), None, None, None),
    ("host:4333", ("nats://host:4333",), None, None, None),
    ("NATS://Host:1", ("nats://host:1",), None, None, None),
    ("tls://host:4222", ("tls://host:4222",), None, None, None),
    ("nats://[::1]:4222", ("nats://[::1]:4222",), None, None, None),
    ("nats://alice:pw@host:4222", ("nats://host:4222",), "alice", "pw", None),
    ("nats://alice:p%40ss%3Aw@host", ("nats://host:4222",), "alice", "p@ss:w", None),
    ("nats://tok@host:4222", ("nats://host:4222",), None, None, "tok"),
    ("nats://h1:4222,nats://h2:4223", ("nats://h1:4222", "nats://h2:4223"), None, None, None),
    ("nats://h1:4222, h2:4223", ("nats://h1:4222", "nats://h2:4223"), None, None, None),
    ("tls://h1:4222,h2:4223", ("tls://h1:4222", "tls://h2:4223"), None, None, None),
    ("nats://a:b@h1:4222,h2", ("nats://h1:4222", "nats://h2:4222"), "a", "b", None),
    ("nats://a:b@h1,nats://a:b@h2", ("nats://h1:4222", "nats://h2:4222"), "a", "b", None),
    (["nats://h1:1", "h2:2"], ("nats://h1:1", "nats://h2:2"), None, None, None),
    ("nats://h1:1,nats://h1:1", ("nats://h1:1",), None, None, None),
]


@pytest.mark.parametrize("url, servers, user, password, token", GOOD)
def test_parse_good_urls(url: str | list[str], servers: tuple[str, ...], user: str | None,
                         password: str | None, token: str | None) -> None:
    options = parse_nats_url(url)
    assert (options.servers, options.user, options.password, options.token) == (servers, user, password, token)
    assert options.tls is None


BAD = [
    ("http://host:4222", "scheme 'http'"),
    ("nats://:4222", "no host"),
    ("nats://host:65536", "out of range"),
    ("nats://host:0", "out of range"),
    ("nats://host:abc", "host:abc"),
    ("nats://ho st:4222", "bad host"),
    ("nats://host:4222/path", "path"),
    ("nats://[::1:4222", "[::1:4222"),
    ("", "empty"),
    ([], "empty"),
    ("nats://h1:4222,", "empty entry"),
    ("nats://a:pw1@h1,nats://a:pw2@h2", "credentials differ"),
    ("nats://a:pw1@h1,nats://tok@h2", "credentials differ"),
    ("nats://:pw1@h1", "password without a user"),
]


@pytest.mark.parametrize("url, message", BAD)
def test_parse_bad_urls(url: str | list[str], message: str) -> None:
    with pytest.raises(BrokerOptionsError) as info:
        parse_nats_url(url)
    text = str(info.value)
    assert message in text
    assert "\n" not in text
    assert "pw1" not in text and "pw2" not in text


def test_keywords_replace_the_credentials_of_the_urls() -> None:
    context = ssl.create_default_context()
    options = parse_nats_url("nats://a:b@h1", user="carol", password="c", tls=context, tls_hostname="x")
    assert (options.user, options.password, options.token) == ("carol", "c", None)
    assert (options.tls, options.tls_hostname) == (context, "x")
    options = parse_nats_url("nats://a:b@h1", token="t")
    assert (options.user, options.password, options.token) == (None, None, "t")
    with pytest.raises(BrokerOptionsError, match="not both"):
        parse_nats_url("nats://h1", user="u", password="p", token="t")
    with pytest.raises(BrokerOptionsError, match="password without a user"):
        parse_nats_url("nats://h1", password="p")


def test_repr_masks_the_password_and_token() -> None:
    options = parse_nats_url("nats://alice:hunter2@h1")
    assert "hunter2" not in repr(options) and "alice" in repr(options) and "***" in repr(options)
    options = parse_nats_url("nats://t0psecret@h1")
    assert "t0psecret" not in repr(options) and "***" in repr(options)
    assert NatsOptions(("nats://h:1",)) == parse_nats_url("h:1")


label = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?", fullmatch=True)
hostname = st.lists(label, min_size=1, max_size=3).map(".".join)
ipv4 = st.ip_addresses(v=4).map(str)
ipv6 = st.ip_addresses(v=6).map(lambda ip: f"[{ip}]")
host = st.one_of(hostname, ipv4, ipv6)
port = st.integers(1, 65535)
entry = st.tuples(st.sampled_from(["nats", "tls"]), host, st.one_of(st.none(), port))


@given(st.lists(entry, min_size=1, max_size=5, unique_by=lambda e: (e[1], e[2] or 4222)),
       st.booleans(), st.one_of(st.none(), st.from_regex(r"Zq[A-Za-z0-9]{6,12}", fullmatch=True)))
def test_url_lists_round_trip_into_servers(entries: list[tuple[str, str, int | None]], as_list: bool,
                                           password: str | None) -> None:
    # the same host may come with different schemes: keep (host, port) unique so no two
    # entries collapse into one
    creds = f"u:{password}@" if password else ""
    urls = [f"{scheme}://{creds}{h}{f':{p}' if p is not None else ''}" for scheme, h, p in entries]
    options = parse_nats_url(urls if as_list else ",".join(urls))
    expected = tuple(f"{scheme}://{h}:{p or 4222}" for scheme, h, p in entries)
    assert options.servers == expected
    assert options.password == password
    if password:
        assert password not in repr(options)
        with pytest.raises(BrokerOptionsError) as info:
            parse_nats_url([*urls, f"nats://u:{password}@{entries[0][1]}:70000"])
        assert password not in str(info.value)
