"""The ``nerve`` command: run a node; call, emit, broadcast, watch, ping, list and transfer files
against a cluster; the demo and the fuzzer. Each command is a thin trio program over the public
API; every failure and Ctrl-C ends as one ``error: ...`` line on stderr (exit 1, 2 or 130)."""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import trio

import nerve
from nerve.errors import NerveError, RemoteError

__all__ = ["main", "sha256_file"]

#: the environment variable naming the default ``--peer`` (comma-separated for several)
PEER_ENV = "NERVE_PEER"
#: seconds the set of known nodes must stay the same before a listing is taken
_SETTLE = 0.3


class CliError(Exception):
    """A failure the user caused or can fix, reported as its message alone."""


class _Run:
    """What one command run saw: a SIGINT (Ctrl-C) turns any outcome into exit 130."""

    interrupted = False
    #: set by the first SIGINT of a long-running node (run, gateway): it stops as on SIGTERM,
    #: gracefully (a cancellation would leave its stop nothing to send its goodbyes with)
    stop: trio.Event | None = None


# --- outcomes -------------------------------------------------------------------------------


def _leaves(exc: BaseException) -> Iterator[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            yield from _leaves(inner)
    else:
        yield exc


def _os_reason(exc: BaseException) -> str | None:
    """'connection refused' for an OSError, or for one that trio wrapped (its cause's leaves)."""
    seen: list[BaseException] = [exc]
    while seen:
        cur = seen.pop(0)
        if isinstance(cur, OSError) and (cur.errno or cur.strerror):
            text = os.strerror(cur.errno) if cur.errno else str(cur.strerror)
            return text[0].lower() + text[1:]
        if isinstance(cur, BaseExceptionGroup):
            seen.extend(cur.exceptions)
        if cur.__cause__ is not None:
            seen.append(cur.__cause__)
    return None


def _message(exc: BaseException) -> str:
    if isinstance(exc, CliError):
        text = str(exc)
    elif isinstance(exc, NerveError):
        name = exc.name if isinstance(exc, RemoteError) else type(exc).__name__  # the sender's
        text = f"{name}: {exc} (code {exc.code}, type {exc.type}, data {exc.data!r})"
    elif isinstance(exc, OSError) and exc.strerror:
        where = f": {exc.filename}" if exc.filename is not None else ""
        text = f"{_os_reason(exc)}{where}"
    else:
        text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return " ".join(text.split())


def _outcome(exc: BaseException) -> tuple[int, str | None]:
    """(exit code, one-line message) for what ended a command. A group is unwrapped: a
    KeyboardInterrupt anywhere in it is 130, else its first leaf that is not a Cancelled."""
    leaves = list(_leaves(exc))
    if _Run.interrupted or any(isinstance(leaf, KeyboardInterrupt) for leaf in leaves):
        return 130, "interrupted"
    first = next((leaf for leaf in leaves if not isinstance(leaf, trio.Cancelled)), leaves[0])
    if isinstance(first, SystemExit):
        if first.code is None or isinstance(first.code, int):
            return first.code or 0, None
        return 1, " ".join(str(first.code).split())
    return 1, _message(first)


async def _with_sigint(command: Callable[[argparse.Namespace], Awaitable[None]], args: argparse.Namespace) -> None:
    """Run ``command``; the first SIGINT cancels it (so it cleans up: brokers stop gracefully,
    partial files are removed), a second one exits at once."""

    async def watch(task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        with trio.open_signal_receiver(signal.SIGINT) as signals:
            task_status.started()
            async for _ in signals:
                if _Run.interrupted:
                    print("error: interrupted twice; exiting now", file=sys.stderr, flush=True)
                    os._exit(130)
                _Run.interrupted = True
                if _Run.stop is not None:
                    _Run.stop.set()
                else:
                    scope.cancel()

    _Run.stop = trio.Event() if args.command in ("run", "gateway") else None
    async with trio.open_nursery() as nursery:
        with trio.CancelScope() as scope:
            await nursery.start(watch)
            await command(args)
        nursery.cancel_scope.cancel()
    if _Run.interrupted:
        raise KeyboardInterrupt


# --- arguments ------------------------------------------------------------------------------


def _json_arg(option: str, text: str | None, default: Any = None) -> Any:
    """JSON from an option: inline, ``@path`` (a file) or ``-`` (stdin)."""
    if text is None:
        return default
    where = ""
    if text == "-":
        text, where = sys.stdin.read(), " (from stdin)"
    elif text.startswith("@"):
        try:
            text, where = Path(text[1:]).read_text(), f" (from {text[1:]})"
        except OSError as exc:
            raise CliError(f"{option}: cannot read {text[1:]}: {_os_reason(exc)}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise CliError(f"{option}: invalid JSON{where}: {exc.msg} at line {exc.lineno} column {exc.colno} "
                       f"(char {exc.pos})") from None


def _peers(args: argparse.Namespace) -> list[str]:
    peers = list(args.peer or [])
    if not peers and not getattr(args, "transport", None):
        peers = [p.strip() for p in os.environ.get(PEER_ENV, "").split(",") if p.strip()]
    return peers


def _broker_options(args: argparse.Namespace) -> dict[str, Any]:
    kw: dict[str, Any] = {"namespace": args.namespace, "serializer": args.serializer}
    if args.secret is not None:
        kw["secret"] = args.secret
    if args.tls_cert is not None or args.tls_ca is not None:
        kw.update(tls_cert=args.tls_cert, tls_key=args.tls_key, tls_ca=args.tls_ca, tls_mutual=args.tls_mutual)
    return kw


def _client(args: argparse.Namespace) -> nerve.Broker:
    """The CLI's own short-lived node, joined to the cluster through --peer or --transport."""
    node_id = args.node_id or f"cli-{os.getpid()}"
    kw = _broker_options(args)
    kw["retries"] = getattr(args, "retries", 0) or 0
    kw["graceful_stop_timeout"] = 2.0
    if args.transport:
        return nerve.Broker(node_id, transport=args.transport, **kw)
    peers = _peers(args)
    if not peers:
        raise CliError(f"no node to join: give --peer tcp://HOST:PORT, --transport nats://HOST:PORT "
                       f"or set {PEER_ENV}")
    from nerve.transports.tcp import parse_address

    for peer in peers:
        try:
            parse_address(peer)
        except NerveError:
            raise CliError(f"--peer: expected tcp://HOST:PORT, got {peer!r}") from None
    return nerve.Broker(node_id, transport="tcp://127.0.0.1:0", peers=peers, **kw)


# --- discovery ------------------------------------------------------------------------------


def _others(broker: nerve.Broker) -> list[str]:
    """Other nodes whose INFO this node has (so their services are known)."""
    return sorted(n.id for n in broker.registry.available_nodes() if not n.local)


async def _join(broker: nerve.Broker, args: argparse.Namespace, *, settle: bool = False) -> None:
    """Wait until another node's INFO has arrived, bounded by --wait. Fails at once when every
    seed refuses connections; with ``settle``, also waits until no new node shows up."""
    deadline = trio.current_time() + args.wait
    seeds = [] if args.transport else _peers(args)
    while not _others(broker):
        now = trio.current_time()
        stats = broker.transport.statistics()
        if now >= deadline:
            through = ", ".join(seeds) or args.transport
            hint = ""
            if getattr(stats, "handshakes_failed", 0) and not stats.connections:
                hint = " (handshakes failed: check --secret, --namespace and the --tls-* options)"
            raise CliError(f"no node answered through {through} within {args.wait}s{hint}")
        failed = broker.transport.unreachable_seeds()  # dials and handshakes that failed
        refused = all(failed.get(seed, "").startswith(("it refused us", "we refused it")) for seed in seeds)
        if seeds and not stats.connections and all(seed in failed for seed in seeds) and (
                not args.wait_given or refused or now >= deadline - 0.06):
            # (A refused handshake is a wrong setting: waiting does not fix it. Nothing
            # listening may be a node still starting: an explicit --wait waits for it.)
            raise CliError("cannot connect to " + "; ".join(f"{s}: {failed[s]}" for s in seeds))
        await trio.sleep(0.05)
    if settle:
        seen, since = _others(broker), trio.current_time()
        while trio.current_time() - since < _SETTLE and trio.current_time() < deadline:
            await trio.sleep(0.05)
            if _others(broker) != seen:
                seen, since = _others(broker), trio.current_time()


async def _ready(broker: nerve.Broker, args: argparse.Namespace, action: str) -> None:
    start = trio.current_time()
    await _join(broker, args, settle=action.startswith("$"))
    service = action.rsplit(".", 1)[0]
    left = max(0.0, args.wait - (trio.current_time() - start))
    await broker.wait_for_services(service, timeout=left)


# --- files ----------------------------------------------------------------------------------


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks (call it in a worker thread)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _readable_file(name: str) -> tuple[Path, int]:
    path = Path(name)
    if path.is_dir():
        raise CliError(f"{name}: is a directory, not a file to upload")
    try:
        with open(path, "rb") as f:
            return path, os.fstat(f.fileno()).st_size
    except OSError as exc:
        raise CliError(f"cannot read {name}: {_os_reason(exc)}") from None


def _writable_target(name: str) -> Path:
    """Check, before any call, that a file can be written at ``name``."""
    path = Path(name)
    parent = path.parent
    if path.is_dir():
        raise CliError(f"cannot write {name}: it is a directory")
    if not parent.is_dir():
        raise CliError(f"cannot write {name}: directory {str(parent)!r} does not exist")
    if not os.access(parent, os.W_OK):
        raise CliError(f"cannot write {name}: directory {str(parent)!r} is not writable")
    return path


async def _save(stream: nerve.PacketStream, path: Path) -> int:
    try:
        return await stream.transfer_to(path)
    except NerveError:  # the stream's failure (a stall is a TimeoutError: not the disk's)
        raise
    except OSError as exc:  # named after the target, not the hidden partial file
        raise CliError(f"cannot write {path}: {_os_reason(exc) or exc}") from None


async def _hashed_chunks(path: Path, chunk: int, digest: Any) -> AsyncIterator[bytes]:
    """The file's content in ``chunk``-byte blocks, hashed as it is read (in a worker thread)."""

    def read(f: Any) -> bytes:
        block: bytes = f.read(chunk)
        digest.update(block)
        return block

    f = await trio.to_thread.run_sync(open, path, "rb")
    try:
        while block := await trio.to_thread.run_sync(read, f):
            yield block
    finally:
        f.close()


def _progress(description: str, total: int | None) -> Any:
    """A rich progress bar on stderr, or None when stderr is not a terminal."""
    if not sys.stderr.isatty():
        return None, None
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    progress = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                        TransferSpeedColumn(), TimeRemainingColumn(), transient=False,
                        console=Console(stderr=True))
    task = progress.add_task(description, total=total)
    return progress, task


async def _with_progress(description: str, total: int | None, count: Callable[[], int],
                         work: Callable[[], Awaitable[Any]]) -> Any:
    progress, task = _progress(description, total)
    if progress is None:
        return await work()

    async def track() -> None:
        while True:
            progress.update(task, completed=count())
            await trio.sleep(0.1)

    with progress:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(track)
            result = await work()
            progress.update(task, completed=count())
            nursery.cancel_scope.cancel()
    return result


# --- commands -------------------------------------------------------------------------------


def _load_service(spec: str) -> nerve.Service:
    module, _, name = spec.partition(":")
    if not module or not name:
        raise CliError(f"--service wants module:Class, got {spec!r}")
    try:
        cls = getattr(importlib.import_module(module), name)
    except ImportError as exc:
        raise CliError(f"--service {spec}: cannot import {module!r}: {exc}") from None
    except AttributeError:
        raise CliError(f"--service {spec}: module {module!r} has no {name!r}") from None
    if not (isinstance(cls, type) and issubclass(cls, nerve.Service)):
        raise CliError(f"--service {spec}: {name!r} is not a nerve.Service subclass")
    return cls()


async def _run_node(args: argparse.Namespace) -> None:
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # --service mod:Class from the current directory
    services = [_load_service(s) for s in args.service]
    transport = getattr(args, "transport", None) or args.listen or "tcp://127.0.0.1:0"
    gateway_serve: Any = None
    if args.http is not None:
        try:
            from nerve.gateway import serve as gateway_serve
        except ImportError as exc:
            raise CliError(f"--http needs nerve's 'gateway' extra (hypercorn, starlette, httpx): {exc}") from None
    async with nerve.Broker(args.node_id, transport=transport, peers=_peers(args), services=services,
                            metrics_port=args.metrics, advertise=args.advertise,
                            protocol_version=args.protocol_version, **_broker_options(args)) as broker:
        shown = {"nodeID": broker.node_id, "address": broker.address}
        if broker.metrics is not None:
            shown["metrics"] = broker.metrics.url
        async with AsyncExitStack() as stack:
            if gateway_serve is not None:
                options: dict[str, Any] = {}
                if args.token:
                    from nerve.gateway.app import bearer_token

                    options["auth"] = bearer_token(*args.token)
                if args.expose:
                    options["expose"] = args.expose
                if args.cors:
                    options["cors_origins"] = args.cors
                try:
                    server = await stack.enter_async_context(gateway_serve(broker, args.http, **options))
                except ValueError as exc:
                    raise CliError(f"--http: {exc}") from None
                shown["http"] = server.url
            print(json.dumps(shown), flush=True)
            await _until_stopped()


async def _until_stopped() -> None:
    """Wait for SIGTERM, or a first SIGINT (``_Run.stop``): the node then stops gracefully."""
    stop = _Run.stop
    with trio.open_signal_receiver(signal.SIGTERM) as signals:
        async with trio.open_nursery() as waits:
            async def on_term() -> None:
                async for _ in signals:
                    break
                waits.cancel_scope.cancel()

            async def on_interrupt() -> None:
                if stop is not None:
                    await stop.wait()
                    waits.cancel_scope.cancel()

            waits.start_soon(on_term)
            waits.start_soon(on_interrupt)


def _print_json(value: Any) -> None:
    print(json.dumps(value, default=repr, indent=2), flush=True)


async def _call(args: argparse.Namespace) -> None:
    params = _json_arg("params", args.params)
    meta = _json_arg("--meta", args.meta, {})
    output = _writable_target(args.output) if args.output else None
    async with _client(args) as broker:
        await _ready(broker, args, args.action)
        result = await broker.call(args.action, params, meta=meta, timeout=args.timeout, node_id=args.target)
        if isinstance(result, nerve.PacketStream):
            if output is not None:
                written = await _save(result, output)
                _print_json({"written": written, "output": str(output), "meta": meta})
            else:
                out = sys.stdout.buffer
                await result.transfer_to(out)
                out.flush()
            return
        if output is not None:
            output.write_text(json.dumps(result, default=repr, indent=2) + "\n")
            return
        _print_json({"result": result, "meta": meta})


async def _emit(args: argparse.Namespace, *, broadcast: bool) -> None:
    data = _json_arg("data", args.data)
    meta = _json_arg("--meta", args.meta, {})
    groups = args.group or None
    async with _client(args) as broker:
        start = trio.current_time()
        await _join(broker, args, settle=True)

        def subscribers() -> list[Any]:
            return [ep for ep in broker.registry.event_endpoints(args.event)
                    if not ep.local and (groups is None or ep.group in groups)]

        with trio.move_on_after(max(0.0, args.wait - (trio.current_time() - start))):
            while not subscribers():
                await trio.sleep(0.05)
        found = subscribers()
        if not found:
            which = f" in groups {groups}" if groups else ""
            raise CliError(f"no node subscribes to {args.event!r}{which} (waited {args.wait}s)")
        send = broker.broadcast if broadcast else broker.emit
        await send(args.event, data, groups=groups, meta=meta)
        print(json.dumps({"event": args.event, "broadcast": broadcast,
                          "groups": sorted({ep.group for ep in found}),
                          "nodes": sorted({ep.node_id for ep in found})}), flush=True)


async def _emit_one(args: argparse.Namespace) -> None:
    await _emit(args, broadcast=False)


async def _broadcast(args: argparse.Namespace) -> None:
    await _emit(args, broadcast=True)


async def _nodes(args: argparse.Namespace) -> None:
    async with _client(args) as broker:
        await _join(broker, args, settle=True)
        nodes = [n for n in await broker.call("$node.list") if args.all or n["id"] != broker.node_id]
        if args.json:
            _print_json(nodes)
            return
        for node in nodes:
            state = "up" if node["available"] else "down"
            print(f"{node['id']:<30} {state:<5} {node.get('address') or ''}")


async def _listing(args: argparse.Namespace) -> None:
    """``actions`` / ``services`` / ``events``: the cluster's, as ``$node.<command>`` lists them."""
    async with _client(args) as broker:
        await _join(broker, args, settle=True)
        rows = await broker.call(f"$node.{args.command}")
    me = broker.node_id
    shown = []
    for row in rows:
        name = row.get("fullName") or row["name"]
        if not args.all and str(name).startswith("$"):
            continue
        if "endpoints" in row:
            row["endpoints"] = [ep for ep in row["endpoints"] if args.all or ep["nodeID"] != me]
            nodes = [ep["nodeID"] for ep in row["endpoints"]]
        else:
            row["nodes"] = [n for n in row["nodes"] if args.all or n != me]
            nodes = row["nodes"]
        if nodes:
            shown.append(row)
    if args.json:
        _print_json(shown)
        return
    for row in shown:
        where = ", ".join(sorted(ep["nodeID"] for ep in row["endpoints"]) if "endpoints" in row
                          else sorted(row["nodes"]))
        if args.command == "events":
            print(f"{row['name']:<30} {row['group']:<20} {where}")
        elif args.command == "services":
            version = "" if row.get("version") is None else f"v{row['version']}"
            print(f"{row['fullName']:<30} {version:<6} {where}")
        else:
            print(f"{row['name']:<40} {where}")


async def _ping(args: argparse.Namespace) -> None:
    async with _client(args) as broker:
        await _join(broker, args)
        with trio.move_on_after(args.wait):
            while args.node not in _others(broker):
                await trio.sleep(0.05)
        if args.node not in _others(broker):
            raise CliError(f"node {args.node!r} not found (known: {', '.join(_others(broker)) or 'none'})")
        for i in range(args.count):
            if i:
                await trio.sleep(args.interval)
            rtt = await broker.ping(args.node, timeout=args.timeout)
            print(f"pong from {args.node}: {rtt * 1000:.2f} ms", flush=True)


def _watcher(pattern: str, service_name: str, group: str | None) -> nerve.Service:
    """A service with one handler for events matching ``pattern``, printing each as a JSON line."""

    class Watcher(nerve.Service):
        name = service_name

        @nerve.event(pattern, group=group)
        async def seen(self, ctx: nerve.Context) -> None:
            print(json.dumps({"event": ctx.event, "data": ctx.params, "meta": ctx.meta, "sender": ctx.node_id},
                             default=repr), flush=True)

    return Watcher()


async def _watch(args: argparse.Namespace) -> None:
    async with _client(args) as broker:
        broker.add_service(_watcher(args.pattern, f"cli-watch-{os.getpid()}", args.group))
        await _join(broker, args)
        print(f"watching {args.pattern!r} (Ctrl-C to stop)", file=sys.stderr, flush=True)
        await trio.sleep_forever()


async def _upload(args: argparse.Namespace) -> None:
    path, size = _readable_file(args.file)
    meta = {"filename": path.name, "size": size, **_json_arg("--meta", args.meta, {})}
    params = _json_arg("--params", args.params, {})
    digest = hashlib.sha256()
    async with _client(args) as broker:
        await _ready(broker, args, args.action)
        upload = nerve.PacketStream.from_iterable(
            _hashed_chunks(path, broker.max_chunk, digest), window=broker.stream_window,
            max_chunk=broker.max_chunk, idle_timeout=args.idle_timeout or broker.stream_idle_timeout)
        upload.size = size
        result = await _with_progress(
            f"upload {path.name}", size, lambda: upload.bytes_sent,
            lambda: broker.call(args.action, params, meta=meta, stream=upload, timeout=args.timeout,
                                node_id=args.target))
    print(f"sha256 {digest.hexdigest()}  {upload.bytes_sent} bytes")
    _print_json({"result": result})


async def _download(args: argparse.Namespace) -> None:
    params = _json_arg("--params", args.params, {})
    meta: dict[str, Any] = _json_arg("--meta", args.meta, {})
    target = _writable_target(args.file)
    async with _client(args) as broker:
        await _ready(broker, args, args.action)
        stream = await broker.call(args.action, params, meta=meta, timeout=args.timeout, node_id=args.target)
        if not isinstance(stream, nerve.PacketStream):
            raise CliError(f"{args.action} did not answer with a stream: {json.dumps(stream, default=repr)}")
        total = meta.get("size") if isinstance(meta.get("size"), int) else None
        written = await _with_progress(f"download {target.name}", total, lambda: stream.bytes_received,
                                       lambda: _save(stream, target))
    digest = await trio.to_thread.run_sync(sha256_file, target)
    print(f"sha256 {digest}  {written} bytes -> {target}")


async def _demo(args: argparse.Namespace) -> None:
    from nerve.demo import demo

    await demo(args.size)


async def _fuzz(args: argparse.Namespace) -> None:
    """``nerve fuzz``: attack a node as a hostile peer (see nerve.fuzzing); exit 1 on findings."""
    from nerve.testing import NodeProcess, fuzz_node

    if (args.address is None) == (args.spawn is None):
        raise CliError("nerve fuzz: give the node's tcp://host:port or --spawn CMD (not both)")
    params = _json_arg("--params", args.params)
    download_params = _json_arg("--download-params", args.download_params)
    target: Any = NodeProcess(args.spawn) if args.spawn else args.address
    try:
        report = await fuzz_node(
            target, secret=args.secret, duration=args.duration, seed=args.seed, pid=args.pid,
            legit_action=args.legit_action, legit_params=params, actions=args.action or (),
            upload_action=args.upload_action, download_action=args.download_action,
            download_params=download_params, namespace=args.namespace, latency_bound=args.latency,
            minimize_budget=args.minimize_budget,
            **({"categories": args.category} if args.category else {}))
    finally:
        if isinstance(target, NodeProcess):
            with trio.CancelScope(shield=True):
                await target.stop()
    print(report.summary(), flush=True)
    if args.report:
        Path(args.report).write_text(json.dumps(report.to_json(), indent=2, default=repr))
        print(f"report written to {args.report}")
    if not report.ok:
        raise SystemExit(1)


# --- the parser -----------------------------------------------------------------------------


def _fuzz_parser(sub: Any) -> None:
    f = sub.add_parser("fuzz", help="fuzz a live node as a hostile peer (needs hypothesis); exit 1 on findings")
    f.add_argument("address", nargs="?", help="tcp://host:port of the node (or --spawn)")
    f.add_argument("--spawn", help="command starting the node, which prints a JSON line with 'address' "
                                    "(e.g. 'nerve run --service mod:Cls'); the fuzzer restarts it after "
                                    "a crash and minimizes reproducers against fresh instances")
    f.add_argument("--pid", type=int, help="the node's pid, to watch its process, RSS and descriptors")
    f.add_argument("--secret", help="the cluster's shared secret")
    f.add_argument("--namespace", default="", help="the cluster's namespace (default none)")
    f.add_argument("--duration", type=float, default=60.0, help="seconds of fuzzing (default 60)")
    f.add_argument("--seed", type=int, default=None, help="random seed, to replay a run")
    f.add_argument("--report", help="write the JSON report here")
    f.add_argument("--action", action="extend", nargs="+", metavar="NAME",
                   help="actions hostile frames may call and whose params are fuzzed (the first is "
                        "called by the legitimate client unless --legit-action)")
    f.add_argument("--legit-action", help="the action the legitimate client calls (default: first "
                                          "--action, else $node.health)")
    f.add_argument("--params", help="JSON params of the legitimate call (or @FILE, or - for stdin)")
    f.add_argument("--upload-action", help="an action reading a request stream")
    f.add_argument("--download-action", help="an action answering with a response stream")
    f.add_argument("--download-params", help="JSON params of the download action")
    f.add_argument("--latency", type=float, default=2.0, help="latency bound of legitimate calls (s)")
    f.add_argument("--minimize-budget", type=float, default=120.0, help="seconds for minimizing findings")
    f.add_argument("--category", action="append",
                   choices=["handshake", "session", "generated", "stateful", "burst", "cancel", "service"],
                   help="fuzz only these categories (repeatable; default all)")


def _add_cluster_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--secret", help="the cluster's shared secret (TCP): nodes without it are refused")
    p.add_argument("--namespace", default="", help="the cluster's namespace: nodes of another are not seen")
    p.add_argument("--serializer", choices=["msgpack", "json"], default="msgpack",
                   help="packet serializer; every node of a cluster uses the same (default msgpack)")
    p.add_argument("--tls-cert", help="PEM certificate of this node (names its node id)")
    p.add_argument("--tls-key", help="PEM private key (if not in --tls-cert)")
    p.add_argument("--tls-ca", help="PEM CA bundle that peers' certificates must chain to")
    p.add_argument("--tls-mutual", action="store_true", help="require client certificates (mutual TLS)")


def _add_node_flags(p: argparse.ArgumentParser) -> None:
    """Flags of a long-running node (run, gateway)."""
    p.add_argument("--protocol-version", choices=["4", "5"], default="5",
                   help="Moleculer protocol version: 5 (moleculer.js 0.15, default) or 4 (0.14)")
    p.add_argument("--token", action="append", default=[], metavar="TOKEN",
                   help="with --http: HTTP clients must send 'Authorization: Bearer TOKEN' (repeatable)")
    p.add_argument("--expose", action="append", default=[], metavar="PATTERN",
                   help="with --http: actions HTTP clients may call ('users.*', '**'; repeatable; default all)")
    p.add_argument("--cors", action="append", default=[], metavar="ORIGIN",
                   help="with --http: an origin allowed by CORS (repeatable)")
    _add_cluster_flags(p)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nerve", description=__doc__)
    p.add_argument("--version", action="version", version=f"nerve {nerve.__version__}",
                   help="print nerve's version and exit")
    p.add_argument("-v", "--verbose", action="store_true", help="log at INFO level (by default run, demo and fuzz log warnings, the "
                        "other commands errors only)")
    p.add_argument("--log-format", choices=["text", "json"], default="text",
                   help="json: one JSON object per log line, with node_id, service, action, "
                        "request_id... as fields (see nerve.logs)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    d = sub.add_parser("demo", help="three nodes on loopback calling each other and streaming a file")
    d.add_argument("--size", type=int, default=8 * 1024 * 1024, help="bytes of the streamed demo file")

    r = sub.add_parser("run", help="run a node hosting services (module:Class) until SIGTERM or Ctrl-C")
    r.add_argument("--listen", default="tcp://127.0.0.1:0",
                   help="tcp://HOST:PORT to listen on (port 0 picks a free one, shown in the JSON line "
                        "printed at start), or nats://HOST:PORT to join through a NATS server")
    r.add_argument("--peer", action="append", default=[], metavar="tcp://HOST:PORT",
                   help=f"a node to join (repeatable; default ${PEER_ENV})")
    r.add_argument("--node-id", default=None, help="this node's id (default HOSTNAME-PID-N)")
    r.add_argument("--service", action="append", default=[], metavar="MODULE:CLASS",
                   help="a nerve.Service subclass to host, imported from the current directory or "
                        "sys.path (repeatable)")
    r.add_argument("--metrics", metavar="HOST:PORT", default=None,
                   help="serve Prometheus metrics at http://HOST:PORT/metrics (needs prometheus-client, "
                        "nerve's 'metrics' extra; port 0 picks a free one, shown in the JSON line)")
    r.add_argument("--advertise", metavar="tcp://HOST:PORT", default=None,
                   help="the address peers are told to dial (behind NAT or in a container); default: the "
                        "--listen address, a wildcard host replaced by this host's first non-loopback address")
    _add_node_flags(r)
    r.add_argument("--http", metavar="HOST:PORT", default=None,
                   help="also serve the HTTP gateway there (the Moleculer Sidecar's API under /v1; needs "
                        "nerve's 'gateway' extra; port 0 picks a free one, shown in the JSON line)")

    g = sub.add_parser("gateway", help="run an HTTP gateway node (the Moleculer Sidecar's API under /v1) "
                                       "joined to a cluster, until SIGTERM or Ctrl-C")
    g.add_argument("--http", metavar="HOST:PORT", default="127.0.0.1:5103",
                   help="where to serve HTTP (default 127.0.0.1:5103, the Sidecar's port)")
    g.add_argument("--listen", default=None,
                   help="tcp://HOST:PORT to listen on for nodes (default tcp://127.0.0.1:0 unless --transport)")
    g.add_argument("--transport", metavar="nats://HOST:PORT", default=None,
                   help="join through a NATS server (moleculer.js clusters) instead of TCP")
    g.add_argument("--peer", action="append", default=[], metavar="tcp://HOST:PORT",
                   help=f"a node to join (repeatable; default ${PEER_ENV})")
    g.add_argument("--node-id", default=None, help="this node's id (default HOSTNAME-PID-N)")
    g.add_argument("--service", action="append", default=[], metavar="MODULE:CLASS",
                   help="a nerve.Service subclass to host beside the gateway (repeatable)")
    g.add_argument("--metrics", metavar="HOST:PORT", default=None, help="serve Prometheus metrics there")
    g.add_argument("--advertise", metavar="tcp://HOST:PORT", default=None,
                   help="the address peers are told to dial")
    _add_node_flags(g)

    def client(name: str, help: str) -> argparse.ArgumentParser:
        c = sub.add_parser(name, help=help, description=help)
        c.add_argument("--peer", action="append", default=[], metavar="tcp://HOST:PORT",
                       help=f"a node of the cluster to join through (repeatable; default ${PEER_ENV}, "
                            "comma-separated)")
        c.add_argument("--transport", metavar="nats://HOST:PORT",
                       help="join through a NATS server instead of --peer")
        c.add_argument("--node-id", default=None, help="this client's node id (default cli-<pid>)")
        _add_cluster_flags(c)
        c.add_argument("--wait", type=float, default=None,
                       help="seconds to wait for the cluster (and the action's service) to be found "
                            "(default 10; without --wait, a seed that refuses the connection ends the "
                            "wait at once; with it, seeds are retried until it runs out: a node still "
                            "starting is waited for)")
        return c

    def target(c: argparse.ArgumentParser) -> None:
        c.add_argument("--target", metavar="NODE_ID", help="call this node only")

    c = client("call", "call an action and print the result as JSON (a stream's bytes go to stdout "
                       "or --output)")
    c.add_argument("action", help="the action's full name, e.g. math.add or $node.health")
    c.add_argument("params", nargs="?", help="JSON params (or @FILE, or - for stdin)")
    c.add_argument("--meta", help="JSON meta (or @FILE, or - for stdin)")
    c.add_argument("--timeout", type=float, default=None,
                   help="seconds to wait for the answer (RequestTimeoutError after); the remaining "
                        "budget travels to the callee")
    c.add_argument("--retries", type=int, default=0, help="retry retryable failures this many times")
    c.add_argument("--output", "-o", metavar="FILE",
                   help="write the result there (a stream's bytes, else its JSON) instead of stdout")
    target(c)

    u = client("upload", "upload FILE as the request stream of ACTION (SHA-256 computed while sending)")
    u.add_argument("file", help="the file to send")
    u.add_argument("action", help="the action reading the stream, e.g. storage.save")
    u.add_argument("--params", help="JSON params (or @FILE, or - for stdin)")
    u.add_argument("--meta", help="JSON meta (filename and size are added)")
    u.add_argument("--timeout", type=float, default=None,
                   help="seconds to wait for the action's answer once the whole file is sent (it does "
                        "not bound the transfer; --idle-timeout does). When it expires the upload may "
                        "still have completed on the server")
    u.add_argument("--idle-timeout", type=float, default=None,
                   help="seconds without progress after which the transfer fails (default 60)")
    target(u)

    dl = client("download", "download the response stream of ACTION into FILE (written atomically)")
    dl.add_argument("action", help="the action answering with a stream, e.g. storage.load")
    dl.add_argument("file", help="where to write it; nothing appears there unless the download succeeds")
    dl.add_argument("--params", help="JSON params (or @FILE, or - for stdin)")
    dl.add_argument("--meta", help="JSON meta (or @FILE, or - for stdin)")
    dl.add_argument("--timeout", type=float, default=None,
                    help="seconds to wait for the action to answer (it does not bound the transfer, "
                         "which fails after 60s without progress)")
    target(dl)

    for name, help in (("emit", "emit EVENT to one handler per group"),
                       ("broadcast", "broadcast EVENT to every handler on every node")):
        e = client(name, help + " (fails if no node subscribes to it within --wait)")
        e.add_argument("event", help="the event's name, e.g. user.created")
        e.add_argument("data", nargs="?", help="JSON data (or @FILE, or - for stdin)")
        e.add_argument("--meta", help="JSON meta (or @FILE, or - for stdin)")
        e.add_argument("--group", action="append", metavar="GROUP",
                       help="deliver to these groups only (repeatable)")

    w = client("watch", "print every event matching PATTERN as a JSON line, until Ctrl-C")
    w.add_argument("pattern", help="an event name or pattern: * matches within a segment, ** anything")
    w.add_argument("--group", help="the watcher's group (default its own, so it sees every emit)")

    pi = client("ping", "measure the round trip to a node (PING/PONG)")
    pi.add_argument("node", metavar="NODE_ID", help="the node to ping")
    pi.add_argument("--count", type=int, default=1, help="pings to send (default 1)")
    pi.add_argument("--interval", type=float, default=1.0, help="seconds between pings (default 1)")
    pi.add_argument("--timeout", type=float, default=2.0, help="seconds to wait for each pong (default 2)")

    for name, help in (("nodes", "list the nodes of the cluster"),
                       ("actions", "list the cluster's actions and the nodes serving them"),
                       ("services", "list the cluster's services and the nodes hosting them"),
                       ("events", "list the cluster's event subscriptions (name, group, nodes)")):
        ls = client(name, help + " (waits for discovery)")
        ls.add_argument("--all", action="store_true",
                        help="include this client's own node and the $node internals")
        ls.add_argument("--json", action="store_true", help="print JSON instead of a table")

    _fuzz_parser(sub)
    return p


_COMMANDS: dict[str, Callable[[argparse.Namespace], Awaitable[None]]] = {
    "demo": _demo, "run": _run_node, "gateway": _run_node, "call": _call, "upload": _upload, "download": _download,
    "nodes": _nodes, "actions": _listing, "services": _listing, "events": _listing, "emit": _emit_one,
    "broadcast": _broadcast, "ping": _ping, "watch": _watch, "fuzz": _fuzz,
}


def main(argv: list[str] | None = None) -> int:
    """The ``nerve`` entry point: exit 0, 1 (an error), 2 (bad usage) or 130 (Ctrl-C)."""
    _Run.interrupted = False
    try:
        parser = _parser()
        args = parser.parse_args(argv)
        if hasattr(args, "wait"):
            args.wait_given = args.wait is not None
            if args.wait is None:
                args.wait = 10.0
        if getattr(args, "http", "unset") is None and (args.token or args.expose or args.cors):
            parser.error("--token, --expose and --cors are options of --http (the HTTP gateway)")
        if getattr(args, "transport", None):
            if not args.transport.startswith(("nats://", "tls://")):
                parser.error(f"--transport wants nats://HOST:PORT, got {args.transport!r}")
            if args.peer or args.secret or args.tls_cert or args.tls_ca:
                parser.error("--transport nats:// goes without --peer, --secret and --tls-*")
        handler = logging.StreamHandler()
        if args.log_format == "json":
            from nerve.logs import JsonFormatter

            handler.setFormatter(JsonFormatter())
        else:
            handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
        # A client's failure is its one error line; the warnings behind it show with -v.
        quiet = logging.WARNING if args.command in ("run", "gateway", "demo", "fuzz") else logging.ERROR
        logging.basicConfig(level=logging.INFO if args.verbose else quiet, handlers=[handler])
        trio.run(_with_sigint, _COMMANDS[args.command], args)
    except BaseException as exc:
        code, message = _outcome(exc)
        if message:
            print(f"error: {message}", file=sys.stderr, flush=True)
        return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
