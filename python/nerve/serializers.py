"""Packet payloads to bytes and back: msgpack (nerve's default) and JSON (Moleculer's).

Decoding validates as it goes; a payload that does not fit the model raises
:class:`nerve.errors.PacketError` naming the field, and so does any other failure of the
decoder on a peer's bytes (invalid UTF-8, nesting too deep): never anything else. Under JSON, binary values of ``params``
and ``data`` travel in Node's ``{"type": "Buffer", "data": [...]}`` form, as Moleculer does.
"""

from __future__ import annotations

import re
from typing import Any

import msgspec

from nerve.errors import PacketError
from nerve.packets import PACKET_CLASSES, Event, Packet, PacketType, Request, Response

__all__ = ["Serializer", "MsgPackSerializer", "JSONSerializer", "get_serializer"]

_PATH = re.compile(r"at `\$\.?([^`]*)`")
_MISSING = re.compile(r"missing required field `([^`]*)`")


def _packet_error(kind: PacketType, exc: Exception) -> PacketError:
    if isinstance(exc, RecursionError):
        return PacketError(f"invalid {kind.name} packet: nested too deeply", field=None)
    if isinstance(exc, UnicodeDecodeError):
        return PacketError(f"invalid {kind.name} packet: a string is not UTF-8 ({exc.reason})", field=None)
    if not isinstance(exc, msgspec.DecodeError):
        return PacketError(f"invalid {kind.name} packet: {exc!r}", field=None)
    text = str(exc)
    match = _PATH.search(text)
    path = match.group(1) if match else None
    if not path:
        # A missing top-level field has no path; its name is in the message.
        missing = _MISSING.search(text)
        path = missing.group(1) if missing else None
    field_name = path.split(".")[0].split("[")[0] if path else None
    where = f" (field {path!r})" if path else ""
    return PacketError(f"invalid {kind.name} packet{where}: {text}", field=field_name or None)


class Serializer:
    """Encodes packets to payload bytes and decodes payload bytes of a known packet type."""

    name: str = ""

    def encode(self, packet: Packet) -> bytes:
        raise NotImplementedError

    def decode(self, kind: PacketType | int, payload: bytes | bytearray | memoryview) -> Packet:
        raise NotImplementedError

    def encode_value(self, value: Any) -> bytes:
        """Encode a plain value (used for error bodies of streams)."""
        raise NotImplementedError

    def decode_value(self, payload: bytes | bytearray | memoryview) -> Any:
        raise NotImplementedError


class _MsgspecSerializer(Serializer):
    """A serializer over one msgspec format module (``msgspec.msgpack`` or ``msgspec.json``):
    one encoder and one typed decoder per packet type, built once."""

    _format: Any = None

    def __init__(self) -> None:
        self._encoder = self._format.Encoder()
        self._decoders = {k: self._format.Decoder(cls) for k, cls in PACKET_CLASSES.items()}
        self._any = self._format.Decoder()

    def encode(self, packet: Packet) -> bytes:
        try:
            return self._encoder.encode(packet)  # type: ignore[no-any-return]
        except (TypeError, OverflowError, ValueError) as exc:
            raise _serialization_error(packet, exc) from exc

    def decode(self, kind: PacketType | int, payload: bytes | bytearray | memoryview) -> Packet:
        try:
            decoder = self._decoders[kind]  # type: ignore[index]  # an int is a PacketType
        except KeyError:
            raise PacketError(f"unknown packet type {kind!r}", field=None) from None
        try:
            return decoder.decode(payload)  # type: ignore[no-any-return]
        except Exception as exc:  # DecodeError, and UnicodeDecodeError (a ValueError) among others
            raise _packet_error(PacketType(kind), exc) from exc

    def encode_value(self, value: Any) -> bytes:
        return self._encoder.encode(value)  # type: ignore[no-any-return]

    def decode_value(self, payload: bytes | bytearray | memoryview) -> Any:
        try:
            return self._any.decode(payload)
        except Exception as exc:  # whatever a peer's bytes make the decoder raise
            raise PacketError(f"invalid payload: {exc!r}") from exc


class MsgPackSerializer(_MsgspecSerializer):
    """nerve's default: compact, binary chunks as msgpack ``bin``."""

    name = "msgpack"
    _format = msgspec.msgpack


def _to_node_buffer(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {"type": "Buffer", "data": list(bytes(value))}
    return value


def _from_node_buffer(value: Any, kind: PacketType, field_name: str) -> Any:
    if isinstance(value, dict) and value.get("type") == "Buffer" and "data" in value:
        data = value["data"]
        if not isinstance(data, list):
            raise PacketError(f"invalid {kind.name} packet: Buffer data is not a list", field=field_name)
        try:
            return bytes(data)
        except (TypeError, ValueError) as exc:
            raise PacketError(f"invalid {kind.name} packet: Buffer data is not bytes: {exc}",
                              field=field_name) from exc
    return value


class JSONSerializer(_MsgspecSerializer):
    """Moleculer's default; binary ``params``/``data`` in Node's Buffer form."""

    name = "json"
    _format = msgspec.json

    def encode(self, packet: Packet) -> bytes:
        if isinstance(packet, Request):
            if isinstance(packet.params, (bytes, bytearray, memoryview)):
                packet = msgspec.structs.replace(packet, params=_to_node_buffer(packet.params))
        elif isinstance(packet, (Response, Event)):
            if isinstance(packet.data, (bytes, bytearray, memoryview)):
                packet = msgspec.structs.replace(packet, data=_to_node_buffer(packet.data))
        return super().encode(packet)

    def decode(self, kind: PacketType | int, payload: bytes | bytearray | memoryview) -> Packet:
        packet = super().decode(kind, payload)
        if isinstance(packet, Request):
            packet.params = _from_node_buffer(packet.params, packet.kind, "params")
        elif isinstance(packet, (Response, Event)):
            packet.data = _from_node_buffer(packet.data, packet.kind, "data")
        return packet


def _serialization_error(packet: Packet, exc: Exception) -> Exception:
    from nerve.errors import SerializationError

    return SerializationError(f"cannot serialize {packet.kind.name} packet: {exc}",
                              data={"reason": str(exc)})


_SERIALIZERS: dict[str, type[Serializer]] = {"msgpack": MsgPackSerializer, "json": JSONSerializer}


def get_serializer(name: str | Serializer) -> Serializer:
    """The serializer called ``name`` (``"msgpack"`` or ``"json"``), or ``name`` itself."""
    if isinstance(name, Serializer):
        return name
    try:
        return _SERIALIZERS[name.lower()]()
    except KeyError:
        from nerve.errors import BrokerOptionsError

        raise BrokerOptionsError(f"unknown serializer {name!r}; expected one of {sorted(_SERIALIZERS)}") from None
