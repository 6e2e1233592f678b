"""nerve._malloc: glibc's thresholds set for stream chunks, once, unless the operator decided.

The effect is observed, not the call: in a fresh process, chunk-sized blocks allocated and
freed in waves (what a stream's window does) fault in fresh pages every wave with glibc's
defaults, and almost none once the thresholds are set."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

PROBE = r"""
import json, resource, sys
from nerve import _malloc
tuned = _malloc.tune_for_streams()
again = _malloc.tune_for_streams()
def wave():
    held = [bytes(1 << 20) for _ in range(8)]   # a window of 1 MiB chunks
    del held
wave()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(100):
    wave()
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps({"tuned": tuned, "again": again, "faults": faults}))
"""


def probe(**env: str) -> dict[str, object]:
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith("MALLOC_") and k not in ("NERVE_MALLOC_TUNING", "GLIBC_TUNABLES")}
    out = subprocess.run([sys.executable, "-c", PROBE], env={**clean, **env}, capture_output=True, text=True,
                         check=True, timeout=60)
    return json.loads(out.stdout)


glibc = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt (Linux)")


@glibc
def test_chunk_waves_reuse_memory_once_tuned() -> None:
    tuned = probe()
    default = probe(NERVE_MALLOC_TUNING="0")
    assert tuned["tuned"] is True and tuned["again"] is False
    assert default["tuned"] is False
    # 100 waves of 8 MiB: with glibc's defaults the top of the heap is given back and taken
    # again every wave (measured: about 240 faults a wave, a megabyte's pages); tuned, the
    # freed heap is reused (measured: about 17 a wave)
    assert default["faults"] > 100 * 100, default
    assert tuned["faults"] * 5 < default["faults"], (tuned, default)


@glibc
@pytest.mark.parametrize("setting", [{"MALLOC_TRIM_THRESHOLD_": "131072"}, {"MALLOC_MMAP_THRESHOLD_": "131072"},
                                     {"MALLOC_ARENA_MAX": "2"},
                                     {"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=131072"}],
                         ids=["trim", "mmap", "arena", "tunables"])
def test_an_operators_malloc_settings_win(setting: dict[str, str]) -> None:
    assert probe(**setting)["tuned"] is False


@glibc
def test_unrelated_tunables_do_not_stop_it() -> None:
    assert probe(GLIBC_TUNABLES="glibc.rtld.nns=2")["tuned"] is True
