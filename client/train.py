"""Local fine-tuning of one round: Opacus DP-SGD with Poisson sampling (or plain SGD for baselines)."""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable, Sequence
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


def train_round(model: torch.nn.Module, data: Encoded, cfg: JobConfig, *, batch_size: int, steps: int,
                noise_multiplier: float | None, dev: torch.device, seed: int | None) -> TrainResult:
    """Run `steps` optimizer steps on every trainable weight of `model`, batches of about `batch_size` (the plain
    loader's batch: under DP, Opacus samples each row with rate 1 / number of such batches). With
    `noise_multiplier` set, DP-SGD with Poisson sampling.

    Under DP pass `seed=None`: batch sampling and noise then come from generators seeded from the OS's entropy
    pool, so nobody can predict (and subtract) the noise. (Opacus' `secure_mode` would need torchcsprng.)
    The caller charges the site ledger before calling; this returns Opacus' own record so the caller can check
    that exactly the charged steps were taken.
    """
    def forward(module: torch.nn.Module, batch: Sequence[torch.Tensor]) -> torch.Tensor:
        input_ids, attention_mask = batch
        return module(**model_inputs(input_ids, attention_mask, dev)).logits

    return _train(model, data.dataset(), forward, batch_size=batch_size, learning_rate=cfg.learning_rate,
                  optimizer=cfg.optimizer, clip_norm=cfg.clip_norm, grad_sample_mode=cfg.grad_sample_mode,
                  steps=steps, noise_multiplier=noise_multiplier, dev=dev, seed=seed)


def train_head(head: torch.nn.Module, inputs: torch.Tensor, labels: torch.Tensor, cfg: JobConfig, *,
               batch_size: int, steps: int, noise_multiplier: float | None, dev: torch.device,
               seed: int | None) -> TrainResult:
    """The probe: `steps` Adam steps of DP-SGD (Poisson sampling, per-example clipping at the job's clip norm) on
    the classifier head alone, over its inputs as the frozen model computed them (`head_inputs`). Same contract
    as `train_round`: the caller charges the ledger first and checks the returned accountant record."""
    def forward(module: torch.nn.Module, batch: Sequence[torch.Tensor]) -> torch.Tensor:
        (x,) = batch
        out: torch.Tensor = module(x.to(dev))
        return out

    dataset = torch.utils.data.TensorDataset(inputs, labels)
    return _train(head, dataset, forward, batch_size=batch_size, learning_rate=cfg.probe_learning_rate,
                  optimizer="adam", clip_norm=cfg.clip_norm, grad_sample_mode="hooks", steps=steps,
                  noise_multiplier=noise_multiplier, dev=dev, seed=seed)


@torch.inference_mode()
def head_inputs(model: torch.nn.Module, head: torch.nn.Module, data: Encoded, dev: torch.device,
                batch_size: int = 256) -> torch.Tensor:
    """What `head` receives from `model` for every row of `data`, in order, with the model in eval mode (no
    dropout): the probe's training inputs. Rows go through sorted by length, so batches pad little."""
    captured: list[torch.Tensor] = []

    def capture(_: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        captured.append(args[0].detach().to("cpu", copy=True))

    order = torch.argsort(data.attention_mask.sum(dim=1))
    handle = head.register_forward_pre_hook(capture)
    try:
        model.to(dev)
        model.eval()
        for start in range(0, len(data), batch_size):
            idx = order[start:start + batch_size]
            model(**model_inputs(data.input_ids[idx], data.attention_mask[idx], dev))
    finally:
        handle.remove()
    inputs = torch.empty_like(torch.cat(captured))
    inputs[order] = torch.cat(captured)
    return inputs


def _train(module: torch.nn.Module, dataset: torch.utils.data.Dataset[tuple[torch.Tensor, ...]],
           forward: Callable[[torch.nn.Module, Sequence[torch.Tensor]], torch.Tensor], *, batch_size: int,
           learning_rate: float, optimizer: str, clip_norm: float, grad_sample_mode: str, steps: int,
           noise_multiplier: float | None, dev: torch.device, seed: int | None) -> TrainResult:
    quiet_third_party_warnings()  # this runs in Ray workers and the sites' ClientApp processes, not only the CLI
    torch.manual_seed(secrets.randbits(63) if seed is None else seed)  # dropout
    generator = _generator(seed)
    model = module.to(dev)
    model.train()  # from_pretrained returns eval mode; Opacus captures activations only in train mode
    params = [p for p in model.parameters() if p.requires_grad]
    opt: torch.optim.Optimizer = (
        torch.optim.Adam(params, lr=learning_rate) if optimizer == "adam"
        else torch.optim.SGD(params, lr=learning_rate, momentum=SGD_MOMENTUM))
    criterion = torch.nn.CrossEntropyLoss()
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=generator)
    engine: PrivacyEngine | None = None
    ghost = grad_sample_mode == "ghost"
    if noise_multiplier is not None:
        engine = PrivacyEngine(accountant="rdp", secure_mode=False)
        made = engine.make_private(module=model, optimizer=opt, data_loader=loader, criterion=criterion,
                                   noise_multiplier=noise_multiplier, max_grad_norm=clip_norm,
                                   poisson_sampling=True, grad_sample_mode=grad_sample_mode,
                                   noise_generator=_generator(seed, dev))
        if ghost:
            model, opt, criterion, loader = made
        else:
            model, opt, loader = made
    start = time.perf_counter()
    losses: list[float] = []
    done = 0
    while done < steps:
        for *inputs, labels in loader:
            if done == steps:
                break
            opt.zero_grad(set_to_none=True)
            if len(labels) == 0:
                if engine is None or not isinstance(opt, DPOptimizer):
                    raise PrivacyError("An empty batch can only occur under Poisson sampling.")
                _noise_only_step(opt, params, ghost)
            else:
                loss = criterion(forward(model, inputs), labels.to(dev))
                loss.backward()
                opt.step()
                losses.append(float(loss.item()))
            done += 1
    seconds = time.perf_counter() - start
    history = list(engine.accountant.history) if engine is not None else []
    if isinstance(model, AbstractGradSampleModule):
        model.cleanup()  # hooks and per-sample attributes: the caller evaluates (and may reuse) the same module
    for p in params:  # gradients and DPOptimizer's sums would otherwise stay on the (reusable) module
        p.grad = None
        if hasattr(p, "summed_grad"):
            del p.summed_grad
    mean_loss = sum(losses) / max(1, len(losses))
    log.info("train: %d steps in %.1fs, mean loss %.4f", done, seconds, mean_loss)
    return TrainResult(steps=done, mean_loss=mean_loss, seconds=seconds, accountant_history=history)
