"""`fedsilo predict`: batched inference with an exported model (`fedsilo export`), CPU or GPU.

The model is loaded the way the export's model card documents for plain `transformers` (and `peft` for an adapter
export), so what `predict` outputs is what any user of the export gets. Input and output are tables in the same
format (CSV, TSV, JSONL or Parquet): the input's columns, the predicted label, one probability column per class.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer, PreTrainedTokenizerBase

from common.data import read_table, table_bytes
from common.errors import ConfigError, DataError, ModelError
from common.files import FileExistsRefusal, write_atomic
from common.model import device, uses_mean_pooling

log = logging.getLogger(__name__)

PREDICTED = "predicted_label"
PROBABILITY = "probability_"  # + label
ADAPTER_CONFIG = "adapter_config.json"


@dataclass(frozen=True)
class ExportedModel:
    model: torch.nn.Module
    tokenizer: PreTrainedTokenizerBase
    labels: tuple[str, ...]
    mean_pooling: bool


def load_export(model_dir: Path) -> ExportedModel:
    """Load an export (merged or adapter); `ConfigError` for a path that is not one."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if not model_dir.is_dir():
        raise ConfigError(f"--model {model_dir} is not a directory (expected the output of `fedsilo export`).")
    config_path = model_dir / "config.json"
    try:
        config = AutoConfig.from_pretrained(model_dir) if config_path.is_file() else None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--model {model_dir}: unreadable config.json ({exc}).") from exc
    if config is None or not getattr(config, "id2label", None) or not (model_dir / "tokenizer_config.json").is_file():
        raise ConfigError(f"--model {model_dir} is not a model export: it needs config.json with id2label and the "
                          "tokenizer files (make one with `fedsilo export RUN_DIR --out DIR`).")
    try:
        if (model_dir / ADAPTER_CONFIG).is_file():
            from peft import PeftConfig, PeftModel

            base = AutoModelForSequenceClassification.from_pretrained(
                PeftConfig.from_pretrained(model_dir).base_model_name_or_path, config=config)
            model = PeftModel.from_pretrained(base, model_dir).merge_and_unload()
        else:
            model = AutoModelForSequenceClassification.from_pretrained(model_dir)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError) as exc:
        raise ModelError(f"Could not load the model in {model_dir}: {exc}") from exc
    labels = tuple(str(config.id2label[i]) for i in range(len(config.id2label)))
    return ExportedModel(model=model.eval(), tokenizer=tokenizer, labels=labels,
                         mean_pooling=uses_mean_pooling(model_dir))


@torch.inference_mode()
def logits(exported: ExportedModel, texts: list[str], *, batch_size: int = 64,
           on_batch: Callable[[int], None] | None = None) -> np.ndarray:
    """The model's logits for `texts` (in order), in batches of similar length."""
    dev = device()
    model = exported.model.to(dev)
    order = np.argsort([len(t) for t in texts], kind="stable")
    out = np.zeros((len(texts), len(exported.labels)), dtype=np.float32)
    for start in range(0, len(texts), batch_size):
        idx = order[start:start + batch_size]
        inputs = exported.tokenizer([texts[i] for i in idx], padding=True, truncation=True,
                                    return_tensors="pt").to(dev)
        if exported.mean_pooling:
            hidden = model.base_model(**inputs).last_hidden_state
            mask = inputs["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            batch = model.classifier((hidden * mask).sum(1) / mask.sum(1).clamp(min=1))
        else:
            batch = model(**inputs).logits
        out[idx] = batch.float().cpu().numpy()
        if on_batch is not None:
            on_batch(len(idx))
    return out


def _texts(frame: pd.DataFrame, column: str, path: Path) -> list[str]:
    if column not in frame.columns:
        raise DataError(f"Input {path} has no column {column!r}; it has {list(frame.columns)}.")
    values = frame[column]
    missing = int(values.isna().sum())
    if missing:
        raise DataError(f"Input {path}: {missing} row(s) have no '{column}'.")
    return values.astype(str).tolist()


def _check_paths(input_path: Path, output: Path) -> None:
    if output.exists() or output.is_symlink():
        raise ConfigError(f"--output {output} exists already; choose a new file.")
    if input_path.suffix.lower() != output.suffix.lower():
        raise ConfigError(f"--output {output} must have the input's format ({input_path.suffix or 'no suffix'}).")
    if not output.parent.is_dir():
        raise ConfigError(f"--output {output}: directory {output.parent} does not exist.")


def predict_file(model_dir: Path, input_path: Path, text_column: str, output: Path, *, batch_size: int = 64,
                 progress: Callable[[int], Callable[[int], None]] | None = None) -> int:
    """Predict every row of `input_path` into the new file `output` (same format); returns the row count.

    Every check happens before the model runs; the output is written to a temporary file and renamed.
    `progress(total)` returns the per-batch callback of a progress display.
    """
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {batch_size}.")
    _check_paths(input_path, output)
    frame = read_table(input_path)
    texts = _texts(frame, text_column, input_path)
    exported = load_export(model_dir)
    new_columns = [PREDICTED] + [PROBABILITY + label for label in exported.labels]
    clash = [c for c in new_columns if c in frame.columns]
    if clash:
        raise DataError(f"Input {input_path} already has column(s) {clash}, which the output adds.")
    scores = logits(exported, texts, batch_size=batch_size,
                    on_batch=progress(len(texts)) if progress is not None else None)
    probabilities = torch.softmax(torch.from_numpy(scores), dim=-1).numpy()
    result = frame.copy()
    result[PREDICTED] = [exported.labels[i] for i in scores.argmax(axis=1)]
    for k, label in enumerate(exported.labels):
        result[PROBABILITY + label] = probabilities[:, k]
    try:
        write_atomic(output, table_bytes(result, output.suffix), overwrite=False)
    except FileExistsRefusal as exc:
        raise ConfigError(f"--output {output} appeared while predicting; nothing was written over it.") from exc
    log.info("predict: %d rows of %s -> %s", len(result), input_path, output)
    return len(result)
