"""The packet model against real moleculer.js / moleculerpy captures (JSON and MsgPack),
property round trips through both serializers, and refusal of malformed payloads.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nerve import testing
from nerve.errors import NerveError, PacketError, ProtocolError
from nerve.packets import PACKET_CLASSES, UNSET, Packet, PacketType, Request, Response
from nerve.serializers import JSONSerializer, MsgPackSerializer, Serializer

CAPTURES = Path(__file__).parent / "data" / "captures"
JSON_FOLDERS = ["js-0.15.2", "js-0.15.2-namespace", "js-0.14.36"]
MOLPY_FOLDERS = ["molpy-peer--js-0.14.36-check", "molpy-check--js-0.14.36-peer"]
MSGPACK_FOLDER = "js-0.15.2-msgpack"

JSON = JSONSerializer()
MSGPACK = MsgPackSerializer()
SERIALIZERS: list[Serializer] = [JSON, MSGPACK]

props = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def records(folder: str) -> list[Any]:
    """One pytest param per line of ``<folder>/all.jsonl``: ``(kind, record)``, id file:line:subject.
    The record gets the folder's protocol version (``"4"`` for the 0.14 folders) as ``_ver``."""
    path = CAPTURES / folder / "all.jsonl"
    params = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        record = json.loads(line)
        record["_ver"] = "4" if "0.14" in folder else "5"
        kind = PacketType[record["subject"].split(".")[1]]
        params.append(pytest.param(kind, record, id=f"{folder}/all.jsonl:{lineno}:{record['subject']}"))
    return params


def all_records(folders: list[str]) -> list[Any]:
    return [p for folder in folders for p in records(folder)]


def unbin(value: Any) -> Any:
    """The capture's ``{"$bin_base64", "$bin_len"}`` placeholders back to ``bytes``."""
    if isinstance(value, dict):
        if set(value) == {"$bin_base64", "$bin_len"}:
            raw = base64.b64decode(value["$bin_base64"])
            assert len(raw) == value["$bin_len"]
            return raw
        return {k: unbin(v) for k, v in value.items()}
    if isinstance(value, list):
        return [unbin(v) for v in value]
    return value


def test_captures_are_all_there() -> None:
    counts = {f: len(records(f)) for f in [*JSON_FOLDERS, MSGPACK_FOLDER, *MOLPY_FOLDERS]}
    assert all(n >= 20 for n in counts.values()), counts


# --- captures ------------------------------------------------------------------------


class TestJSONCaptures:
    @pytest.mark.parametrize(("kind", "record"), all_records(JSON_FOLDERS))
    def test_decodes_and_re_encodes_equal(self, kind: PacketType, record: dict[str, Any]) -> None:
        packet = JSON.decode(kind, json.dumps(record["packet"]).encode())
        assert type(packet) is PACKET_CLASSES[kind]
        assert packet.sender == record["packet"]["sender"]
        assert packet.ver == record["_ver"]
        assert json.loads(JSON.encode(packet)) == record["packet"]

    @pytest.mark.parametrize(("kind", "record"), all_records(JSON_FOLDERS))
    def test_buffers_become_bytes(self, kind: PacketType, record: dict[str, Any]) -> None:
        if kind not in (PacketType.REQ, PacketType.RES, PacketType.EVENT):
            return
        name = "params" if kind is PacketType.REQ else "data"
        packet = JSON.decode(kind, json.dumps(record["packet"]).encode())
        body = record["packet"][name]
        if isinstance(body, dict) and body.get("type") == "Buffer":
            assert getattr(packet, name) == bytes(body["data"])
        else:
            assert getattr(packet, name) == body


class TestMsgPackCaptures:
    @pytest.mark.parametrize(("kind", "record"),
                             [p for p in records(MSGPACK_FOLDER) if p.values[1]["raw_base64"]])
    def test_raw_bytes_decode_and_re_encode_equal(self, kind: PacketType, record: dict[str, Any]) -> None:
        raw = base64.b64decode(record["raw_base64"])
        assert len(raw) == record["bytes"]
        packet = MSGPACK.decode(kind, raw)
        assert type(packet) is PACKET_CLASSES[kind]
        assert msgspec.msgpack.decode(MSGPACK.encode(packet)) == msgspec.msgpack.decode(raw)
        # The capture's JSON record says the same thing as its raw bytes.
        assert msgspec.msgpack.decode(raw) == unbin(record["packet"])

    @pytest.mark.parametrize(("kind", "record"),
                             [p for p in records(MSGPACK_FOLDER) if not p.values[1]["raw_base64"]])
    def test_rebuilt_from_record(self, kind: PacketType, record: dict[str, Any]) -> None:
        value = unbin(record["packet"])
        packet = MSGPACK.decode(kind, msgspec.msgpack.encode(value))
        assert type(packet) is PACKET_CLASSES[kind]
        again = MSGPACK.decode(kind, MSGPACK.encode(packet))
        assert again == packet
        assert msgspec.msgpack.decode(MSGPACK.encode(again)) == value

    def test_stream_chunks_are_bytes(self) -> None:
        """The upload (REQ) and download (RES) streams each carry bytes 0..39 as native bin."""
        upload: list[Any] = []
        download: list[Any] = []
        for kind, record in (p.values for p in records(MSGPACK_FOLDER)):
            if not record["raw_base64"] or kind not in (PacketType.REQ, PacketType.RES):
                continue
            packet = MSGPACK.decode(kind, base64.b64decode(record["raw_base64"]))
            if isinstance(packet, Request) and packet.action == "peer.upload":
                upload.append(packet.params)
            elif isinstance(packet, Response) and packet.stream is True:
                download.append(packet.data)
        for chunks in (upload, download):
            binary = [c for c in chunks if isinstance(c, bytes)]
            assert len(binary) == 3
            assert b"".join(binary) == bytes(range(40))


class TestMoleculerpyCaptures:
    @pytest.mark.parametrize(("kind", "record"), all_records(MOLPY_FOLDERS))
    def test_decodes_ignoring_unknown_keys(self, kind: PacketType, record: dict[str, Any]) -> None:
        packet = JSON.decode(kind, json.dumps(record["packet"]).encode())
        cls = PACKET_CLASSES[kind]
        assert type(packet) is cls
        assert packet.ver == record["_ver"] == "4"
        out = json.loads(JSON.encode(packet))
        wire_names = set(cls.__struct_encode_fields__)
        assert set(out) <= wire_names
        for key, value in record["packet"].items():
            if key in wire_names:
                assert out[key] == value, key
        unknown = set(record["packet"]) - wire_names
        assert not unknown & set(out)

    def test_extra_request_keys_are_present_in_captures(self) -> None:
        reqs = [r["packet"] for kind, r in (p.values for p in all_records(MOLPY_FOLDERS)) if kind is PacketType.REQ]
        extra = set().union(*(set(r) - set(Request.__struct_encode_fields__) for r in reqs))
        assert {"nodeID", "needAck"} <= extra


# --- property round trips ------------------------------------------------------------


def _body(packet: Packet) -> tuple[str, Any] | None:
    if isinstance(packet, Request):
        return "params", packet.params
    if isinstance(packet, Response) or packet.kind is PacketType.EVENT:
        return "data", packet.data  # type: ignore[attr-defined]
    return None


class TestRoundTripProperties:
    @props
    @given(testing.packets(version="5"))
    def test_v5_through_both(self, packet: Packet) -> None:
        for ser in SERIALIZERS:
            assert ser.decode(packet.kind, ser.encode(packet)) == packet

    @props
    @given(testing.packets(version="4"))
    def test_v4_through_both(self, packet: Packet) -> None:
        assert packet.ver == "4" and getattr(packet, "headers", UNSET) is UNSET
        for ser in SERIALIZERS:
            payload = ser.encode(packet)
            assert ser.decode(packet.kind, payload) == packet
            wire = msgspec.json.decode(payload) if ser is JSON else msgspec.msgpack.decode(payload)
            assert wire["ver"] == "4" and "headers" not in wire

    @props
    @given(st.sampled_from([PacketType.REQ, PacketType.RES, PacketType.EVENT]).flatmap(testing.packets),
           st.binary(max_size=300))
    def test_bytes_bodies(self, packet: Packet, body: bytes) -> None:
        name, _ = _body(packet)  # type: ignore[misc]
        packet = msgspec.structs.replace(packet, **{name: body})
        wire = json.loads(JSON.encode(packet))
        assert wire[name] == {"type": "Buffer", "data": list(body)}
        assert getattr(JSON.decode(packet.kind, json.dumps(wire).encode()), name) == body
        assert getattr(MSGPACK.decode(packet.kind, MSGPACK.encode(packet)), name) == body
        assert msgspec.msgpack.decode(MSGPACK.encode(packet))[name] == body  # native bin

    @props
    @given(st.sampled_from(["msgpack", "json"]).flatmap(
        lambda name: st.tuples(st.just(name), testing.packet_payloads(name))))
    def test_packet_payloads(self, item: tuple[str, tuple[PacketType, bytes]]) -> None:
        name, (kind, payload) = item
        ser = JSON if name == "json" else MSGPACK
        packet = ser.decode(kind, payload)
        assert type(packet) is PACKET_CLASSES[kind]
        assert ser.encode(packet) == payload


# --- refusals ------------------------------------------------------------------------

BASE: dict[PacketType, dict[str, Any]] = {
    PacketType.REQ: {"id": "1", "action": "a.b", "params": {}, "ver": "5", "sender": "n"},
    PacketType.RES: {"id": "1", "success": True, "data": None, "ver": "5", "sender": "n"},
    PacketType.EVENT: {"event": "e", "data": None, "ver": "5", "sender": "n"},
    PacketType.INFO: {"services": [], "ver": "5", "sender": "n"},
    PacketType.HEARTBEAT: {"cpu": 1, "ver": "5", "sender": "n"},
    PacketType.GOSSIP_REQ: {"ver": "5", "sender": "n"},
}

WRONG: list[tuple[PacketType, str, Any]] = [
    (PacketType.REQ, "action", 5),
    (PacketType.REQ, "id", None),
    (PacketType.REQ, "level", "x"),
    (PacketType.REQ, "meta", [1]),
    (PacketType.REQ, "timeout", "soon"),
    (PacketType.REQ, "stream", "yes"),
    (PacketType.RES, "success", "yes"),
    (PacketType.RES, "error", "boom"),
    (PacketType.RES, "seq", 1.5),
    (PacketType.EVENT, "groups", "g"),
    (PacketType.EVENT, "needAck", 3),
    (PacketType.INFO, "services", {"a": 1}),
    (PacketType.INFO, "ipList", [1, 2]),
    (PacketType.INFO, "instanceID", 7),
    (PacketType.HEARTBEAT, "cpu", "x"),
    (PacketType.HEARTBEAT, "sender", 1),
    (PacketType.GOSSIP_REQ, "offline", {"n": "x"}),
]


def encode_with(ser: Serializer, value: Any) -> bytes:
    return msgspec.json.encode(value) if ser is JSON else msgspec.msgpack.encode(value)


@pytest.mark.parametrize("ser", SERIALIZERS, ids=lambda s: s.name)
class TestRefusals:
    @pytest.mark.parametrize(("kind", "field", "value"), WRONG,
                             ids=[f"{k.name}.{f}={v!r}" for k, f, v in WRONG])
    def test_wrong_type_names_the_field(self, ser: Serializer, kind: PacketType, field: str, value: Any) -> None:
        payload = encode_with(ser, {**BASE[kind], field: value})
        with pytest.raises(PacketError) as info:
            ser.decode(kind, payload)
        assert info.value.field == field
        assert field in str(info.value) and kind.name in str(info.value)
        assert isinstance(info.value, ProtocolError) and info.value.reason == "invalid_packet"

    @pytest.mark.parametrize(("kind", "field"), [(PacketType.REQ, "action"), (PacketType.REQ, "id"),
                                                 (PacketType.RES, "id"), (PacketType.EVENT, "event")])
    def test_missing_required_field_is_named(self, ser: Serializer, kind: PacketType, field: str) -> None:
        payload = encode_with(ser, {k: v for k, v in BASE[kind].items() if k != field})
        with pytest.raises(PacketError) as info:
            ser.decode(kind, payload)
        assert info.value.field == field

    @pytest.mark.parametrize("value", [[], None, "x", 1])
    def test_not_an_object(self, ser: Serializer, value: Any) -> None:
        with pytest.raises(PacketError) as info:
            ser.decode(PacketType.REQ, encode_with(ser, value))
        assert info.value.field is None

    def test_unknown_kind(self, ser: Serializer) -> None:
        with pytest.raises(PacketError):
            ser.decode(99, encode_with(ser, {"ver": "5", "sender": "n"}))

    def test_deep_nesting_is_a_packet_error(self, ser: Serializer) -> None:
        if ser is JSON:
            payload = b'{"id":"1","action":"a","params":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
        else:  # fixmap of 3: id, action, params = 100000 nested 1-arrays around nil
            payload = b"\x83\xa2id\xa11\xa6action\xa1a\xa6params" + b"\x91" * 100_000 + b"\xc0"
        with pytest.raises(PacketError):
            ser.decode(PacketType.REQ, payload)
        with pytest.raises(PacketError):
            ser.decode_value(b"[" * 100_000 if ser is JSON else b"\x91" * 100_000)

    @props
    @given(st.sampled_from(list(PacketType)), st.binary(max_size=200))
    def test_garbage_never_escapes_as_another_error(self, ser: Serializer, kind: PacketType, data: bytes) -> None:
        try:
            packet = ser.decode(kind, data)
        except PacketError as exc:
            assert isinstance(exc, NerveError)
        else:
            assert type(packet) is PACKET_CLASSES[kind]

    @props
    @given(st.sampled_from(list(PacketType)), st.dictionaries(
        st.sampled_from(["id", "action", "event", "params", "data", "level", "success", "meta", "ver",
                         "sender", "seq", "stream", "groups", "services", "cpu", "online", "offline"]),
        testing.json_values(max_leaves=4), max_size=8))
    def test_wrongly_typed_objects(self, ser: Serializer, kind: PacketType, value: dict[str, Any]) -> None:
        try:
            packet = ser.decode(kind, encode_with(ser, value))
        except PacketError as exc:
            assert exc.field is None or exc.field in value or exc.field in {"id", "action", "event"}
        else:
            assert type(packet) is PACKET_CLASSES[kind]


class TestNodeBuffers:
    @pytest.mark.parametrize("data", [[256], [-1], ["a"], [1.5], "not-a-list", {"0": 1}])
    def test_bad_buffer_data(self, data: Any) -> None:
        payload = json.dumps({**BASE[PacketType.REQ], "params": {"type": "Buffer", "data": data}}).encode()
        with pytest.raises(PacketError) as info:
            JSON.decode(PacketType.REQ, payload)
        assert info.value.field == "params"

    def test_buffer_lookalike_in_meta_is_left_alone(self) -> None:
        buf = {"type": "Buffer", "data": [1, 2]}
        packet = JSON.decode(PacketType.RES, json.dumps({**BASE[PacketType.RES], "meta": {"b": buf},
                                                         "data": buf}).encode())
        assert packet.meta == {"b": buf}  # type: ignore[attr-defined]
        assert packet.data == b"\x01\x02"  # type: ignore[attr-defined]
