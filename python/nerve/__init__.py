"""nerve: a streaming-capable RPC and service broker on trio, speaking Moleculer's protocol.

Start with :class:`Broker`, :class:`Service`, :func:`action`, :func:`event` and
:class:`PacketStream`; errors live in :mod:`nerve.errors`.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _dist_version

from nerve import errors, middlewares
from nerve.broker import Broker
from nerve.context import Context
from nerve.middleware import ActionInfo, CallOptions, EventInfo, EventOptions, Middleware
from nerve.registry import RandomStrategy, RoundRobinStrategy, Strategy
from nerve.service import Service, action, event
from nerve.strategies import CpuUsageStrategy, LatencyStrategy, ShardStrategy
from nerve.streams import PacketStream

try:
    #: the installed distribution's version (maturin takes it from rust/Cargo.toml)
    __version__: str = _dist_version("nerve")
except PackageNotFoundError:  # imported from a source tree that is not installed
    __version__ = "0+unknown"

__all__ = [
    "__version__",
    "ActionInfo",
    "Broker",
    "CallOptions",
    "EventInfo",
    "EventOptions",
    "Middleware",
    "Context",
    "CpuUsageStrategy",
    "LatencyStrategy",
    "ShardStrategy",
    "PacketStream",
    "RandomStrategy",
    "RoundRobinStrategy",
    "Service",
    "Strategy",
    "action",
    "errors",
    "middlewares",
    "event",
]
