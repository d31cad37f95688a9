"""Is a department's data usable for a job? Checked before any privacy budget is charged.

Pure checks over counts and labels, shared by a site (before it trains) and by the simulation (before it starts),
so both refuse the same inputs with the same message.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from common.errors import ConfigError, DataError

# A round's expected batch is at most this fraction of a department's rows (Poisson sampling rate at most 1/4):
# a batch of all rows would leave DP-SGD without the privacy amplification of sampling.
MIN_BATCHES_PER_EPOCH = 4


def check_department_data(name: str, train_labels: np.ndarray, label_names: Sequence[str], *,
                          delta: float | None) -> None:
    """Raise unless department `name` can train: enough examples to sample batches from, two classes, delta below
    1/n.

    `delta` is the site's DP delta, or None for a job without DP.
    """
    n = len(train_labels)
    if n < MIN_BATCHES_PER_EPOCH:
        raise DataError(
            f"Department {name!r} has {n} training example(s), fewer than {MIN_BATCHES_PER_EPOCH}: a batch is at "
            f"most 1/{MIN_BATCHES_PER_EPOCH} of a department's rows (DP-SGD's privacy comes from sampling them), so "
            "it cannot train. Give the department more data."
        )
    present = sorted({int(i) for i in np.unique(train_labels)})
    if len(present) < 2:
        only = label_names[present[0]] if present and present[0] < len(label_names) else "none"
        raise DataError(
            f"Department {name!r} has a single class ({only!r}) in its {n} training examples; a classifier "
            "update from one class only teaches 'always predict it'. Give it examples of at least two classes."
        )
    if delta is not None and delta >= 1 / n:
        raise ConfigError(
            f"delta={delta:g} is not below 1/n = {1 / n:.3g} for department {name!r} ({n} training examples): "
            "a delta that large allows releasing whole records. Choose delta well below 1/n."
        )
