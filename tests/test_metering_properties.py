"""Property tests of the metering state (nerve._metering), the metrics address parser and the
JSON log formatter: whatever is fed in, the invariants hold and nothing but the documented
error escapes."""

from __future__ import annotations

import json
import logging
from bisect import bisect_left

from hypothesis import given
from hypothesis import strategies as st

from nerve._metering import BUCKETS, MAX_ERROR_KINDS, CallSlot, error_kind
from nerve.errors import BrokerOptionsError, NerveError
from nerve.logs import FIELDS, JsonFormatter
from nerve.metrics import parse_listen

durations = st.floats(min_value=0, max_value=1e6, allow_nan=False)
errors = st.builds(NerveError, st.text(max_size=20), st.one_of(st.none(), st.integers(-10**6, 10**6)),
                   st.one_of(st.none(), st.text(max_size=80)))


@given(st.lists(durations, max_size=200))
def test_histogram_places_every_observation_in_its_bucket(values: list[float]) -> None:
    slot = CallSlot()
    for v in values:
        slot.observe(v)
    assert sum(slot.buckets) == len(values)
    assert abs(slot.sum - sum(values)) <= 1e-6 * max(1.0, sum(values))
    for i, count in enumerate(slot.buckets):
        expected = sum(1 for v in values if bisect_left(BUCKETS, v) == i)
        assert count == expected
        if i < len(BUCKETS):  # every value in bucket i is <= its bound (Prometheus' "le")
            assert all(v <= BUCKETS[i] for v in values if bisect_left(BUCKETS, v) == i)


@given(st.lists(st.one_of(errors, st.builds(RuntimeError, st.text(max_size=5)), st.none()), max_size=300))
def test_error_kinds_are_bounded_and_every_failure_is_counted(failures: list[BaseException | None]) -> None:
    slot = CallSlot()
    for exc in failures:
        slot.failed(exc)
    assert slot.error_total == len(failures)
    assert len(slot.errors) <= MAX_ERROR_KINDS + 1
    for name, code, kind in slot.errors:
        assert len(name) <= 64 and len(kind) <= 64 and (code == "" or code.lstrip("-").isdigit())


@given(st.one_of(errors, st.builds(ValueError, st.text())))
def test_error_kind_is_three_short_strings(exc: BaseException) -> None:
    kind = error_kind(exc)
    assert all(isinstance(x, str) for x in kind) and len(kind[0]) <= 64


@given(st.one_of(st.text(max_size=40), st.integers(-10, 70000), st.none(), st.booleans(), st.floats()))
def test_parse_listen_answers_or_refuses_clearly(spec: object) -> None:
    try:
        host, port = parse_listen(spec)  # type: ignore[arg-type]
    except BrokerOptionsError:
        return
    assert isinstance(host, str) and 0 <= port <= 65535


@given(st.sampled_from(["", "127.0.0.1", "0.0.0.0", "::1", "example.org"]), st.integers(0, 65535))
def test_parse_listen_round_trips(host: str, port: int) -> None:
    text = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    assert parse_listen(text) == (host, port)


@given(st.dictionaries(st.sampled_from(FIELDS), st.one_of(st.text(), st.integers(), st.none(),
                                                          st.lists(st.text(), max_size=3))),
       st.text())
def test_json_formatter_writes_one_ascii_json_object(fields: dict[str, object], message: str) -> None:
    record = logging.LogRecord("nerve.test", logging.INFO, __file__, 1, "%s", (message,), None)
    record.__dict__.update(fields)
    line = JsonFormatter().format(record)
    assert "\n" not in line and line.isascii()
    out = json.loads(line)
    assert out["message"] == message and out["level"] == "INFO"
    for name, value in fields.items():
        if value is not None:
            assert out[name] == value
