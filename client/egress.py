"""Egress audit: an append-only record, kept at the site, of every message the department sends.

`EgressAudit.mod` is the ClientApp's outermost mod, so it sees each reply exactly as it leaves the department:
after training, after SecAgg+ masking, for every SecAgg+ stage (setup, share_keys, collect_masked_vectors,
unmask) and every evaluation. For each reply it appends one JSON line to `<ledger>.egress.jsonl` next to the
site's ledger, *before* the reply is handed to Flower:

- what was sent, never the data itself: array names, dtypes, shapes and byte counts; metric and config names
  with their value types and byte counts (SecAgg+'s masked vectors, keys and encrypted shares included);
- the round, the message type, the SecAgg+ stage, the site's epsilon before and after (from its ledger);
- in deployment, the server's address and the sha256 fingerprint of the TLS certificate it presents.

Lines are chained (each holds the sha256 of the previous line), so an edited or deleted line is detected by
`read_egress_log`. If the record cannot be written the reply is not released (the ClientApp raises): nothing
leaves a site unrecorded except Flower's own error report of that failure. Reading the log, and checking the
site's ledger against its epsilon records, live in `client.egress_log` (no Flower import: the department's runner
checks before it charges).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context, Message

from client.compat import RECORD_KEY_CONFIGS, ClientAppCallable, SecAggKey
from client.egress_log import FORMAT, GENESIS, egress_lock_path, egress_log_path, line_hash, read_egress_log
from client.ledger import LedgerFile
from client.policy import observed_server_fingerprint
from client.site import SiteConfig
from common.errors import EgressLogError, FedsiloError
from common.files import PRIVATE_MODE, append_durable, exclusive_lock

log = logging.getLogger(__name__)

def _value_summary(value: Any) -> dict[str, Any]:
    """Type and size of a config/metric value, never the value."""
    if isinstance(value, bytes):
        return {"type": "bytes", "bytes": len(value)}
    if isinstance(value, str):
        return {"type": "str", "bytes": len(value.encode())}
    if isinstance(value, list):
        kinds = sorted({type(v).__name__ for v in value})
        size = sum(len(v) if isinstance(v, bytes) else len(v.encode()) if isinstance(v, str) else 8 for v in value)
        return {"type": f"list[{'|'.join(kinds) or 'empty'}]", "length": len(value), "bytes": size}
    return {"type": type(value).__name__, "bytes": 8}


def describe_content(msg: Message) -> dict[str, Any]:
    """What a message carries: names, shapes, types and sizes of every item in every record (no values)."""
    if not msg.has_content():
        return {"arrays": [], "metrics": [], "configs": [], "bytes": 0}
    arrays, metrics, configs = [], [], []
    content = msg.content
    for rname, record in content.array_records.items():
        for key, arr in record.items():
            arrays.append({"record": rname, "name": key, "dtype": str(arr.dtype), "shape": list(arr.shape),
                           "bytes": len(arr.data)})
    for rname, mrecord in content.metric_records.items():
        for key, value in mrecord.items():
            metrics.append({"record": rname, "name": key, **_value_summary(value)})
    for rname, crecord in content.config_records.items():
        for key, value in crecord.items():
            configs.append({"record": rname, "name": key, **_value_summary(value)})
    total = sum(int(item["bytes"]) for group in (arrays, metrics, configs) for item in group)
    return {"arrays": arrays, "metrics": metrics, "configs": configs, "bytes": total}


def _incoming_stage(msg: Message) -> str | None:
    if not msg.has_content():
        return None
    cfg: ConfigRecord | None = msg.content.config_records.get(RECORD_KEY_CONFIGS)
    stage = cfg.get(SecAggKey.STAGE) if cfg is not None else None
    return str(stage) if stage is not None else None


def _round(msg: Message) -> int | None:
    """The legacy workflow tags every message of a round with group_id = the round number."""
    group = msg.metadata.group_id
    return int(group) if group.isdigit() else None


def _server_identity(site: SiteConfig) -> dict[str, Any]:
    """Deployment only: to whom the messages go (address and the certificate it presents)."""
    if not site.server:
        return {}
    out: dict[str, Any] = {"server": site.server, "server_cert_sha256": None}
    if site.insecure or not site.ca:
        out["server_cert_error"] = "insecure connection: no server certificate"
        return out
    try:
        out["server_cert_sha256"] = observed_server_fingerprint(site.server, Path(site.ca))
    except FedsiloError as exc:
        out["server_cert_error"] = f"{type(exc).__name__}: {exc}"
    return out


def append_record(path: Path, record: dict[str, Any]) -> dict[str, Any]:
    """Append `record` (chained to the last line) durably; returns what was written."""
    with exclusive_lock(egress_lock_path(path)):
        existing = read_egress_log(path)
        prev = GENESIS
        if existing:
            last = path.read_bytes().rstrip(b"\n").rsplit(b"\n", 1)[-1]
            prev = line_hash(last)
        full = {"format": FORMAT, **record, "prev_sha256": prev}
        line = json.dumps(full, sort_keys=True, allow_nan=False).encode() + b"\n"
        try:
            append_durable(path, line, mode=PRIVATE_MODE)
        except OSError as exc:
            raise EgressLogError(f"Could not append to egress log {path}: {exc}") from exc
    return full


def _recorded_epsilon(site: SiteConfig) -> float:
    ledger = LedgerFile(Path(site.ledger), site.name, site.epsilon, site.delta, site.accountant)
    return ledger.read().epsilon_recorded


def _base_record(site: SiteConfig, msg: Message, run_id: int) -> dict[str, Any]:
    return {"time": time.time(), "site": site.name, "run_id": str(run_id),
            "message_type": msg.metadata.message_type, "round": _round(msg), "secagg_stage": _incoming_stage(msg),
            "delta": site.delta, "accountant": site.accountant, "epsilon_before": _recorded_epsilon(site),
            **_server_identity(site)}


def record_refusal(site: SiteConfig, msg: Message, run_id: int, reply: Message) -> None:
    """Record a reply the site sends without running its ClientApp (the gate refused the job)."""
    base = _base_record(site, msg, run_id)
    error = f"{reply.error.code}: {reply.error.reason}" if reply.has_error() else None
    append_record(egress_log_path(Path(site.ledger)), {**base, "epsilon_after": base["epsilon_before"],
                                                       "error": error, **describe_content(reply)})


@dataclass(frozen=True)
class EgressAudit:
    """The ClientApp mod that records every outgoing message. `site_of` resolves the node's site config."""

    site_of: Callable[[Context], SiteConfig]

    def mod(self, msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
        site = self.site_of(ctxt)
        path = egress_log_path(Path(site.ledger))
        base = _base_record(site, msg, ctxt.run_id)
        try:
            reply = call_next(msg, ctxt)
        except Exception as exc:
            # Flower turns the exception into an error reply carrying its type and message: that leaves too.
            append_record(path, {**base, "epsilon_after": _recorded_epsilon(site), "error": f"{type(exc)}:<'{exc}'>",
                                 "arrays": [], "metrics": [], "configs": [], "bytes": 0})
            raise
        error = f"{reply.error.code}: {reply.error.reason}" if reply.has_error() else None
        append_record(path, {**base, "epsilon_after": _recorded_epsilon(site), "error": error,
                             **describe_content(reply)})
        log.debug("egress: site %s recorded a %s reply (round %s, stage %s)", site.name,
                  msg.metadata.message_type, base["round"], base["secagg_stage"])
        return reply


def format_record(record: dict[str, Any]) -> str:
    """One line for `fedsilo budget`: when, what kind, how much, epsilon before -> after, to whom."""
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(float(record.get("time", 0))))
    kind = str(record.get("message_type"))
    if record.get("secagg_stage"):
        kind += f"/{record['secagg_stage']}"
    arrays = record.get("arrays", [])
    names = sorted({str(m["name"]) for m in [*record.get("metrics", []), *record.get("configs", [])]})
    text = (f"{when} run {record.get('run_id')} round {record.get('round')} {kind}: {len(arrays)} tensor(s), "
            f"{record.get('bytes', 0)} bytes; fields {', '.join(names) or '-'}; "
            f"epsilon {record.get('epsilon_before', 0):.4f} -> {record.get('epsilon_after', 0):.4f}")
    if record.get("server"):
        cert = record.get("server_cert_sha256") or f"unknown ({record.get('server_cert_error')})"
        text += f"; to {record['server']} (certificate sha256 {cert})"
    if record.get("error"):
        text += f"; ERROR {record['error']}"
    return text
