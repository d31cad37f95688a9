"""What a model update must look like, checked the same way by a department (before masking) and by the server.

`check_update` is fedsilo's one array validator: it returns the reason an array list is unusable (or None), and
`common.params.check_arrays` raises `ParameterMismatchError` on top of it for arrays loaded into a model.

An update is the list of trainable arrays' differences (trained minus global), in the model's fixed order. It is
usable when it has the expected count, shapes and dtype, is finite, and its L2 norm is within the job's bound
(`max-update-norm`). Pure numpy: no Flower, no torch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

# A SecAgg+ aggregate is dequantised: its norm may exceed the bound that every summand met by this relative slack.
AGGREGATE_NORM_SLACK = 1e-2


def update_norm(arrays: Sequence[np.ndarray]) -> float:
    """L2 norm of all arrays together, accumulated in float64 (inf when any value is not finite)."""
    total = 0.0
    for a in arrays:
        total += float(np.square(a, dtype=np.float64).sum())
    return math.sqrt(total) if math.isfinite(total) else math.inf


def check_update(arrays: Sequence[np.ndarray], reference: Sequence[np.ndarray], *, max_norm: float | None = None,
                 exact_dtype: bool = True, names: Sequence[str] | None = None) -> str | None:
    """Why `arrays` cannot be an update of a model whose trainable arrays are `reference`, or None if it can.

    `exact_dtype=False` accepts any floating dtype (a SecAgg+ aggregate is dequantised to float64). `names` (the
    trainable tensors' names, in order) make the reason name the offending tensor.
    """
    if len(arrays) != len(reference):
        return f"{len(arrays)} arrays instead of {len(reference)}"
    for i, (a, r) in enumerate(zip(arrays, reference, strict=True)):
        label = f"array {i}" + (f" ({names[i]})" if names is not None and i < len(names) else "")
        if not isinstance(a, np.ndarray):
            return f"{label} is a {type(a).__name__}, not an array"
        if a.shape != r.shape:
            return f"{label} has shape {a.shape} instead of {r.shape}"
        if exact_dtype and a.dtype != r.dtype:
            return f"{label} has dtype {a.dtype} instead of {r.dtype}"
        if not np.issubdtype(a.dtype, np.floating):
            return f"{label} has non-floating dtype {a.dtype}"
        if not np.isfinite(a).all():
            return f"{label} is not finite"
    if max_norm is not None:
        norm = update_norm(arrays)
        if norm > max_norm:
            return f"L2 norm {norm:.4g} exceeds max-update-norm {max_norm:g}"
    return None
