"""The built-in ``$node`` service, as Moleculer has it: list, services, actions, events, health."""

from __future__ import annotations

import dataclasses
import os
import platform
import resource
import socket
import time
import builtins
from typing import Any

from nerve.context import Context
from nerve.service import Service, action
from nerve.transit import local_ip_list

__all__ = ["NodeService"]

_STARTED = time.time()


class NodeService(Service):
    name = "$node"

    @action
    async def list(self, ctx: Context) -> list[dict[str, Any]]:
        """Known nodes (``onlyAvailable`` param filters)."""
        only = bool((ctx.params or {}).get("onlyAvailable")) if isinstance(ctx.params, dict) else False
        self.broker.registry.forget_offline()
        return [n.describe() for n in self.broker.registry.nodes.values() if n.available or not only]

    @action
    async def services(self, ctx: Context) -> builtins.list[dict[str, Any]]:
        """Services and the nodes that host them."""
        out: dict[str, dict[str, Any]] = {}
        reg = self.broker.registry
        for node in reg.nodes.values():
            if not node.available:
                continue
            svcs = self.broker.describe_services() if node.local else node.services
            for svc in svcs:
                name = svc.get("fullName") or svc.get("name")
                entry = out.setdefault(name, {"name": svc.get("name"), "fullName": name,
                                              "version": svc.get("version"), "nodes": []})
                entry["nodes"].append(node.id)
        return list(out.values())

    @action
    async def actions(self, ctx: Context) -> builtins.list[dict[str, Any]]:
        """Actions and their endpoints; ``action`` is the action's definition as it travels in
        INFO (its properties included), from a local endpoint if there is one."""
        out = []
        for name, eps in sorted(self.broker.registry.actions.items()):
            shown = next((ep for ep in eps if ep.local), eps[0])
            out.append({"name": name, "action": dict(shown.definition),
                        "endpoints": [{"nodeID": ep.node_id, "local": ep.local} for ep in eps]})
        return out

    @action
    async def events(self, ctx: Context) -> builtins.list[dict[str, Any]]:
        """Event subscriptions and their endpoints."""
        out: dict[tuple[str, str], builtins.list[dict[str, Any]]] = {}
        for ep in self.broker.registry.events:
            out.setdefault((ep.name, ep.group), []).append({"nodeID": ep.node_id, "local": ep.local})
        return [{"name": n, "group": g, "endpoints": eps} for (n, g), eps in sorted(out.items())]

    @action
    async def health(self, ctx: Context) -> dict[str, Any]:
        """This node's health, in Moleculer's shape (cpu, mem, os, process, client, net, time),
        plus ``nerve``: the node's statistics (``broker.statistics()``, as plain data)."""
        usage = resource.getrusage(resource.RUSAGE_SELF)
        load = os.getloadavg()
        cores = os.cpu_count() or 1
        stats = self.broker.statistics()
        return {
            "nodeID": self.broker.node_id,
            "cpu": {"load1": load[0], "load5": load[1], "load15": load[2], "cores": cores,
                    "utilization": round(min(100.0, load[0] * 100 / cores))},
            "mem": _memory(),
            "process": {"pid": os.getpid(), "maxrss_kib": usage.ru_maxrss, "rss": _rss(),
                        "uptime": time.time() - _STARTED},
            "os": {"platform": platform.platform(), "type": platform.system(),
                   "release": platform.release(), "arch": platform.machine(),
                   "hostname": socket.gethostname()},
            "client": {"type": "python", "name": "nerve", "langVersion": platform.python_version()},
            "net": {"ip": local_ip_list()},
            "time": {"now": time.time(), "iso": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
            "nerve": dataclasses.asdict(stats),
        }


def _memory() -> dict[str, Any]:
    """Free and total memory (Linux /proc/meminfo; empty elsewhere)."""
    try:
        with open("/proc/meminfo") as f:
            fields = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f if line.split()[1:2]}
    except (OSError, ValueError, IndexError):
        return {}
    total = fields.get("MemTotal", 0)
    free = fields.get("MemAvailable", fields.get("MemFree", 0))
    return {"free": free, "total": total, "percent": round(free * 100 / total, 2) if total else None}


def _rss() -> int | None:
    """This process' resident memory in bytes now (Linux /proc/self/statm)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None

