"""Unit tests stay cheap: a tripwire refuses what only `tests/integration` may do.

A unit test runs in milliseconds, in this process, on the tiny random model: no sleeping, no child processes, no
training (backward passes) and no loading of pretrained weights (MiniLM). Each of those raises `CostTripwire`
here, naming what to do instead; a test that needs one belongs in `tests/integration/`.
"""

from __future__ import annotations

import multiprocessing.process
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from typing import Any, NoReturn

import pytest
import torch
import transformers


class CostTripwire(RuntimeError):
    """A unit test did something only an integration test may do."""


def _refuse(what: str) -> Callable[..., NoReturn]:
    def refuse(*_args: Any, **_kwargs: Any) -> NoReturn:
        raise CostTripwire(f"{what} in a unit test: tests/unit runs in seconds, in one process, without sleeping, "
                           "training or pretrained weights. Fake it, or move the test to tests/integration/.")

    return refuse


TRIPWIRES: list[tuple[object, str, str]] = [
    (time, "sleep", "time.sleep"),
    (subprocess, "Popen", "starting a process (subprocess)"),
    (os, "system", "starting a process (os.system)"),
    (os, "fork", "starting a process (os.fork)"),
    (os, "posix_spawn", "starting a process (os.posix_spawn)"),
    (multiprocessing.process.BaseProcess, "start", "starting a process (multiprocessing)"),
    (torch.Tensor, "backward", "a backward pass (training)"),
    (torch.autograd, "backward", "a backward pass (training)"),
    (transformers.PreTrainedModel, "from_pretrained", "loading pretrained weights (MiniLM)"),
    (transformers.AutoModelForSequenceClassification, "from_pretrained", "loading pretrained weights (MiniLM)"),
]


@pytest.fixture(autouse=True)
def _unit_tests_stay_cheap(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for owner, name, what in TRIPWIRES:
        monkeypatch.setattr(owner, name, _refuse(what))
    yield
