"""Every private (undocumented) Flower name the server side uses: the workflow internals that `server.secagg`
drives, the legacy strategy's ClientProxy type, the SuperLink pieces `server.superlink` assembles, and the
simulation engine's message queue (`set_simulation_queue_poll`).

Resolved on first use (see `common.compat`: the SuperLink's modules take half a second to import); checked name by
name by `tests/unit/test_flower_compat.py`.
"""

from __future__ import annotations

import functools
import inspect
import threading
from typing import TYPE_CHECKING, Any

from common.compat import flower_mismatch, flower_source, lazy_names, resolve

if TYPE_CHECKING:
    from flwr.cli.supernode.register import try_load_public_key
    from flwr.common.constant import ErrorCode
    from flwr.common.logger import console_handler
    from flwr.common.secure_aggregation.crypto.shamir import combine_shares, create_shares
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS as SECAGG_CONFIGS_RECORD
    from flwr.common.secure_aggregation.secaggplus_constants import Key as SecAggKey
    from flwr.compat.server.typing import Workflow
    from flwr.server.client_proxy import ClientProxy
    from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD
    from flwr.server.workflow.constant import Key as WorkflowKey
    from flwr.server.workflow.default_workflows import default_evaluate_workflow, default_fit_workflow
    from flwr.supercore.http_logging import get_uvicorn_log_config
    from flwr.superlink.cli.flower_superlink import SuperLinkLifespan
    from flwr.superlink.cli.flower_superlink import (
        _parse_superlink_lifespan_config as parse_superlink_lifespan_config,
    )
    from flwr.superlink.config_loader import get_federation_manager, get_objectstore_linkstate_factories
    from flwr.superlink.main import create_app

# The module, not the function of the same name that `flwr.superlink.cli` re-exports.
_FLOWER_SUPERLINK = "flwr.superlink.cli.flower_superlink"
FLOWER_NAMES: dict[str, str] = {
    # the legacy workflows and their records (server.secagg)
    "Workflow": "flwr.compat.server.typing:Workflow",
    "MAIN_CONFIGS_RECORD": "flwr.server.workflow.constant:MAIN_CONFIGS_RECORD",
    "WorkflowKey": "flwr.server.workflow.constant:Key",
    "default_fit_workflow": "flwr.server.workflow.default_workflows:default_fit_workflow",
    "default_evaluate_workflow": "flwr.server.workflow.default_workflows:default_evaluate_workflow",
    # the SecAgg+ messages' config record and keys (server.secagg trims the unmask stage's shares)
    "SECAGG_CONFIGS_RECORD": "flwr.common.secure_aggregation.secaggplus_constants:RECORD_KEY_CONFIGS",
    "SecAggKey": "flwr.common.secure_aggregation.secaggplus_constants:Key",
    # Flower's Shamir sharing (tests: the trimmed shares still reconstruct the secret)
    "combine_shares": "flwr.common.secure_aggregation.crypto.shamir:combine_shares",
    "create_shares": "flwr.common.secure_aggregation.crypto.shamir:create_shares",
    # the codes of a node's error reply (server.recording: a ClientApp that failed, or a node that is gone)
    "ErrorCode": "flwr.common.constant:ErrorCode",
    # the legacy strategy API's client handle (server.strategy)
    "ClientProxy": "flwr.server.client_proxy:ClientProxy",
    # the SuperLink process (server.superlink)
    "console_handler": "flwr.common.logger:console_handler",
    "get_uvicorn_log_config": "flwr.supercore.http_logging:get_uvicorn_log_config",
    "create_app": "flwr.superlink.main:create_app",
    "SuperLinkLifespan": f"{_FLOWER_SUPERLINK}:SuperLinkLifespan",
    "parse_superlink_lifespan_config": f"{_FLOWER_SUPERLINK}:_parse_superlink_lifespan_config",
    # how the SuperLink opens its database (`create_app`; tests: Flower keeps the pre-created superlink.db private)
    "get_federation_manager": "flwr.superlink.config_loader:get_federation_manager",
    "get_objectstore_linkstate_factories": "flwr.superlink.config_loader:get_objectstore_linkstate_factories",
    # `flwr supernode register`'s key loader (tests: fedsilo's node keys load in Flower)
    "try_load_public_key": "flwr.cli.supernode.register:try_load_public_key",
}
__all__ = ["FLOWER_NAMES", "MAIN_CONFIGS_RECORD", "SECAGG_CONFIGS_RECORD", "ClientProxy", "ErrorCode", "SecAggKey",
           "SuperLinkLifespan", "Workflow", "WorkflowKey", "combine_shares", "console_handler", "create_app",
           "create_shares", "default_evaluate_workflow", "default_fit_workflow", "get_federation_manager",
           "get_objectstore_linkstate_factories", "get_uvicorn_log_config", "parse_superlink_lifespan_config",
           "try_load_public_key"]


# ---------------------------------------------------------------- the simulation engine's message queue
SIMULATION_QUEUE = "flwr.server.superlink.fleet.vce.vce_api"  # `add_messages_to_queue`: the engine's extractor
FLOWER_QUEUE_POLL_SECONDS = 0.1  # it looks for each node's next message, then `f_stop.wait(0.1)`


class _PolledStop:
    """Flower's stop event as the simulation's message extractor sees it: its fixed 0.1 s wait lasts `poll` s;
    everything else is the event's own."""

    def __init__(self, event: threading.Event, poll: float) -> None:
        self._event, self._poll = event, poll

    def is_set(self) -> bool:
        return self._event.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        return self._event.wait(self._poll if timeout == FLOWER_QUEUE_POLL_SECONDS else timeout)


def set_simulation_queue_poll(seconds: float) -> None:
    """Make Flower's simulation engine in this process look for the departments' next messages every `seconds`
    (not every 0.1 s): each message of a round waited on average half that before a department saw it (a SecAgg+
    round has five). In memory only, before the simulation starts; `FlowerCompatError` (nothing changed) if the
    installed Flower's extractor is not the one described here."""
    current, source = flower_source(f"{SIMULATION_QUEUE}:add_messages_to_queue")
    original = getattr(current, "__wrapped__", current)  # set before: the function is fedsilo's wrapper of Flower's
    try:
        params = list(inspect.signature(original).parameters)
    except (TypeError, ValueError):
        params = []
    if params != ["state", "queue", "nodes_mapping", "f_stop"] or \
            f"f_stop.wait({FLOWER_QUEUE_POLL_SECONDS:g})" not in source:
        raise flower_mismatch(f"simulation message extractor ({SIMULATION_QUEUE}.add_messages_to_queue) is not "
                              "(state, queue, nodes_mapping, f_stop) waiting "
                              f"f_stop.wait({FLOWER_QUEUE_POLL_SECONDS:g})")

    @functools.wraps(original)
    def add_messages_to_queue(state: Any, queue: Any, nodes_mapping: Any, f_stop: threading.Event) -> None:
        original(state, queue, nodes_mapping, _PolledStop(f_stop, seconds))

    resolve(SIMULATION_QUEUE).add_messages_to_queue = add_messages_to_queue


__getattr__ = lazy_names(FLOWER_NAMES, globals())
