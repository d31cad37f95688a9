"""Mean pooling on the pretrained MiniLM (loads its weights): padding does not change the logits."""

from __future__ import annotations

import torch

from common.config import JobConfig
from common.model import MaskedMeanPooler, build_model
from common.text import model_inputs


def test_minilm_uses_mean_pooling_and_padding_does_not_change_logits() -> None:
    built = build_model(JobConfig(model="minilm"), 2)
    model = built.model.eval()
    assert isinstance(model.base_model.model.bert.pooler, MaskedMeanPooler)
    short = built.tokenizer(["a fine film"], padding="max_length", max_length=8, return_tensors="pt")
    long = built.tokenizer(["a fine film"], padding="max_length", max_length=24, return_tensors="pt")
    with torch.no_grad():
        # model_inputs trims to the longest row, so pad by hand with a second, longer row
        a = model(input_ids=short["input_ids"], attention_mask=short["attention_mask"]).logits
        b = model(input_ids=long["input_ids"], attention_mask=long["attention_mask"]).logits
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    inputs = model_inputs(long["input_ids"], long["attention_mask"], torch.device("cpu"))
    assert inputs["input_ids"].shape[1] == int(long["attention_mask"].sum())
