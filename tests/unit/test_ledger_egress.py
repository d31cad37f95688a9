"""F2: the ledger is checked against the site's hash-chained egress log, by `fedsilo budget --check` and by the site
before it charges. The ledger's checksum is unkeyed, so a forger who removes or rewrites charges can recompute it;
the egress log still records the epsilon the site had spent each time it sent, and a ledger showing less is refused.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import pytest
from flwr.app import Context, Message

from client.egress import EgressAudit
from client.egress_log import check_against_egress, egress_log_path, read_egress_log
from client.ledger import LedgerFile, load_ledger
from client.site import SiteConfig
from common.cli import main
from common.errors import EgressLogError, LedgerBehindEgressError, LedgerError, PrivacyError
from tests.unit.test_egress import _context, _fit_reply, _incoming
from tests.unit.test_ledger_crash import GLOBAL, _department, _Harness

SITE_TOML = 'name = "cardiology"\ndata = "hutto"\nepsilon = 8.0\ndelta = 1e-5\nledger = "ledger.json"\n'
CHARGES = [(3.0, 0.1, 5), (2.5, 0.1, 5), (2.0, 0.1, 5)]


def _site(tmp_path: Path) -> SiteConfig:
    return SiteConfig(name="cardiology", data="hutto", epsilon=8.0, delta=1e-5, ledger=str(tmp_path / "ledger.json"))


@pytest.fixture
def sent(tmp_path: Path) -> Path:
    """A site that trained three rounds: each charge made inside the ClientApp, each reply recorded on its way out.
    Returns the site's TOML file (its ledger and egress log beside it)."""
    site = _site(tmp_path)
    ledger = LedgerFile(Path(site.ledger), site.name, site.epsilon, site.delta, site.accountant)
    audit = EgressAudit(lambda _: site)
    for server_round, charge in enumerate(CHARGES, start=1):
        def train(msg: Message, ctxt: Context, server_round: int = server_round,
                  charge: tuple[float, float, int] = charge) -> Message:
            with ledger.open() as opened:
                ledger.charge(opened, run_id="7", server_round=server_round, charge=charge, job_id="job-a")
            return _fit_reply(msg)

        audit.mod(_incoming(group=str(server_round)), _context(), train)
    toml = tmp_path / "site.toml"
    toml.write_text(SITE_TOML, encoding="utf-8")
    return toml


def _forge(path: Path, edit: str) -> None:
    """Edit the ledger's charges and recompute its (unkeyed) checksum, as anyone with write access can."""
    doc = json.loads(path.read_text())
    entries = doc["body"]["entries"]
    if edit == "drop_last":  # also what restoring an older copy of the ledger looks like
        entries.pop()
    elif edit == "drop_middle":  # the last charge's epsilon_after (the highest) stays
        entries.pop(1)
    elif edit == "more_noise":  # every recorded epsilon stays; the charges themselves claim less
        for e in entries:
            e["noise_multiplier"] *= 4
    doc["sha256"] = hashlib.sha256(json.dumps(doc["body"], sort_keys=True).encode()).hexdigest()
    path.write_text(json.dumps(doc))


def _budget_check(toml: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Opacus' RDP warnings for extreme orders
        code = main(["budget", "--site-config", str(toml), "--check"])
    out, err = capsys.readouterr()
    return code, out, err


def test_an_honest_ledger_agrees_with_the_egress_log(sent: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _budget_check(sent, capsys)
    assert code == 0, err
    assert "egress cross-check" in out and "agrees" in out and "job job-a" in out
    ledger = load_ledger(sent.parent / "ledger.json")
    records = read_egress_log(egress_log_path(sent.parent / "ledger.json"))
    assert check_against_egress(ledger, records, Path("e"), Path("l")) == ledger.epsilon_recorded > 0


@pytest.mark.parametrize("edit", ["drop_last", "drop_middle", "more_noise"])
def test_budget_check_refuses_a_forged_rechecksummed_ledger(sent: Path, edit: str,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    ledger_path = sent.parent / "ledger.json"
    _forge(ledger_path, edit)
    load_ledger(ledger_path)  # the recomputed checksum passes: the checksum alone cannot tell
    code, out, err = _budget_check(sent, capsys)
    assert code == 2
    assert out == ""  # nothing of the forged ledger is shown as if it were true
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fedsilo: error: Site cardiology: ")
    assert "egress log" in lines[0] and "Refusing to trust it" in lines[0]


def test_a_ledger_deleted_with_its_lock_file_is_refused_while_the_egress_log_remains(
        sent: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (sent.parent / "ledger.json").unlink()
    (sent.parent / "ledger.json.lock").unlink()  # so that the ledger's own loss detection cannot tell
    code, _, err = _budget_check(sent, capsys)
    assert code == 2 and "shows epsilon 0 spent, but its egress log" in err


@pytest.mark.parametrize("edit", ["drop_last", "drop_middle", "more_noise"])
def test_the_site_refuses_to_charge_against_a_forged_ledger(sent: Path, edit: str) -> None:
    tmp = sent.parent
    _forge(tmp / "ledger.json", edit)
    before = (tmp / "ledger.json").read_bytes()
    harness = _Harness(tmp, budget=8.0)
    dept = _department(tmp, 8.0, 40, "run-8", rounds=2)
    with harness.patched(None, dept), pytest.raises(LedgerBehindEgressError, match="egress log") as caught:
        dept.fit(GLOBAL, 1, 2, None, job_id="job-b")
    assert isinstance(caught.value, LedgerError) and isinstance(caught.value, PrivacyError)
    assert (tmp / "ledger.json").read_bytes() == before and harness.trained_with == []


def test_the_site_charges_when_ledger_and_egress_log_agree(sent: Path) -> None:
    tmp = sent.parent
    harness = _Harness(tmp, budget=8.0)
    outcome = harness.fit(_department(tmp, 8.0, 40, "run-8", rounds=2), None, 1, 2)
    assert outcome is not None and harness.trained_with == [len(CHARGES) + 1]


def test_an_egress_record_without_a_usable_epsilon_fails_closed(sent: Path) -> None:
    ledger = load_ledger(sent.parent / "ledger.json")
    records = read_egress_log(egress_log_path(sent.parent / "ledger.json"))
    records[0] = records[0] | {"epsilon_after": None}
    with pytest.raises(EgressLogError, match="no usable epsilon_after"):
        check_against_egress(ledger, records, Path("e"), Path("l"))
