"""SecAgg+ changes nothing but who sees what, and the server really sees nothing of one department.

Two one-round simulations of 5 small departments, with DP off and a fixed seed, produce the same department
updates; one aggregates them with SecAgg+ (each department's neighbourhood: all 5), the other in the clear.
Everything the server receives is recorded (its Grid is wrapped). Then:
- the global models agree within SecAgg+'s quantisation error, and the SecAgg+ aggregate equals FedAvg of the
  departments' true (pre-quantisation) updates, as the server of the clear run received them;
- what the SecAgg+ server received from each department (its masked vector) is uncorrelated with that
  department's true update (|Pearson r| < 0.05 per department), whereas its unmasked quantised update would be
  perfectly correlated (the check has power);
- everything leaving the departments (intercepted by an outermost client mod) passes the egress check.
A third run of the same departments, SecAgg+ with neighbourhoods of 3 (`secagg-num-shares` 3), checks the
aggregate when each department's keys are shared with only some of the others, and each department unmasked from
exactly the threshold number of its shares; two more SecAgg+ runs there, in each of which one department dies
(before its masked update leaves; in the unmask stage), check that the aggregate is FedAvg of the departments whose
masked updates arrived.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import Context, Message, MessageType
from flwr.common import bytes_to_ndarray

import server.app
import server.secagg
from client.compat import RECORD_KEY_CONFIGS, ClientAppCallable, Mod, SecAggKey
from common import keys
from common.compat import quantize
from common.config import JobConfig
from common.model import build_model
from common.params import named_state
from server.checkpoint import CHECKPOINT
from server.compat import SECAGG_CONFIGS_RECORD as SERVER_SECAGG_RECORD
from server.secagg import trim_shares
from simulations.run import simulate
from tests.conftest import TINY_JOB, make_department_frame
from tests.integration.egress_checks import capture_mod, check_egress, load_captured

pytestmark = pytest.mark.slow

log = logging.getLogger(__name__)

# Five departments: by default each shares its keys with the 4 others; with neighbourhoods of 3, with 2 of them
# (threshold 2 of 3 shares): as small as a neighbourhood smaller than the federation can be.
SIZES = {"cardiology": 20, "oncology": 18, "radiology": 16, "neurology": 14, "urology": 12}
NEIGHBOURHOOD = 3
# LoRA rank 64 on the tiny model: ~16k exchanged values, so |r| of independent vectors is ~0.008 (sd).
JOB = {**TINY_JOB, "lora-r": 64, "lora-alpha": 128}
MAX_ABS_CORRELATION = 0.05


def _snapshot(reply: Message) -> dict[str, Any]:
    """Copy what matters out of a reply now: Flower's workflow consumes records once it has read them."""
    content = reply.content
    arrays = content.array_records.get("fitres.parameters")
    cfg = content.config_records.get(RECORD_KEY_CONFIGS)
    metrics = content.config_records.get("fitres.metrics")
    n = content.metric_records.get("fitres.num_examples")
    return {
        "department": None if metrics is None else str(metrics[keys.M_DEPARTMENT]),
        "update": None if not arrays else [a.numpy().copy() for a in arrays.values()],
        "num_examples": None if n is None else int(n["num_examples"]),
        "masked": (None if cfg is None or SecAggKey.MASKED_PARAMETERS not in cfg
                   else [bytes_to_ndarray(b) for b in cfg[SecAggKey.MASKED_PARAMETERS]]),
        "share_destinations": (None if cfg is None or SecAggKey.DESTINATION_LIST not in cfg
                               else len(cfg[SecAggKey.DESTINATION_LIST])),
    }


class RecordingGrid:
    """The server's Grid, unchanged, except that it keeps a copy of every reply it hands to the server."""

    def __init__(self, grid: Any) -> None:
        self._grid = grid
        self.replies: list[dict[str, Any]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def send_and_receive(self, messages: Iterable[Message], *args: Any, **kwargs: Any) -> Iterable[Message]:
        return self._keep(self._grid.send_and_receive(messages, *args, **kwargs))

    def pull_messages(self, *args: Any, **kwargs: Any) -> Iterable[Message]:
        """fedsilo's stage-timeout grid pushes and polls (server.secagg.StageTimeoutGrid)."""
        return self._keep(self._grid.pull_messages(*args, **kwargs))

    def _keep(self, replies: Iterable[Message]) -> list[Message]:
        replies = list(replies)
        self.replies.extend(_snapshot(r) for r in replies if r.has_content())
        return replies


def _run(base: Path, data: Path, secagg: bool, mods: Sequence[Mod] = (), **extra: Any) -> dict[str, Any]:
    out = base / ("secagg" if secagg else "plain")
    captured = base / f"captured-{out.name}"
    captured.mkdir()
    rc = {**JOB, "num-server-rounds": 1, "dp": False, "secagg": secagg, "sim-data": str(data), "seed": 7,
          "sim-global-eval": False, **extra}
    grids: list[RecordingGrid] = []
    unmasked_from: list[dict[int, int]] = []  # per unmask stage: department -> shares its secret was combined from
    original = server.app.run_workflow

    def recording_workflow(grid: Any, *args: Any) -> None:
        grids.append(RecordingGrid(grid))
        original(grids[-1], *args)

    def counting_trim(replies: list[Message], threshold: int) -> None:
        trim_shares(replies, threshold)
        counts: dict[int, int] = {}
        for reply in replies:
            if not reply.has_error():
                for owner in reply.content.config_records[SERVER_SECAGG_RECORD][SecAggKey.NODE_ID_LIST]:
                    counts[int(owner)] = counts.get(int(owner), 0) + 1
        unmasked_from.append(counts)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(server.app, "run_workflow", recording_workflow)
        mp.setattr(server.secagg, "trim_shares", counting_trim)
        report = simulate(rc, out, client_mods=[*mods, capture_mod(captured)])
    return {"global": torch.load(out / CHECKPOINT)["trainable"], "report": report,
            "replies": [r for g in grids for r in g.replies], "unmasked_from": unmasked_from,
            "captured": load_captured(captured)}


@pytest.fixture(scope="module")
def federation_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    data = tmp_path_factory.mktemp("federation") / "departments.csv"
    make_department_frame(SIZES).to_csv(data, index=False)
    return data


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, federation_data: Path) -> dict[str, dict[str, Any]]:
    base = tmp_path_factory.mktemp("secagg")
    return {"secagg": _run(base, federation_data, secagg=True), "plain": _run(base, federation_data, secagg=False)}


@pytest.fixture(scope="module")
def neighbourhood_runs(tmp_path_factory: pytest.TempPathFactory, federation_data: Path,
                       runs: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Neighbourhoods of 3: SecAgg+; and the same departments' run in the clear."""
    base = tmp_path_factory.mktemp("neighbourhood")
    return {"secagg": _run(base, federation_data, secagg=True, **{"secagg-num-shares": NEIGHBOURHOOD}),
            "plain": runs["plain"]}


def _true_updates(plain: dict[str, Any]) -> dict[str, tuple[list[np.ndarray], int]]:
    """Each department's update and weight, as the server of the clear run received them."""
    return {r["department"]: (r["update"], r["num_examples"]) for r in plain["replies"] if r["update"]}


def _masked_vectors(secagg: dict[str, Any]) -> dict[str, list[np.ndarray]]:
    """What the SecAgg+ server received from each department in the collect-masked-vectors stage."""
    return {r["department"]: r["masked"] for r in secagg["replies"] if r["masked"] is not None}


def _shapes(report: dict[str, Any]) -> list[tuple[int, ...]]:
    model = build_model(JobConfig.from_run_config(report["config"]), 2).model
    return [tuple(p.shape) for p in model.parameters() if p.requires_grad]


def _check_aggregate(runs: dict[str, dict[str, Any]], sizes: dict[str, int], same_as_plain: bool = True) -> None:
    """The SecAgg+ run's global model is FedAvg of the true updates of the departments `sizes` names (as the clear
    run's server received them); with `same_as_plain`, also the clear run's global model (everyone took part)."""
    masked, plain = runs["secagg"]["global"], runs["plain"]["global"]
    report = runs["secagg"]["report"]
    cfg = report["config"]
    n_train = [d["n_train"] for name, d in report["departments"].items() if name in sizes]
    # Each department quantises w * n / max_weight with step 2c/q; the sum is divided by sum(n) / max_weight.
    bound = (len(n_train) * 2 * cfg["secagg-clipping-range"] / cfg["secagg-quantization-range"]
             * cfg["secagg-max-weight"] / sum(n_train))
    assert cfg["secagg-max-weight"] == max(d["n_train"] for d in report["departments"].values())  # the tightest

    # The global model before round 1 is rebuilt the way the server built it.
    initial = named_state(build_model(JobConfig.from_run_config(cfg), 2).model)
    assert masked.keys() == plain.keys() == initial.keys()
    errors = [float((masked[k] - plain[k]).abs().max()) for k in plain]
    moved = [float((plain[k] - initial[k]).abs().max()) for k in plain]
    assert max(moved) > 1000 * bound  # the round really changed the model
    if same_as_plain:
        assert max(errors) <= bound + 1e-6, f"max error {max(errors):.3g} > bound {bound:.3g}"

    # FedAvg of the true updates (as sent in the clear), applied to the initial model, is the SecAgg+ result.
    true = {name: update for name, update in _true_updates(runs["plain"]).items() if name in sizes}
    assert sorted(true) == sorted(sizes)
    total = sum(n for _, n in true.values())
    fedavg = [sum(u[i].astype(np.float64) * n for u, n in true.values()) / total for i in range(len(initial))]
    for (name, start), avg in zip(initial.items(), fedavg, strict=True):
        expected = start.numpy().astype(np.float64) + avg
        assert np.abs(masked[name].numpy() - expected).max() <= bound + 1e-6, name


def test_secagg_aggregate_equals_fedavg_of_true_updates(runs: dict[str, dict[str, Any]]) -> None:
    _check_aggregate(runs, SIZES)
    # The default neighbourhood (31) is every department of a small federation: each shares with the 2 others.
    assert [r["share_destinations"] for r in runs["secagg"]["replies"]
            if r["share_destinations"] is not None] == [len(SIZES) - 1] * len(SIZES)


def test_secagg_aggregate_equals_fedavg_at_a_neighbourhood_smaller_than_the_federation(
        neighbourhood_runs: dict[str, dict[str, Any]]) -> None:
    secagg = neighbourhood_runs["secagg"]
    assert secagg["report"]["config"]["secagg-num-shares"] == NEIGHBOURHOOD
    # Each department shared its keys with 2 others only, not with all 4 ...
    assert [r["share_destinations"] for r in secagg["replies"]
            if r["share_destinations"] is not None] == [NEIGHBOURHOOD - 1] * len(SIZES)
    # ... each department's secret was combined from exactly the threshold (2 of its 3 shares) ...
    assert len(secagg["unmasked_from"]) == 1
    assert sorted(secagg["unmasked_from"][0].values()) == [2] * len(SIZES)
    # ... and the aggregate is still FedAvg of the true updates.
    _check_aggregate(neighbourhood_runs, SIZES)


def test_server_view_is_independent_of_each_update(runs: dict[str, dict[str, Any]]) -> None:
    true = _true_updates(runs["plain"])
    seen = _masked_vectors(runs["secagg"])
    assert sorted(seen) == sorted(true) == sorted(SIZES)
    cfg = runs["secagg"]["report"]["config"]
    correlations = {}
    for name, (update, n) in true.items():
        u = np.concatenate([a.ravel() for a in update]).astype(np.float64)
        m = np.concatenate([v.ravel() for v in seen[name][1:]]).astype(np.float64)  # [0] is the masked weight
        assert m.shape == u.shape and u.size > 10_000 and np.std(u) > 0
        correlations[name] = float(np.corrcoef(m, u)[0, 1])
        # Power: without the masks the server would receive the quantised update, correlated ~1 with it.
        weighted = [a * (n / cfg["secagg-max-weight"]) for a in update]
        unmasked = np.concatenate([q.ravel() for q in quantize(weighted, cfg["secagg-clipping-range"],
                                                               cfg["secagg-quantization-range"])])
        assert np.corrcoef(unmasked.astype(np.float64), u)[0, 1] > 0.99
        # The masked vector looks uniform on [0, 2^32): its mean is 2^31 within a few standard errors.
        assert abs(m.mean() / 2**32 - 0.5) < 5 * (1 / np.sqrt(12 * m.size))
    log.info("server view vs true update, Pearson r per department: %s", correlations)
    print(f"\nserver view vs true update, Pearson r: {correlations}")
    assert all(abs(r) < MAX_ABS_CORRELATION for r in correlations.values()), correlations


def test_what_left_the_departments_passes_the_egress_check(runs: dict[str, dict[str, Any]]) -> None:
    texts = make_department_frame(SIZES)["text"].tolist()
    for mode in ("secagg", "plain"):
        shapes = _shapes(runs[mode]["report"])
        seen = check_egress(runs[mode]["captured"], shapes, texts, secagg=mode == "secagg")
        stages = 4 if mode == "secagg" else 1
        assert seen["train"] == stages * len(SIZES) and seen["evaluate"] == len(SIZES)


class DepartmentCrashed(RuntimeError):
    pass


def dying_mod(who: str, stage: str, after_call_next: bool) -> Mod:
    """`who` dies in SecAgg+ stage `stage` (after training and charging its ledger, when `after_call_next`)."""
    names = sorted(SIZES)  # simulated partition i is the i-th department in sorted order

    def mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
        records = msg.content.config_records if msg.metadata.message_type == MessageType.TRAIN else {}
        if (RECORD_KEY_CONFIGS not in records or str(records[RECORD_KEY_CONFIGS][SecAggKey.STAGE]) != stage
                or names[int(ctxt.node_config["partition-id"])] != who):
            return call_next(msg, ctxt)
        if after_call_next:
            call_next(msg, ctxt)
        raise DepartmentCrashed(f"{who} crashed in stage {stage}")

    return mod


# Who dies where, in a federation of 5 whose neighbourhoods are 3: after training, before its masked update leaves
# (its pairwise masks are removed with its secret key, rebuilt from 2 of its neighbours' shares: it is left out of
# the aggregate); and in the unmask stage, its masked update in (its own mask is rebuilt from its neighbours' shares:
# it stays in).
DEATHS = {"masked": ("oncology", "collect_masked_vectors", True), "unmask": ("radiology", "unmask", False)}


@pytest.fixture(scope="module")
def dropout_runs(tmp_path_factory: pytest.TempPathFactory, federation_data: Path) -> dict[str, dict[str, Any]]:
    base = tmp_path_factory.mktemp("neighbourhood-dropouts")
    runs = {}
    for case, death in DEATHS.items():
        (base / case).mkdir()
        runs[case] = _run(base / case, federation_data, secagg=True, mods=[dying_mod(*death)],
                          **{"secagg-num-shares": NEIGHBOURHOOD})
    return runs


@pytest.mark.parametrize("case", sorted(DEATHS))
def test_a_death_at_a_neighbourhood_smaller_than_the_federation_leaves_fedavg_of_the_rest(
        case: str, dropout_runs: dict[str, dict[str, Any]], neighbourhood_runs: dict[str, dict[str, Any]]) -> None:
    who, stage, after = DEATHS[case]
    run = dropout_runs[case]
    (record,) = run["report"]["rounds"]
    assert record["aggregate"] == "applied" and record["attempts"] == 1, record
    assert [(d["department"], d["stage"]) for d in record["dropouts"]] == [(who, stage)]
    assert [r["share_destinations"] for r in run["replies"]
            if r["share_destinations"] is not None] == [NEIGHBOURHOOD - 1] * len(SIZES)
    # Dead before its masked update left: not in the sum; dead after: in it.
    included = {n: s for n, s in SIZES.items() if not (after and n == who)}
    assert sorted(_masked_vectors(run)) == sorted(included)
    _check_aggregate({"secagg": run, "plain": neighbourhood_runs["plain"]}, included, same_as_plain=False)
