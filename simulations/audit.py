"""`fedsilo audit`: an empirical privacy audit of a simulation's global model, for a data-protection officer.

Loss-threshold membership inference (Yeom et al., 2018): a record is guessed to be a training member when the
global model's loss on it is low. Members are each department's training rows, non-members its held-out rows
(the simulation's split is reproduced from the run's config and seed). The audit reports, per department and
pooled, the attack's ROC AUC and its true-positive rate at 1% false-positive rate, each with a bootstrap 95%
confidence interval, and draws the ROC curves. AUC 0.5 means the attack cannot tell members from non-members.

It also cross-checks every site ledger of the run against Opacus' accountants (`common.accountant_check`).
An empirical audit can only show leakage, never prove its absence: the DP guarantee is the ledger's epsilon.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.stats import rankdata

from client.site import simulated_sites
from common.accountant_check import check_ledger
from common.errors import ConfigError
from common.files import write_atomic
from common.model import device
from common.text import encode, model_inputs
from simulations.runs import global_model, load_run, simulation_ledgers

log = logging.getLogger(__name__)

AUDIT_JSON = "audit.json"
ROC_PNG = "audit_roc.png"
TARGET_FPR = 0.01  # report the attack's TPR at this false-positive rate
CONFIDENCE = 0.95


@dataclass(frozen=True)
class AttackResult:
    members: int
    non_members: int
    auc: float
    auc_ci: tuple[float, float]
    tpr_at_fpr: float  # TPR at TARGET_FPR
    tpr_at_fpr_ci: tuple[float, float]
    member_loss: float  # mean loss on members
    non_member_loss: float


def auc_score(members: np.ndarray, non_members: np.ndarray) -> float:
    """ROC AUC of `score > threshold` as a membership test (Mann-Whitney U / (m n), ties count half)."""
    ranks = rankdata(np.concatenate([members, non_members]))
    m, n = len(members), len(non_members)
    return float((ranks[:m].sum() - m * (m + 1) / 2) / (m * n))


def tpr_at_fpr(members: np.ndarray, non_members: np.ndarray, fpr: float = TARGET_FPR) -> float:
    """Largest TPR of a threshold whose false-positive rate on the non-members is at most `fpr`."""
    ordered = np.sort(non_members)[::-1]
    allowed = int(np.floor(fpr * len(non_members)))  # non-members that may score above the threshold
    threshold = ordered[allowed] if allowed < len(ordered) else -np.inf
    return float(np.mean(members > threshold))


def roc_curve(members: np.ndarray, non_members: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    thresholds = np.unique(np.concatenate([members, non_members]))[::-1]
    fpr = np.array([0.0, *[(non_members >= t).mean() for t in thresholds]])
    tpr = np.array([0.0, *[(members >= t).mean() for t in thresholds]])
    return fpr, tpr


def attack(member_loss: np.ndarray, non_member_loss: np.ndarray, *, bootstrap: int, seed: int) -> AttackResult:
    """Loss-threshold attack (score = -loss) with stratified bootstrap confidence intervals."""
    if len(member_loss) < 1 or len(non_member_loss) < 1:
        raise ConfigError("The audit needs at least one member and one non-member per department.")
    members, non_members = -member_loss, -non_member_loss
    rng = np.random.default_rng(seed)
    aucs, tprs = [], []
    for _ in range(bootstrap):
        m = members[rng.integers(0, len(members), len(members))]
        n = non_members[rng.integers(0, len(non_members), len(non_members))]
        aucs.append(auc_score(m, n))
        tprs.append(tpr_at_fpr(m, n))
    tail = (1 - CONFIDENCE) / 2 * 100

    def ci(values: list[float]) -> tuple[float, float]:
        if not values:
            return (float("nan"), float("nan"))
        low, high = np.percentile(values, [tail, 100 - tail])
        return (float(low), float(high))

    return AttackResult(members=len(members), non_members=len(non_members), auc=auc_score(members, non_members),
                        auc_ci=ci(aucs), tpr_at_fpr=tpr_at_fpr(members, non_members), tpr_at_fpr_ci=ci(tprs),
                        member_loss=float(member_loss.mean()), non_member_loss=float(non_member_loss.mean()))


@torch.inference_mode()
def per_example_loss(model: torch.nn.Module, tokenizer: Any, texts: list[str], labels: np.ndarray,
                     max_length: int, batch_size: int = 128) -> np.ndarray:
    """Cross-entropy of the model on every example (in input order)."""
    data = encode(tokenizer, texts, labels, max_length)
    dev = device()
    model.to(dev)
    model.eval()
    out = np.empty(len(data), dtype=np.float64)
    order = torch.argsort(data.attention_mask.sum(dim=1))
    for start in range(0, len(data), batch_size):
        idx = order[start:start + batch_size]
        logits = model(**model_inputs(data.input_ids[idx], data.attention_mask[idx], dev)).logits
        losses = torch.nn.functional.cross_entropy(logits, data.labels[idx].to(dev), reduction="none")
        out[idx.numpy()] = losses.double().cpu().numpy()
    return out


def _plot(curves: dict[str, tuple[np.ndarray, np.ndarray, float]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.8))
    for ax, log_scale in zip(axes, (False, True), strict=True):
        for name, (fpr, tpr, auc) in curves.items():
            style = {"color": "k", "lw": 2.5} if name == "all departments" else {"lw": 1.2, "ls": "--"}
            ax.plot(fpr, tpr, label=f"{name} (AUC {auc:.3f})", **style)
        ax.plot([1e-4, 1], [1e-4, 1], color="grey", lw=0.8, ls=":", label="chance")
        if log_scale:
            ax.set(xscale="log", yscale="log", xlim=(1e-3, 1), ylim=(1e-3, 1))
            ax.axvline(TARGET_FPR, color="red", lw=0.8, ls=":")
        ax.set(xlabel="false-positive rate", ylabel="true-positive rate")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def audit_run(run_dir: Path, *, out_dir: Path | None = None, bootstrap: int = 1000, seed: int = 0,
              accountant_check: bool = True) -> dict[str, Any]:
    """Audit a simulation's output directory; writes audit.json and the ROC plot; returns the audit."""
    if bootstrap < 0:
        raise ConfigError(f"--bootstrap must be at least 0, got {bootstrap}.")
    run = load_run(run_dir)
    if not run.is_simulation:
        raise ConfigError(f"{run_dir} is not a simulation's output (no sites/): the audit needs the departments' "
                          "data, which only a simulation has on this machine.")
    report, checkpoint, job = run.report, run.checkpoint, run.job
    model, tokenizer = global_model(run)
    sites = simulated_sites(job, run.sim, run_dir.resolve())
    results: dict[str, AttackResult] = {}
    curves: dict[str, tuple[np.ndarray, np.ndarray, float]] = {}
    pooled_members, pooled_non = [], []
    for site in sites:
        split = site.load_split(job.label_names)
        members = per_example_loss(model, tokenizer, split.train_texts, split.train_labels, job.max_length)
        non_members = per_example_loss(model, tokenizer, split.test_texts, split.test_labels, job.max_length)
        results[site.name] = attack(members, non_members, bootstrap=bootstrap, seed=seed)
        curves[site.name] = (*roc_curve(-members, -non_members), results[site.name].auc)
        pooled_members.append(members)
        pooled_non.append(non_members)
        log.info("audit: %s: AUC %.4f on %d members / %d non-members", site.name, results[site.name].auc,
                 len(members), len(non_members))
    members, non_members = np.concatenate(pooled_members), np.concatenate(pooled_non)
    results["all departments"] = attack(members, non_members, bootstrap=bootstrap, seed=seed)
    curves["all departments"] = (*roc_curve(-members, -non_members), results["all departments"].auc)

    ledgers: dict[str, Any] = {}
    if accountant_check:
        for name, ledger in simulation_ledgers(run).items():
            ledgers[name] = [dataclasses.asdict(c) | {"relative_difference": c.relative_difference,
                                                      "agrees": c.agrees}
                             for c in check_ledger(ledger.entries, ledger.delta, ledger.accountant)]
    final = report.final  # None: the run did not finish (the audit reads its last checkpoint)
    epsilon = final.epsilon if final is not None else None
    audit = {
        "run_dir": str(run_dir.resolve()),
        "attack": "loss threshold (score = -cross-entropy of the global model); members = departments' training "
                  "rows, non-members = their held-out rows",
        "target_fpr": TARGET_FPR, "confidence": CONFIDENCE, "bootstrap": bootstrap,
        "dp": final.dp if final else None, "epsilon": epsilon, "delta": final.delta if final else None,
        "rounds": checkpoint.round,
        "results": {name: dataclasses.asdict(r) for name, r in results.items()},
        "accountant_check": ledgers,
    }
    out = out_dir or run_dir
    write_atomic(out / AUDIT_JSON, json.dumps(audit, indent=2, allow_nan=True).encode())
    dp = f"DP, epsilon <= {max((e for e in (epsilon or {}).values() if e is not None), default=0):.2f}" \
        if final is not None and final.dp else "no DP"
    _plot(curves, out / ROC_PNG, f"Loss-threshold membership inference on the global model ({dp})")
    return audit
