"""Hypothesis strategies for fuzzing nerve and the services built on it: frames, byte streams
and their splits, JSON values, Moleculer packets and payloads, and error wire forms; and the
live-node fuzzer (:func:`fuzz_node`, :func:`fuzz_service`, :func:`replay`, :func:`minimize`,
implemented in :mod:`nerve.fuzzing`, also run by ``nerve fuzz``).
Requires ``hypothesis`` (the ``testing`` extra: ``pip install "/path/to/nerve[testing]"``, see the
README's "Installing"); nothing else imports it.
"""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

from nerve import errors
from nerve.frames import FrameType, encode_frame
from nerve.packets import (
    UNSET,
    Discover,
    Disconnect,
    Event,
    GossipHello,
    GossipRequest,
    GossipResponse,
    Heartbeat,
    Info,
    Packet,
    PacketType,
    Ping,
    Pong,
    Request,
    Response,
)
from nerve.serializers import Serializer, get_serializer

__all__ = [
    "Frame",
    "frame_types",
    "frames",
    "frame_lists",
    "wire_bytes",
    "splits",
    "json_values",
    "packets",
    "packet_payloads",
    "error_wire_forms",
    "KNOWN_ERROR_NAMES",
    # the live-node fuzzer (nerve.fuzzing)
    "fuzz_node",
    "fuzz_service",
    "replay",
    "minimize",
    "NodeProcess",
    "FuzzReport",
    "Finding",
    "Reproducer",
    "Step",
    "CategoryStats",
    "LegitStats",
    "ODD_ADDRESSES",
    "BadStr",
    "Nested",
    "pack",
]

Frame = tuple[FrameType, bytes]
"""A decoded frame: its type and payload."""

INT_MIN = -(2**63)
"""Smallest integer msgpack can carry (int64)."""
INT_MAX = 2**64 - 1
"""Largest integer msgpack can carry (uint64)."""


# --- frames --------------------------------------------------------------------------


def frame_types() -> st.SearchStrategy[FrameType]:
    """Any :class:`nerve.frames.FrameType`."""
    return st.sampled_from(list(FrameType))


def frames(max_payload: int = 4096) -> st.SearchStrategy[Frame]:
    """``(FrameType, payload)`` with a payload of at most ``max_payload`` bytes."""
    return st.tuples(frame_types(), st.binary(max_size=max_payload))


def frame_lists(
    max_payload: int = 4096, *, min_size: int = 0, max_size: int = 20
) -> st.SearchStrategy[list[Frame]]:
    """Lists of :func:`frames`."""
    return st.lists(frames(max_payload), min_size=min_size, max_size=max_size)


def _encode_all(frame_list: list[Frame]) -> tuple[bytes, list[Frame]]:
    return b"".join(encode_frame(t, p) for t, p in frame_list), frame_list


def wire_bytes(
    frames_strategy: st.SearchStrategy[list[Frame]] | None = None,
) -> st.SearchStrategy[tuple[bytes, list[Frame]]]:
    """``(stream, frame_list)``: the bytes a peer sends for ``frame_list``, each frame encoded
    with :func:`nerve.frames.encode_frame` (``frames_strategy`` defaults to :func:`frame_lists`)."""
    return (frame_lists() if frames_strategy is None else frames_strategy).map(_encode_all)


def splits(data: bytes, *, max_pieces: int = 32) -> st.SearchStrategy[list[bytes]]:
    """Lists of chunks whose concatenation is ``data``, cut at arbitrary points (empty chunks
    included: a cut point may repeat, or sit at either end)."""

    def cut(points: list[int]) -> list[bytes]:
        bounds = [0, *sorted(points), len(data)]
        return [data[a:b] for a, b in zip(bounds, bounds[1:])]

    return st.lists(st.integers(0, len(data)), max_size=max(0, max_pieces - 1)).map(cut)


# --- values --------------------------------------------------------------------------

_keys = st.text(max_size=12)


def json_values(*, max_leaves: int = 12) -> st.SearchStrategy[Any]:
    """JSON-compatible values both serializers carry unchanged: ``None``, bools, ints in
    msgpack's range ``[-2**63, 2**64-1]``, finite floats, text, lists and str-keyed dicts
    (at most ``max_leaves`` scalars in all)."""
    scalars = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(INT_MIN, INT_MAX),
        st.floats(allow_nan=False, allow_infinity=False),
        st.text(max_size=40),
    )
    return st.recursive(
        scalars,
        lambda children: st.one_of(
            st.lists(children, max_size=5),
            st.dictionaries(_keys, children, max_size=5),
        ),
        max_leaves=max_leaves,
    )


def _json_objects() -> st.SearchStrategy[dict[str, Any]]:
    return st.dictionaries(_keys, json_values(max_leaves=6), max_size=4)


def _maybe(strategy: st.SearchStrategy[Any], *, nullable: bool = True) -> st.SearchStrategy[Any]:
    """``UNSET`` (absent on the wire), ``None`` (when ``nullable``) or a value."""
    options = [st.just(UNSET), strategy]
    if nullable:
        options.insert(1, st.none())
    return st.one_of(*options)


_ids = st.uuids().map(str)
_node_ids = st.one_of(
    st.sampled_from(["js-peer", "js-check", "node-1", "py-worker-7"]),
    st.from_regex(r"[a-z][a-z0-9_-]{0,24}", fullmatch=True),
)
_names = st.from_regex(r"[a-z$][A-Za-z0-9_]{0,12}", fullmatch=True)
_actions = st.builds(lambda svc, act: f"{svc}.{act}", _names, _names)
_counters = st.integers(0, 2**53)
_numbers = st.one_of(st.integers(0, 2**53), st.floats(0, 1e12, allow_nan=False, allow_infinity=False))
_bodies = st.one_of(json_values(), st.binary(max_size=256))
_tracing = st.one_of(st.just(UNSET), st.none(), st.booleans(), _json_objects())
_ips = st.ip_addresses(v=4).map(str)


def _service() -> st.SearchStrategy[dict[str, Any]]:
    def build(name: str, version: int | None, actions: list[str], events: list[str],
              settings: dict[str, Any]) -> dict[str, Any]:
        full = name if version is None else f"v{version}.{name}"
        return {
            "name": name,
            "version": version,
            "fullName": full,
            "settings": settings,
            "metadata": {},
            "actions": {f"{full}.{a}": {"rawName": a, "name": f"{full}.{a}", "cache": False,
                                        "tracing": False, "params": {}} for a in actions},
            "events": {e: {"name": e} for e in events},
        }

    return st.builds(build, _names, st.none() | st.integers(1, 9), st.lists(_names, max_size=4),
                     st.lists(_actions, max_size=3), _json_objects())


def _packet_strategy(kind: PacketType, version: str) -> st.SearchStrategy[Packet]:
    v5 = version != "4"
    common: dict[str, st.SearchStrategy[Any]] = {"ver": st.just(version), "sender": _node_ids}
    headers = _maybe(_json_objects()) if v5 else st.just(UNSET)
    if kind is PacketType.DISCOVER:
        return st.builds(Discover, **common)
    if kind is PacketType.DISCONNECT:
        return st.builds(Disconnect, **common)
    if kind is PacketType.HEARTBEAT:
        return st.builds(Heartbeat, cpu=_maybe(_numbers), **common)
    if kind is PacketType.INFO:
        client = st.fixed_dictionaries({
            "type": st.sampled_from(["nodejs", "python", "java"]),
            "version": st.sampled_from(["0.14.36", "0.15.2", "1.0.0"]),
            "langVersion": st.sampled_from(["v20.20.2", "3.11.9"]),
        })
        return st.builds(
            Info,
            services=st.lists(_service(), max_size=3),
            config=_maybe(_json_objects()),
            ip_list=_maybe(st.lists(_ips, max_size=3)),
            hostname=_maybe(st.from_regex(r"[a-z][a-z0-9.-]{0,20}", fullmatch=True)),
            client=_maybe(client),
            instance_id=_maybe(_ids),
            metadata=_maybe(_json_objects()),
            seq=_maybe(_counters),
            port=_maybe(st.integers(0, 65535)),
            **common,
        )
    if kind is PacketType.REQ:
        return st.builds(
            Request,
            id=_ids,
            action=_actions,
            params=_bodies,
            meta=_maybe(_json_objects()),
            headers=headers,
            timeout=_maybe(_numbers),
            level=_maybe(st.integers(1, 100), nullable=False),
            tracing=_tracing,
            parent_id=_maybe(_ids),
            request_id=_maybe(_ids),
            caller=_maybe(_actions),
            stream=_maybe(st.booleans()),
            seq=_maybe(_counters),
            params_type=_maybe(st.integers(0, 10)),
            **common,
        )
    if kind is PacketType.RES:
        return st.builds(
            Response,
            id=_ids,
            success=st.booleans(),
            data=_bodies,
            error=_maybe(error_wire_forms()),
            meta=_maybe(_json_objects()),
            headers=headers,
            stream=_maybe(st.booleans()),
            seq=_maybe(_counters),
            data_type=_maybe(st.integers(0, 10)),
            **common,
        )
    if kind is PacketType.EVENT:
        return st.builds(
            Event,
            event=_actions,
            id=_maybe(_ids),
            data=_bodies,
            groups=_maybe(st.lists(_names, max_size=3)),
            broadcast=_maybe(st.booleans()),
            meta=_maybe(_json_objects()),
            headers=headers,
            level=_maybe(st.integers(1, 100)),
            tracing=_tracing,
            parent_id=_maybe(_ids),
            request_id=_maybe(_ids),
            caller=_maybe(_actions),
            need_ack=_maybe(st.booleans()),
            stream=_maybe(st.booleans()),
            seq=_maybe(_counters),
            data_type=_maybe(st.integers(0, 10)),
            **common,
        )
    if kind is PacketType.PING:
        return st.builds(Ping, time=_maybe(_numbers), id=_maybe(_ids), **common)
    if kind is PacketType.PONG:
        return st.builds(Pong, time=_maybe(_numbers), id=_maybe(_ids), arrived=_maybe(_numbers), **common)
    if kind is PacketType.GOSSIP_HELLO:
        return st.builds(GossipHello, host=_maybe(_ips), port=_maybe(st.integers(0, 65535)), **common)
    if kind in (PacketType.GOSSIP_REQ, PacketType.GOSSIP_RES):
        cls = GossipRequest if kind is PacketType.GOSSIP_REQ else GossipResponse
        online = st.dictionaries(_node_ids, st.lists(_counters, min_size=1, max_size=3), max_size=3)
        offline = st.dictionaries(_node_ids, _counters, max_size=3)
        return st.builds(cls, online=_maybe(online, nullable=False),
                         offline=_maybe(offline, nullable=False), **common)
    raise ValueError(f"no strategy for packet type {kind!r}")  # pragma: no cover


def packets(kind: PacketType | None = None, version: str = "5") -> st.SearchStrategy[Packet]:
    """Valid packets of type ``kind`` (any :class:`nerve.packets.PacketType` when ``None``).

    Fields are realistic: uuid ids, node ids, ``service.action`` names, meta and header dicts,
    params/data from :func:`json_values` or raw ``bytes`` (REQ, RES, EVENT); optional fields are
    sometimes ``UNSET``. ``version="4"`` gives moleculer 0.14 packets: ``ver "4"``, no headers.
    """
    if version not in ("4", "5"):
        raise ValueError(f"version must be '4' or '5', not {version!r}")
    if kind is not None:
        return _packet_strategy(PacketType(kind), version)
    return st.sampled_from(list(PacketType)).flatmap(lambda k: _packet_strategy(k, version))


def packet_payloads(
    serializer: Serializer | str, kind: PacketType | None = None, version: str = "5"
) -> st.SearchStrategy[tuple[PacketType, bytes]]:
    """``(kind, payload)`` pairs: :func:`packets` encoded with ``serializer`` (a
    :class:`nerve.serializers.Serializer` or its name, ``"msgpack"`` / ``"json"``)."""
    ser = get_serializer(serializer)
    return packets(kind, version).map(lambda p: (p.kind, ser.encode(p)))


# --- errors --------------------------------------------------------------------------


def _known_error_names() -> frozenset[str]:
    names = set()
    for value in vars(errors).values():
        if isinstance(value, type) and issubclass(value, errors.NerveError):
            names.add(value.wire_name)
    return frozenset(names)


KNOWN_ERROR_NAMES: frozenset[str] = _known_error_names()
"""The ``name`` of every error class in :mod:`nerve.errors` (Moleculer's names included)."""


def error_wire_forms(*, known: bool | None = None) -> st.SearchStrategy[dict[str, Any]]:
    """Moleculer plain error objects ``{name, message, code, type, data, retryable, nodeID,
    stack}``; ``name`` is one of :data:`KNOWN_ERROR_NAMES` (``known=True``), a name nerve does
    not know (``known=False``) or either (``None``)."""
    known_names = st.sampled_from(sorted(KNOWN_ERROR_NAMES))
    unknown_names = st.one_of(
        st.sampled_from(["Error", "TypeError", "MyAppError", "moleculer-db.EntityNotFound"]),
        st.text(min_size=1, max_size=30),
    ).filter(lambda n: n not in KNOWN_ERROR_NAMES)
    if known is None:
        names = st.one_of(known_names, unknown_names)
    else:
        names = known_names if known else unknown_names
    return st.fixed_dictionaries({
        "name": names,
        "message": st.text(max_size=80),
        "code": st.one_of(st.sampled_from([400, 401, 404, 422, 429, 500, 502, 503, 504, 514]),
                          st.integers(0, 999)),
        "type": st.one_of(st.none(), st.from_regex(r"[A-Z][A-Z_]{0,20}", fullmatch=True)),
        "data": st.one_of(st.none(), _json_objects()),
        "retryable": st.booleans(),
        "nodeID": st.one_of(st.none(), _node_ids),
        "stack": st.one_of(st.none(), st.text(max_size=200)),
    })


# --- the live-node fuzzer (imported last: nerve.fuzzing draws on the strategies above) -------

from nerve.fuzzing import (  # noqa: E402
    ODD_ADDRESSES,
    BadStr,
    CategoryStats,
    Finding,
    FuzzReport,
    LegitStats,
    Nested,
    NodeProcess,
    Reproducer,
    Step,
    fuzz_node,
    fuzz_service,
    minimize,
    pack,
    replay,
)
