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
