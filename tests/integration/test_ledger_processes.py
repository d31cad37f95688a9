"""Two real processes charging one ledger at once: the lock serialises them and no charge is lost."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from client.ledger import LedgerFile

WORKER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from client.ledger import LedgerFile
    path, name, count = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    lf = LedgerFile(path, "cardiology", 1000.0, 1e-5, "rdp")
    Path(f"{path}.{name}.ready").touch()
    while not Path(f"{path}.go").exists():
        time.sleep(0.01)
    for i in range(count):
        with lf.open() as ledger:
            seen = len(ledger.entries)
            time.sleep(0.03)  # widen the read-modify-write window: without the lock, charges would be lost
            lf.charge(ledger, run_id=name, server_round=i + 1, charge=(2.0, 0.01, 10 + seen))
""")


@pytest.mark.slow  # two fresh interpreters importing Opacus
def test_two_processes_on_one_ledger_are_serialised(tmp_path: Path) -> None:
    path = tmp_path / "ledger.json"
    count = 6
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(path), name, str(count)], env=env)
             for name in ("job-a", "job-b")]
    try:
        for name in ("job-a", "job-b"):
            while not Path(f"{path}.{name}.ready").exists():
                assert all(p.poll() is None for p in procs), "a worker died during start-up"
                os.sched_yield()
        Path(f"{path}.go").touch()
        assert [p.wait(timeout=120) for p in procs] == [0, 0]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    entries = LedgerFile(path, "cardiology", 1000.0, 1e-5, "rdp").read().entries
    assert len(entries) == 2 * count  # no charge lost
    for name in ("job-a", "job-b"):
        assert [e.round for e in entries if e.run_id == name] == list(range(1, count + 1))
    # each charge was made on top of every earlier one: steps = 10 + entries seen
    assert [e.steps for e in entries] == [10 + i for i in range(2 * count)]
    afters = [e.epsilon_after for e in entries]
    assert afters == sorted(afters) and len(set(afters)) == len(afters)
