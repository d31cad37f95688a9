"""The egress audit mod with fake messages: what it records, the hash chain, failing closed, `fedsilo budget`."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, Metadata, MetricRecord, RecordDict

from client.compat import RECORD_KEY_CONFIGS
from client.egress import EgressAudit, egress_log_path, read_egress_log
from client.ledger import LedgerFile
from client.site import SiteConfig
from common.cli import main
from common.errors import EgressLogError

TEXT = "a secret patient note that must never leave"


def _site(tmp_path: Path) -> SiteConfig:
    return SiteConfig(name="cardiology", data="hutto", epsilon=8.0, delta=1e-5,
                      ledger=str(tmp_path / "site" / "ledger.json"))


def _incoming(kind: str = MessageType.TRAIN, group: str = "2", content: RecordDict | None = None) -> Message:
    md = Metadata(run_id=7, message_id="m1", src_node_id=0, dst_node_id=5, reply_to_message_id="", group_id=group,
                  created_at=time.time(), ttl=100.0, message_type=kind)
    return Message(content or RecordDict({"fitins.config": ConfigRecord({"server-round": 2})}), metadata=md)


def _context() -> Context:
    return Context(run_id=7, node_id=5, node_config={}, state=RecordDict(), run_config={})


def _fit_reply(msg: Message) -> Message:
    content = RecordDict({
        "fitres.parameters": ArrayRecord([np.zeros((4, 3), np.float32), np.ones(5, np.float32)]),
        "fitres.num_examples": MetricRecord({"num_examples": 40}),
        "fitres.metrics": ConfigRecord({"department": "cardiology", "train-loss": 0.5, "reason": TEXT}),
    })
    return Message(content, reply_to=msg)


def test_records_names_shapes_sizes_and_epsilon_but_no_values(tmp_path: Path) -> None:
    site = _site(tmp_path)
    audit = EgressAudit(lambda _: site)
    ledger = LedgerFile(Path(site.ledger), site.name, site.epsilon, site.delta, site.accountant)

    def train_and_charge(msg: Message, ctxt: Context) -> Message:
        with ledger.open() as opened:
            ledger.charge(opened, run_id="7", server_round=2, charge=(1.0, 0.1, 10))
        return _fit_reply(msg)

    audit.mod(_incoming(), _context(), train_and_charge)
    audit.mod(_incoming(MessageType.EVALUATE), _context(),
              lambda m, c: Message(RecordDict({"evaluateres.loss": MetricRecord({"loss": 0.3})}), reply_to=m))
    path = egress_log_path(Path(site.ledger))
    assert path.name == "ledger.egress.jsonl" and path.parent == Path(site.ledger).parent
    assert path.stat().st_mode & 0o777 == 0o600
    fit, ev = read_egress_log(path)
    assert fit["round"] == 2 and fit["message_type"] == "train" and fit["secagg_stage"] is None
    assert fit["epsilon_before"] == 0.0
    assert fit["epsilon_after"] == pytest.approx(ledger.read().epsilon) and fit["epsilon_after"] > 0
    assert [(a["name"], a["shape"], a["dtype"]) for a in fit["arrays"]] == [("0", [4, 3], "float32"),
                                                                           ("1", [5], "float32")]
    assert all(a["bytes"] >= 4 * int(np.prod(a["shape"])) for a in fit["arrays"])
    assert {m["name"] for m in fit["configs"]} == {"department", "train-loss", "reason"}
    assert fit["bytes"] == sum(x["bytes"] for x in fit["arrays"] + fit["metrics"] + fit["configs"])
    assert TEXT not in path.read_text()  # names and sizes only, never values
    assert ev["message_type"] == "evaluate" and ev["epsilon_before"] == ev["epsilon_after"] == fit["epsilon_after"]
    assert ev["prev_sha256"] != fit["prev_sha256"]


def test_secagg_stage_and_failures_are_recorded(tmp_path: Path) -> None:
    site = _site(tmp_path)
    audit = EgressAudit(lambda _: site)
    setup = _incoming(content=RecordDict({RECORD_KEY_CONFIGS: ConfigRecord({"stage": "setup"})}))
    audit.mod(setup, _context(), lambda m, c: Message(
        RecordDict({RECORD_KEY_CONFIGS: ConfigRecord({"pk1": b"k" * 44, "pk2": b"k" * 44})}), reply_to=m))

    def boom(msg: Message, ctxt: Context) -> Message:
        raise ValueError("refused")

    with pytest.raises(ValueError, match="refused"):
        audit.mod(_incoming(), _context(), boom)
    first, second = read_egress_log(egress_log_path(Path(site.ledger)))
    assert first["secagg_stage"] == "setup"
    assert [(c["name"], c["type"], c["bytes"]) for c in first["configs"]] == [("pk1", "bytes", 44),
                                                                             ("pk2", "bytes", 44)]
    assert "refused" in second["error"] and second["bytes"] == 0


def test_an_edited_or_removed_line_is_detected(tmp_path: Path) -> None:
    site = _site(tmp_path)
    audit = EgressAudit(lambda _: site)
    for _ in range(3):
        audit.mod(_incoming(), _context(), lambda m, c: _fit_reply(m))
    path = egress_log_path(Path(site.ledger))
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(lines[0] + lines[2])
    with pytest.raises(EgressLogError, match="line 2 does not chain"):
        read_egress_log(path)
    path.write_bytes(lines[0] + lines[1].replace(b'"round": 2', b'"round": 3') + lines[2])
    with pytest.raises(EgressLogError, match="line 3 does not chain"):
        read_egress_log(path)
    path.write_bytes(b"".join(lines)[:-5])
    with pytest.raises(EgressLogError, match="torn"):
        read_egress_log(path)
    # A site whose egress log is broken refuses to send anything further (fail closed).
    with pytest.raises(EgressLogError):
        audit.mod(_incoming(), _context(), lambda m, c: _fit_reply(m))


def test_budget_shows_ledger_egress_and_accountant_check(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    site = _site(tmp_path)
    audit = EgressAudit(lambda _: site)
    ledger = LedgerFile(Path(site.ledger), site.name, site.epsilon, site.delta, site.accountant)

    def train_and_charge(msg: Message, ctxt: Context) -> Message:
        with ledger.open() as opened:
            ledger.charge(opened, run_id="7", server_round=2, charge=(1.0, 0.1, 10))
        return _fit_reply(msg)

    audit.mod(_incoming(), _context(), train_and_charge)
    toml = tmp_path / "site" / "site.toml"
    toml.write_text('name = "cardiology"\ndata = "hutto"\nepsilon = 8.0\ndelta = 1e-5\nledger = "ledger.json"\n')
    assert main(["budget", "--site-config", str(toml), "--check"]) == 0
    out = capsys.readouterr().out
    assert "egress log" in out and "1 message(s) sent" in out and "round 2 train: 2 tensor(s)" in out
    assert "agrees" in out and "PRV" in out
    assert main(["budget", "--site-config", str(toml), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert len(doc["egress"]) == 1 and doc["egress"][0]["arrays"][0]["shape"] == [4, 3]
    assert TEXT not in json.dumps(doc)


def test_deployment_records_the_server_certificate_fingerprint(tmp_path: Path) -> None:
    import socket
    import ssl
    import threading

    from common.certs import provision

    done = provision(tmp_path / "certs", sans=["127.0.0.1"])
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(done.server.cert, done.server.key)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve_once() -> None:
        conn, _ = listener.accept()
        with context.wrap_socket(conn, server_side=True):
            pass

    thread = threading.Thread(target=serve_once, daemon=True)
    thread.start()
    site = replace(_site(tmp_path), server=f"127.0.0.1:{port}", ca=str(done.ca.cert))
    try:
        EgressAudit(lambda _: site).mod(_incoming(), _context(), lambda m, c: _fit_reply(m))
    finally:
        thread.join(timeout=10)
        listener.close()
    (record,) = read_egress_log(egress_log_path(Path(site.ledger)))
    assert record["server"] == site.server
    assert record["server_cert_sha256"] == done.server.fingerprint


def test_a_refusal_by_the_sites_gate_is_recorded_too(tmp_path: Path) -> None:
    from client.gate import handle
    from common import keys

    toml = tmp_path / "site.toml"
    toml.write_text('name = "cardiology"\ndata = "notes.csv"\nepsilon = 8.0\ndelta = 1e-5\nledger = "ledger.json"\n'
                    '[policy]\napproved_apps = []\n')
    context = Context(run_id=7, node_id=5, node_config={keys.NODE_SITE_CONFIG: str(toml)}, state=RecordDict(),
                      run_config={})
    reply = handle(_incoming(), context, b"a bundle the site never approved")
    assert reply.has_error() and "PolicyError" in reply.error.reason
    (record,) = read_egress_log(egress_log_path(tmp_path / "ledger.json"))
    assert record["site"] == "cardiology" and record["round"] == 2
    assert "PolicyError" in record["error"] and record["bytes"] == 0
    assert record["epsilon_before"] == record["epsilon_after"] == 0.0
