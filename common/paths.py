"""Where fedsilo keeps files on this machine (no heavy imports: the ClientApp loads this for every message)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """The user's cache directory for fedsilo (`$FEDSILO_CACHE`, else `$XDG_CACHE_HOME/fedsilo`)."""
    if env := os.environ.get("FEDSILO_CACHE"):
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fedsilo"
