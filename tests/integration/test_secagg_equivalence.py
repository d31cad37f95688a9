"""SecAgg+ changes nothing but who sees what: its aggregate equals plain FedAvg of the same updates.

Two one-round simulations with DP off and a fixed seed produce the same department updates; one aggregates
them with SecAgg+, the other in the clear. The global models must agree within SecAgg+'s quantisation error.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from common.config import JobConfig
from common.model import build_model
from common.params import named_state
from server.checkpoint import CHECKPOINT
from simulations.run import simulate
from tests.conftest import TINY_JOB, make_department_frame

pytestmark = pytest.mark.slow

SIZES = {"cardiology": 60, "oncology": 48, "radiology": 40}


def _run(base: Path, data: Path, secagg: bool) -> tuple[dict[str, torch.Tensor], dict]:
    out = base / ("secagg" if secagg else "plain")
    rc = {**TINY_JOB, "num-server-rounds": 1, "dp": False, "secagg": secagg, "sim-data": str(data), "seed": 7,
          "sim-global-eval": False}
    report = simulate(rc, out)
    return torch.load(out / CHECKPOINT)["trainable"], report


def test_secagg_aggregate_equals_fedavg(tmp_path: Path) -> None:
    data = tmp_path / "departments.csv"
    make_department_frame(SIZES).to_csv(data, index=False)
    masked, report = _run(tmp_path, data, secagg=True)
    plain, _ = _run(tmp_path, data, secagg=False)

    cfg = report["config"]
    n_train = [d["n_train"] for d in report["departments"].values()]
    # Each department quantises w * n / max_weight with step 2c/q; the sum is divided by sum(n) / max_weight.
    bound = (len(n_train) * 2 * cfg["secagg-clipping-range"] / cfg["secagg-quantization-range"]
             * cfg["secagg-max-weight"] / sum(n_train))
    assert cfg["secagg-max-weight"] == max(n_train)  # the simulation picks the tightest weight bound

    # The global model before round 1 is rebuilt the way the server built it.
    initial = named_state(build_model(JobConfig.from_run_config(cfg), 2).model)

    assert masked.keys() == plain.keys() == initial.keys()
    errors = [float((masked[k] - plain[k]).abs().max()) for k in plain]
    moved = [float((plain[k] - initial[k]).abs().max()) for k in plain]
    assert max(moved) > 1000 * bound  # the round really changed the model
    assert max(errors) <= bound + 1e-6, f"max error {max(errors):.3g} > bound {bound:.3g}"
    assert np.isfinite(errors).all()
