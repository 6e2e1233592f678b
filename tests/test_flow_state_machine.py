"""Credit-based stream flow control (``nerve._core.CreditSender`` / ``StreamReceiver``).

A hypothesis state machine drives a sender and a receiver over a simulated link that
reorders, duplicates and drops frames; plain tests pin down every FlowError reason.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from nerve._core import CreditSender, StreamReceiver
from nerve.errors import FlowError, ProtocolError

END = "end"
CHUNK_TYPES = [bytes, bytearray, lambda b: memoryview(bytes(b))]


def reason_of(fn, *args) -> str:
    with pytest.raises(FlowError) as info:
        fn(*args)
    return info.value.reason


class FlowLink(RuleBasedStateMachine):
    """One sender, one receiver and a link between them (two lists of frames in flight).

    When a stream is broken on purpose (duplicate delivered, frame dropped, reorder limit
    hit) the rule checks the outcome and starts a fresh stream with the same settings.
    """

    @initialize(
        window=st.integers(1, 64),
        max_chunk=st.integers(1, 16),
        max_reorder=st.integers(0, 8),
        chaos=st.booleans(),
    )
    def setup(self, window: int, max_chunk: int, max_reorder: int, chaos: bool) -> None:
        self.window = window
        self.max_chunk = max_chunk
        self.max_reorder = max_reorder
        self.streams = 0
        self.new_stream(chaos)

    def new_stream(self, chaos: bool) -> None:
        self.streams += 1
        self.chaos = chaos
        self.tx = CreditSender(self.window, self.max_chunk)
        self.rx = StreamReceiver(self.window, self.max_chunk, self.max_reorder)
        self.objs: list[object] = []  # seq -> the object sent
        self.offsets: list[int] = []  # seq -> its first byte's offset in `produced`
        self.produced = bytearray()
        self.data_flight: list[tuple[object, object]] = []  # (seq, obj) or (END, end_seq)
        self.credit_flight: list[int] = []
        self.delivered: set[int] = set()
        self.model_next = 0
        self.end_delivered: int | None = None
        self.dropped: set[int] = set()
        self.popped = bytearray()
        self.npopped = 0

    # --- model -------------------------------------------------------------------------

    def model_parked(self) -> int:
        return sum(1 for s in self.delivered if s > self.model_next)

    def model_missing(self) -> int | None:
        gap = self.model_parked() > 0 or (
            self.end_delivered is not None and self.end_delivered > self.model_next
        )
        return self.model_next if gap else None

    def check_sticky(self, reason: str) -> None:
        assert self.rx.failed
        assert reason_of(self.rx.pop) == reason
        assert reason_of(self.rx.push_end, 10**6) == reason
        assert reason_of(self.rx.push, self.rx.next_seq, b"x") == reason
        assert self.rx.take_grant() is None
        assert self.rx.force_grant() is None
        assert not self.rx.finished

    # --- producer ----------------------------------------------------------------------

    @precondition(lambda self: not self.tx.closed)
    @rule(want=st.integers(1, 40), kind=st.sampled_from(CHUNK_TYPES), last=st.integers(0, 7))
    def produce(self, want: int, kind, last: int) -> None:
        """Send one chunk if there is credit; then, one time in eight, end the stream."""
        n = self.tx.next_chunk_len(want)
        assert n == min(want, self.max_chunk, self.tx.credit)
        if n == 0:
            assert self.tx.credit == 0
            assert reason_of(self.tx.on_sent, 1) == "window_exceeded"
        else:
            self.send(n, kind)
        if last == 0:
            self.close()

    def send(self, n: int, kind) -> None:
        off = len(self.produced)
        raw = bytes((off + i) % 251 for i in range(n))
        obj = kind(raw)
        seq = self.tx.on_sent(n)
        assert seq == len(self.objs)
        self.objs.append(obj)
        self.offsets.append(off)
        self.produced += raw
        self.data_flight.append((seq, obj))

    def close(self) -> None:
        end = self.tx.close()
        assert end == len(self.objs) == self.tx.next_seq
        assert self.tx.closed and self.tx.next_chunk_len(10) == 0
        assert reason_of(self.tx.on_sent, 1) == "closed"
        self.data_flight.append((END, end))

    # --- link --------------------------------------------------------------------------

    @precondition(lambda self: self.data_flight)
    @rule(data=st.data())
    def deliver(self, data) -> None:
        i = data.draw(st.integers(0, len(self.data_flight) - 1), label="frame")
        seq, obj = self.data_flight[i]
        if seq == END:
            self.rx.push_end(obj)  # the same end again is harmless: it may stay in flight
            if not data.draw(st.booleans(), label="end duplicated"):
                self.data_flight.pop(i)
            self.end_delivered = obj
            assert self.rx.end_seq == obj
            return
        self.data_flight.pop(i)
        if seq != self.model_next and self.model_parked() >= self.max_reorder:
            assert reason_of(self.rx.push, seq, obj) == "reorder_overflow"
            self.check_sticky("reorder_overflow")
            self.new_stream(data.draw(st.booleans(), label="chaos"))
            return
        self.rx.push(seq, obj)
        self.delivered.add(seq)
        while self.model_next in self.delivered:
            self.model_next += 1

    @precondition(lambda self: self.chaos and self.delivered)
    @rule(data=st.data())
    def duplicate(self, data) -> None:
        seq = data.draw(st.sampled_from(sorted(self.delivered)), label="dup")
        with pytest.raises(FlowError) as info:
            self.rx.push(seq, self.objs[seq])
        assert info.value.reason == "duplicate"
        assert str(seq) in str(info.value)
        self.check_sticky("duplicate")
        self.new_stream(data.draw(st.booleans(), label="chaos"))

    @precondition(lambda self: self.chaos and self.data_flight)
    @rule(data=st.data())
    def drop(self, data) -> None:
        i = data.draw(st.integers(0, len(self.data_flight) - 1), label="lost")
        seq, _ = self.data_flight.pop(i)
        if seq != END:
            self.dropped.add(seq)
        elif self.end_delivered is None:  # else only a spare copy of the end was lost
            self.dropped.add(len(self.objs))

    @precondition(lambda self: self.dropped)
    @rule(chaos=st.booleans())
    def abandon(self, chaos: bool) -> None:
        """The stream stalled behind a lost frame: the gap is reported, nothing past it read."""
        first = min(self.dropped)
        assert self.rx.next_seq <= first
        assert self.rx.missing() == self.model_missing()
        if first < len(self.objs):
            assert len(self.popped) <= self.offsets[first]
        self.new_stream(chaos)

    # --- consumer and grants -----------------------------------------------------------

    @rule(k=st.integers(1, 4), force=st.booleans())
    def read(self, k: int, force: bool) -> None:
        for _ in range(k):
            obj = self.rx.pop()
            if obj is None:
                assert self.rx.next_seq == self.npopped
                break
            assert obj is self.objs[self.npopped]
            self.npopped += 1
            self.popped += bytes(obj)
        g = self.rx.take_grant()
        if g is None and force:
            g = self.rx.force_grant()
            assert self.rx.force_grant() is None
        if g is not None:
            assert g == self.rx.consumed
            self.credit_flight.append(g)

    @precondition(lambda self: self.credit_flight)
    @rule(data=st.data(), again=st.booleans())
    def deliver_grant(self, data, again: bool) -> None:
        i = data.draw(st.integers(0, len(self.credit_flight) - 1), label="grant")
        g = self.credit_flight[i] if again else self.credit_flight.pop(i)
        before = self.tx.consumed
        assert self.tx.on_credit(g) == (g > before)
        assert self.tx.consumed == max(before, g)

    @precondition(lambda self: self.chaos and self.credit_flight)
    @rule(data=st.data())
    def drop_grant(self, data) -> None:
        self.credit_flight.pop(data.draw(st.integers(0, len(self.credit_flight) - 1)))

    @precondition(lambda self: self.rx.finished)
    @rule(chaos=st.booleans())
    def next_stream(self, chaos: bool) -> None:
        assert self.popped == self.produced
        assert self.rx.missing() is None and self.rx.buffered_bytes == 0
        self.new_stream(chaos)

    # --- invariants --------------------------------------------------------------------

    @invariant()
    def within_window(self) -> None:
        rx, tx = self.rx, self.tx
        assert rx.buffered_bytes <= self.window
        assert rx.buffered_bytes == rx.received - rx.consumed
        assert tx.sent - tx.consumed <= self.window
        assert tx.credit == self.window - (tx.sent - tx.consumed)
        assert tx.consumed <= rx.consumed == len(self.popped)

    @invariant()
    def popped_is_a_prefix(self) -> None:
        assert self.popped == self.produced[: len(self.popped)]

    @invariant()
    def matches_model(self) -> None:
        assert self.rx.next_seq == self.model_next
        assert self.rx.parked == self.model_parked()
        assert self.rx.missing() == self.model_missing()
        if self.dropped:
            assert self.rx.next_seq <= min(self.dropped)
            assert not self.rx.finished
        if self.rx.finished:
            assert self.popped == self.produced and self.tx.closed


TestFlowLink = FlowLink.TestCase
TestFlowLink.settings = settings(max_examples=200, stateful_step_count=80, deadline=None)


# --- whole transfers ---------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    window=st.integers(1, 32),
    max_chunk=st.integers(1, 8),
    total=st.integers(0, 200),
    data=st.data(),
)
def test_reordered_transfer_completes(window: int, max_chunk: int, total: int, data) -> None:
    payload = bytes(i % 256 for i in range(total))
    tx = CreditSender(window, max_chunk)
    rx = StreamReceiver(window, max_chunk, max_reorder=window)
    flight: list[tuple[int | None, int, bytes]] = []
    at, out = 0, bytearray()
    for _ in range(10_000):
        if rx.finished:
            break
        n = tx.next_chunk_len(total - at)
        if n:
            flight.append((tx.on_sent(n), at, payload[at : at + n]))
            at += n
        elif at == total and not tx.closed:
            flight.append((None, tx.close(), b""))
        while flight:
            seq, val, chunk = flight.pop(data.draw(st.integers(0, len(flight) - 1)))
            if seq is None:
                rx.push_end(val)
            else:
                rx.push(seq, chunk)
            assert rx.buffered_bytes <= window
        while (c := rx.pop()) is not None:
            out += c
        g = rx.take_grant() or rx.force_grant()
        if g is not None:
            tx.on_credit(g)
    assert rx.finished
    assert out == payload


@settings(max_examples=80, deadline=None)
@given(
    window=st.integers(1, 64),
    max_chunk=st.integers(1, 16),
    data=st.data(),
)
def test_sender_ignoring_credit_is_caught(window: int, max_chunk: int, data) -> None:
    """A sender that never waits for credit overflows the receiver's window."""
    sizes = data.draw(
        st.lists(st.integers(1, max_chunk), min_size=1, max_size=80).filter(
            lambda s: sum(s) > window
        )
    )
    order = data.draw(st.permutations(range(len(sizes))))
    rx = StreamReceiver(window, max_chunk, max_reorder=len(sizes))
    buffered = 0
    for seq in order:
        if buffered + sizes[seq] > window:
            with pytest.raises(FlowError) as info:
                rx.push(seq, b"\0" * sizes[seq])
            assert info.value.reason == "window_exceeded"
            assert f"window is {window}" in str(info.value)
            assert rx.buffered_bytes == buffered <= window
            return
        rx.push(seq, b"\0" * sizes[seq])
        buffered += sizes[seq]
    raise AssertionError("the window was never exceeded")


# --- plain tests -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda: CreditSender(0, 1),
        lambda: CreditSender(1, 0),
        lambda: CreditSender(-5, 1),
        lambda: StreamReceiver(0, 1),
        lambda: StreamReceiver(1, 0),
        lambda: StreamReceiver(1, 1, max_reorder=-1),
        lambda: StreamReceiver(1, 1, first_seq=-1),
        lambda: StreamReceiver(2**64, 1),
    ],
)
def test_invalid_config(make) -> None:
    assert reason_of(make) == "invalid_config"


def test_flow_error_is_a_protocol_error() -> None:
    with pytest.raises(ProtocolError) as info:
        CreditSender(0, 1)
    assert isinstance(info.value, FlowError)
    assert "window" in str(info.value)


def test_sender_errors() -> None:
    tx = CreditSender(10, 4)
    assert reason_of(tx.on_sent, 0) == "empty_chunk"
    assert reason_of(tx.on_sent, 5) == "chunk_too_large"
    assert tx.on_sent(4) == 0
    assert tx.on_sent(4) == 1
    assert tx.credit == 2
    assert reason_of(tx.on_sent, 3) == "window_exceeded"
    assert reason_of(tx.on_credit, 9) == "credit_beyond_sent"
    assert tx.on_credit(8) is True
    assert tx.on_credit(3) is False  # stale
    assert tx.on_credit(8) is False  # repeated
    assert tx.credit == 10
    assert tx.close() == 2
    assert reason_of(tx.on_sent, 1) == "closed"


def test_receiver_errors() -> None:
    assert reason_of(StreamReceiver(10, 4).push, 0, b"12345") == "chunk_too_large"
    assert reason_of(StreamReceiver(10, 4).push, 0, b"") == "empty_chunk"

    rx = StreamReceiver(10, 4)
    rx.push(0, b"a")
    with pytest.raises(FlowError, match="chunk 0") as info:
        rx.push(0, b"a")
    assert info.value.reason == "duplicate"

    rx = StreamReceiver(10, 4)
    rx.push(3, b"a")
    assert reason_of(rx.push, 3, b"a") == "duplicate"  # parked twice

    rx = StreamReceiver(10, 4)
    rx.push_end(2)
    assert reason_of(rx.push, 2, b"a") == "after_end"
    rx = StreamReceiver(10, 4)
    rx.push(5, b"a")
    assert reason_of(rx.push_end, 3) == "after_end"

    rx = StreamReceiver(8, 4)
    rx.push(0, b"abcd")
    rx.push(2, b"abcd")
    with pytest.raises(FlowError) as info:
        rx.push(1, b"a")
    assert info.value.reason == "window_exceeded"
    assert "8 bytes already buffered, window is 8" in str(info.value)

    rx = StreamReceiver(100, 4, max_reorder=1)
    rx.push(1, b"a")
    assert reason_of(rx.push, 2, b"a") == "reorder_overflow"

    rx = StreamReceiver(10, 4)
    rx.push_end(3)
    rx.push_end(3)
    assert reason_of(rx.push_end, 4) == "duplicate_end"


def test_receiver_errors_are_sticky() -> None:
    rx = StreamReceiver(10, 4)
    rx.push(0, b"a")
    assert reason_of(rx.push, 0, b"a") == "duplicate"
    assert rx.failed
    assert reason_of(rx.push, 1, b"b") == "duplicate"
    assert reason_of(rx.push_end, 1) == "duplicate"
    assert reason_of(rx.pop) == "duplicate"
    assert rx.statistics()["failed"] == "duplicate"


def test_push_keeps_the_same_object() -> None:
    rx = StreamReceiver(100, 10, first_seq=7)
    objs = [b"bytes", bytearray(b"array"), memoryview(b"view!")]
    for seq, obj in zip((9, 8, 7), reversed(objs)):
        rx.push(seq, obj)
    assert rx.buffered_bytes == 15
    for obj in objs:
        assert rx.pop() is obj
    assert rx.pop() is None
    assert rx.consumed == 15


def test_push_counts_bytes_not_items() -> None:
    import array

    rx = StreamReceiver(100, 8)
    rx.push(0, array.array("i", [1, 2]))  # 2 items, 8 bytes
    assert rx.buffered_bytes == 8
    assert reason_of(rx.push, 1, array.array("i", [1, 2, 3])) == "chunk_too_large"


def test_push_rejects_non_buffers_without_failing() -> None:
    rx = StreamReceiver(100, 8)
    with pytest.raises(TypeError):
        rx.push(0, "text")
    assert not rx.failed
    rx.push(0, b"ok")
    assert rx.pop() == b"ok"


def test_grants_and_missing() -> None:
    rx = StreamReceiver(8, 4)  # grant threshold 2
    assert rx.missing() is None
    rx.push(1, b"b")
    assert rx.missing() == 0 and rx.parked == 1
    rx.push(0, b"a")
    assert rx.missing() is None and rx.parked == 0 and rx.next_seq == 2
    assert rx.pop() == b"a"
    assert rx.take_grant() is None
    assert rx.pop() == b"b"
    assert rx.take_grant() == 2
    assert rx.take_grant() is None
    assert rx.force_grant() is None
    rx.push(2, b"c")
    rx.pop()
    assert rx.force_grant() == 3
    rx.push_end(4)
    assert rx.missing() == 3 and not rx.finished
    rx.push(3, b"d")
    assert rx.pop() == b"d"
    assert rx.finished


def test_statistics_keys() -> None:
    tx = CreditSender(16, 4)
    tx.on_sent(3)
    stats = tx.statistics()
    assert set(stats) == {"window", "max_chunk", "sent", "consumed", "credit", "next_seq", "closed"}
    assert stats == {
        "window": 16, "max_chunk": 4, "sent": 3, "consumed": 0,
        "credit": 13, "next_seq": 1, "closed": False,
    }
    rx = StreamReceiver(16, 4)
    rx.push(0, b"abc")
    stats = rx.statistics()
    assert {"window", "buffered_bytes", "received", "consumed", "next_seq", "parked", "finished"} <= set(stats)
    assert stats["buffered_bytes"] == 3 and stats["received"] == 3 and stats["parked"] == 0
