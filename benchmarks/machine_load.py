"""How busy the whole machine is: the benchmarks print it beside their timings (shared by
engine_overhead.py, scale.py and data_scale.py); and `Sampling`, the thread that samples a
process's memory every so often while a benchmark's subprocess runs (scale.py, data_scale.py).
"""

from __future__ import annotations

import os
import threading
import time

CpuTicks = tuple[float, float] | None


def machine_cpu() -> CpuTicks:
    """(busy, idle) CPU ticks of the whole machine since boot, from /proc/stat (Linux only)."""
    try:
        with open("/proc/stat") as f:
            ticks = [float(x) for x in f.readline().split()[1:9]]
    except OSError:
        return None
    idle = ticks[3] + ticks[4]  # idle + iowait
    return sum(ticks) - idle, idle


def busy_cores(before: CpuTicks, after: CpuTicks) -> float | None:
    """How many cores the whole machine kept busy, on average, between two machine_cpu()."""
    if before is None or after is None:
        return None
    busy, idle = after[0] - before[0], after[1] - before[1]
    return (os.cpu_count() or 1) * busy / max(busy + idle, 1e-9)


def others_load(seconds: float) -> float | None:
    """Cores the machine keeps busy while the caller idles for `seconds`: other work's."""
    before = machine_cpu()
    time.sleep(seconds)
    return busy_cores(before, machine_cpu())


class Sampling:
    """A thread that calls `sample()` every `interval` seconds between `with` and its end,
    until the process sampled has gone (psutil's NoSuchProcess or ZombieProcess)."""

    interval: float = 0.2

    def start_sampling(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def sample(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        import psutil

        while not self._stop.is_set():
            try:
                self.sample()
            except (psutil.NoSuchProcess, psutil.ZombieProcess):  # the process has exited
                return
            self._stop.wait(self.interval)
