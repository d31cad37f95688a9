"""The identity of a fedsilo job's code: the Flower App Bundle (FAB) that `flwr run` submits.

A FAB is a deterministic zip (Flower fixes the timestamps and sorts the files), so the sha256 of its bytes names
exactly the code and the default run config it carries. Sites approve jobs by this digest (`fedsilo app digest`);
it is the same hash Flower itself gives the FAB (`flwr ls`).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from common.errors import ConfigError

DIGEST_PREFIX = "sha256:"


def app_dir() -> Path:
    """The Flower app directory (fedsilo's pyproject.toml with [tool.flwr.app]) of this installation."""
    root = Path(__file__).resolve().parents[1]
    if not (root / "pyproject.toml").is_file():
        raise ConfigError(f"No pyproject.toml beside fedsilo's packages in {root}: install fedsilo from a "
                          "checkout (pip install -e .) so its app bundle can be built.")
    return root


def build_bundle(app: Path) -> bytes:
    """The FAB bytes `flwr run <app>` would submit (Flower's own builder)."""
    from flwr.cli.build import build_fab_from_disk

    if not (app / "pyproject.toml").is_file():
        raise ConfigError(f"{app} is not a Flower app directory (no pyproject.toml).")
    try:
        return build_fab_from_disk(app)
    except ValueError as exc:
        raise ConfigError(f"Cannot build the app bundle of {app}: {exc}") from exc


def bundle_digest(fab: bytes) -> str:
    return DIGEST_PREFIX + hashlib.sha256(fab).hexdigest()


def normalise_digest(value: str) -> str:
    """'sha256:<64 hex>' (the prefix is optional on input); anything else is a ConfigError."""
    hexpart = value[len(DIGEST_PREFIX):] if value.startswith(DIGEST_PREFIX) else value
    if len(hexpart) != 64 or any(c not in "0123456789abcdef" for c in hexpart.lower()):
        raise ConfigError(f"{value!r} is not an app digest (sha256:<64 hex digits>; see `fedsilo app digest`).")
    return DIGEST_PREFIX + hexpart.lower()
