"""The ``nerve`` command: run a node, call an action, upload and download files, list nodes,
and the demo. Each command is a thin trio program over the public API."""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import trio

import nerve
from nerve.errors import NerveError

__all__ = ["main"]


def _tls(args: argparse.Namespace) -> dict[str, Any]:
    """Broker options from the --tls-* flags."""
    return {"tls_cert": args.tls_cert, "tls_key": args.tls_key, "tls_ca": args.tls_ca,
            "tls_mutual": args.tls_mutual}


def _add_tls_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tls-cert", help="PEM certificate of this node (names its node id)")
    p.add_argument("--tls-key", help="PEM private key (if not in --tls-cert)")
    p.add_argument("--tls-ca", help="PEM CA bundle that peers' certificates must chain to")
    p.add_argument("--tls-mutual", action="store_true", help="require client certificates (mutual TLS)")


def _client(peer: str, args: argparse.Namespace | None = None, **kw: Any) -> nerve.Broker:
    node_id = getattr(args, "node_id", None) or f"cli-{os.getpid()}"
    if args is not None and getattr(args, "tls_cert", None) is not None:
        kw.update(_tls(args))
    return nerve.Broker(node_id, transport="tcp://127.0.0.1:0", peers=[peer], **kw)


async def _ready(broker: nerve.Broker, action: str, timeout: float) -> None:
    service = action.rsplit(".", 1)[0]
    await broker.wait_for_services(service, timeout=timeout)


def _load_service(spec: str) -> nerve.Service:
    module, _, name = spec.partition(":")
    if not name:
        raise SystemExit(f"--service wants module:Class, got {spec!r}")
    cls = getattr(importlib.import_module(module), name)
    return cls()  # type: ignore[no-any-return]


async def _run_node(args: argparse.Namespace) -> None:
    services = [_load_service(s) for s in args.service]
    async with nerve.Broker(args.node_id, transport=args.listen, peers=args.peer, **_tls(args),
                            services=services, metrics_port=args.metrics) as broker:
        shown = {"nodeID": broker.node_id, "address": broker.address}
        if broker.metrics is not None:
            shown["metrics"] = broker.metrics.url
        print(json.dumps(shown), flush=True)
        with trio.open_signal_receiver(2, 15) as signals:
            async for _ in signals:
                break


async def _call(args: argparse.Namespace) -> None:
    params = json.loads(args.params) if args.params else None
    meta = json.loads(args.meta) if args.meta else {}
    async with _client(args.peer, args) as broker:
        await _ready(broker, args.action, args.wait)
        result = await broker.call(args.action, params, meta=meta, timeout=args.timeout)
        print(json.dumps({"result": result, "meta": meta}, default=repr, indent=2))


async def _nodes(args: argparse.Namespace) -> None:
    async with _client(args.peer, args) as broker:
        with trio.move_on_after(args.wait):
            while len(broker.registry.available_nodes()) < 2:
                await trio.sleep(0.05)
        for node in await broker.call("$node.list"):
            state = "up" if node["available"] else "down"
            print(f"{node['id']:<30} {state:<5} {node.get('address') or ''}")


def _progress(description: str, total: int | None) -> Any:
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    progress = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                        TransferSpeedColumn(), TimeRemainingColumn(), transient=False)
    task = progress.add_task(description, total=total)
    return progress, task


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks (call it in a worker thread)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


async def _track(progress: Any, task: Any, count: Any) -> None:
    while True:
        progress.update(task, completed=count())
        await trio.sleep(0.1)


async def _upload(args: argparse.Namespace) -> None:
    path = Path(args.file)
    size = path.stat().st_size
    meta = {"filename": path.name, "size": size, **(json.loads(args.meta) if args.meta else {})}
    params = json.loads(args.params) if args.params else {}
    digest = await trio.to_thread.run_sync(sha256_file, path)
    async with _client(args.peer, args) as broker:
        await _ready(broker, args.action, args.wait)
        upload = nerve.PacketStream.from_file(path, window=broker.stream_window, max_chunk=broker.max_chunk,
                                              idle_timeout=broker.stream_idle_timeout)
        progress, task = _progress(f"upload {path.name}", size)
        with progress:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_track, progress, task, lambda: upload.bytes_sent)
                result = await broker.call(args.action, params, meta=meta, stream=upload, timeout=args.timeout)
                progress.update(task, completed=upload.bytes_sent)
                nursery.cancel_scope.cancel()
    print(f"sha256 {digest}  {size} bytes")
    print(json.dumps({"result": result}, default=repr, indent=2))


async def _download(args: argparse.Namespace) -> None:
    params = json.loads(args.params) if args.params else {}
    meta: dict[str, Any] = json.loads(args.meta) if args.meta else {}
    target = Path(args.file)
    async with _client(args.peer, args) as broker:
        await _ready(broker, args.action, args.wait)
        stream = await broker.call(args.action, params, meta=meta, timeout=args.timeout)
        if not isinstance(stream, nerve.PacketStream):
            raise SystemExit(f"{args.action} did not answer with a stream: {stream!r}")
        total = meta.get("size") if isinstance(meta.get("size"), int) else None
        progress, task = _progress(f"download {target.name}", total)
        with progress:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_track, progress, task, lambda: stream.bytes_received)
                written = await stream.transfer_to(target)
                progress.update(task, completed=written)
                nursery.cancel_scope.cancel()
    digest = await trio.to_thread.run_sync(sha256_file, target)
    print(f"sha256 {digest}  {written} bytes -> {target}")


async def _fuzz(args: argparse.Namespace) -> None:
    """``nerve fuzz``: attack a node as a hostile peer (see nerve.fuzzing); exit 1 on findings."""
    from nerve.testing import NodeProcess, fuzz_node

    if (args.address is None) == (args.spawn is None):
        raise SystemExit("nerve fuzz: give the node's tcp://host:port or --spawn CMD (not both)")
    params = json.loads(args.params) if args.params else None
    download_params = json.loads(args.download_params) if args.download_params else None
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
            await target.stop()
    print(report.summary(), flush=True)
    if args.report:
        Path(args.report).write_text(json.dumps(report.to_json(), indent=2, default=repr))
        print(f"report written to {args.report}")
    if not report.ok:
        raise SystemExit(1)


def _fuzz_parser(sub: Any) -> None:
    f = sub.add_parser("fuzz", help="fuzz a live node as a hostile peer (needs hypothesis); exit 1 on findings")
    f.add_argument("address", nargs="?", help="tcp://host:port of the node (or --spawn)")
    f.add_argument("--spawn", help="command starting the node, which prints a JSON line with 'address' "
                                    "(e.g. 'nerve run --service mod:Cls'); the fuzzer restarts it after "
                                    "a crash and minimizes reproducers against fresh instances")
    f.add_argument("--pid", type=int, help="the node's pid, to watch its process, RSS and descriptors")
    f.add_argument("--secret", help="the cluster's shared secret")
    f.add_argument("--namespace", default="")
    f.add_argument("--duration", type=float, default=60.0, help="seconds of fuzzing (default 60)")
    f.add_argument("--seed", type=int, default=None)
    f.add_argument("--report", help="write the JSON report here")
    f.add_argument("--action", action="extend", nargs="+", metavar="NAME",
                   help="actions hostile frames may call and whose params are fuzzed (the first is "
                        "called by the legitimate client unless --legit-action)")
    f.add_argument("--legit-action", help="the action the legitimate client calls (default: first "
                                          "--action, else $node.health)")
    f.add_argument("--params", help="JSON params of the legitimate call")
    f.add_argument("--upload-action", help="an action reading a request stream")
    f.add_argument("--download-action", help="an action answering with a response stream")
    f.add_argument("--download-params", help="JSON params of the download action")
    f.add_argument("--latency", type=float, default=2.0, help="latency bound of legitimate calls (s)")
    f.add_argument("--minimize-budget", type=float, default=120.0, help="seconds for minimizing findings")
    f.add_argument("--category", action="append",
                   choices=["handshake", "session", "generated", "stateful", "burst", "cancel", "service"],
                   help="fuzz only these categories (repeatable; default all)")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nerve", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    p.add_argument("--log-format", choices=["text", "json"], default="text",
                   help="json: one JSON object per log line, with node_id, service, action, "
                        "request_id... as fields (see nerve.logs)")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="three nodes on loopback calling each other and streaming a file")
    d.add_argument("--size", type=int, default=8 * 1024 * 1024, help="bytes of the streamed demo file")

    r = sub.add_parser("run", help="run a node hosting services (module:Class)")
    r.add_argument("--listen", default="tcp://127.0.0.1:0")
    r.add_argument("--peer", action="append", default=[])
    r.add_argument("--node-id", default=None)
    r.add_argument("--service", action="append", default=[])
    r.add_argument("--metrics", metavar="HOST:PORT", default=None,
                   help="serve Prometheus metrics at http://HOST:PORT/metrics (needs prometheus-client: "
                        "pip install 'nerve[metrics]'; port 0 picks a free one, shown in the JSON line)")
    _add_tls_flags(r)

    def client(name: str, help: str) -> argparse.ArgumentParser:
        c = sub.add_parser(name, help=help)
        c.add_argument("--peer", required=True, help="tcp://host:port of a running node")
        c.add_argument("--node-id", default=None, help="this client's node id (default cli-<pid>)")
        _add_tls_flags(c)
        c.add_argument("--wait", type=float, default=10.0, help="seconds to wait for the service")
        return c

    c = client("call", "call an action and print the result")
    c.add_argument("action")
    c.add_argument("params", nargs="?", help="JSON params")
    c.add_argument("--meta", help="JSON meta")
    c.add_argument("--timeout", type=float, default=None)

    u = client("upload", "upload FILE as the request stream of ACTION")
    u.add_argument("file")
    u.add_argument("action")
    u.add_argument("--params", help="JSON params")
    u.add_argument("--meta", help="JSON meta (filename and size are added)")
    u.add_argument("--timeout", type=float, default=None)

    dl = client("download", "download the response stream of ACTION into FILE")
    dl.add_argument("action")
    dl.add_argument("file")
    dl.add_argument("--params", help="JSON params")
    dl.add_argument("--meta", help="JSON meta")
    dl.add_argument("--timeout", type=float, default=None)

    client("nodes", "list the nodes of the cluster")
    _fuzz_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    handler = logging.StreamHandler()
    if args.log_format == "json":
        from nerve.logs import JsonFormatter

        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, handlers=[handler])
    if args.command == "demo":
        from nerve.demo import run_demo

        return run_demo(size=args.size)
    commands = {"run": _run_node, "call": _call, "upload": _upload, "download": _download, "nodes": _nodes,
                "fuzz": _fuzz}
    try:
        trio.run(commands[args.command], args)
    except NerveError as exc:
        print(f"error: {type(exc).__name__}: {exc} (code {exc.code}, type {exc.type}, data {exc.data!r})",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
