"""Shared checks of an export: fedsilo's own logits vs the README's loader run in a fresh process without fedsilo."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from client.site import simulated_sites
from common.model import device
from common.text import encode, model_inputs
from simulations.runs import global_model, load_run

ROOT = Path(__file__).resolve().parents[2]
FEDSILO_PACKAGES = ("common", "client", "server", "simulations")


def readme_loader() -> str:
    """The README's loading code (between its fedsilo:load-export markers), without its example lines."""
    text = (ROOT / "README.md").read_text()
    block = text.split("<!-- fedsilo:load-export:start -->")[1].split("<!-- fedsilo:load-export:end -->")[0]
    code = re.search(r"```python\n(.*?)```", block, re.S)
    if code is None:
        raise ValueError("README has no load-export code block")
    return code.group(1).split("\nmodel, tokenizer = load(")[0]


def held_out_texts(run_dir: Path) -> list[str]:
    run = load_run(run_dir)
    return [t for site in simulated_sites(run.job, run.sim, run_dir.resolve())
            for t in site.load_split(run.job.label_names).test_texts]


@torch.inference_mode()
def fedsilo_logits(run_dir: Path, texts: list[str]) -> np.ndarray:
    """The global model's logits as fedsilo's evaluation computes them (`common.text.model_inputs`)."""
    run = load_run(run_dir)
    model, tokenizer = global_model(run)
    model.eval()
    data = encode(tokenizer, texts, np.zeros(len(texts), dtype=np.int64), run.job.max_length)
    return model(**model_inputs(data.input_ids, data.attention_mask, device())).logits.cpu().numpy()


def exported_logits(export_dir: Path, texts: list[str], work: Path) -> np.ndarray:
    """Load the export in a fresh Python process that never imports fedsilo, the way the README documents."""
    (work / "texts.json").write_text(json.dumps(texts))
    script = readme_loader() + f"""
import sys, numpy
texts = json.load(open({str(work / 'texts.json')!r}))
model, tokenizer = load({str(export_dir)!r})
numpy.save({str(work / 'logits.npy')!r}, logits({str(export_dir)!r}, model, tokenizer, texts).numpy())
leaked = sorted({{m.split('.')[0] for m in sys.modules}} & set({FEDSILO_PACKAGES!r}))
assert not leaked, leaked
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", script], cwd=work, env=env, capture_output=True, text=True,
                            timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    return np.load(work / "logits.npy")
