"""Peak resident memory of the server's process tree, sampled in the background and read out per round.

In simulation the tree holds everything: the ServerApp, Ray's GCS and raylet, and the Ray workers that run the
departments. RSS is summed over the processes, so pages shared between them (libraries mapped by every worker)
count once per process: an upper bound that is stable from round to round, which is what a leak check needs.
"""

from __future__ import annotations

import logging
import threading

import psutil

log = logging.getLogger(__name__)

MIB = 2**20
SAMPLE_SECONDS = 0.2  # sampling period: rounds last seconds, so a short peak is still seen


def tree_rss_bytes(root: psutil.Process) -> int:
    """Summed RSS of `root` and all its descendants (processes that exit while being read are skipped)."""
    total = 0
    try:
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    for proc in procs:
        try:
            total += proc.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return total


class PeakMemoryMonitor:
    """A daemon thread sampling the process tree's RSS; `take_peak_mib()` returns and resets the peak."""

    def __init__(self, period: float = SAMPLE_SECONDS) -> None:
        self._root = psutil.Process()
        self._period = period
        self._peak = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fedsilo-rss", daemon=True)

    def __enter__(self) -> PeakMemoryMonitor:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _sample(self) -> None:
        rss = tree_rss_bytes(self._root)
        with self._lock:
            self._peak = max(self._peak, rss)

    def _run(self) -> None:
        while not self._stop.wait(self._period):
            self._sample()

    def take_peak_mib(self) -> float:
        """Peak since the previous call (or the start), in MiB; the next period starts from the current RSS."""
        self._sample()
        with self._lock:
            peak, self._peak = self._peak, 0
        self._sample()
        return round(peak / MIB, 1)
