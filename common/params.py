"""The one boundary where model tensors become exchanged arrays and back, checked on both sides."""

from __future__ import annotations

import numpy as np
import torch

from common.errors import ParameterMismatchError
from common.model import trainable_names


def get_trainable(model: torch.nn.Module) -> list[np.ndarray]:
    """The exchanged tensors (everything that trains), as float32 numpy arrays in a fixed order."""
    return [p.detach().cpu().numpy().astype(np.float32, copy=True)
            for _, p in model.named_parameters() if p.requires_grad]


def check_arrays(model: torch.nn.Module, arrays: list[np.ndarray], what: str) -> None:
    """Raise unless `arrays` match the model's trainable tensors in count, shape, dtype and finiteness."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if len(arrays) != len(params):
        raise ParameterMismatchError(f"{what}: expected {len(params)} arrays, got {len(arrays)}.")
    for (name, p), arr in zip(params, arrays, strict=True):
        if tuple(arr.shape) != tuple(p.shape):
            raise ParameterMismatchError(f"{what}: {name} has shape {arr.shape}, expected {tuple(p.shape)}.")
        if arr.dtype != np.float32:
            raise ParameterMismatchError(f"{what}: {name} has dtype {arr.dtype}, expected float32.")
        if not np.isfinite(arr).all():
            raise ParameterMismatchError(f"{what}: {name} contains NaN or infinite values.")


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
