"""A thin NATS core client on trio (no NATS client for trio exists on PyPI: nats-py is
asyncio-only): the connection options (servers, credentials, TLS), and CONNECT, PUB, SUB,
UNSUB, MSG, PING/PONG on one connection to one server. The transport
(``nerve.transports.nats``) owns reconnection, server rotation and the subjects."""

from __future__ import annotations

import ipaddress
import json
import re
import ssl
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import SplitResult, unquote, urlsplit

import trio

from nerve.errors import BrokerOptionsError, ProtocolError

__all__ = ["NatsClient", "NatsOptions", "parse_nats_url", "check_subject", "MAX_SUBJECT"]

_MAX_CONTROL_LINE = 4096
_DEFAULT_PORT = 4222
_SCHEMES = ("nats", "tls")
_HOSTNAME = re.compile(r"[A-Za-z0-9._-]+")
_MASK = "***"
_FALLBACK_VERSION = "0+unknown"


@dataclass(frozen=True, repr=False)
class NatsOptions:
    """How to reach a NATS cluster: the servers to try, in order, as ``nats://host:port`` or
    ``tls://host:port`` (without credentials), and the credentials and TLS settings that all of
    them share. ``tls`` None means plain TCP unless the server demands TLS or the server's
    scheme is ``tls://`` (then ``ssl.create_default_context()`` is used); a context means TLS
    is required. Build one with :func:`parse_nats_url`."""

    servers: tuple[str, ...]
    user: str | None = None
    password: str | None = None
    token: str | None = None
    tls: ssl.SSLContext | None = None
    tls_hostname: str | None = None

    def __post_init__(self) -> None:
        if not self.servers:
            raise BrokerOptionsError("NATS options: no server given")
        if self.password is not None and self.user is None:
            raise BrokerOptionsError("NATS options: a password without a user")
        if self.token is not None and self.user is not None:
            raise BrokerOptionsError("NATS options: give a token or a user and password, not both")

    def __repr__(self) -> str:
        return (f"NatsOptions(servers={self.servers!r}, user={self.user!r}, "
                f"password={_MASK if self.password is not None else None!r}, "
                f"token={_MASK if self.token is not None else None!r}, tls={self.tls!r}, "
                f"tls_hostname={self.tls_hostname!r})")


@dataclass(frozen=True)
class _Server:
    """One entry of a server list, taken apart (credentials kept aside)."""

    scheme: str
    host: str
    port: int
    user: str | None
    password: str | None
    token: str | None

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"

    @property
    def credentials(self) -> tuple[str | None, str | None, str | None]:
        return self.user, self.password, self.token


def _masked(entry: str) -> str:
    """``entry`` with whatever sits before the host's '@' hidden (it may hold a secret)."""
    start = entry.find("://")
    start = start + 3 if start >= 0 else 0
    end = entry.find("/", start)
    end = len(entry) if end < 0 else end
    at = entry.rfind("@", start, end)
    if at < 0:
        return entry
    userinfo = entry[start:at]
    shown = f"{userinfo.split(':', 1)[0]}:{_MASK}" if ":" in userinfo else _MASK
    return f"{entry[:start]}{shown}{entry[at:]}"


def _parse_server(entry: str, default_scheme: str = "nats") -> _Server:
    """One "host[:port]" or "scheme://[userinfo@]host[:port]" entry; BrokerOptionsError if bad."""
    shown = repr(_masked(entry))
    text = entry.strip()
    if not text:
        raise BrokerOptionsError("NATS server list: an empty entry")
    if "://" not in text:
        text = f"{default_scheme}://{text}"
    try:
        parts: SplitResult = urlsplit(text)
        port = parts.port
    except ValueError as exc:  # a bad port or a malformed IPv6 literal
        raise BrokerOptionsError(f"NATS server {shown}: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in _SCHEMES:
        raise BrokerOptionsError(f"NATS server {shown}: scheme {parts.scheme!r} is not nats:// or tls://")
    host = parts.hostname
    if not host:
        raise BrokerOptionsError(f"NATS server {shown}: no host")
    if not _HOSTNAME.fullmatch(host):
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise BrokerOptionsError(f"NATS server {shown}: bad host {host!r}") from None
    if port == 0:
        raise BrokerOptionsError(f"NATS server {shown}: port 0 is out of range 1-65535")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise BrokerOptionsError(f"NATS server {shown}: unexpected path or query after the port")
    user = password = token = None
    if "@" in parts.netloc:
        userinfo = parts.netloc.rsplit("@", 1)[0]
        if ":" in userinfo:
            raw_user, raw_password = userinfo.split(":", 1)
            user, password = unquote(raw_user), unquote(raw_password)
            if not user:
                raise BrokerOptionsError(f"NATS server {shown}: a password without a user")
        elif userinfo:
            token = unquote(userinfo)  # nats.js / Moleculer: userinfo without ':' is a token
    return _Server(scheme, host, port or _DEFAULT_PORT, user, password, token)


def parse_nats_url(url: str | Sequence[str], *, user: str | None = None, password: str | None = None,
                   token: str | None = None, tls: ssl.SSLContext | None = None,
                   tls_hostname: str | None = None) -> NatsOptions:
    """The :class:`NatsOptions` for ``url``: one server ("nats://host:4222",
    "nats://user:pass@host:4222", "nats://token@host:4222", "tls://host:4222", or a bare
    "host:port"), a comma-separated list of them, or a sequence of them. A bare entry takes the
    scheme of the list's first entry. Credentials written in the URLs must be the same for
    every server that carries some; ``user``, ``password`` or ``token`` given here replace
    them all. Raises :class:`~nerve.errors.BrokerOptionsError` naming the bad entry, with its
    secret masked."""
    entries = [url] if isinstance(url, str) else list(url)
    if not all(isinstance(entry, str) for entry in entries):
        raise BrokerOptionsError(f"NATS server list: expected strings, got {type(url).__name__}")
    items = [item for entry in entries for item in entry.split(",")]
    if not items or items == [""]:
        raise BrokerOptionsError("NATS server list: empty")
    first = items[0].strip()
    default_scheme = first.split("://", 1)[0].lower() if "://" in first else "nats"
    servers = [_parse_server(item, default_scheme) for item in items]
    carried: _Server | None = None
    for server in servers:
        if server.credentials == (None, None, None):
            continue
        if carried is None:
            carried = server
        elif server.credentials != carried.credentials:
            raise BrokerOptionsError(f"NATS server {server.address}: its credentials differ from "
                                     f"those of {carried.address} (one set is shared by all servers)")
    if user is not None or password is not None or token is not None:
        credentials: tuple[str | None, str | None, str | None] = (user, password, token)
    else:
        credentials = carried.credentials if carried is not None else (None, None, None)
    addresses = tuple(dict.fromkeys(server.address for server in servers))
    return NatsOptions(addresses, *credentials, tls=tls, tls_hostname=tls_hostname)


#: what may appear in a subject (or queue group) on the wire: no whitespace or control
#: character (they would end the protocol line), at most MAX_SUBJECT characters
_SUBJECT = re.compile(r"[^\s\x00-\x1f\x7f]{1,1024}")
MAX_SUBJECT = 1024


def check_subject(subject: str, *, wildcards: bool = False) -> None:
    """Raise ProtocolError unless ``subject`` can go in a NATS protocol line as it is
    (``wildcards``: ``*`` and ``>`` tokens are allowed, for SUB). An empty token (``a..b``,
    ``user.``) is refused: the server would answer ``-ERR 'Invalid Subject'``."""
    if (not _SUBJECT.fullmatch(subject) or "" in subject.split(".")  # (an empty token: -ERR, then a loop)
            or (not wildcards and ("*" in subject or ">" in subject))):
        raise ProtocolError(f"not a NATS subject: {subject[:80]!r}", reason="nats_subject")


def _client_version() -> str:
    """nerve's version, as its distribution says (a transport imports nothing above the wire)."""
    try:
        from importlib.metadata import version

        return version("nerve")
    except Exception:  # pragma: no cover - not installed as a distribution
        return _FALLBACK_VERSION


def _is_auth_error(text: str) -> bool:
    lowered = text.lower()
    return "authorization" in lowered or "authentication" in lowered or "permissions" in lowered


class NatsClient:
    """NATS core protocol on a trio stream (TCP, or TLS over it): CONNECT, PUB, SUB, UNSUB,
    MSG, PING/PONG.

    ``messages`` yields ``(subject, payload)``; ``publish`` appends to a buffer that one
    ``writer`` task flushes (many PUBs, one ``send_all``). ``pending_bytes`` counts what is
    queued and not yet handed to the stream; ``drained`` waits until it is zero."""

    def __init__(self, stream: trio.abc.Stream, *, name: str, max_payload: int = 64 * 1024 * 1024) -> None:
        self.stream: trio.abc.Stream = stream
        self.name = name
        self.max_payload = max_payload
        self.server_info: dict[str, Any] = {}
        #: bytes queued by publish/subscribe/... that the writer has not yet sent
        self.pending_bytes = 0
        self._out: list[bytes] = []
        self._wakeup = trio.Event()
        self._idle = trio.Event()
        self._idle.set()
        self._sids: dict[int, str] = {}
        self._next_sid = 1
        self._buffer = bytearray()

    @classmethod
    async def connect(cls, server: str, *, name: str, options: NatsOptions | None = None,
                      connect_timeout: float = 5.0) -> NatsClient:
        """Connect to one ``server`` (an entry of ``options.servers``) with ``options``'
        credentials and TLS settings: TCP, INFO, TLS handshake when either side asks for it,
        CONNECT, PING, PONG. Without ``options``, ``server`` is parsed with
        :func:`parse_nats_url` (credentials in it are used) and its first server is dialled.

        Raises ``OSError`` when the server cannot be reached or does not answer within
        ``connect_timeout`` seconds, ``trio.BrokenResourceError`` when it hangs up or the TLS
        handshake fails, :class:`~nerve.errors.ProtocolError` when it refuses us (``reason``
        ``"nats_auth"`` for credentials, ``"nats_tls"`` when we require TLS and it offers
        none, ``"nats"`` otherwise), and :class:`~nerve.errors.BrokerOptionsError` for a bad
        ``server``. Nothing is left open when it raises or is cancelled."""
        if options is None:
            options = parse_nats_url(server)
            server = options.servers[0]
        target = _parse_server(server)
        stream: trio.abc.Stream | None = None
        client: NatsClient | None = None
        try:
            with trio.fail_after(connect_timeout):
                stream = await trio.open_tcp_stream(target.host, target.port)
                client = cls(stream, name=name)
                await client._introduce(target, options)
        except BaseException as exc:
            opened = client.stream if client is not None else stream
            if opened is not None:
                with trio.CancelScope(shield=True):
                    await trio.aclose_forcefully(opened)
            if isinstance(exc, trio.TooSlowError):
                raise OSError(f"NATS at {target.address}: no answer in {connect_timeout}s") from None
            raise
        return client

    async def _introduce(self, target: _Server, options: NatsOptions) -> None:
        address = target.address
        line = await self._read_line()
        if not line.startswith(b"INFO "):
            raise ProtocolError(f"NATS at {address} sent {line[:40]!r} instead of INFO", reason="nats")
        try:
            info = json.loads(line[5:])
        except ValueError:
            raise ProtocolError(f"NATS at {address} sent an INFO that is not JSON", reason="nats") from None
        if not isinstance(info, dict):
            raise ProtocolError(f"NATS at {address} sent an INFO that is not an object", reason="nats")
        self.server_info = info
        self.max_payload = int(info.get("max_payload", self.max_payload))
        we_require = target.scheme == "tls" or options.tls is not None
        server_requires = bool(info.get("tls_required"))
        use_tls = server_requires or (we_require and bool(info.get("tls_available")))
        if we_require and not use_tls:
            raise ProtocolError(f"NATS at {address} does not offer TLS, which we require", reason="nats_tls")
        if use_tls:
            await self._start_tls(target, options)
        connect: dict[str, Any] = {
            "verbose": False, "pedantic": False, "tls_required": use_tls, "name": self.name,
            "lang": "python-nerve", "version": _client_version(), "protocol": 1, "headers": False}
        if options.user is not None:
            connect["user"] = options.user
            connect["pass"] = options.password or ""
        if options.token is not None:
            connect["auth_token"] = options.token
        await self.stream.send_all(b"CONNECT " + json.dumps(connect).encode() + b"\r\nPING\r\n")
        while True:
            line = await self._read_line()
            if line == b"PONG":
                return
            if line.startswith(b"-ERR"):
                text = line[4:].strip().decode(errors="replace")
                reason = "nats_auth" if _is_auth_error(text) else "nats"
                raise ProtocolError(f"NATS at {address} refused the connection: {text}", reason=reason)
            if line == b"PING":
                await self.stream.send_all(b"PONG\r\n")
            # +OK and INFO updates: nothing to do

    async def _start_tls(self, target: _Server, options: NatsOptions) -> None:
        """Wrap the TCP stream in TLS after INFO, as NATS does."""
        if self._buffer:
            raise ProtocolError(f"NATS at {target.address} sent data after INFO before the TLS "
                                "handshake", reason="nats_tls")
        context = options.tls if options.tls is not None else ssl.create_default_context()
        tls_stream = trio.SSLStream(self.stream, context,
                                    server_hostname=options.tls_hostname or target.host)
        self.stream = tls_stream
        try:
            await tls_stream.do_handshake()
        except trio.BrokenResourceError as exc:
            cause = exc.__cause__ or exc
            raise trio.BrokenResourceError(f"TLS handshake with NATS at {target.address} failed: "
                                           f"{cause}") from exc

    async def aclose(self) -> None:
        """Close the connection at once (what is still queued is dropped)."""
        await trio.aclose_forcefully(self.stream)

    async def __aenter__(self) -> NatsClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def _read_line(self) -> bytes:
        while True:
            at = self._buffer.find(b"\r\n")
            if at >= 0:
                line = bytes(self._buffer[:at])
                del self._buffer[:at + 2]
                return line
            if len(self._buffer) > _MAX_CONTROL_LINE:
                raise ProtocolError("NATS control line too long", reason="nats")
            data = await self.stream.receive_some(65536)
            if not data:
                raise trio.BrokenResourceError("NATS server closed the connection")
            self._buffer += data

    async def _read_exactly(self, n: int) -> bytes:
        while len(self._buffer) < n:
            data = await self.stream.receive_some(max(65536, n - len(self._buffer)))
            if not data:
                raise trio.BrokenResourceError("NATS server closed the connection")
            self._buffer += data
        out = bytes(self._buffer[:n])
        del self._buffer[:n]
        return out

    def subscribe(self, subject: str, queue: str | None = None) -> int:
        """Subscribe to ``subject`` (in ``queue`` group if given); returns the sid."""
        check_subject(subject, wildcards=True)
        if queue is not None:
            check_subject(queue)
        sid = self._next_sid
        self._next_sid += 1
        self._sids[sid] = subject
        self._send(f"SUB {subject} {queue + ' ' if queue else ''}{sid}\r\n".encode())
        return sid

    def unsubscribe(self, sid: int) -> None:
        """End subscription ``sid``; messages for it still in flight are dropped. An unknown or
        already ended sid is ignored."""
        if self._sids.pop(sid, None) is not None:
            self._send(b"UNSUB %d\r\n" % sid)

    def publish(self, subject: str, payload: bytes) -> None:
        """Queue one message for ``subject``: ProtocolError if the subject is not one (a space,
        a control character or a wildcard in it would inject into the protocol line) or the
        payload is over the server's ``max_payload``."""
        check_subject(subject)
        if len(payload) > self.max_payload:
            raise ProtocolError(f"payload of {len(payload)} bytes is over the NATS max_payload "
                                f"{self.max_payload}", reason="nats_max_payload")
        self._send(b"PUB %s %d\r\n" % (subject.encode(), len(payload)))
        self._send(payload)
        self._send(b"\r\n")

    def _send(self, data: bytes) -> None:
        self._out.append(data)
        self.pending_bytes += len(data)
        if self._idle.is_set():
            self._idle = trio.Event()
        self._wakeup.set()

    async def writer(self) -> None:
        """Send what is queued, forever. Cancelled in the middle of a write, it may have sent
        some, all or none of that batch, and ``pending_bytes`` keeps counting it."""
        while True:
            if not self._out:
                self._idle.set()
                self._wakeup = trio.Event()
                await self._wakeup.wait()
                continue
            data, self._out = b"".join(self._out), []
            await self.stream.send_all(data)
            self.pending_bytes -= len(data)

    async def drained(self) -> None:
        """Return once everything queued has been handed to the stream (``pending_bytes`` is
        0). Needs the ``writer`` task running; bound it with a cancel scope."""
        if not self.pending_bytes:
            await trio.lowlevel.checkpoint()
            return
        while self.pending_bytes:
            await self._idle.wait()

    async def messages(self) -> AsyncIterator[tuple[str, bytes]]:
        """Yield ``(subject, payload)`` for every MSG of a live subscription; answers PING;
        raises on -ERR."""
        while True:
            line = await self._read_line()
            if line.startswith(b"MSG "):
                parts = line.split(b" ")
                if len(parts) not in (4, 5):
                    raise ProtocolError(f"bad NATS MSG line {line[:80]!r}", reason="nats")
                try:
                    sid = int(parts[2])
                    size = int(parts[-1])
                except ValueError:
                    raise ProtocolError(f"bad NATS MSG line {line[:80]!r}", reason="nats") from None
                payload = await self._read_exactly(size + 2)
                if sid in self._sids:
                    yield parts[1].decode(errors="replace"), payload[:-2]
            elif line == b"PING":
                self._send(b"PONG\r\n")
            elif line.startswith(b"-ERR"):
                raise ProtocolError(f"NATS error: {line.decode(errors='replace')}", reason="nats")
            # +OK, PONG, INFO updates: nothing to do
