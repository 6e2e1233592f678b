"""The node's CPU usage, as Moleculer reports it in heartbeats (``cpu``, percent 0..100).

Moleculer measures the whole machine (every core, not this process) from the kernel's CPU
time counters; on Linux this reads the same counters from ``/proc/stat`` and reports the busy
share of the time elapsed since the previous sample. Elsewhere, or if ``/proc/stat`` cannot be
read, it falls back to the one-minute load average per core. It never raises.
"""

from __future__ import annotations

import os

__all__ = ["CpuMeter"]


def _read_proc_stat(path: str) -> tuple[int, int] | None:
    """(busy, total) jiffies of the aggregate ``cpu`` line, or None if it cannot be read.

    Columns: user nice system idle iowait irq softirq steal guest guest_nice. ``guest`` and
    ``guest_nice`` are already counted in ``user`` and ``nice``, so they are left out of the
    total; ``iowait`` is idle time (the CPU had nothing to run).
    """
    try:
        with open(path, "rb") as f:
            line = f.readline()
        fields = line.split()
        if not fields or fields[0] != b"cpu":
            return None
        ticks = [int(v) for v in fields[1:9]]
        if len(ticks) < 4:
            return None
        total = sum(ticks)
        idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)
        return total - idle, total
    except (OSError, ValueError):
        return None


def _load_percent() -> float:
    try:
        return os.getloadavg()[0] * 100.0 / (os.cpu_count() or 1)
    except (OSError, AttributeError):
        return 0.0


def _clamp(value: float) -> float:
    if value != value:  # nan
        return 0.0
    return min(100.0, max(0.0, value))


class CpuMeter:
    """Samples the machine's CPU usage; ``percent()`` is the usage since the previous call.

    The first call reports the usage since the meter was made (or, when called at once, since
    boot). Two calls closer together than the kernel's tick repeat the previous figure. A meter
    is cheap (one small read per call) and holds no file open.
    """

    __slots__ = ("_path", "_last", "_percent")

    def __init__(self, stat_path: str = "/proc/stat") -> None:
        self._path = stat_path
        self._last = _read_proc_stat(stat_path)
        if self._last is not None and self._last[1] > 0:
            self._percent = _clamp(100.0 * self._last[0] / self._last[1])
        else:
            self._percent = _clamp(_load_percent())

    def percent(self) -> float:
        """CPU usage in percent (0..100) over the interval since the previous sample."""
        try:
            sample = _read_proc_stat(self._path)
            if sample is None:
                self._last = None
                self._percent = _clamp(_load_percent())
                return self._percent
            last, self._last = self._last, sample
            if last is not None:
                busy = sample[0] - last[0]
                total = sample[1] - last[1]
                if total > 0 and busy >= 0:
                    self._percent = _clamp(100.0 * busy / total)
            return self._percent
        except Exception:  # never let a heartbeat fail on a measurement
            return self._percent
