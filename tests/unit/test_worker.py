"""The site's warm worker (client.worker): its directory is the site's alone, it serves one run and one approved
app, and the framing carries Flower's protobuf messages. A real deployment runs it in tests/deployment."""

from __future__ import annotations

import json
import os
import socket
import threading
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from flwr.app import Context, RecordDict

from client.site import SiteConfig
from client.worker import WORKER_DIR, _peer_uid, _recv, _send, _serve_one, worker_dir
from common.errors import PolicyError


def _site(tmp_path: Path) -> SiteConfig:
    toml = tmp_path / "site.toml"
    toml.write_text('name = "cardiology"\ndata = "notes.csv"\nepsilon = 8.0\ndelta = 1e-5\nledger = "ledger.json"\n'
                    '[policy]\napproved_apps = ["installed"]\n')
    return SiteConfig.from_toml(toml)


def test_the_worker_directory_is_the_sites_alone(tmp_path: Path) -> None:
    site = _site(tmp_path)
    assert site.warm_worker and site.warm_worker_idle_seconds == 300.0
    made = worker_dir(site)
    assert made == tmp_path / WORKER_DIR and (made.stat().st_mode & 0o777) == 0o700
    assert worker_dir(site) == made  # reused as it is
    made.chmod(0o750)
    with pytest.raises(PolicyError, match=r"must be a directory .* with mode 0700; it is drwxr-x---"):
        worker_dir(site)
    made.rmdir()
    (tmp_path / "elsewhere").mkdir(mode=0o700)
    made.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(PolicyError, match="not a link"):
        worker_dir(site)
    other = replace(site, ledger=str(tmp_path / "fresh" / "ledger.json"))
    (tmp_path / "fresh").mkdir()
    assert worker_dir(other).is_dir()


@pytest.mark.timeout(60)
def test_a_worker_refuses_a_message_of_another_run_or_app() -> None:
    from client.compat import context_to_proto

    cases = (({"run_id": 8, "digest": "sha256:ours"}, 8, "this worker serves run 7, app sha256:ours"),
             ({"run_id": 7, "digest": "sha256:theirs"}, 7, "this worker serves run 7, app sha256:ours"),
             ({"run_id": 7, "digest": "sha256:ours"}, 8, "this worker serves run 7"))  # the context says run 8
    for header, run_id, error in cases:
        context = Context(run_id=run_id, node_id=5, node_config={}, state=RecordDict(), run_config={})
        ours, theirs = socket.socketpair(socket.AF_UNIX)
        with ours, theirs:
            assert _peer_uid(theirs) == os.getuid()
            server = threading.Thread(target=_serve_one, args=(theirs, 7, "sha256:ours"))
            server.start()
            # an empty message (Flower's Message needs a task identity to be built here): refused before it matters
            _send(ours, json.dumps(header).encode(), b"", context_to_proto(context).SerializeToString())
            (status,) = _recv(ours)
            server.join(timeout=10)
        assert json.loads(status) == {"ok": False, "error": error}


def test_the_worker_ends_with_the_evaluation_of_the_jobs_last_round() -> None:
    from flwr.app import MessageType

    from client.worker import last_message

    context = Context(run_id=7, node_id=5, node_config={}, state=RecordDict(), run_config={"num-server-rounds": 3})

    def message(kind: str, group: str) -> Any:  # Flower's Message needs a task identity to be built here
        return SimpleNamespace(metadata=SimpleNamespace(message_type=kind, group_id=group))

    assert last_message(message(MessageType.EVALUATE, "3"), context)
    assert not last_message(message(MessageType.EVALUATE, "2"), context)
    assert not last_message(message(MessageType.TRAIN, "3"), context)  # the last round's training: more to come
    no_rounds = Context(run_id=7, node_id=5, node_config={}, state=RecordDict(), run_config={})
    assert not last_message(message(MessageType.EVALUATE, "3"), no_rounds)  # unknown: the idle timeout ends it


def test_a_site_keeps_the_newest_run_logs_of_its_workers(tmp_path: Path) -> None:
    from client.worker import prune_run_logs

    for run in range(6):
        for suffix in (".log", ".lock"):
            path = tmp_path / f"run-{run}{suffix}"
            path.write_text("")
            os.utime(path, (1000 + run, 1000 + run))  # run 5 is the newest
    (tmp_path / "run-0.sock").write_text("")  # run 0's worker still listens: its log stays
    removed = prune_run_logs(tmp_path, keep=3)
    assert sorted(p.name for p in removed) == ["run-1.lock", "run-1.log", "run-2.lock", "run-2.log"]
    assert sorted(p.name for p in tmp_path.glob("run-*.log")) == ["run-0.log", "run-3.log", "run-4.log", "run-5.log"]
    assert prune_run_logs(tmp_path, keep=3) == []
