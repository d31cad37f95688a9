"""common.memory: process-tree memory and the peak sampler (no sleeping, no child processes: the integration test
`tests/integration/test_memory.py` allocates real memory in this process and a child)."""

from __future__ import annotations

import os

import psutil

from common.memory import MIB, PeakMemoryMonitor, PeakSampler, tree_pss_bytes, tree_rss_bytes


class _Values:
    def __init__(self, *values: int) -> None:
        self.values = list(values)

    def __call__(self) -> int:
        return self.values.pop(0)


def test_take_peak_returns_the_peak_and_restarts_from_the_current_value() -> None:
    sampler = PeakSampler(_Values(5, 3, 1, 2), interval=3600)
    sampler._sample()  # a background sample: 5
    assert sampler.take_peak() == 5  # samples 3; the peak was 5; the next period starts at 3
    assert sampler.take_peak() == 3  # samples 1: the period's peak is its start, 3
    assert sampler.take_peak() == 2  # samples 2


def test_entering_samples_at_once_and_exiting_stops_the_thread() -> None:
    values = _Values(7, 4)
    with PeakSampler(values, interval=3600) as sampler:
        assert sampler.take_peak() == 7
    assert not sampler._thread.is_alive()


def test_tree_memory_of_this_process() -> None:
    rss = tree_rss_bytes()
    assert rss >= psutil.Process().memory_info().rss // 2 > 0
    assert 0 < tree_pss_bytes(os.getpid()) <= rss * 2


def test_a_vanished_process_holds_nothing() -> None:
    pid = 2**22 + 12345  # above the kernel's pid_max: never a live process
    assert tree_rss_bytes(pid) == 0
    assert tree_pss_bytes(pid) == 0


def test_monitor_reports_mib() -> None:
    monitor = PeakMemoryMonitor(period=3600)
    assert monitor.take_peak_mib() * MIB >= psutil.Process().memory_info().rss // 2
