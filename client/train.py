"""Local fine-tuning of one round: Opacus DP-SGD with Poisson sampling (or plain SGD for baselines)."""

from __future__ import annotations

import logging
import secrets
import time
from dataclasses import dataclass

import torch
from opacus import PrivacyEngine
from opacus.grad_sample.gsm_base import AbstractGradSampleModule
from opacus.optimizers import DPOptimizer

from common.config import JobConfig
from common.errors import PrivacyError
from common.logs import quiet_third_party_warnings
from common.text import Encoded, model_inputs

log = logging.getLogger(__name__)

SGD_MOMENTUM = 0.9


@dataclass(frozen=True)
class TrainResult:
    steps: int
    mean_loss: float
    seconds: float
    accountant_history: list[tuple[float, float, int]]  # what Opacus' own accountant recorded this round


def _noise_only_step(optimizer: DPOptimizer, params: list[torch.nn.Parameter], ghost: bool) -> None:
    """An empty Poisson batch still is a DP-SGD step: zero clipped sum, plus noise, counted by the accountant."""
    for p in params:
        if ghost:
            p.grad = torch.zeros_like(p)
        else:
            p.grad_sample = torch.zeros((0, *p.shape), device=p.device, dtype=p.dtype)
    optimizer.step()


def _generator(seed: int | None, dev: torch.device | None = None) -> torch.Generator:
    """A seeded generator on `dev` (default CPU), or one seeded from the OS's entropy pool when `seed` is None.

    Opacus draws the noise with `torch.normal(device=<the gradient's device>, generator=...)`, so on CUDA the noise
    generator must live on the GPU; the data loader's sampling generator stays on the CPU.
    """
    generator = torch.Generator(device=dev) if dev is not None else torch.Generator()
    return generator.manual_seed(secrets.randbits(63) if seed is None else seed)


def train_round(model: torch.nn.Module, data: Encoded, cfg: JobConfig, *, steps: int, noise_multiplier: float | None,
                dev: torch.device, seed: int | None) -> TrainResult:
    """Run `steps` optimizer steps. With `noise_multiplier` set, DP-SGD with Poisson sampling.

    Under DP pass `seed=None`: batch sampling and noise then come from generators seeded from the OS's entropy
    pool, so nobody can predict (and subtract) the noise. (Opacus' `secure_mode` would need torchcsprng.)
    The caller charges the site ledger before calling; this returns Opacus' own record so the caller can check
    that exactly the charged steps were taken.
    """
    quiet_third_party_warnings()  # this runs in Ray workers and the sites' ClientApp processes, not only the CLI
    torch.manual_seed(secrets.randbits(63) if seed is None else seed)  # dropout
    generator = _generator(seed)
    model.to(dev)
    model.train()  # from_pretrained returns eval mode; Opacus captures activations only in train mode
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer: torch.optim.Optimizer = (
        torch.optim.Adam(params, lr=cfg.learning_rate) if cfg.optimizer == "adam"
        else torch.optim.SGD(params, lr=cfg.learning_rate, momentum=SGD_MOMENTUM))
    criterion = torch.nn.CrossEntropyLoss()
    loader = torch.utils.data.DataLoader(data.dataset(), batch_size=cfg.batch_size, shuffle=True,
                                         generator=generator)
    engine: PrivacyEngine | None = None
    ghost = cfg.grad_sample_mode == "ghost"
    if noise_multiplier is not None:
        engine = PrivacyEngine(accountant="rdp", secure_mode=False)
        made = engine.make_private(module=model, optimizer=optimizer, data_loader=loader, criterion=criterion,
                                   noise_multiplier=noise_multiplier, max_grad_norm=cfg.clip_norm,
                                   poisson_sampling=True, grad_sample_mode=cfg.grad_sample_mode,
                                   noise_generator=_generator(seed, dev))
        if ghost:
            model, optimizer, criterion, loader = made
        else:
            model, optimizer, loader = made
    start = time.perf_counter()
    losses: list[float] = []
    done = 0
    while done < steps:
        for input_ids, attention_mask, labels in loader:
            if done == steps:
                break
            optimizer.zero_grad(set_to_none=True)
            if len(labels) == 0:
                if engine is None or not isinstance(optimizer, DPOptimizer):
                    raise PrivacyError("An empty batch can only occur under Poisson sampling.")
                _noise_only_step(optimizer, params, ghost)
            else:
                logits = model(**model_inputs(input_ids, attention_mask, dev)).logits
                loss = criterion(logits, labels.to(dev))
                loss.backward()
                optimizer.step()
                losses.append(float(loss.item()))
            done += 1
    seconds = time.perf_counter() - start
    history = list(engine.accountant.history) if engine is not None else []
    if isinstance(model, AbstractGradSampleModule):
        model.remove_hooks()  # the caller evaluates the same module next; per-sample hooks would only cost
    log.info("train_round: %d steps in %.1fs, mean loss %.4f", done, seconds, sum(losses) / max(1, len(losses)))
    return TrainResult(steps=done, mean_loss=sum(losses) / max(1, len(losses)), seconds=seconds,
                       accountant_history=history)
