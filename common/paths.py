"""Where fedsilo keeps files on this machine (no heavy imports: the ClientApp loads this for every message)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """The user's cache directory for fedsilo (`$FEDSILO_CACHE`, else `$XDG_CACHE_HOME/fedsilo`)."""
    if env := os.environ.get("FEDSILO_CACHE"):
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fedsilo"


def run_out_dir(out_dir: str, run_id: int) -> Path:
    """A run's directory: the job's `out-dir`, else (a simulation that names none) one per Flower run id in the
    cache, where its sites' ledgers are kept."""
    return Path(out_dir) if out_dir else cache_dir() / "runs" / f"run-{run_id}"
