"""The site's warm worker as a process (client.worker): its socket is the site user's alone (mode 0600, in the
0700 directory), and it ends by itself when no message comes, removing its socket."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from client.worker import socket_name

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


def test_the_worker_listens_for_the_sites_user_alone_and_ends_when_idle(tmp_path: Path) -> None:
    directory = tmp_path / "workers"
    directory.mkdir(mode=0o700)
    proc = subprocess.Popen([sys.executable, "-m", "client.worker", "--dir", str(directory), "--run-id", "7",
                             "--digest", "sha256:ours", "--idle-seconds", "3"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    sock = directory / socket_name(7)
    deadline = time.monotonic() + 60
    while not sock.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        mode = sock.stat().st_mode
        assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
        out, _ = proc.communicate(timeout=90)  # no message for 3 s: it ends
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, out
    assert "no message for 3s; ending" in out
    assert not sock.exists()
    assert os.listdir(directory) == []
