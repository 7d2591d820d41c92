"""Per-stage cost: wall time and peak resident memory of each stage, throttled progress counters, and handing
freed memory back to the OS between stages.

Peak RSS per stage: ``ru_maxrss`` is the process's lifetime peak, exact but monotonic — when a stage raises it,
that is the stage's peak. When it does not, the stage's own peak is below an earlier one and comes from a
sampling thread (``/proc/self/statm`` every 20 ms; it can miss a spike shorter than that, never overstate).
The earlier peak may not even be ours: Linux keeps ``ru_maxrss`` across ``execve``, so a CLI started by a 4 GB
test runner begins with a 4 GB "peak"; the sampler is what measures such a run.
"""

from __future__ import annotations

import ctypes
import gc
import os
import resource
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

_PAGE_MB = os.sysconf("SC_PAGE_SIZE") / 2**20


def rss_mb() -> float:
    """Current resident set in MB (0 where /proc is absent)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE_MB
    except OSError:
        return 0.0


def peak_rss_mb() -> float:
    # ru_maxrss is KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class _Sampler(threading.Thread):
    def __init__(self, period_s: float = 0.02) -> None:
        super().__init__(daemon=True)
        self.period_s = period_s
        self.peak = rss_mb()
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(self.period_s):
            self.peak = max(self.peak, rss_mb())

    def stop(self) -> float:
        self._stop_event.set()
        self.join()
        return max(self.peak, rss_mb())


class Meter:
    """``with meter("export"): ...`` records ``timings_s["export"]`` and ``peak_rss_mb_by_stage["export"]``."""

    def __init__(self, say: Callable[[str], None] | None = None) -> None:
        self.timings: dict[str, float] = {}
        self.peaks: dict[str, float] = {}
        self.say = say

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        before = peak_rss_mb()
        sampler = _Sampler()
        sampler.start()
        t = time.perf_counter()
        try:
            yield
        finally:
            sampled = sampler.stop()
            self.timings[stage] = time.perf_counter() - t
            after = peak_rss_mb()
            self.peaks[stage] = after if after > before else sampled
        if self.say is not None:
            self.say(f"{stage}: {self.timings[stage]:.1f} s, peak RSS {self.peaks[stage]:.0f} MB")

    def to_json(self) -> dict[str, Any]:
        return {
            "timings_s": {k: round(v, 3) for k, v in self.timings.items()},
            "peak_rss_mb_by_stage": {k: round(v, 1) for k, v in self.peaks.items()},
            # Not ru_maxrss itself: Linux carries it across execve, so a process started from a large one (a test
            # runner, a notebook) would report its parent's peak. The stages cover the whole job.
            "peak_rss_mb": round(max(self.peaks.values(), default=rss_mb()), 1),
        }


def counter_progress(say: Callable[[str], None], what: str, every_s: float = 2.0) -> Callable[[int, int], None]:
    """``progress(done, total)`` that prints ``what done/total`` at most every ``every_s`` seconds, and at the end."""
    last = [time.perf_counter()]

    def progress(done: int, total: int) -> None:
        now = time.perf_counter()
        if done == total or now - last[0] >= every_s:
            last[0] = now
            say(f"{what} {done}/{total}")

    return progress


def return_freed_memory() -> None:
    """Collect, then hand freed heap pages back to the OS. glibc keeps freed blocks below its (adaptive, up to
    32 MB) mmap threshold in the heap: after a Llama-3.2-1B Decoder is freed, ~800 MB of its smaller tensors
    stay resident until ``malloc_trim``."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass
