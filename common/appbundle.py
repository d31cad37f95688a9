"""The identity of a fedsilo job's code: the Flower App Bundle (FAB) that `flwr run` submits.

A FAB is a deterministic zip (Flower fixes the timestamps and sorts the files), so the sha256 of its bytes names
exactly the code and the default run config it carries. Sites approve jobs by this digest (`fedsilo app digest`);
it is the same hash Flower itself gives the FAB (`flwr ls`).
"""

from __future__ import annotations

import hashlib
import shutil
import tomllib
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


def _candidate_files(app: Path) -> dict[str, Path]:
    """The files Flower's builder would consider. `flwr run` walks the whole directory (a virtualenv in it
    included: tens of seconds) and then keeps what `[tool.flwr.app] fab-include` names; when the app names its
    include patterns, only their top directories (plus pyproject.toml and .gitignore) are walked here, which gives
    the same bundle."""
    from common.compat import collect_files

    app = app.resolve()
    try:
        doc = tomllib.loads((app / "pyproject.toml").read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"Cannot read {app / 'pyproject.toml'}: {exc}") from exc
    patterns = doc.get("tool", {}).get("flwr", {}).get("app", {}).get("fab-include")
    tops = {str(p).split("/", 1)[0] for p in patterns} if isinstance(patterns, list) and patterns else set()
    if not tops or any(not top or "*" in top or top in {".", ".."} for top in tops):
        return collect_files(app)
    files = {name: app / name for name in ("pyproject.toml", ".gitignore") if (app / name).is_file()}
    for top in sorted(tops):
        if (app / top).is_dir() and not (app / top).is_symlink():
            files.update({f"{top}/{rel}": path for rel, path in collect_files(app / top).items()})
    return files


def build_bundle(app: Path) -> bytes:
    """The FAB bytes `flwr run <app>` would submit (Flower's own builder, over `_candidate_files`)."""
    from common.compat import build_fab_from_files

    if not (app / "pyproject.toml").is_file():
        raise ConfigError(f"{app} is not a Flower app directory (no pyproject.toml).")
    try:
        return build_fab_from_files(_candidate_files(app))[0]
    except ValueError as exc:
        raise ConfigError(f"Cannot build the app bundle of {app}: {exc}") from exc


def stage_app(app: Path, dest: Path) -> Path:
    """Copy the files the app's bundle is built from into `dest` (for `flwr run dest`: the same bundle, without
    Flower walking the whole checkout)."""
    for rel, src in _candidate_files(app).items():
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, target)
    return dest


def bundle_digest(fab: bytes) -> str:
    return DIGEST_PREFIX + hashlib.sha256(fab).hexdigest()


def normalise_digest(value: str) -> str:
    """'sha256:<64 hex>' (the prefix is optional on input); anything else is a ConfigError."""
    hexpart = value[len(DIGEST_PREFIX):] if value.startswith(DIGEST_PREFIX) else value
    if len(hexpart) != 64 or any(c not in "0123456789abcdef" for c in hexpart.lower()):
        raise ConfigError(f"{value!r} is not an app digest (sha256:<64 hex digits>; see `fedsilo app digest`).")
    return DIGEST_PREFIX + hexpart.lower()
