"""Transports move packets between nodes: ``local`` (in-process, the default), ``tcp`` (native)
and ``nats`` (Moleculer's subjects, for moleculer.js interop)."""

from nerve.transports.base import Transport
from nerve.transports.local import LocalTransport

__all__ = ["Transport", "LocalTransport", "make_transport"]


def make_transport(spec: "str | Transport | None", **options: object) -> Transport:
    """A transport from a broker's ``transport=`` option."""
    if spec is None or spec == "local":
        return LocalTransport()
    if isinstance(spec, Transport):
        return spec
    if isinstance(spec, str) and spec.startswith("tcp://"):
        from nerve.transports.tcp import TcpTransport

        return TcpTransport(spec, **options)  # type: ignore[arg-type]
    if isinstance(spec, str) and spec.startswith(("nats://", "tls://")):
        from nerve.transports.nats import NatsTransport

        return NatsTransport(spec, **options)  # type: ignore[arg-type]
    from nerve.errors import BrokerOptionsError

    raise BrokerOptionsError(
        f"unknown transport {spec!r}; expected None, 'local', 'tcp://host:port' or 'nats://host:port' (a NATS server list: 'nats://h1:4222,h2:4222'; TLS: 'tls://host:4222')")
