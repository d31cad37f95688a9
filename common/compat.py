"""Flower's private names that common code (and both sides) use, and the mechanism every compat module shares.

fedsilo imports Flower's documented API directly (`flwr.app`, `flwr.serverapp`, `flwr.clientapp`, `flwr.client`,
`flwr.client.mod`, `flwr.server`, `flwr.server.workflow`, `flwr.server.strategy`, `flwr.common`,
`flwr.simulation`: their top-level names). Every other Flower name it needs sits in one compat module per side:
`client.compat`, `server.compat`, and this one for `common` and for what both sides share (the app bundle builder,
SecAgg+'s arithmetic). A Flower upgrade that moves one of them breaks `tests/unit/test_flower_compat.py`, which
imports each name and fails if any other module imports a private Flower module.

Each compat module lists its names in `FLOWER_NAMES` (name -> "module:attribute", or "module" for a module) and
resolves them on first use (module `__getattr__`), so that importing a compat module costs nothing until a name
is used: the Flower CLI's and SuperLink's modules take up to half a second to import.
"""

from __future__ import annotations

import importlib
import inspect
import logging
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flwr.cli.build import build_fab_from_disk, build_fab_from_files
    from flwr.cli.utils import collect_files
    from flwr.common.logger import update_console_handler
    from flwr.common.secure_aggregation.ndarrays_arithmetic import (
        factor_combine,
        parameters_addition,
        parameters_mod,
        parameters_multiply,
    )
    from flwr.common.secure_aggregation.quantization import quantize
    from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen


class FlowerCompatError(ImportError):
    """The installed Flower lacks a private name fedsilo relies on (see the README's supported versions)."""


def resolve(target: str) -> Any:
    """The object `target` names: "package.module:attribute", or "package.module" for the module itself."""
    module, _, attribute = target.partition(":")
    value: Any = importlib.import_module(module)
    return getattr(value, attribute) if attribute else value


def flower_source(target: str) -> tuple[Any, str]:
    """The object `target` names (as `resolve`) and its source code: what an in-memory change to Flower reads
    before it changes anything (`client.compat`, `server.compat`); `FlowerCompatError` if either cannot be read."""
    try:
        value = resolve(target)
        return value, inspect.getsource(value)
    except (ImportError, AttributeError, OSError, TypeError) as exc:
        raise FlowerCompatError(f"cannot read Flower's {target}: {exc}") from exc


def flower_mismatch(what: str) -> FlowerCompatError:
    """The error for an installed Flower whose code is not what an in-memory change checked: "Flower <version>'s
    `what`"."""
    from flwr import __version__

    return FlowerCompatError(f"Flower {__version__}'s {what}")


def lazy_names(table: Mapping[str, str], namespace: dict[str, Any]) -> Callable[[str], Any]:
    """A module `__getattr__` resolving `table`'s names on first use and caching them in `namespace`."""

    def module_getattr(name: str) -> Any:
        target = table.get(name)
        if target is None:
            raise AttributeError(f"module {namespace['__name__']!r} has no attribute {name!r}")
        try:
            value = resolve(target)
        except (ImportError, AttributeError) as exc:
            from flwr import __version__

            raise FlowerCompatError(f"Flower {__version__} has no {target} ({namespace['__name__']}.{name}); "
                                    "fedsilo supports the Flower versions its pyproject.toml pins.") from exc
        namespace[name] = value
        return value

    return module_getattr


# ---------------------------------------------------------------- the wait for a message's objects (both sides)
# A message travels as its metadata first, then its objects (the arrays, the configs). A reader that finds an object
# not yet pushed waits before it asks again: Flower's pulls start at 1 s and double (10 s at most). Every hop of a
# message exchange pulls: the SuperNode from the SuperLink, the ClientApp from the SuperNode, the ServerApp from the
# SuperLink. A writer pushes the objects a few milliseconds after the metadata, so nearly every message with
# arrays waited a whole second at some hop.
OBJECT_PULLS = "flwr.supercore.inflatable.inflatable_utils"
OBJECT_PULL_USES = {"pull_objects": "delay = initial_backoff",
                    "pull_and_inflate_object_from_tree": "initial_backoff=initial_backoff"}
FLOWER_PULL_FIRST_WAIT = 1.0
PULL_FIRST_WAIT_SECONDS = 0.02


def set_object_pull_wait(seconds: float = PULL_FIRST_WAIT_SECONDS) -> None:
    """Make this process's pulls of a message's objects wait `seconds` (not Flower's 1 s) before they first ask
    again for an object not yet pushed, still doubling up to Flower's cap. In memory only (the functions' default
    arguments); `FlowerCompatError` (nothing changed) if the installed Flower's pulls are not the ones described
    here."""
    functions = []
    for name, use in OBJECT_PULL_USES.items():
        function, source = flower_source(f"{OBJECT_PULLS}:{name}")
        defaults = getattr(function, "__kwdefaults__", None) or {}
        if use not in source or not isinstance(defaults.get("initial_backoff"), int | float):
            raise flower_mismatch(f"{OBJECT_PULLS}.{name} has no keyword `initial_backoff` used as `{use}`")
        functions.append(function)
    for function in functions:
        function.__kwdefaults__["initial_backoff"] = seconds


def quicken_object_pulls(logger: logging.Logger, who: str) -> None:
    """`set_object_pull_wait`, or a warning in `logger` (the process then waits as Flower does; nothing else
    changes)."""
    try:
        set_object_pull_wait()
    except FlowerCompatError as exc:
        logger.warning("%s: %s; a message's objects not yet pushed are waited for as Flower does (%g s, doubling).",
                       who, exc, FLOWER_PULL_FIRST_WAIT)


_SECAGG = "flwr.common.secure_aggregation"
FLOWER_NAMES: dict[str, str] = {
    # the app bundle (FAB) exactly as `flwr run` builds it (common.appbundle)
    "collect_files": "flwr.cli.utils:collect_files",
    "build_fab_from_files": "flwr.cli.build:build_fab_from_files",
    "build_fab_from_disk": "flwr.cli.build:build_fab_from_disk",
    # SecAgg+'s quantisation and masking, as secaggplus_mod runs them (bench, equivalence tests)
    "factor_combine": f"{_SECAGG}.ndarrays_arithmetic:factor_combine",
    "parameters_addition": f"{_SECAGG}.ndarrays_arithmetic:parameters_addition",
    "parameters_mod": f"{_SECAGG}.ndarrays_arithmetic:parameters_mod",
    "parameters_multiply": f"{_SECAGG}.ndarrays_arithmetic:parameters_multiply",
    "quantize": f"{_SECAGG}.quantization:quantize",
    "pseudo_rand_gen": f"{_SECAGG}.secaggplus_utils:pseudo_rand_gen",
    # Flower's console handler without colour codes in the ServerApp's process (common.logs)
    "update_console_handler": "flwr.common.logger:update_console_handler",
}
__all__ = ["FLOWER_NAMES", "FlowerCompatError", "build_fab_from_disk", "build_fab_from_files", "collect_files",
           "factor_combine", "lazy_names", "parameters_addition", "parameters_mod", "parameters_multiply",
           "pseudo_rand_gen", "quantize", "resolve", "update_console_handler"]

__getattr__ = lazy_names(FLOWER_NAMES, globals())
