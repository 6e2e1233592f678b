"""The built-in ``$node`` service, as Moleculer has it: list, services, actions, events, health."""

from __future__ import annotations

import os
import platform
import resource
import socket
import time
import builtins
from typing import Any

from nerve.context import Context
from nerve.service import Service, action

__all__ = ["NodeService"]

_STARTED = time.time()


class NodeService(Service):
    name = "$node"

    @action
    async def list(self, ctx: Context) -> list[dict[str, Any]]:
        """Known nodes (``onlyAvailable`` param filters)."""
        only = bool((ctx.params or {}).get("onlyAvailable")) if isinstance(ctx.params, dict) else False
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
        """This node's process, OS and transport statistics."""
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return {
            "nodeID": self.broker.node_id,
            "cpu": {"load1": os.getloadavg()[0], "cores": os.cpu_count()},
            "process": {"pid": os.getpid(), "maxrss_kib": usage.ru_maxrss,
                        "uptime": time.time() - _STARTED},
            "os": {"platform": platform.platform(), "hostname": socket.gethostname()},
            "client": {"type": "python", "langVersion": platform.python_version()},
            "transit": dict(self.broker.transit.stats),
            "broker": dict(self.broker.stats),
            "time": {"now": time.time()},
        }
