"""Cost of one DP-SGD step per Opacus mode vs one non-private step, and agreement of the modes' gradients.

Every variant gets a freshly built model (same seed, same weights) and the same fixed batch.

Peak memory of a step: what the step allocates above what was allocated before it (activations, gradients,
per-sample gradients or ghost norms), measured on a step after the warm-up (optimizer state already exists). On
CUDA: the caching allocator's peak (`torch.cuda.max_memory_allocated`). On CPU torch keeps no allocator statistics,
so the step runs once under `torch.profiler` with `profile_memory=True`, and the peak is the maximum of the running
sum of every allocation and free it recorded, in time order (exact allocator bytes, unaffected by malloc caching or
other processes; the profiled step is not one of the timed steps).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from opacus import PrivacyEngine
from opacus.optimizers import DPOptimizer

from common.config import FINETUNE_MODES, JobConfig
from common.errors import ConfigError
from common.model import build_model, device
from common.settings import Settings, option
from common.text import model_inputs

log = logging.getLogger(__name__)

NON_PRIVATE = "non-private"
DP_MODES = ("hooks", "functorch", "ghost")
VARIANTS = (NON_PRIVATE, *DP_MODES)
REFERENCE_MODE = "hooks"  # Opacus' standard per-sample-gradient mode
LABELS = "negative,positive"
NOISE_SEED = 1000


@dataclass(frozen=True, kw_only=True)
class StepSetup(Settings):
    """What one step-cost measurement runs (the job config built from it checks itself too)."""

    label: ClassVar[str] = "Step-cost setting"

    model: str = option(help="model (the run-config key model)", nonempty=True)
    finetune: str = option(help="the run-config key finetune", choices=FINETUNE_MODES)
    batch: int = option(help="examples per step", gt=0)
    seq_len: int = option(help="tokens per example (max-length)", gt=0, le=512)
    steps: int = option(help="timed steps", ge=1)
    warmup: int = option(help="untimed steps first (the memory peak is taken over these and the timed ones)", ge=0)
    seed: int = option(0, help="model and batch seed")


def _job(setup: StepSetup) -> JobConfig:
    return JobConfig(model=setup.model, finetune=setup.finetune, max_length=setup.seq_len, labels=LABELS,
                     seed=setup.seed)


def _batch(setup: StepSetup, vocab: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A fixed batch of full-length sequences (every step pays for `seq_len` tokens)."""
    g = torch.Generator().manual_seed(setup.seed)
    ids = torch.randint(1000, vocab, (setup.batch, setup.seq_len), generator=g)
    mask = torch.ones_like(ids)
    labels = torch.randint(0, 2, (setup.batch,), generator=g)
    return ids, mask, labels


def _prepare(setup: StepSetup, variant: str, noise: float, clip: float) -> tuple[Any, ...]:
    built = build_model(_job(setup), 2)
    model = built.model
    dev = device()
    model.to(dev)
    model.train()
    batch = _batch(setup, len(built.tokenizer))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer: torch.optim.Optimizer = torch.optim.Adam(params, lr=5e-3)
    criterion: Any = torch.nn.CrossEntropyLoss()
    if variant != NON_PRIVATE:
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*batch), batch_size=setup.batch)
        made = PrivacyEngine(accountant="rdp").make_private(
            module=model, optimizer=optimizer, data_loader=loader, criterion=criterion, noise_multiplier=noise,
            max_grad_norm=clip, poisson_sampling=False, grad_sample_mode=variant)
        model, optimizer = made[0], made[1]
        if variant == "ghost":
            criterion = made[2]
    return model, optimizer, criterion, batch, dev


def _backward(model: Any, criterion: Any, batch: tuple[torch.Tensor, ...], dev: torch.device) -> None:
    ids, mask, labels = batch
    logits = model(**model_inputs(ids, mask, dev)).logits
    criterion(logits, labels.to(dev)).backward()


def _cpu_peak(step: Callable[[], None]) -> int:
    """Peak bytes allocated by `step` above what was allocated before it, from the profiler's memory events."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    timeline = sorted((e.time_range.start, e.self_cpu_memory_usage) for e in prof.events()
                      if e.self_cpu_memory_usage)
    current = peak = 0
    for _, delta in timeline:
        current += delta
        peak = max(peak, current)
    return peak


def _stepper(setup: StepSetup, variant: str) -> Callable[[], None]:
    model, optimizer, criterion, batch, dev = _prepare(setup, variant, noise=1.0, clip=1.0)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        _backward(model, criterion, batch, dev)
        optimizer.step()
        if dev.type == "cuda":
            torch.cuda.synchronize()

    return step


def _step_peak(step: Callable[[], None]) -> int:
    if device().type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        return torch.cuda.max_memory_allocated() - before
    return _cpu_peak(step)


def measure(setup: StepSetup, variants: Sequence[str] = VARIANTS) -> dict[str, list[dict[str, Any]]]:
    """Per variant, per round: seconds of one optimizer step, and the peak memory one step adds.

    Every variant is built first; then the timed steps go round-robin (one step of each variant per round,
    `setup.steps` rounds), so load that changes on a shared machine hits the variants of a round alike.
    """
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise ConfigError(f"Unknown step variant(s) {unknown}; expected some of {VARIANTS}.")
    steps = {v: _stepper(setup, v) for v in variants}
    peaks = {}
    for v, step in steps.items():
        for _ in range(setup.warmup):
            step()
        peaks[v] = max(0, int(_step_peak(step)))
    out: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    for r in range(setup.steps):
        for v, step in steps.items():
            start = time.perf_counter()
            step()
            out[v].append({"round": r + 1, "step_seconds": time.perf_counter() - start, "peak_bytes": peaks[v]})
        log.info("stepcost: round %d: %s", r + 1, ", ".join(f"{v} {out[v][-1]['step_seconds']:.2f}s" for v in out))
    return out


def memory_method() -> str:
    return "CUDA allocator peak" if device().type == "cuda" else "torch profiler allocation timeline"


def _dp_gradient(setup: StepSetup, mode: str, noise: float, clip: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(clipped summed gradient without noise, the same step's gradient with noise), both / expected batch."""
    model, optimizer, criterion, batch, dev = _prepare(setup, mode, noise=0.0, clip=clip)
    if not isinstance(optimizer, DPOptimizer):
        raise ConfigError(f"Mode {mode} did not give a DP optimizer.")

    def step_grad(sigma: float) -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        optimizer.noise_multiplier = sigma
        torch.manual_seed(setup.seed)  # the same dropout masks in every mode and pass
        _backward(model, criterion, batch, dev)
        torch.manual_seed(NOISE_SEED + DP_MODES.index(mode))  # Opacus draws noise from the global RNG: fresh per mode
        optimizer.pre_step()  # clip, accumulate, add noise, scale: everything but the parameter update
        return torch.cat([p.grad.detach().flatten().cpu() for p in optimizer.params])

    return step_grad(0.0), step_grad(noise)


def _per_sample_norms(setup: StepSetup) -> torch.Tensor:
    model, optimizer, criterion, batch, dev = _prepare(setup, REFERENCE_MODE, noise=0.0, clip=1.0)
    optimizer.zero_grad(set_to_none=True)
    torch.manual_seed(setup.seed)
    _backward(model, criterion, batch, dev)
    per_param = [p.grad_sample.flatten(1).norm(dim=1) for p in optimizer.params]
    return torch.stack(per_param, dim=1).norm(dim=1).cpu()


def check_modes(setup: StepSetup, noise: float = 1.0) -> dict[str, Any]:
    """Do the modes give the same clipped sum (noise off) and the same noise (std sigma*C/B)?

    The clip norm is the median per-sample gradient norm of the batch, so half the examples are clipped and the
    check exercises clipping. LoRA's B matrices start at zero; the check perturbs nothing and compares every
    trainable tensor (adapter and classifier) at initialisation.
    """
    norms = _per_sample_norms(setup)
    clip = float(norms.median())
    reference, _ = _dp_gradient(setup, REFERENCE_MODE, noise, clip)
    out: dict[str, Any] = {"reference": REFERENCE_MODE, "clip_norm": clip, "noise_multiplier": noise,
                           "clipped_fraction": float((norms > clip).float().mean()), "modes": {}}
    for mode in DP_MODES:
        clean, noisy = _dp_gradient(setup, mode, noise, clip)
        expected_std = noise * clip / setup.batch
        measured_std = float((noisy - clean).std())
        out["modes"][mode] = {
            "clipped_sum_relative_error": float((clean - reference).norm() / reference.norm().clamp(min=1e-30)),
            "noise_std_ratio": measured_std / expected_std,
            "noise_values": int(clean.numel()),
        }
    return out
