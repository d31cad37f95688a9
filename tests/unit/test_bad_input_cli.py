"""Bad input, everywhere a user types or points at something, through the real command line (`main([...])`).

One case per class of bad input. Each must end with exit status 2 and one line `fedsilo: error: ...` naming the
problem, and leave everything already on disk (a site's charged ledger, a previous run's report and checkpoint,
certificates, data) byte-identical, with no new output directory or half-written file. Nothing here may start Ray,
a Flower process or the `flwr` CLI: those entry points are replaced by tripwires.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import re
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import pytest

from client.ledger import LedgerFile
from common import certs
from common.cli import EXIT_ERROR, main
from tests.conftest import make_department_frame

DEPARTMENTS = {"cardiology": 60, "oncology": 48, "radiology": 40}
SITE_TOML = """\
name = "cardiology"
data = "notes.csv"
epsilon = 4.0
delta = 1e-5
ledger = "ledger.json"
server = "127.0.0.1:47999"
"""
POLICY = '\n[policy]\napproved_apps = ["installed"]\n'  # a table: after every top-level key


@dataclass
class World:
    root: Path

    def __truediv__(self, name: str) -> Path:
        return self.root / name

    def write(self, name: str, data: str | bytes) -> Path:
        path = self.root / "inputs" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(data, bytes):
            path.write_bytes(data)
        else:
            path.write_text(data, encoding="utf-8")
        return path

    def site(self, name: str, toml: str, data: str | bytes | None = None) -> Path:
        """A site directory with its TOML (and data file), beside no ledger yet."""
        path = self.write(f"{name}/site.toml", toml)
        if data is not None:
            self.write(f"{name}/notes.csv", data)
        return path


def _good_csv(departments: dict[str, int] = DEPARTMENTS) -> str:
    return make_department_frame(departments).to_csv(index=False)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    w = World(tmp_path_factory.mktemp("world"))
    (w / "data.csv").write_text(_good_csv())
    # a site that has already trained: its ledger must survive every failure below
    site = w / "site"
    site.mkdir()
    (site / "site.toml").write_text(SITE_TOML + "insecure = true\n" + POLICY)
    (site / "notes.csv").write_text(_good_csv({"cardiology": 60}))
    lf = LedgerFile(site / "ledger.json", "cardiology", 4.0, 1e-5, "rdp")
    with lf.open() as ledger:
        lf.charge(ledger, run_id="run-1", server_round=1, charge=(2.0, 0.1, 10))
    # a previous run: report, CSV and checkpoint
    prev = w / "previous-run"
    prev.mkdir()
    (prev / "report.json").write_text('{"rounds": [{"round": 1}], "final": {}}')
    (prev / "rounds.csv").write_text("round\n1\n")
    (prev / "global_model.pt").write_bytes(b"\x80\x02checkpoint")
    # certificates: a good deployment, another CA, and an expired one
    certs.provision(w / "pki", sans=["localhost", "127.0.0.1"], nodes=["cardiology"])
    certs.provision(w / "other-pki", sans=["localhost"])
    long_ago = dt.datetime.now(dt.UTC) - dt.timedelta(days=400)
    with mock.patch("common.certs._now", lambda: long_ago):
        certs.provision(w / "expired-pki", sans=["localhost"], days=30)
    (w / "model-without-config").mkdir()
    return w


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
        yield sock.getsockname()[1]


def _unreadable(w: World) -> Path:
    """A data file this process cannot read: mode 000, or (as root, who reads anything) a read that fails."""
    if os.geteuid() != 0:
        path = w.write("unreadable.csv", _good_csv())
        path.chmod(0)
        return path
    path = w / "inputs" / "unreadable.csv"
    path.parent.mkdir(exist_ok=True)
    if not path.is_symlink():
        path.symlink_to("/proc/self/mem")  # reading offset 0 of one's own memory fails with EIO
    return path


def _simulate(w: World, data: Path | str | None = None, *extra: str) -> list[str]:
    return ["simulate", "--quiet", "--out", str(w / "new-run"), "--data", str(data or w / "data.csv"),
            "--model", "tiny-random", "-c", "batch-size=8", *extra]


def _port_without_listener() -> int:
    """A loopback port nothing listens on (bound for a moment by this process, then freed)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _one_class_csv() -> str:
    frame = make_department_frame(DEPARTMENTS)
    frame.loc[frame["department"] == "oncology", "label"] = "positive"
    return frame.to_csv(index=False)


def _long_text_csv() -> str:
    frame = make_department_frame(DEPARTMENTS)
    frame.loc[3, "text"] = "word " * 20_001
    return frame.to_csv(index=False)


def _corrupt_ledger_site(w: World) -> Path:
    toml = w.site("corrupt", SITE_TOML, _good_csv({"cardiology": 60}))
    ledger = (w / "site" / "ledger.json").read_text().replace('"steps": 10', '"steps": 1')
    w.write("corrupt/ledger.json", ledger)  # fewer steps = less epsilon: the checksum must catch it
    w.write("corrupt/ledger.json.lock", (w / "site" / "ledger.json.lock").read_text())
    return toml


def _lost_ledger_site(w: World) -> Path:
    toml = w.site("lost", SITE_TOML, _good_csv({"cardiology": 60}))
    w.write("lost/ledger.json.lock", (w / "site" / "ledger.json.lock").read_text())  # a ledger existed here
    return toml


def _site_with_ca(w: World, name: str, ca: Path) -> Path:
    toml = SITE_TOML + f'ca = "{ca}"\nnode_key = "{w / "pki" / "cardiology"}"\n' + POLICY
    return w.site(name, toml, _good_csv({"cardiology": 60}))


def _certs_mixing(w: World, name: str, **replace: Path) -> Path:
    """A certs directory copied from the good deployment, with some files replaced by foreign ones."""
    for f in ("ca.crt", "server.pem", "server.key"):
        w.write(f"{name}/{f}", (replace.get(f.replace(".", "_")) or w / "pki" / f).read_bytes())
    return w / "inputs" / name


def _expired_ca_only(w: World) -> Path:
    for f in ("ca.crt", "ca.key"):
        w.write(f"expired-ca/{f}", (w / "expired-pki" / f).read_bytes())
    return w / "inputs" / "expired-ca"


def _server_start(w: World, certs_dir: Path, port: int = 47998) -> list[str]:
    return ["server", "start", "--state-dir", str(w / "new-state"), "--certs", str(certs_dir), "--port", str(port)]


Case = Callable[[World, int], list[str]]
CASES: dict[str, tuple[Case, str]] = {
    # data files
    "data file missing": (lambda w, p: _simulate(w, w / "nope.csv"), r"nope\.csv does not exist"),
    "data file empty": (lambda w, p: _simulate(w, w.write("empty.csv", b"")), r"is empty \(0 bytes\)"),
    "data file header only": (lambda w, p: _simulate(w, w.write("header.csv", "text,label,department\n")),
                              "has no rows"),
    "data file unreadable": (lambda w, p: _simulate(w, _unreadable(w)), "cannot be read"),
    "data file not text": (lambda w, p: _simulate(w, w.write("image.csv", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")),
                           "is not a text file"),
    "data file wrong encoding": (lambda w, p: _simulate(w, w.write("latin1.csv", _good_csv().replace(
        "story", "caf\xe9").encode("latin-1"))), "is not valid UTF-8"),
    "data path is a directory": (lambda w, p: _simulate(w, w / "pki"), "is not a file"),
    "data format unknown": (lambda w, p: _simulate(w, w.write("notes.xlsx", b"PK\x03\x04")), "unsupported format"),
    "missing columns": (lambda w, p: _simulate(w, w.write("columns.csv", _good_csv().replace("text,", "body,", 1))),
                        r"lacks column\(s\) \['text'\]"),
    "labels outside the label set": (lambda w, p: _simulate(w, None, "-c", "labels=neg,pos"),
                                     r"are not in the job's label set \['neg', 'pos'\]"),
    "department with one class": (lambda w, p: _simulate(w, w.write("oneclass.csv", _one_class_csv())),
                                  r"'oncology' has a single class \('positive'\)"),
    "too few examples to sample batches from": (
        lambda w, p: _simulate(w, w.write("tiny.csv", _good_csv({**DEPARTMENTS, "radiology": 4}))),
        r"'radiology' has 3 training example\(s\), fewer than 4"),
    "absurdly long text": (lambda w, p: _simulate(w, w.write("long.csv", _long_text_csv())),
                           "exceed 100000 characters"),
    # run config
    "unknown config key": (lambda w, p: _simulate(w, None, "-c", "learning_rate=0.1"),
                           r"Unknown config key\(s\): learning_rate"),
    "bad config value": (lambda w, p: _simulate(w, None, "-c", "optimizer=adamw"), "'optimizer' must be one of"),
    "epsilon zero": (lambda w, p: _simulate(w, None, "--epsilon", "0"), "'sim-epsilon' must be positive"),
    "epsilon negative for one site": (lambda w, p: _simulate(w, None, "--site-epsilon", "oncology=-1"),
                                      "'sim-site-epsilons' must look like"),
    "delta not below 1/n": (lambda w, p: _simulate(w, None, "--delta", "0.05"),
                            r"delta=0.05 is not below 1/n = 0.0\d+ for department 'cardiology'"),
    "delta not below 1": (lambda w, p: _simulate(w, None, "--delta", "1"), r"'sim-delta' must be in \(0, 1\)"),
    "unknown model path": (lambda w, p: _simulate(w, None, "--model", str(w / "no-such-model")),
                           "is neither 'minilm', 'tiny-random' nor an existing local directory"),
    "model directory without config": (lambda w, p: _simulate(w, None, "--model", str(w / "model-without-config")),
                                       "has no config.json"),
    "ray address without a cluster": (lambda w, p: _simulate(w, None, "--ray-address",
                                                             f"127.0.0.1:{_port_without_listener()}"),
                                      r"No Ray cluster reachable at 127\.0\.0\.1:\d+"),
    "ray address malformed": (lambda w, p: _simulate(w, None, "--ray-address", "head-node"),
                              "Ray address 'head-node' .* must be HOST:PORT"),
    "bench on a ray cluster beyond the scale part": (lambda w, p: ["bench", "--out", str(w / "new-run"), "--quick",
                                                                   "--ray-address", "127.0.0.1:6379"],
                                                     "give --only scale"),
    "output already holds a run": (lambda w, p: ["simulate", "--quiet", "--out", str(w / "previous-run"), "--data",
                                                 str(w / "data.csv")], "already holds a run"),
    # site config and ledger
    "malformed site TOML": (lambda w, p: ["budget", "--site-config", str(w.write("bad.toml", "name = \"x\nepsilon"))],
                            "is not valid TOML"),
    "site config missing": (lambda w, p: ["budget", "--site-config", str(w / "nope.toml")], "cannot be read"),
    "unknown site config key": (lambda w, p: ["budget", "--site-config", str(w.site("unknown", SITE_TOML +
                                                                                     "budget = 3\n"))],
                                r"unknown key\(s\) \['budget'\]"),
    "site epsilon zero": (lambda w, p: ["budget", "--site-config", str(w.site("eps0", SITE_TOML.replace(
        "epsilon = 4.0", "epsilon = 0.0")))], "'epsilon' must be positive"),
    "site delta not below 1": (lambda w, p: ["budget", "--site-config", str(w.site("delta1", SITE_TOML.replace(
        "delta = 1e-5", "delta = 1.0")))], r"'delta' must be in \(0, 1\)"),
    "corrupted ledger": (lambda w, p: ["budget", "--site-config", str(_corrupt_ledger_site(w))],
                         "failed its checksum"),
    "lost ledger": (lambda w, p: ["budget", "--site-config", str(_lost_ledger_site(w))], "is missing, but"),
    # a department starting its client
    "client data missing": (lambda w, p: ["client", "start", "--site-config", str(w.site(
        "nodata", SITE_TOML + POLICY))], r"notes\.csv does not exist"),
    "client data missing columns": (lambda w, p: ["client", "start", "--site-config", str(w.site(
        "badcols", SITE_TOML + POLICY, "body,label\nhello,positive\n"))], r"lacks column\(s\) \['text'\]"),
    "client CA expired": (lambda w, p: ["client", "start", "--site-config", str(_site_with_ca(
        w, "expired-ca", w / "expired-pki" / "ca.crt"))], r"ca\.crt expired on"),
    "client CA is not a CA": (lambda w, p: ["client", "start", "--site-config", str(_site_with_ca(
        w, "not-ca", w / "pki" / "server.pem"))], "is not a CA certificate"),
    "client port in use": (lambda w, p: ["client", "start", "--site-config", str(w / "site" / "site.toml"),
                                         "--port", str(p)], "Cannot listen on 127.0.0.1:{0}"),
    # the coordination server
    "server certificate expired": (lambda w, p: _server_start(w, w / "expired-pki"), "expired on"),
    "server certificate from another CA": (lambda w, p: _server_start(w, _certs_mixing(
        w, "mixed-ca", ca_crt=w / "other-pki" / "ca.crt")), "is not signed by the CA"),
    "server key does not match certificate": (lambda w, p: _server_start(w, _certs_mixing(
        w, "mixed-key", server_key=w / "other-pki" / "server.key")), "is not the private key of the certificate"),
    "server certificates missing": (lambda w, p: _server_start(w, w / "no-certs"), r"server\.pem is missing|ca\.crt "
                                                                                   "is missing"),
    "server port in use": (lambda w, p: _server_start(w, w / "pki", p), "Cannot listen on 127.0.0.1:{0}"),
    "server job with unknown model": (lambda w, p: ["server", "run", "--state-dir", str(w / "new-state"), "--out",
                                                    str(w / "new-run"), "--labels", "negative,positive", "--model",
                                                    str(w / "no-such-model")], "is neither 'minilm'"),
    "server job into a previous run": (lambda w, p: ["server", "run", "--state-dir", str(w / "new-state"), "--out",
                                                     str(w / "previous-run"), "--labels", "a,b"],
                                       "already holds a run"),
    "certs with an expired CA": (lambda w, p: ["certs", "server", "--out", str(_expired_ca_only(w)), "--san",
                                               "localhost"], "expired on"),
}


def _tree(root: Path) -> dict[str, str]:
    out = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_symlink():
            out[rel] = "link:" + os.readlink(path)
        elif path.is_dir():
            out[rel] = "dir"
        elif os.access(path, os.R_OK):
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            out[rel] = f"unreadable:{path.stat().st_size}"
    return out


def _tripwire(*args: object, **kwargs: object) -> None:
    raise AssertionError("bad input must be refused before anything is started")


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_exits_2_with_a_clear_message_and_changes_nothing(case: str, world: World, busy_port: int,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    build, pattern = CASES[case]
    argv = build(world, busy_port)
    before = _tree(world.root)
    with mock.patch("os.execve", _tripwire), mock.patch("flwr.simulation.run_simulation", _tripwire), \
            mock.patch("server.deploy._flwr", _tripwire):
        status = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert status == EXIT_ERROR, err
    errors = [line for line in err if line.startswith("fedsilo: error: ")]
    assert len(errors) == 1, err
    assert re.search(pattern.format(busy_port), errors[0]), errors[0]
    assert _tree(world.root) == before  # nothing created, removed or changed: ledger, report, checkpoint, certs
    assert not (world / "new-run").exists() and not (world / "new-state").exists()


def test_every_issue_class_has_a_case() -> None:
    """The classes listed by issue 4, item 5; each must have at least one case above."""
    wanted = ["missing", "empty", "unreadable", "wrong encoding", "missing columns", "labels outside", "one class",
              "too few examples", "long text", "malformed", "unknown config key", "epsilon zero", "delta not below 1/n",
              "unknown model path", "expired", "from another CA", "port in use"]
    assert [w for w in wanted if not any(w in case for case in CASES)] == []


def test_a_bad_sim_cpus_variable_exits_2_and_changes_nothing(world: World, monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    """The one input that comes from the environment: $FEDSILO_SIM_CPUS (the CPUs a simulation's Ray may use)."""
    monkeypatch.setenv("FEDSILO_SIM_CPUS", "0")
    before = _tree(world.root)
    with mock.patch("flwr.simulation.run_simulation", _tripwire):
        status = main(_simulate(world))
    err = capsys.readouterr().err.strip().splitlines()
    assert status == EXIT_ERROR and err == ["fedsilo: error: $FEDSILO_SIM_CPUS must be a whole number of CPUs, at "
                                            "least 1; got '0'."], err
    assert _tree(world.root) == before and not (world / "new-run").exists()
