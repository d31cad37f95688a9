"""A site's persistent privacy ledger: every DP-SGD charge the site has made, for the life of the site.

The file is JSON with a sha256 checksum of its body, written atomically by `common.files` (temporary file, fsync,
rename, fsync of the directory) under an exclusive lock (`<ledger>.lock`, held for the whole read-charge-write).
A missing file means nothing was spent, unless the lock file records that a ledger was written here before: then
the ledger was deleted or lost, and the site refuses to train rather than start again from zero. An unreadable,
corrupted, torn or foreign file raises `LedgerError` and the site refuses to train. Each charge records (run id,
job id, round, sigma, q, steps, delta, epsilon after), so anyone can recompute epsilon with Opacus.

Formats: `fedsilo-ledger/2` (written) records each charge's job id, the job's identity across resumes, on which the
per-job cap is counted; `fedsilo-ledger/1` (read) has none: each of its charges counts as a job of its own run id.
The checksum only detects accidents: who can write the file can recompute it. `check_against_egress` compares the
ledger with the site's hash-chained egress log, which records the epsilon the site had spent each time it sent.

Crash safety: a charge is durable (file and directory fsynced) before `charge` returns, and the caller trains
only after it returns, so a crash at any point can only over-count. A crash mid-write leaves the previous ledger
intact plus a temporary file, which the next locked open removes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from common.errors import LedgerError
from common.files import PRIVATE_MODE, append_durable, exclusive_lock, make_dirs_durable, write_atomic

if TYPE_CHECKING:
    from common.privacy import Charge

log = logging.getLogger(__name__)

FORMAT = "fedsilo-ledger/2"
READABLE_FORMATS = ("fedsilo-ledger/1", FORMAT)  # /1: charges without a job id (their run id stands in for it)
# Written into the lock file once the ledger file exists: from then on a missing ledger is an error, not "empty".
CREATED_MARK = "fedsilo-ledger: a ledger was written beside this lock file; it must not disappear.\n"


@dataclass(frozen=True)
class LedgerEntry:
    run_id: str
    round: int
    noise_multiplier: float
    sample_rate: float
    steps: int
    delta: float
    epsilon_after: float
    time: float
    job_id: str = ""  # "" only while constructing: `__post_init__` makes it the run id (ledgers before job ids)

    def __post_init__(self) -> None:
        if not self.job_id:
            object.__setattr__(self, "job_id", self.run_id)

    @property
    def charge(self) -> Charge:
        return (self.noise_multiplier, self.sample_rate, self.steps)


@dataclass
class Ledger:
    site: str
    epsilon_budget: float
    delta: float
    accountant: str
    entries: list[LedgerEntry] = field(default_factory=list)

    @property
    def history(self) -> list[Charge]:
        return [e.charge for e in self.entries]

    @property
    def epsilon(self) -> float:
        from common.privacy import epsilon_spent  # Opacus (torch) only where epsilon is computed

        return epsilon_spent(self.history, self.delta, self.accountant)

    @property
    def epsilon_recorded(self) -> float:
        """Epsilon after the last charge, as recorded (no recomputation, no Opacus import)."""
        return self.entries[-1].epsilon_after if self.entries else 0.0

    @property
    def remaining(self) -> float:
        return max(0.0, self.epsilon_budget - self.epsilon)

    def body(self) -> dict[str, object]:
        return {"format": FORMAT, "site": self.site, "accountant": self.accountant,
                "budget": {"epsilon": self.epsilon_budget, "delta": self.delta},
                "entries": [asdict(e) for e in self.entries]}


def _checksum(body: dict[str, object]) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _parse(path: Path, text: str) -> Ledger:
    try:
        doc = json.loads(text)
        body, checksum = doc["body"], doc["sha256"]
        if body.get("format") not in READABLE_FORMATS:
            raise LedgerError(f"Ledger {path} has format {body.get('format')!r}, expected one of "
                              f"{', '.join(map(repr, READABLE_FORMATS))}.")
        if _checksum(body) != checksum:
            raise LedgerError(f"Ledger {path} failed its checksum: it was modified or corrupted. Refusing to train.")
        entries = [LedgerEntry(**e) for e in body["entries"]]
        return Ledger(site=str(body["site"]), epsilon_budget=float(body["budget"]["epsilon"]),
                      delta=float(body["budget"]["delta"]), accountant=str(body["accountant"]), entries=entries)
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError, ValueError) as exc:
        raise LedgerError(f"Ledger {path} is unreadable or torn ({exc!r}). Refusing to train.") from exc


def _serialise(ledger: Ledger) -> bytes:
    body = ledger.body()
    return json.dumps({"body": body, "sha256": _checksum(body)}, indent=1, sort_keys=True).encode()


def _make_dirs_durable(directory: Path) -> None:
    """Create `directory` and any missing parents, each synced into its parent: a crash right after a site's first
    charge must not lose the directory that holds its ledger."""
    try:
        make_dirs_durable(directory)
    except OSError as exc:
        raise LedgerError(f"Cannot create the ledger directory {directory}: {exc}. Refusing to train.") from exc


class LedgerFile:
    """The on-disk ledger of one site. All reads and writes go through `open()` (locked)."""

    def __init__(self, path: Path, site: str, epsilon_budget: float, delta: float, accountant: str) -> None:
        self.path = path
        self.site = site
        self.epsilon_budget = epsilon_budget
        self.delta = delta
        self.accountant = accountant

    @contextlib.contextmanager
    def open(self) -> Iterator[Ledger]:
        """Lock, load (or start empty), yield the ledger; nothing is written unless `charge` is called."""
        _make_dirs_durable(self.path.parent)
        with contextlib.ExitStack() as stack:
            try:
                stack.enter_context(exclusive_lock(self.lock_path))
            except OSError as exc:
                raise LedgerError(f"Cannot lock the ledger {self.lock_path}: {exc}. Refusing to train.") from exc
            self._remove_torn_writes()
            yield self._load()

    @property
    def lock_path(self) -> Path:
        return self.path.with_name(self.path.name + ".lock")

    def _existed_before(self) -> bool:
        try:
            return CREATED_MARK.strip() in self.lock_path.read_text(encoding="utf-8", errors="replace")
        except OSError as exc:
            raise LedgerError(f"Ledger lock {self.lock_path} cannot be read: {exc}. Refusing to train.") from exc

    def _mark_created(self) -> None:
        """Record in the lock file (durably) that the ledger exists, so that its loss is detected."""
        if self._existed_before():
            return
        append_durable(self.lock_path, CREATED_MARK.encode())

    def _remove_torn_writes(self) -> None:
        """Remove temporary files of writes interrupted by a crash (only called under the exclusive lock, so no
        write is in flight); the ledger itself is still the last complete version."""
        for tmp in self.path.parent.glob(f".{self.path.name}.*.tmp"):
            log.warning("ledger: removing %s, left by an interrupted write (the ledger is intact)", tmp)
            tmp.unlink(missing_ok=True)

    def _load(self) -> Ledger:
        if not self.path.exists():
            if self._existed_before():
                raise LedgerError(
                    f"Ledger {self.path} is missing, but {self.lock_path.name} records that this site kept a ledger "
                    "there: it was deleted or lost. Refusing to train (spent epsilon would restart from zero). "
                    f"Restore it from a backup; to start a new ledger on purpose, also delete {self.lock_path}."
                )
            return Ledger(self.site, self.epsilon_budget, self.delta, self.accountant)
        try:
            text = self.path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise LedgerError(f"Ledger {self.path} cannot be read: {exc}. Refusing to train.") from exc
        ledger = _parse(self.path, text)
        if ledger.site != self.site:
            raise LedgerError(f"Ledger {self.path} belongs to site {ledger.site!r}, not {self.site!r}.")
        if ledger.delta != self.delta or ledger.accountant != self.accountant:
            raise LedgerError(
                f"Ledger {self.path} was kept at delta={ledger.delta:g} with the {ledger.accountant} accountant; "
                f"the site config says delta={self.delta:g}, {self.accountant}. Epsilons are not comparable."
            )
        if not self._existed_before():  # a ledger written before loss detection existed, or a crash in between
            try:
                self._mark_created()
            except OSError as exc:
                log.warning("ledger: could not record in %s that %s exists: %s", self.lock_path, self.path, exc)
        # The budget may be changed by the site admin (it is the site's own config); what was spent stays.
        ledger.epsilon_budget = self.epsilon_budget
        return ledger

    def charge(self, ledger: Ledger, *, run_id: str, server_round: int, charge: Charge,
               job_id: str = "") -> LedgerEntry:
        """Append a charge if it fits the budget, and persist it atomically before returning. `job_id` ""
        (a server from before job ids): the run id stands in for it."""
        from common.privacy import check_charge

        sigma, q, steps = charge
        if not (math.isfinite(sigma) and sigma > 0 and 0 < q <= 1 and steps >= 1):
            raise LedgerError(f"Refusing an invalid charge sigma={sigma}, q={q}, steps={steps}.")
        after = check_charge(ledger.history, charge, ledger.epsilon_budget, ledger.delta, ledger.accountant)
        entry = LedgerEntry(run_id=run_id, round=server_round, noise_multiplier=sigma, sample_rate=q, steps=steps,
                            delta=ledger.delta, epsilon_after=after, time=time.time(), job_id=job_id)
        ledger.entries.append(entry)
        try:
            write_atomic(self.path, _serialise(ledger), mode=PRIVATE_MODE)
        except OSError as exc:
            ledger.entries.pop()
            raise LedgerError(f"Could not persist ledger {self.path}: {exc}. Refusing to train.") from exc
        try:
            self._mark_created()
        except OSError as exc:  # the charge itself is durable; only the loss detection could not be recorded
            raise LedgerError(f"Could not record the ledger's existence in {self.lock_path}: {exc}. "
                              "Refusing to train.") from exc
        log.info("ledger: site %s charged round %s: sigma=%.4g q=%.4g steps=%d -> epsilon %.4f of %.4g",
                 ledger.site, server_round, sigma, q, steps, after, ledger.epsilon_budget)
        return entry

    def read(self) -> Ledger:
        with self.open() as ledger:
            return ledger


def load_ledger(path: Path) -> Ledger:
    """Read a ledger file as it is (no site config needed, nothing locked or written), for tools that inspect a
    copy of a site's ledger; `LedgerError` if it is missing, unreadable or fails its checksum."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise LedgerError(f"Ledger {path} cannot be read: {exc}.") from exc
    return _parse(path, text)
