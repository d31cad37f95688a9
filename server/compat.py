"""Every private (undocumented) Flower name the server side uses: the workflow internals that `server.secagg`
drives, the legacy strategy's ClientProxy type, and the SuperLink pieces `server.superlink` assembles.

Resolved on first use (see `common.compat`: the SuperLink's modules take half a second to import); checked name by
name by `tests/unit/test_flower_compat.py`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from common.compat import lazy_names

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

__getattr__ = lazy_names(FLOWER_NAMES, globals())
