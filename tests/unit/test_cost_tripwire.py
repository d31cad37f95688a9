"""The unit tests' tripwire (tests/unit/conftest.py) refuses sleeping, processes, training and pretrained weights."""

from __future__ import annotations

import multiprocessing
import subprocess
import sys
import time

import pytest
import torch
import transformers

from common.config import JobConfig
from common.model import build_model
from tests.unit.conftest import CostTripwire


def test_sleeping_is_refused() -> None:
    with pytest.raises(CostTripwire, match=r"time\.sleep"):
        time.sleep(0.01)


def test_starting_a_process_is_refused() -> None:
    with pytest.raises(CostTripwire, match="subprocess"):
        subprocess.run([sys.executable, "-c", "pass"], check=False)
    with pytest.raises(CostTripwire, match="multiprocessing"):
        multiprocessing.get_context("spawn").Process(target=print).start()


def test_a_backward_pass_is_refused() -> None:
    weight = torch.ones(2, requires_grad=True)
    with pytest.raises(CostTripwire, match="backward"):
        (weight * 2).sum().backward()
    with pytest.raises(CostTripwire, match="backward"):
        torch.autograd.backward((weight * 3).sum())


def test_loading_minilm_is_refused_but_the_tiny_model_builds() -> None:
    with pytest.raises(CostTripwire, match="pretrained"):
        build_model(JobConfig(model="minilm"), 2)
    with pytest.raises(CostTripwire, match="pretrained"):
        transformers.AutoModelForSequenceClassification.from_pretrained("anything")
    assert build_model(JobConfig(model="tiny-random"), 2).model is not None
