"""`fedsilo client start` runs the SuperNode as a child (`client.join.supervise`): its stderr is forwarded, a signal
to fedsilo reaches it exactly once (a terminal's Ctrl-C too, which goes to fedsilo's whole process group), and its
exit status is fedsilo's. A stand-in child (plain Python) takes the SuperNode's place; about a second."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

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
