"""Tokenised datasets and evaluation, shared by department clients and the simulation's global evaluation."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True)
class Encoded:
    """Token ids padded to `max_length`, attention masks and labels; batches are trimmed to their longest row."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def dataset(self) -> torch.utils.data.TensorDataset:
        return torch.utils.data.TensorDataset(self.input_ids, self.attention_mask, self.labels)


def encode(tokenizer: PreTrainedTokenizerBase, texts: list[str], labels: np.ndarray, max_length: int) -> Encoded:
    enc = tokenizer(texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    # torch.tensor copies: labels may be a read-only view (pandas), which torch.as_tensor would share and warn about
    return Encoded(enc["input_ids"], enc["attention_mask"], torch.tensor(np.asarray(labels), dtype=torch.long))


def model_inputs(input_ids: torch.Tensor, attention_mask: torch.Tensor, dev: torch.device) -> dict[str, torch.Tensor]:
    """Forward kwargs for a batch, trimmed to its longest sequence.

    Position and token-type ids are passed batch-sized: BERT's default buffers have batch size 1, which breaks
    Opacus' per-sample gradients.
    """
    width = max(1, int(attention_mask.sum(dim=1).max().item())) if len(attention_mask) else 1
    ids = input_ids[:, :width].to(dev)
    mask = attention_mask[:, :width].to(dev)
    positions = torch.arange(width, device=dev).unsqueeze(0).expand(ids.shape[0], -1)
    return {"input_ids": ids, "attention_mask": mask, "position_ids": positions,
            "token_type_ids": torch.zeros_like(ids)}


@dataclass(frozen=True)
class EvalResult:
    loss: float
    correct: int
    n: int

    @property
    def accuracy(self) -> float:
        return self.correct / self.n if self.n else 0.0


@torch.inference_mode()
def evaluate(model: torch.nn.Module, data: Encoded, dev: torch.device, batch_size: int = 256) -> EvalResult:
    """Mean cross-entropy and correct count of `model` on `data` (sorted by length so batches pad little)."""
    model.to(dev)
    model.eval()
    order = torch.argsort(data.attention_mask.sum(dim=1))
    total_loss, correct = 0.0, 0
    for start in range(0, len(data), batch_size):
        idx = order[start:start + batch_size]
        logits = model(**model_inputs(data.input_ids[idx], data.attention_mask[idx], dev)).logits
        labels = data.labels[idx].to(dev)
        total_loss += float(torch.nn.functional.cross_entropy(logits, labels, reduction="sum"))
        correct += int((logits.argmax(dim=-1) == labels).sum())
    return EvalResult(loss=total_loss / max(1, len(data)), correct=correct, n=len(data))
