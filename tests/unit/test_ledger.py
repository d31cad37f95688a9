"""Unit tests for client.ledger: the persistent, checksummed per-site privacy ledger."""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import pytest

from client.ledger import FORMAT, LedgerFile
from common.errors import BudgetExhaustedError, LedgerError
from common.privacy import epsilon_spent

DELTA = 1e-5
SITE = "cardiology"
CHARGES = [(1.2, 0.02, 50), (0.9, 0.05, 20), (2.0, 0.01, 100)]


def _ledger_file(path: Path, *, site: str = SITE, budget: float = 50.0, delta: float = DELTA,
                 accountant: str = "rdp") -> LedgerFile:
    return LedgerFile(path, site=site, epsilon_budget=budget, delta=delta, accountant=accountant)


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ledger file written by charging the three CHARGES (built once per module; do not modify)."""
    path = tmp_path_factory.mktemp("template") / "ledger.json"
    lf = _ledger_file(path)
    with lf.open() as ledger:
        for i, charge in enumerate(CHARGES, start=1):
            lf.charge(ledger, run_id="run-1", server_round=i, charge=charge)
    return path


@pytest.fixture
def charged(template: Path, tmp_path: Path) -> Path:
    """A private copy of the template ledger that a test may modify."""
    path = tmp_path / "site" / "ledger.json"
    path.parent.mkdir()
    shutil.copy2(template, path)
    return path


def test_missing_file_is_an_empty_ledger(tmp_path: Path) -> None:
    path = tmp_path / "ledger.json"
    ledger = _ledger_file(path).read()
    assert ledger.entries == []
    assert ledger.epsilon == 0.0
    assert ledger.remaining == 50.0
    assert not path.exists()  # reading writes nothing


def test_charge_persists(charged: Path) -> None:
    ledger = _ledger_file(charged).read()
    assert [e.charge for e in ledger.entries] == CHARGES
    assert [e.round for e in ledger.entries] == [1, 2, 3]
    assert {e.run_id for e in ledger.entries} == {"run-1"}
    assert all(e.delta == DELTA for e in ledger.entries)
    expected = epsilon_spent(CHARGES, DELTA)
    assert ledger.epsilon == pytest.approx(expected, rel=1e-12)
    assert ledger.entries[-1].epsilon_after == pytest.approx(expected, rel=1e-12)
    assert ledger.remaining == pytest.approx(50.0 - expected)
    doc = json.loads(charged.read_text())
    assert doc["body"]["format"] == FORMAT
    assert doc["body"]["site"] == SITE
    assert len(doc["body"]["entries"]) == 3


def test_charge_returns_entry_and_updates_in_memory(tmp_path: Path) -> None:
    lf = _ledger_file(tmp_path / "ledger.json")
    with lf.open() as ledger:
        entry = lf.charge(ledger, run_id="r", server_round=7, charge=CHARGES[0])
        assert ledger.entries == [entry]
    assert entry.round == 7
    assert entry.charge == CHARGES[0]
    assert entry.time > 0


def test_file_mode_is_private(template: Path) -> None:
    assert stat.S_IMODE(template.stat().st_mode) == 0o600


def test_file_mode_is_private_despite_permissive_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        lf = _ledger_file(tmp_path / "ledger.json")
        with lf.open() as ledger:
            lf.charge(ledger, run_id="r", server_round=1, charge=CHARGES[0])
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "ledger.json").stat().st_mode) == 0o600


def test_epsilon_after_matches_prefix(charged: Path) -> None:
    entries = _ledger_file(charged).read().entries
    for i, entry in enumerate(entries, start=1):
        assert entry.epsilon_after == pytest.approx(epsilon_spent(CHARGES[:i], DELTA), rel=1e-12)
    afters = [e.epsilon_after for e in entries]
    assert afters == sorted(afters)


def test_budget_change_is_honoured_but_spending_kept(charged: Path) -> None:
    ledger = _ledger_file(charged, budget=123.0).read()
    assert ledger.epsilon_budget == 123.0
    assert len(ledger.entries) == 3


def test_over_budget_charge_leaves_file_unchanged(charged: Path) -> None:
    spent = epsilon_spent(CHARGES, DELTA)
    before = charged.read_bytes()
    lf = _ledger_file(charged, budget=spent + 0.01)
    with lf.open() as ledger, pytest.raises(BudgetExhaustedError):
        lf.charge(ledger, run_id="run-2", server_round=4, charge=(0.5, 0.5, 100))
    assert charged.read_bytes() == before
    assert len(lf.read().entries) == 3


def test_over_budget_charge_leaves_memory_unchanged(tmp_path: Path) -> None:
    lf = _ledger_file(tmp_path / "ledger.json", budget=0.1)
    with lf.open() as ledger:
        with pytest.raises(BudgetExhaustedError):
            lf.charge(ledger, run_id="r", server_round=1, charge=(0.5, 0.5, 100))
        assert ledger.entries == []
    assert not (tmp_path / "ledger.json").exists()


def _flip_byte_in_body(path: Path) -> None:
    data = bytearray(path.read_bytes())
    text = data.decode()
    # change a digit of the first entry's noise multiplier: still valid JSON, different content
    idx = text.index('"noise_multiplier": ') + len('"noise_multiplier": ')
    assert chr(data[idx]).isdigit()
    data[idx] = ord("7") if data[idx] != ord("7") else ord("3")
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _empty(path: Path) -> None:
    path.write_bytes(b"")


def _invalid_json(path: Path) -> None:
    path.write_text("{not json at all")


def _not_an_object(path: Path) -> None:
    path.write_text("[1, 2, 3]")


def _no_checksum(path: Path) -> None:
    doc = json.loads(path.read_text())
    del doc["sha256"]
    path.write_text(json.dumps(doc))


def _wrong_format(path: Path) -> None:
    doc = json.loads(path.read_text())
    doc["body"]["format"] = "fedsilo-ledger/0"
    path.write_text(json.dumps(doc))


def _drop_entry(path: Path) -> None:
    # removing a charge (to free budget) without fixing the checksum
    doc = json.loads(path.read_text())
    doc["body"]["entries"].pop()
    path.write_text(json.dumps(doc))


def _binary_garbage(path: Path) -> None:
    path.write_bytes(b"\xff\xfe\x00garbage")


@pytest.mark.parametrize(
    "corrupt",
    [_flip_byte_in_body, _truncate, _empty, _invalid_json, _not_an_object, _no_checksum, _wrong_format,
     _drop_entry, _binary_garbage],
)
def test_corrupted_ledger_refused_and_not_reset(charged: Path, corrupt) -> None:
    corrupt(charged)
    damaged = charged.read_bytes()
    lf = _ledger_file(charged)
    with pytest.raises(LedgerError):
        lf.read()
    with pytest.raises(LedgerError), lf.open():
        pass
    assert charged.read_bytes() == damaged


def test_foreign_site_refused(charged: Path) -> None:
    with pytest.raises(LedgerError, match="belongs to site"):
        _ledger_file(charged, site="radiology").read()


def test_different_delta_refused(charged: Path) -> None:
    with pytest.raises(LedgerError, match="delta"):
        _ledger_file(charged, delta=1e-6).read()


def test_different_accountant_refused(charged: Path) -> None:
    with pytest.raises(LedgerError, match="accountant"):
        _ledger_file(charged, accountant="prv").read()


@pytest.mark.parametrize(
    "charge",
    [(0.0, 0.1, 10), (-1.0, 0.1, 10), (float("nan"), 0.1, 10), (float("inf"), 0.1, 10),
     (1.0, 1.5, 10), (1.0, 0.0, 10), (1.0, -0.1, 10), (1.0, 0.1, 0), (1.0, 0.1, -5)],
)
def test_invalid_charge_refused(charged: Path, charge: tuple[float, float, int]) -> None:
    before = charged.read_bytes()
    lf = _ledger_file(charged)
    with lf.open() as ledger, pytest.raises(LedgerError, match="invalid charge"):
        lf.charge(ledger, run_id="r", server_round=9, charge=charge)
    assert charged.read_bytes() == before


def test_no_temp_files_left(template: Path) -> None:
    names = sorted(p.name for p in template.parent.iterdir())
    assert names == ["ledger.json", "ledger.json.lock"]
    assert not [n for n in names if n.endswith(".tmp")]


def test_charges_accumulate_across_opens(tmp_path: Path) -> None:
    path = tmp_path / "ledger.json"
    lf = _ledger_file(path)
    for i, charge in enumerate(CHARGES, start=1):
        with lf.open() as ledger:
            assert len(ledger.entries) == i - 1
            lf.charge(ledger, run_id=f"run-{i}", server_round=1, charge=charge)
    ledger = lf.read()
    assert [e.run_id for e in ledger.entries] == ["run-1", "run-2", "run-3"]
    assert ledger.epsilon == pytest.approx(epsilon_spent(CHARGES, DELTA), rel=1e-12)
