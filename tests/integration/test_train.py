"""DP-SGD rounds on the tiny model: exact step accounting, empty Poisson batches, DP off."""

from __future__ import annotations

import numpy as np
import pytest

from client.train import train_round
from common.config import JobConfig
from common.model import build_model, device
from common.params import get_trainable
from common.privacy import sample_rate
from common.text import encode, evaluate
from tests.conftest import make_department_frame


def _data(cfg: JobConfig, n: int):
    frame = make_department_frame({"x": n})
    built = build_model(cfg, 2)
    labels = (frame["label"] == "positive").to_numpy().astype(np.int64)
    return built, encode(built.tokenizer, frame["text"].tolist(), labels, cfg.max_length)


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_opacus_records_exactly_the_requested_steps_even_with_empty_batches(mode: str) -> None:
    # Expected batch size 1 out of 300: about a third of Poisson batches are empty. They must still count as
    # (noise-only) DP-SGD steps, or the ledger and the released noise would disagree.
    cfg = JobConfig(model="tiny-random", batch_size=1, max_length=16, grad_sample_mode=mode)
    built, data = _data(cfg, 300)
    before = get_trainable(built.model)
    result = train_round(built.model, data, cfg, batch_size=cfg.batch_size, steps=20, noise_multiplier=1.3,
                         dev=device(), seed=None)
    q = sample_rate(1, 300)
    assert result.accountant_history == [(1.3, q, 20)]
    assert result.steps == 20
    after = get_trainable(built.model)
    assert any(not np.array_equal(a, b) for a, b in zip(after, before, strict=True))


def test_non_private_round_is_reproducible_with_a_seed() -> None:
    cfg = JobConfig(model="tiny-random", batch_size=8, max_length=16, dp=False)
    runs = []
    for _ in range(2):
        built, data = _data(cfg, 64)
        result = train_round(built.model, data, cfg, batch_size=cfg.batch_size, steps=5, noise_multiplier=None,
                             dev=device(), seed=3)
        assert result.accountant_history == []
        runs.append(get_trainable(built.model))
    for a, b in zip(*runs, strict=True):
        np.testing.assert_array_equal(a, b)


def test_training_learns_the_synthetic_task() -> None:
    cfg = JobConfig(model="tiny-random", batch_size=16, max_length=16, dp=False, learning_rate=0.05)
    built, data = _data(cfg, 256)
    start = evaluate(built.model, data, device())
    train_round(built.model, data, cfg, batch_size=cfg.batch_size, steps=60, noise_multiplier=None,
                dev=device(), seed=0)
    end = evaluate(built.model, data, device())
    assert start.accuracy < 0.6 and end.accuracy > 0.85
    assert end.loss < start.loss / 2
