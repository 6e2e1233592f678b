"""nerve's error tree on the wire: every class round-trips through Moleculer's plain error
object, Moleculer's names/codes/retryable flags match, unknown names become RemoteError.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nerve import errors, testing
from nerve.errors import (
    ClientError,
    FrameError,
    InvalidPacketDataError,
    NerveError,
    PacketError,
    ProtocolError,
    RemoteError,
    error_from_wire,
    error_to_wire,
)
from nerve.serializers import JSONSerializer, MsgPackSerializer

CAPTURES = Path(__file__).parent / "data" / "captures"
WIRE_KEYS = {"name", "message", "code", "type", "data", "retryable", "nodeID", "stack"}

ALL_CLASSES: list[type[NerveError]] = sorted(
    (v for v in vars(errors).values() if isinstance(v, type) and issubclass(v, NerveError)),
    key=lambda c: c.__name__,
)


def expected_class(cls: type[NerveError]) -> type[NerveError]:
    """The class a wire name comes back as: PacketError travels as Moleculer's
    InvalidPacketDataError (its parent), everything else as itself."""
    return InvalidPacketDataError if cls is PacketError else cls


def make(cls: type[NerveError], **kw: Any) -> NerveError:
    if cls is RemoteError:
        return RemoteError("remote went wrong", 418, "TEAPOT", {"k": [1, 2]}, name="TeapotError", **kw)
    return cls("went wrong", code=409, type="SOME_TYPE", data={"k": [1, 2]}, **kw)


# --- round trips ---------------------------------------------------------------------


class TestRoundTrip:
    def test_every_class_is_covered(self) -> None:
        assert {c.__name__ for c in ALL_CLASSES} >= set(errors.__all__) - {
            "error_from_wire", "error_to_wire", "request_timeout", "registered_errors"}

    @pytest.mark.parametrize("cls", ALL_CLASSES, ids=lambda c: c.__name__)
    @pytest.mark.parametrize("retryable", [True, False])
    def test_all_fields(self, cls: type[NerveError], retryable: bool) -> None:
        exc = make(cls, retryable=retryable, node_id="node-a", stack="Trace\n  at x")
        wire = error_to_wire(exc)
        assert set(wire) == WIRE_KEYS
        back = error_from_wire(json.loads(json.dumps(wire)))
        assert type(back) is expected_class(cls)
        assert back.name == exc.name == wire["name"]
        assert (back.message, back.code, back.type, back.data) == (exc.message, exc.code, exc.type, exc.data)
        assert (back.retryable, back.node_id, back.stack) == (retryable, "node-a", "Trace\n  at x")
        assert str(back) == exc.message

    @pytest.mark.parametrize("cls", ALL_CLASSES, ids=lambda c: c.__name__)
    def test_defaults_survive(self, cls: type[NerveError]) -> None:
        exc = cls("m") if cls is not RemoteError else RemoteError("m", name="X")
        wire = error_to_wire(exc, node_id="me")
        assert wire["nodeID"] == "me"
        assert "m" in wire["stack"]  # a local error gets its Python traceback as stack
        back = error_from_wire(wire)
        assert (back.code, back.type, back.retryable) == (exc.code, exc.type, exc.retryable)
        assert back.node_id == "me"

    @pytest.mark.parametrize("cls", ALL_CLASSES, ids=lambda c: c.__name__)
    def test_through_both_serializers(self, cls: type[NerveError]) -> None:
        wire = error_to_wire(make(cls, node_id="n"))
        for ser in (JSONSerializer(), MsgPackSerializer()):
            assert error_from_wire(ser.decode_value(ser.encode_value(wire))).__dict__ == \
                error_from_wire(wire).__dict__

    def test_protocol_error_attributes_reset_on_the_receiving_side(self) -> None:
        frame = error_from_wire(error_to_wire(FrameError("bad", "bad_checksum")))
        assert type(frame) is FrameError and frame.reason is None
        packet = error_from_wire(error_to_wire(PacketError("bad", field="action")))
        assert isinstance(packet, InvalidPacketDataError) and not isinstance(packet, ProtocolError)

    @pytest.mark.parametrize("cls", ALL_CLASSES, ids=lambda c: c.__name__)
    def test_pickle(self, cls: type[NerveError]) -> None:
        exc = make(cls, node_id="n", stack="s")
        back = pickle.loads(pickle.dumps(exc))
        assert type(back) is cls and back.__dict__ == exc.__dict__ and str(back) == str(exc)

    def test_sender_fills_missing_node_id(self) -> None:
        assert error_from_wire({"name": "ValidationError", "message": "m"}, sender="peer").node_id == "peer"
        assert error_from_wire({"name": "ValidationError", "nodeID": "x"}, sender="peer").node_id == "x"

    def test_plain_python_exception(self) -> None:
        wire = error_to_wire(KeyError("k"), node_id="me")
        assert (wire["name"], wire["code"], wire["retryable"], wire["nodeID"]) == ("KeyError", 500, False, "me")
        back = error_from_wire(wire)
        assert type(back) is RemoteError and back.name == "KeyError" and back.message == "'k'"


# --- Moleculer's names and codes -----------------------------------------------------


def capture_error(folder: str) -> dict[str, Any]:
    record = json.loads((CAPTURES / folder / "RES-peer.fail-error-1.json").read_text())
    error: dict[str, Any] = record["packet"]["error"]
    return error


class TestMoleculerNames:
    @pytest.mark.parametrize("folder", ["js-0.15.2", "js-0.15.2-namespace", "js-0.14.36", "js-0.15.2-msgpack",
                                        "molpy-check--js-0.14.36-peer"])
    def test_captured_client_error(self, folder: str) -> None:
        plain = capture_error(folder)
        exc = error_from_wire(plain, sender="ignored")
        assert type(exc) is ClientError and exc.name == "MoleculerClientError"
        assert (exc.code, exc.type, exc.retryable) == (422, "PEER_FAIL", False)
        assert exc.message == "peer.fail called"
        assert exc.data == {"params": {"why": "test"}}
        assert exc.node_id == plain["nodeID"] != "ignored"
        assert exc.stack == plain["stack"]
        wire = error_to_wire(exc)
        assert {k: wire[k] for k in plain} == plain

    @pytest.mark.parametrize(("name", "code", "type_", "retryable"), [
        ("ValidationError", 422, "VALIDATION_ERROR", False),
        ("ServiceNotFoundError", 404, "SERVICE_NOT_FOUND", True),
        ("ServiceNotAvailableError", 404, "SERVICE_NOT_AVAILABLE", True),
        ("RequestTimeoutError", 504, "REQUEST_TIMEOUT", True),
        ("RequestSkippedError", 514, "REQUEST_SKIPPED", False),
        ("RequestRejectedError", 503, "REQUEST_REJECTED", True),
        ("QueueIsFullError", 429, "QUEUE_FULL", True),
        ("MaxCallLevelError", 500, "MAX_CALL_LEVEL", False),
        ("GracefulStopTimeoutError", 500, "GRACEFUL_STOP_TIMEOUT", False),
        ("ProtocolVersionMismatchError", 500, "PROTOCOL_VERSION_MISMATCH", False),
        ("InvalidPacketDataError", 500, "INVALID_PACKET_DATA", False),
        ("BrokerDisconnectedError", 502, "BAD_GATEWAY", True),
        ("MoleculerError", 500, None, False),
        ("MoleculerRetryableError", 500, None, True),
        ("MoleculerServerError", 500, None, True),
        ("MoleculerClientError", 400, None, False),
    ])
    def test_documented_defaults(self, name: str, code: int, type_: str | None, retryable: bool) -> None:
        cls = getattr(errors, name.replace("Moleculer", "") if name != "MoleculerError" else "NerveError")
        local = cls("m")
        assert (local.name, local.code, local.type, local.retryable) == (name, code, type_, retryable)
        # A wire form with only name and message gets the same defaults.
        remote = error_from_wire({"name": name, "message": "m"})
        assert type(remote) is cls
        assert (remote.code, remote.type, remote.retryable) == (code, type_, retryable)

    def test_names_are_unique_but_for_packet_error(self) -> None:
        names = [c.wire_name for c in ALL_CLASSES if c is not RemoteError]
        dupes = {n for n in names if names.count(n) > 1}
        assert dupes == {"InvalidPacketDataError"}


# --- unknown names and odd wire forms ------------------------------------------------------


class TestUnknownAndOdd:
    def test_unknown_name_keeps_everything(self) -> None:
        plain = {"name": "EntityNotFoundError", "message": "no such user", "code": 404, "type": "NOT_FOUND",
                 "data": {"id": 7}, "retryable": True, "nodeID": "db-1", "stack": "EntityNotFoundError: ..."}
        exc = error_from_wire(plain)
        assert type(exc) is RemoteError
        assert exc.name == exc.remote_name == "EntityNotFoundError"
        assert error_to_wire(exc) == plain

    def test_unknown_name_without_code_is_500(self) -> None:
        exc = error_from_wire({"name": "Weird", "message": "x", "code": "not-a-number", "type": 5})
        assert (exc.code, exc.type, exc.retryable) == (500, None, False)

    @pytest.mark.parametrize("plain", [None, "boom", 42, ["a"]])
    def test_not_a_dict(self, plain: Any) -> None:
        exc = error_from_wire(plain, sender="s")
        assert type(exc) is RemoteError and exc.name == "Error" and exc.node_id == "s"
        assert exc.message == str(plain)

    @pytest.mark.parametrize("name", [["a"], {"a": 1}, 5, True, None, ""])
    def test_odd_names(self, name: Any) -> None:
        exc = error_from_wire({"name": name, "message": "m"})
        assert type(exc) is RemoteError
        assert exc.name == (str(name) if name else "Error")

    def test_bool_code_is_not_a_code(self) -> None:
        assert error_from_wire({"name": "ValidationError", "code": True}).code == 422


# --- property ------------------------------------------------------------------------------


class TestProperties:
    @settings(max_examples=200, deadline=None)
    @given(testing.error_wire_forms())
    def test_wire_forms_round_trip(self, plain: dict[str, Any]) -> None:
        exc = error_from_wire(plain)
        known = plain["name"] in testing.KNOWN_ERROR_NAMES
        assert isinstance(exc, RemoteError) is (not known)
        assert exc.name == plain["name"]
        wire = error_to_wire(exc)
        assert error_from_wire(wire).__dict__ == {**exc.__dict__, "stack": wire["stack"]}
        expected = dict(plain)
        if not plain["stack"]:  # a missing (or empty) stack is filled in with the local traceback
            assert isinstance(wire["stack"], str) and wire["stack"]
            wire["stack"] = expected["stack"] = None
        if plain["type"] is None:  # absent: a known class supplies its default type
            expected["type"] = type(exc).default_type if known else None
        assert wire == expected

    @settings(max_examples=100, deadline=None)
    @given(st.dictionaries(st.sampled_from(sorted(WIRE_KEYS)), testing.json_values(max_leaves=4)))
    def test_any_dict_gives_a_nerve_error(self, plain: dict[str, Any]) -> None:
        exc = error_from_wire(plain)
        assert isinstance(exc, NerveError)
        assert isinstance(exc.code, int) and isinstance(exc.retryable, bool)
        assert set(error_to_wire(exc)) == WIRE_KEYS
