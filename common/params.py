"""The one boundary where model tensors become exchanged arrays and back, checked on both sides."""

from __future__ import annotations

import numpy as np
import torch

from common.errors import ParameterMismatchError
from common.model import trainable_names
from common.updates import check_update


def get_trainable(model: torch.nn.Module) -> list[np.ndarray]:
    """The exchanged tensors (everything that trains), as float32 numpy arrays in a fixed order."""
    return [p.detach().cpu().numpy().astype(np.float32, copy=True)
            for _, p in model.named_parameters() if p.requires_grad]


def _trainable_specs(model: torch.nn.Module) -> tuple[list[str], list[np.ndarray]]:
    """Names and expected (shape, float32) of the trainable tensors, as zero-size-in-memory broadcast views."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    zero = np.zeros((), np.float32)
    return [n for n, _ in params], [np.broadcast_to(zero, tuple(p.shape)) for _, p in params]


def check_arrays(model: torch.nn.Module, arrays: list[np.ndarray], what: str) -> None:
    """Raise `ParameterMismatchError` unless `arrays` match the model's trainable tensors in count, shape, dtype
    (float32) and finiteness: `common.updates.check_update`'s rules, raised."""
    names, specs = _trainable_specs(model)
    reason = check_update(arrays, specs, names=names)
    if reason is not None:
        raise ParameterMismatchError(f"{what}: {reason}.")


def set_trainable(model: torch.nn.Module, arrays: list[np.ndarray], what: str = "global model") -> None:
    """Load exchanged arrays into the model's trainable tensors (after `check_arrays`)."""
    check_arrays(model, arrays, what)
    with torch.no_grad():
        for (_, p), arr in zip(((n, p) for n, p in model.named_parameters() if p.requires_grad), arrays,
                               strict=True):
            p.copy_(torch.from_numpy(arr).to(p.device))


def subtract(a: list[np.ndarray], b: list[np.ndarray]) -> list[np.ndarray]:
    return [(x - y).astype(np.float32) for x, y in zip(a, b, strict=True)]


def add(a: list[np.ndarray], b: list[np.ndarray]) -> list[np.ndarray]:
    return [(x + y).astype(np.float32) for x, y in zip(a, b, strict=True)]


def max_abs(arrays: list[np.ndarray]) -> float:
    return max((float(np.abs(a).max()) for a in arrays if a.size), default=0.0)


def named_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Trainable tensors by name, for self-describing checkpoints."""
    names = trainable_names(model)
    params = dict(model.named_parameters())
    return {n: params[n].detach().cpu().clone() for n in names}
