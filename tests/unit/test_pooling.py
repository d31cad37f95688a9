"""Mean pooling for sentence-embedding checkpoints: masked, padding-invariant, installed only where configured."""

from __future__ import annotations

import torch

from common.config import JobConfig
from common.model import MaskedMeanPooler, build_model


def test_masked_mean_ignores_padding() -> None:
    pooler = MaskedMeanPooler()
    hidden = torch.randn(2, 5, 3)
    pooler.mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1]])
    out = pooler(hidden)
    torch.testing.assert_close(out[0], hidden[0, :2].mean(dim=0))
    torch.testing.assert_close(out[1], hidden[1].mean(dim=0))


def test_tiny_random_keeps_bert_pooler() -> None:
    built = build_model(JobConfig(model="tiny-random"), 2)
    assert not isinstance(built.model.base_model.model.bert.pooler, MaskedMeanPooler)
