"""What a benchmark ran on, and how much memory a process tree holds: the facts printed beside every figure."""

from __future__ import annotations

import os
import platform
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import psutil
import torch


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def describe() -> dict[str, Any]:
    """The machine and its load right now (benchmarks here share their cores: the load says how much)."""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "cpu": _cpu_model(),
        "cpu_cores": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "gpu": gpu,
        "device": "cuda" if gpu else "cpu",
        "torch_threads": torch.get_num_threads(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def machine_line(info: dict[str, Any]) -> str:
    gpu = f", GPU {info['gpu']}" if info.get("gpu") else ", no GPU"
    return (f"{info['cpu']}, {info['cpu_cores']} cores, {info['memory_gib']} GiB{gpu}; torch {info['torch']}; "
            f"load average {info['load_average']} at {info['time_utc']}")


def tree_memory(pid: int | None = None) -> int:
    """Bytes held by a process and all its descendants (PSS where the kernel reports it, else RSS).

    PSS splits shared pages among the processes sharing them, so the Ray workers' shared libraries are not
    counted once per worker.
    """
    root = psutil.Process(pid or os.getpid())
    total = 0
    for proc in [root, *root.children(recursive=True)]:
        try:
            info = proc.memory_full_info()
            total += int(getattr(info, "pss", info.rss))
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return total


class PeakSampler:
    """Samples a value in a background thread; `take_peak()` returns the peak since the last call."""

    def __init__(self, sample: Any, interval: float) -> None:
        self._sample = sample
        self._interval = interval
        self._peak = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            value = int(self._sample())
            with self._lock:
                self._peak = max(self._peak, value)
            self._stop.wait(self._interval)

    def take_peak(self) -> int:
        value = int(self._sample())
        with self._lock:
            peak, self._peak = max(self._peak, value), 0
        return peak

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        self._thread.join()
