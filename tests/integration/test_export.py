"""`fedsilo export` and `fedsilo predict` on a trained tiny-random run (fast; MiniLM in test_export_minilm.py)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from client.ledger import load_ledger
from common.cli import EXIT_ERROR, main
from common.data import table_bytes
from server.records import read_report
from server.report import REPORT_JSON
from tests.integration.export_checks import exported_logits, fedsilo_logits, held_out_texts
from tests.integration.trained_run import LABELS, build_trained_run

FORMATS = (".csv", ".tsv", ".jsonl", ".parquet")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_trained_run(tmp_path_factory.mktemp("export") / "run")


@pytest.fixture(scope="module")
def exports(run_dir: Path) -> dict[str, Path]:
    out = {}
    for kind, extra in (("merged", []), ("adapter", ["--adapter"])):
        out[kind] = run_dir.parent / kind
        assert main(["export", str(run_dir), "--out", str(out[kind]), *extra]) == 0
    return out


def _one_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("fedsilo: error: ")]
    assert len(errors) == 1, err
    return errors[0]


@pytest.mark.parametrize("kind", ["merged", "adapter"])
def test_export_predicts_what_fedsilo_evaluates(kind: str, run_dir: Path, exports: dict[str, Path],
                                                tmp_path: Path) -> None:
    texts = held_out_texts(run_dir)
    ours = fedsilo_logits(run_dir, texts)
    theirs = exported_logits(exports[kind], texts, tmp_path)
    assert theirs.shape == ours.shape == (len(texts), len(LABELS))
    assert float(np.abs(theirs - ours).max()) <= 1e-4
    assert np.ptp(ours, axis=0).max() > 1e-2  # the check compares real outputs, not constants


def test_merged_export_is_a_plain_transformers_model(exports: dict[str, Path]) -> None:
    merged = exports["merged"]
    config = json.loads((merged / "config.json").read_text())
    assert config["id2label"] == {str(i): label for i, label in enumerate(LABELS)}
    assert config["label2id"] == {label: i for i, label in enumerate(LABELS)}
    assert (merged / "model.safetensors").is_file() and (merged / "tokenizer.json").is_file()
    assert not (merged / "adapter_config.json").exists()
    adapter = json.loads((exports["adapter"] / "adapter_config.json").read_text())
    assert Path(adapter["base_model_name_or_path"]) == exports["adapter"].resolve() / "base_model"


def _card(export: Path) -> tuple[dict, str]:
    text = (export / "README.md").read_text()
    _, meta, body = text.split("---\n", 2)
    return yaml.safe_load(meta), body


def test_model_card_states_the_run_and_its_ledgers(run_dir: Path, exports: dict[str, Path]) -> None:
    meta, body = _card(exports["merged"])
    assert meta["pipeline_tag"] == "text-classification" and "differential-privacy" in meta["tags"]
    report = read_report(run_dir / REPORT_JSON)
    for name, size in report.departments.items():
        ledger = load_ledger(run_dir / "sites" / name / "ledger.json")
        row = f"| {name} | {size.n_train} | {size.n_test} | {ledger.entries[-1].epsilon_after:.4f} | 1e-05 | rdp | " \
              "site ledger, cross-checked |"
        assert row in body
    assert "one record (example) of one department" in body
    assert "does **not** cover" in body
    assert "reconstruction-threshold" in body and "0.67" in body
    assert re.search(r"Run config sha256: `[0-9a-f]{64}`", body)
    for package in ("torch", "transformers", "peft", "opacus", "flwr", "fedsilo"):
        assert f"{package} " in body.split("Versions:")[1]
    info = json.loads((exports["merged"] / "fedsilo_export.json").read_text())
    assert info["labels"] == list(LABELS) and info["rounds"] == 2


def _tamper_report_epsilon(run_dir: Path, target: Path) -> Path:
    import shutil

    shutil.copytree(run_dir, target)
    doc = json.loads((target / REPORT_JSON).read_text())
    name = sorted(doc["departments"])[0]
    doc["rounds"][-1]["departments"][name]["epsilon"] = 1.0  # the report claims less than the ledger charged
    (target / REPORT_JSON).write_text(json.dumps(doc))
    return target


def test_export_refuses_a_report_its_ledgers_do_not_back(run_dir: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    tampered = _tamper_report_epsilon(run_dir, tmp_path / "tampered")
    out = tmp_path / "out"
    assert main(["export", str(tampered), "--out", str(out)]) == EXIT_ERROR
    assert "records no charge with that epsilon" in _one_error(capsys)
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["tampered"]


@pytest.mark.parametrize(("argv", "message"), [
    (["--adapter", "--ledger", "nosuch=x.json"], "does not have"),
    (["--ledger", "radiology=missing.json"], "cannot be read"),
])
def test_export_bad_options(argv: list[str], message: str, run_dir: Path, tmp_path: Path,
                            capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert main(["export", str(run_dir), "--out", str(out), *argv]) == EXIT_ERROR
    assert message in _one_error(capsys)
    assert list(tmp_path.iterdir()) == []


def test_export_refuses_an_existing_out_and_a_non_run(run_dir: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "taken").mkdir()
    assert main(["export", str(run_dir), "--out", str(tmp_path / "taken")]) == EXIT_ERROR
    assert "exists already" in _one_error(capsys)
    assert main(["export", str(tmp_path), "--out", str(tmp_path / "new")]) == EXIT_ERROR
    assert "not the output directory of a finished run" in _one_error(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


def _input(tmp_path: Path, suffix: str) -> tuple[Path, pd.DataFrame]:
    frame = pd.DataFrame({"id": ["a", "b", "c", "d"], "text": ["great good", "awful bad", "fine okay", "lovely"]})
    path = tmp_path / f"in{suffix}"
    path.write_bytes(table_bytes(frame, suffix))
    return path, frame


@pytest.mark.parametrize("suffix", FORMATS)
def test_predict_round_trips_every_format(suffix: str, exports: dict[str, Path], tmp_path: Path) -> None:
    from common.data import read_table

    path, frame = _input(tmp_path, suffix)
    out = tmp_path / f"out{suffix}"
    assert main(["predict", "--model", str(exports["merged"]), "--input", str(path), "--text-column", "text",
                 "--output", str(out), "--quiet"]) == 0
    result = read_table(out)
    assert list(result.columns) == ["id", "text", "predicted_label", *[f"probability_{label}" for label in LABELS]]
    assert result["id"].astype(str).tolist() == frame["id"].tolist()
    assert result["text"].astype(str).tolist() == frame["text"].tolist()
    probs = result[[f"probability_{label}" for label in LABELS]].astype(float).to_numpy()
    assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert [LABELS[i] for i in probs.argmax(axis=1)] == result["predicted_label"].astype(str).tolist()


def test_predict_agrees_with_the_export_loaded_without_fedsilo(exports: dict[str, Path], tmp_path: Path) -> None:
    path, frame = _input(tmp_path, ".csv")
    out = tmp_path / "out.csv"
    assert main(["predict", "--model", str(exports["adapter"]), "--input", str(path), "--output", str(out),
                 "--quiet"]) == 0
    theirs = exported_logits(exports["adapter"], frame["text"].tolist(), tmp_path)
    expected = [LABELS[i] for i in theirs.argmax(axis=1)]
    assert pd.read_csv(out)["predicted_label"].tolist() == expected


def _bad_inputs(tmp_path: Path, exports: dict[str, Path]) -> dict[str, tuple[list[str], str]]:
    good, _ = _input(tmp_path, ".csv")
    (tmp_path / "empty.csv").write_bytes(b"")
    (tmp_path / "binary.csv").write_bytes(b"\x00\x01\x02 not text")
    (tmp_path / "exists.csv").write_text("keep me")
    (tmp_path / "notexport").mkdir()
    model = str(exports["merged"])
    return {
        "missing column": (["--model", model, "--input", str(good), "--text-column", "body", "--output",
                            str(tmp_path / "o1.csv")], "has no column 'body'"),
        "empty file": (["--model", model, "--input", str(tmp_path / "empty.csv"), "--output",
                        str(tmp_path / "o2.csv")], "is empty"),
        "binary file": (["--model", model, "--input", str(tmp_path / "binary.csv"), "--output",
                         str(tmp_path / "o3.csv")], "not a text file"),
        "not an export": (["--model", str(tmp_path / "notexport"), "--input", str(good), "--output",
                           str(tmp_path / "o4.csv")], "is not a model export"),
        "output exists": (["--model", model, "--input", str(good), "--output", str(tmp_path / "exists.csv")],
                          "exists already"),
        "other format": (["--model", model, "--input", str(good), "--output", str(tmp_path / "o5.jsonl")],
                         "must have the input's format"),
    }


@pytest.mark.parametrize("case", ["missing column", "empty file", "binary file", "not an export", "output exists",
                                  "other format"])
def test_predict_bad_input_exits_2_and_writes_nothing(case: str, exports: dict[str, Path], tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    argv, message = _bad_inputs(tmp_path, exports)[case]
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    assert main(["predict", *argv, "--quiet"]) == EXIT_ERROR
    assert message in _one_error(capsys)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before


def test_full_finetune_exports_merged_and_refuses_adapter(tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    run = build_trained_run(tmp_path / "run", finetune="full", noise=0.05)
    assert main(["export", str(run), "--out", str(tmp_path / "adapter"), "--adapter"]) == EXIT_ERROR
    assert "--adapter needs a LoRA run" in _one_error(capsys)
    assert not (tmp_path / "adapter").exists()
    assert main(["export", str(run), "--out", str(tmp_path / "full")]) == 0
    texts = held_out_texts(run)
    work = tmp_path / "work"
    work.mkdir()
    assert float(np.abs(exported_logits(tmp_path / "full", texts, work) - fedsilo_logits(run, texts)).max()) <= 1e-4
    assert "all weights fine-tuned" in (tmp_path / "full" / "README.md").read_text()


def test_deployment_run_exports_with_the_ledgers_given(run_dir: Path, tmp_path: Path) -> None:
    """A deployment's run directory holds no ledgers (each site keeps its own): the card marks the departments
    whose ledger copy is not given as reported by the site, and checks those given with --ledger."""
    import shutil

    deployed = tmp_path / "deployed"
    shutil.copytree(run_dir, deployed, ignore=shutil.ignore_patterns("sites"))
    ledger = run_dir / "sites" / "radiology" / "ledger.json"
    assert main(["export", str(deployed), "--out", str(tmp_path / "out"), "--ledger", f"radiology={ledger}"]) == 0
    body = (tmp_path / "out" / "README.md").read_text()
    assert "| radiology |" in body and "site ledger, cross-checked |" in body.split("| radiology |")[1].split("\n")[0]
    assert "reported by the site (ledger not presented)" in body.split("| cardiology |")[1].split("\n")[0]
    wrong = run_dir / "sites" / "cardiology" / "ledger.json"
    assert main(["export", str(deployed), "--out", str(tmp_path / "out2"), "--ledger", f"radiology={wrong}"]) \
        == EXIT_ERROR
    assert not (tmp_path / "out2").exists()
