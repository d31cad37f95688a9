"""How much memory a process tree holds, and its peak over a period: the one memory sampler of fedsilo.

The server's per-round `peak_rss_mb` (report) and `fedsilo bench`'s memory figures both come from here.

- `tree_rss_bytes`: RSS summed over a process and its descendants. Pages shared between processes (libraries mapped
  by every Ray worker) count once per process: an upper bound that is stable from round to round, which is what a
  leak check needs.
- `tree_pss_bytes`: PSS where the kernel reports it (else RSS), which splits shared pages among the processes
  sharing them: what a process tree really costs, for benchmarks.
- `PeakSampler`: samples any such function in a daemon thread; `take_peak()` returns the peak since the previous
  call and starts the next period from the current value. `PeakMemoryMonitor` is the server's: tree RSS in MiB.

In simulation the server's tree holds everything: the ServerApp, Ray's GCS and raylet, and the Ray workers that run
the departments. Processes that exit or deny access while being read are skipped.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from types import TracebackType

import psutil

log = logging.getLogger(__name__)

MIB = 2**20
SAMPLE_SECONDS = 0.2  # the server's sampling period: rounds last seconds, so a short peak is still seen


def _tree(pid: int | None) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid or os.getpid())
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:  # the root exited: it holds nothing
        return []


def tree_rss_bytes(pid: int | None = None) -> int:
    """Summed RSS of process `pid` (default: this one) and all its descendants."""
    total = 0
    for proc in _tree(pid):
        try:
            total += proc.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return total


def tree_pss_bytes(pid: int | None = None) -> int:
    """Summed PSS (RSS where the kernel reports no PSS) of process `pid` (default: this one) and its descendants."""
    total = 0
    for proc in _tree(pid):
        try:
            info = proc.memory_full_info()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        total += int(getattr(info, "pss", info.rss))
    return total


class PeakSampler:
    """Samples `sample()` every `interval` seconds in a daemon thread while entered (`with`), and at each
    `take_peak()`; without entering it, the peak is the larger of the samples at consecutive `take_peak` calls."""

    def __init__(self, sample: Callable[[], int], interval: float = SAMPLE_SECONDS) -> None:
        self._sample_fn = sample
        self._interval = interval
        self._peak = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fedsilo-memory", daemon=True)

    def _sample(self) -> int:
        value = int(self._sample_fn())
        with self._lock:
            self._peak = max(self._peak, value)
        return value

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self._sample()

    def take_peak(self) -> int:
        """The peak since the previous call (or the start); the next period starts from the current value."""
        current = self._sample()
        with self._lock:
            peak, self._peak = self._peak, current
        return peak

    def __enter__(self) -> PeakSampler:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        self._thread.join(timeout=max(5.0, 2 * self._interval))


class PeakMemoryMonitor(PeakSampler):
    """The server's process tree RSS; `take_peak_mib()` returns and resets the peak, in MiB."""

    def __init__(self, period: float = SAMPLE_SECONDS) -> None:
        pid = os.getpid()
        super().__init__(lambda: tree_rss_bytes(pid), period)

    def take_peak_mib(self) -> float:
        return round(self.take_peak() / MIB, 1)
