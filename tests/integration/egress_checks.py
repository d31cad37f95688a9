"""Intercept what leaves each department in a simulation, and check it is only weights/deltas and aggregates.

`capture_mod(out_dir)` is an outermost ClientApp mod: it pickles every reply exactly as it leaves the department
(after SecAgg+ masking and after the egress audit). It runs inside Ray's worker processes, so it is a closure
whose body only uses the standard library and Flower (cloudpickle ships it by value).
"""

from __future__ import annotations

import pickle
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from flwr.common import bytes_to_ndarray

from client.compat import RECORD_KEY_CONFIGS, Mod, SecAggKey
from common import keys
from server.records import PlanRecord

# What a department may send, by record: the aggregate metrics of keys.py and Flower's own bookkeeping.
ALLOWED_METRICS = {keys.M_DEPARTMENT, keys.M_STATUS, keys.M_EPSILON, keys.M_DELTA, keys.M_NOISE, keys.M_STEPS,
                   keys.M_TRAIN_LOSS, keys.M_TRAIN_SECONDS, keys.M_ACCURACY, keys.M_CORRECT, keys.M_NUM_EXAMPLES,
                   keys.M_REASON, keys.M_PHASE, keys.M_PLAN}
STRING_METRICS = {keys.M_DEPARTMENT, keys.M_STATUS, keys.M_REASON, keys.M_PHASE, keys.M_PLAN}
METRIC_RECORDS = {"fitres.num_examples": {"num_examples"}, "evaluateres.num_examples": {"num_examples"},
                  "evaluateres.loss": {"loss"}}
SECAGG_REPLY_KEYS = {SecAggKey.PUBLIC_KEY_1, SecAggKey.PUBLIC_KEY_2, SecAggKey.DESTINATION_LIST,
                     SecAggKey.CIPHERTEXT_LIST, SecAggKey.MASKED_PARAMETERS, SecAggKey.NODE_ID_LIST,
                     SecAggKey.SHARE_LIST}
SECAGG_MODULUS = 2**32


def capture_mod(out_dir: Path) -> Mod:
    target = str(out_dir)

    def capture(msg: Any, ctxt: Any, call_next: Any) -> Any:
        import os
        import pickle
        import uuid

        reply = call_next(msg, ctxt)
        snap: dict[str, Any] = {"partition": ctxt.node_config.get("partition-id"),
                                "type": str(msg.metadata.message_type), "round": msg.metadata.group_id,
                                "error": reply.error.reason if reply.has_error() else None,
                                "arrays": {}, "metrics": {}, "configs": {}}
        if reply.has_content():
            content = reply.content
            snap["arrays"] = {r: {k: a.numpy() for k, a in rec.items()} for r, rec in content.array_records.items()}
            snap["metrics"] = {r: dict(rec) for r, rec in content.metric_records.items()}
            snap["configs"] = {r: dict(rec) for r, rec in content.config_records.items()}
        with open(os.path.join(target, f"{uuid.uuid4().hex}.pkl"), "wb") as fh:
            pickle.dump(snap, fh)
        return reply

    return capture


def load_captured(out_dir: Path) -> list[dict[str, Any]]:
    return [pickle.loads(p.read_bytes()) for p in sorted(out_dir.glob("*.pkl"))]


def _strings_and_bytes(value: Any) -> Iterable[str | bytes]:
    if isinstance(value, str | bytes):
        yield value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _strings_and_bytes(k)
            yield from _strings_and_bytes(v)
    elif isinstance(value, list | tuple):
        for v in value:
            yield from _strings_and_bytes(v)


def masked_vectors(snap: dict[str, Any]) -> list[np.ndarray] | None:
    """The SecAgg+ masked vectors in a reply (first: the masked weight factor), or None."""
    cfg = snap["configs"].get(RECORD_KEY_CONFIGS, {})
    if SecAggKey.MASKED_PARAMETERS not in cfg:
        return None
    return [bytes_to_ndarray(b) for b in cfg[SecAggKey.MASKED_PARAMETERS]]


def check_egress(messages: list[dict[str, Any]], shapes: list[tuple[int, ...]], texts: list[str],
                 secagg: bool) -> dict[str, int]:
    """Assert every captured reply carries only trainable-shaped arrays (or their SecAgg+ masking), SecAgg+
    protocol material and allow-listed scalar aggregates; and that no text appears anywhere in it.
    Returns how many replies of each kind were seen."""
    seen = {"train": 0, "evaluate": 0, "masked": 0}
    needles = [t.encode() for t in texts if len(t) >= 8]
    for snap in messages:
        assert snap["error"] is None, snap["error"]
        kind = snap["type"]
        assert kind in ("train", "evaluate"), kind
        seen[kind] += 1
        # Arrays: only the trained tensors' updates, in order, float32; none at all under SecAgg+.
        arrays = [(r, k, a) for r, rec in snap["arrays"].items() for k, a in rec.items()]
        if secagg or kind == "evaluate":
            assert arrays == [], [(r, k) for r, k, _ in arrays]
        else:
            assert [tuple(a.shape) for _, _, a in arrays] == shapes
            assert all(a.dtype == np.float32 for _, _, a in arrays)
        # Metric records: Flower's loss / num_examples scalars only.
        for rname, rec in snap["metrics"].items():
            assert set(rec) <= METRIC_RECORDS.get(rname, set()), (rname, sorted(rec))
            assert all(isinstance(v, int | float) and not isinstance(v, bool) for v in rec.values()), rname
        for rname, rec in snap["configs"].items():
            if rname.endswith(".metrics"):
                assert set(rec) <= ALLOWED_METRICS, sorted(set(rec) - ALLOWED_METRICS)
                for key, value in rec.items():
                    allowed: tuple[type, ...] = (str,) if key in STRING_METRICS else (int, float)
                    assert isinstance(value, allowed), (key, type(value))  # scalars only: no per-example lists
                    if key == keys.M_PLAN:  # the plan: counts, rates, noise and epsilon of the job, nothing else
                        PlanRecord.model_validate_json(str(value))
            elif rname.endswith(".status"):
                assert set(rec) == {"code", "message"}
            elif rname == RECORD_KEY_CONFIGS:
                assert secagg
                assert set(rec) <= SECAGG_REPLY_KEYS, sorted(rec)
                for value in rec.values():
                    assert isinstance(value, bytes) or all(isinstance(v, bytes | int) for v in value)
            else:
                raise AssertionError(f"unexpected config record {rname!r}")
        vectors = masked_vectors(snap)
        if vectors is not None:
            seen["masked"] += 1
            assert [tuple(v.shape) for v in vectors] == [(1,), *shapes]
            for v in vectors:
                assert np.issubdtype(v.dtype, np.integer)
                assert 0 <= int(v.min()) and int(v.max()) < SECAGG_MODULUS
        # No raw text (nor any text's UTF-8 bytes) anywhere: keys, values, keys' material, error strings.
        blobs = [b.encode() if isinstance(b, str) else b for b in _strings_and_bytes(snap)]
        blobs += [a.tobytes() for _, _, a in arrays]
        for needle in needles:
            assert not any(needle in blob for blob in blobs), "a training/test text left the department"
    return seen
