"""`fedsilo client start` runs the SuperNode as a child (`client.join.supervise`): its stderr is forwarded, a signal
to fedsilo reaches it exactly once (a terminal's Ctrl-C too, which goes to fedsilo's whole process group), its
exit status is fedsilo's, and it does not outlive a SIGKILLed fedsilo. A stand-in child (plain Python) takes the
SuperNode's place; a few seconds."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[2]

CHILD = """
import os, signal, sys, time
seen = []
def note(signum, _frame):
    seen.append(signum)
    sys.stderr.write(f"child got {signum}\\n"); sys.stderr.flush()
signal.signal(signal.SIGINT, note)
signal.signal(signal.SIGTERM, note)
sys.stderr.write(f"ready {os.getpgrp()}\\n"); sys.stderr.flush()
deadline = time.monotonic() + 20
while not seen and time.monotonic() < deadline:
    time.sleep(0.02)
time.sleep(0.5)  # a second, duplicated signal would arrive now
sys.exit(10 + len(seen))
"""

PARENT = """
import os, sys
from client.join import LineWatch, supervise
sys.exit(supervise([sys.executable, "-c", sys.argv[1]], dict(os.environ), LineWatch()))
"""


@pytest.mark.parametrize(("signum", "group"), [(signal.SIGTERM, False), (signal.SIGINT, True)])
def test_a_signal_reaches_the_supernode_once_and_its_status_is_returned(signum: int, group: bool) -> None:
    parent = subprocess.Popen([sys.executable, "-c", PARENT, CHILD], cwd=ROOT, stderr=subprocess.PIPE, text=True,
                              start_new_session=True, env=os.environ | {"PYTHONPATH": str(ROOT)})
    try:
        assert parent.stderr is not None
        ready, group_id = parent.stderr.readline().split()  # forwarded by fedsilo, line by line
        assert ready == "ready"
        # Its own process group: a terminal's Ctrl-C (to fedsilo's group) reaches it only through fedsilo, once.
        # (Two SIGINTs close together may reach Python's handler as one, so counting alone would not show this.)
        assert int(group_id) != os.getpgid(parent.pid)
        if group:
            os.killpg(parent.pid, signum)  # as a terminal's Ctrl-C: the whole foreground group
        else:
            parent.send_signal(signum)
        rest = parent.stderr.read()
        assert parent.wait(timeout=30) == 11, rest  # one signal seen, the child's own status
        assert rest.count("child got") == 1 and f"child got {int(signum)}" in rest
    finally:
        if parent.poll() is None:
            parent.kill()


SLEEPER = """
import os, sys, time
sys.stderr.write(f"sleeping {os.getpid()}\\n"); sys.stderr.flush()
time.sleep(60)
"""


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE  # ended, not reaped yet by its new parent
    except psutil.NoSuchProcess:
        return True


def test_a_sigkilled_fedsilo_takes_its_supernode_with_it() -> None:
    """SIGKILL cannot be forwarded: the kernel sends the child a SIGTERM when fedsilo dies (PR_SET_PDEATHSIG)."""
    parent = subprocess.Popen([sys.executable, "-c", PARENT, SLEEPER], cwd=ROOT, stderr=subprocess.PIPE, text=True,
                              start_new_session=True, env=os.environ | {"PYTHONPATH": str(ROOT)})
    child_pid = None
    try:
        assert parent.stderr is not None
        word, pid = parent.stderr.readline().split()
        assert word == "sleeping"
        child_pid = int(pid)
        assert psutil.Process(child_pid).ppid() == parent.pid
        parent.kill()
        assert parent.wait(timeout=10) == -signal.SIGKILL
        deadline = time.monotonic() + 5
        while not _gone(child_pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _gone(child_pid), "the supervised child outlived its SIGKILLed parent"
    finally:
        if parent.poll() is None:
            parent.kill()
        if child_pid is not None and not _gone(child_pid):
            os.kill(child_pid, signal.SIGKILL)
