"""The peak-RSS monitor sees memory of this process and of its children, and resets per period."""

from __future__ import annotations

import subprocess
import sys
import time

from common.memory import PeakMemoryMonitor

MIB = 2**20
BLOCK_MIB = 150


def test_peak_covers_this_process_and_children() -> None:
    with PeakMemoryMonitor(period=0.05) as monitor:
        base = monitor.take_peak_mib()
        block = b"x" * (BLOCK_MIB * MIB)  # written, so resident
        time.sleep(0.3)
        del block
        grown = monitor.take_peak_mib()
        assert grown >= base + 0.8 * BLOCK_MIB
        after = monitor.take_peak_mib()
        assert after < grown - 0.5 * BLOCK_MIB  # the next period starts from the current RSS
        child = subprocess.Popen([sys.executable, "-c",
                                  f"b = b'y' * ({BLOCK_MIB} * 2**20); import time; time.sleep(3)"])
        try:
            time.sleep(2)
            with_child = monitor.take_peak_mib()
        finally:
            child.kill()
            child.wait()
        assert with_child >= after + 0.8 * BLOCK_MIB
