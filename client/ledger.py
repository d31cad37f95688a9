"""A site's persistent privacy ledger: every DP-SGD charge the site has made, for the life of the site.

The file is JSON with a sha256 checksum of its body, written atomically (temporary file, fsync, rename, fsync of
the directory) under an exclusive lock. A missing file means nothing was spent; an unreadable, corrupted or
foreign file raises `LedgerError` and the site refuses to train. Each charge records (round, sigma, q, steps,
delta, epsilon after), so anyone can recompute epsilon with Opacus.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from common.errors import LedgerError

if TYPE_CHECKING:
    from common.privacy import Charge

log = logging.getLogger(__name__)

FORMAT = "fedsilo-ledger/1"


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
        if body.get("format") != FORMAT:
            raise LedgerError(f"Ledger {path} has format {body.get('format')!r}, expected {FORMAT!r}.")
        if _checksum(body) != checksum:
            raise LedgerError(f"Ledger {path} failed its checksum: it was modified or corrupted. Refusing to train.")
        entries = [LedgerEntry(**e) for e in body["entries"]]
        return Ledger(site=str(body["site"]), epsilon_budget=float(body["budget"]["epsilon"]),
                      delta=float(body["budget"]["delta"]), accountant=str(body["accountant"]), entries=entries)
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError, ValueError) as exc:
        raise LedgerError(f"Ledger {path} is unreadable or torn ({exc!r}). Refusing to train.") from exc


def _write_atomic(path: Path, ledger: Ledger) -> None:
    body = ledger.body()
    data = json.dumps({"body": body, "sha256": _checksum(body)}, indent=1, sort_keys=True).encode()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


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
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock_path = self.path.with_name(self.path.name + ".lock")
        with lock_path.open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield self._load()
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _load(self) -> Ledger:
        if not self.path.exists():
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
        # The budget may be changed by the site admin (it is the site's own config); what was spent stays.
        ledger.epsilon_budget = self.epsilon_budget
        return ledger

    def charge(self, ledger: Ledger, *, run_id: str, server_round: int, charge: Charge) -> LedgerEntry:
        """Append a charge if it fits the budget, and persist it atomically before returning."""
        from common.privacy import check_charge

        sigma, q, steps = charge
        if not (math.isfinite(sigma) and sigma > 0 and 0 < q <= 1 and steps >= 1):
            raise LedgerError(f"Refusing an invalid charge sigma={sigma}, q={q}, steps={steps}.")
        after = check_charge(ledger.history, charge, ledger.epsilon_budget, ledger.delta, ledger.accountant)
        entry = LedgerEntry(run_id=run_id, round=server_round, noise_multiplier=sigma, sample_rate=q, steps=steps,
                            delta=ledger.delta, epsilon_after=after, time=time.time())
        ledger.entries.append(entry)
        try:
            _write_atomic(self.path, ledger)
        except OSError as exc:
            ledger.entries.pop()
            raise LedgerError(f"Could not persist ledger {self.path}: {exc}. Refusing to train.") from exc
        log.info("ledger: site %s charged round %s: sigma=%.4g q=%.4g steps=%d -> epsilon %.4f of %.4g",
                 ledger.site, server_round, sigma, q, steps, after, ledger.epsilon_budget)
        return entry

    def read(self) -> Ledger:
        with self.open() as ledger:
            return ledger
