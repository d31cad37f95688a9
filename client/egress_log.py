"""Reading a site's egress log, and checking the site's ledger against it: no Flower, no Opacus.

The egress log (`client.egress` writes it) is a hash-chained JSON-lines file next to the ledger. Each record holds
the epsilon the site's ledger showed just before and just after the reply was produced (`epsilon_before`,
`epsilon_after`: the ledger's last recorded `epsilon_after`, or 0 for an empty ledger). Epsilon only grows, so a
ledger that truthfully records every charge shows at least the largest epsilon its egress log ever recorded, and
every epsilon the egress log recorded is the `epsilon_after` of one of the ledger's charges.

`check_against_egress` refuses a ledger that breaks either (`LedgerBehindEgressError`): charges were removed or
rewritten, or an older copy of the ledger was put back. The ledger's own checksum cannot detect that (whoever can
write the file can recompute it); the egress log's hash chain makes the log itself hard to shorten or edit without
rewriting it from the edited line on. Someone who can rewrite both files on the site host is not stopped by this
(docs/threat-model.md).
"""

from __future__ import annotations

import bisect
import hashlib
import json
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common.errors import EgressLogError, LedgerBehindEgressError
from common.files import exclusive_lock

if TYPE_CHECKING:
    from client.ledger import Ledger

FORMAT = "fedsilo-egress/1"
SUFFIX = ".egress.jsonl"
GENESIS = "0" * 64  # prev_sha256 of the first line
EPSILON_KEYS = ("epsilon_before", "epsilon_after")
# The same float is written by the ledger and copied into the egress log (both JSON, which round-trips floats);
# the tolerance only absorbs representation noise.
SAME_EPSILON_REL = 1e-9
# A recomputed epsilon (from the ledger's sigma, q, steps) may differ from the recorded one by the accountant's
# numerical error (PRV's is the largest); below this, the recomputation counts as showing less.
RECOMPUTED_REL = 1e-3


def egress_log_path(ledger_path: Path) -> Path:
    """The egress log lives next to the site's ledger: `ledger.json` -> `ledger.egress.jsonl`."""
    return ledger_path.with_name(ledger_path.stem + SUFFIX)


def egress_lock_path(path: Path) -> Path:
    """The lock every append holds (and a consistent read takes)."""
    return path.with_name(path.name + ".lock")


def line_hash(line: bytes) -> str:
    return hashlib.sha256(line.rstrip(b"\n")).hexdigest()


def _parse_lines(path: Path, data: bytes) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = []
    prev = GENESIS
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    elif lines:
        raise EgressLogError(f"Egress log {path}: the last line is torn (no newline).")
    for number, line in enumerate(lines, start=1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise EgressLogError(f"Egress log {path}: line {number} is not JSON ({exc.msg}).") from exc
        if not isinstance(record, dict) or record.get("format") != FORMAT:
            raise EgressLogError(f"Egress log {path}: line {number} is not a {FORMAT} record.")
        if record.get("prev_sha256") != prev:
            raise EgressLogError(f"Egress log {path}: line {number} does not chain to the line before it "
                                 "(a line was edited, removed or inserted).")
        prev = line_hash(line)
        records.append(record)
    return records


def read_egress_log(path: Path) -> list[dict[str, Any]]:
    """Every record of an egress log, after checking the hash chain (a missing log means nothing was sent)."""
    if not path.exists():
        return []
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise EgressLogError(f"Egress log {path} cannot be read: {exc}") from exc
    return _parse_lines(path, data)


def read_egress_log_locked(path: Path) -> list[dict[str, Any]]:
    """`read_egress_log` under the log's append lock, so that a concurrent append is never seen half written."""
    try:
        with exclusive_lock(egress_lock_path(path)):
            return read_egress_log(path)
    except OSError as exc:
        raise EgressLogError(f"Cannot lock the egress log {path}: {exc}") from exc


def _epsilons(path: Path, records: Sequence[dict[str, Any]]) -> Iterator[tuple[int, dict[str, Any], float]]:
    """(line number, record, epsilon) for every epsilon the log recorded; EgressLogError for a record without a
    finite, non-negative epsilon (fail closed: the check cannot be made)."""
    for number, record in enumerate(records, start=1):
        for key in EPSILON_KEYS:
            value = record.get(key)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) \
                    or value < 0:
                raise EgressLogError(f"Egress log {path}: line {number} has no usable {key} ({value!r}).")
            yield number, record, float(value)


def _reached(value: float, reached: Sequence[float]) -> bool:
    """Whether `value` is (up to representation noise) one of the sorted `reached` epsilons."""
    i = bisect.bisect_left(reached, value)
    return any(math.isclose(value, reached[j], rel_tol=SAME_EPSILON_REL, abs_tol=1e-12)
               for j in (i - 1, i) if 0 <= j < len(reached))


def _where(record: dict[str, Any]) -> str:
    return f"run {record.get('run_id')} round {record.get('round')} {record.get('message_type')}"


def check_against_egress(ledger: Ledger, records: Sequence[dict[str, Any]], egress_path: Path, ledger_path: Path,
                         *, epsilon_recomputed: float | None = None) -> float:
    """Refuse a ledger that shows less spent than the site's egress log recorded (`LedgerBehindEgressError`);
    returns the largest epsilon the egress log recorded (0 for an empty or missing log).

    Three checks, each failing closed: the ledger's recorded epsilon is at least the log's largest (charges removed
    from the end, an older copy restored, the ledger deleted with its lock file); every epsilon
    the log recorded is one the ledger's charges reached (a charge removed from the middle, checksum recomputed,
    is caught here); and `epsilon_recomputed`, the ledger's epsilon recomputed from its (sigma, q, steps) when the
    caller has it, is not below the log's largest (charges rewritten to smaller ones).
    """
    seen = list(_epsilons(egress_path, records))
    if not seen:
        return 0.0
    number, record, highest = max(seen, key=lambda item: item[2])
    where = f"line {number}, {_where(record)}"
    recorded = ledger.epsilon_recorded
    if recorded < highest and not math.isclose(recorded, highest, rel_tol=SAME_EPSILON_REL):
        raise LedgerBehindEgressError(
            f"Site {ledger.site}: its ledger {ledger_path} shows epsilon {recorded:.6g} spent, but its egress log "
            f"{egress_path} recorded {highest:.6g} ({where}): charges were removed, or an older copy of the ledger "
            "was restored. " + _REFUSAL)
    reached = sorted({0.0, *(e.epsilon_after for e in ledger.entries)})
    for n, r, value in seen:
        if not _reached(value, reached):
            raise LedgerBehindEgressError(
                f"Site {ledger.site}: its egress log {egress_path} (line {n}, {_where(r)}) records epsilon "
                f"{value:.6g} spent, a value no charge in its ledger {ledger_path} reaches: charges were removed or "
                "rewritten. " + _REFUSAL)
    if epsilon_recomputed is not None and epsilon_recomputed < highest * (1 - RECOMPUTED_REL):
        raise LedgerBehindEgressError(
            f"Site {ledger.site}: its ledger {ledger_path}, recomputed from its charges (sigma, q, steps), shows "
            f"epsilon {epsilon_recomputed:.6g} spent, but its egress log {egress_path} recorded {highest:.6g} "
            f"({where}): charges were rewritten. " + _REFUSAL)
    return highest


_REFUSAL = ("Refusing to trust it (the site would spend epsilon it already spent). Restore the ledger that matches "
            "the egress log; to start both again on purpose, move the ledger, its lock file and its egress log away "
            "together.")
