"""The gate's stand-ins for Flower's other app processes refuse when they are run (real processes)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from client.compat import TASK_TYPE_TO_COMMAND
from client.deploy import REFUSED_EXIT, install_gate


def test_every_other_app_process_refuses_to_run(tmp_path: Path) -> None:
    bin_dir = install_gate(tmp_path)
    others = set(TASK_TYPE_TO_COMMAND.values()) - {"flwr-clientapp"}
    assert others
    for command in others:  # every other app process Flower could start would load the job's bundle: refused
        proc = subprocess.run([str(bin_dir / command), "--token", "t"], capture_output=True, text=True, check=False,
                              timeout=30)
        assert proc.returncode == REFUSED_EXIT
        assert f"refusing {command}" in proc.stderr
