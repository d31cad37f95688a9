"""`fedsilo export` of a MiniLM run (mean pooling): merged and adapter exports, loaded without fedsilo."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from common.cli import main
from tests.integration.export_checks import exported_logits, fedsilo_logits, held_out_texts
from tests.integration.trained_run import build_trained_run

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("kind", ["merged", "adapter"])
def test_minilm_export_predicts_what_fedsilo_evaluates(kind: str, tmp_path_factory: pytest.TempPathFactory,
                                                       tmp_path: Path) -> None:
    root = tmp_path_factory.mktemp(f"minilm-{kind}")
    run_dir = build_trained_run(root / "run", model="minilm", noise=0.02)
    out = root / "export"
    assert main(["export", str(run_dir), "--out", str(out), *(["--adapter"] if kind == "adapter" else [])]) == 0
    assert json.loads((out / "1_Pooling" / "config.json").read_text())["pooling_mode_mean_tokens"] is True
    assert not any("pooler" in line for line in (out / "README.md").read_text().splitlines()
                   if line.startswith("| "))
    texts = held_out_texts(run_dir)
    ours = fedsilo_logits(run_dir, texts)
    theirs = exported_logits(out, texts, tmp_path)
    assert float(np.abs(theirs - ours).max()) <= 1e-4
    assert np.ptp(ours, axis=0).max() > 1e-2
