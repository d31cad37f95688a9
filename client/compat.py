"""Every private (undocumented) Flower name the client side uses: the SecAgg+ record keys the department and its
egress audit read, the ClientApp typing, the `flwr-clientapp` runtime that `client.gate` re-implements, and the
Fleet API pieces `client.join` uses to ask the server whether a node key is registered.

Resolved on first use (see `common.compat`); checked name by name by `tests/unit/test_flower_compat.py`.
"""

from __future__ import annotations

import functools
import time
import types
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from common.compat import lazy_names

if TYPE_CHECKING:
    from flwr.clientapp.typing import ClientAppCallable, Mod
    from flwr.common.args import add_args_flwr_app_common, try_obtain_flwr_app_token
    from flwr.common.constant import (
        HEARTBEAT_DEFAULT_INTERVAL,
        HEARTBEAT_MAX_INTERVAL,
        HEARTBEAT_MIN_INTERVAL,
        HEARTBEAT_PATIENCE,
        ErrorCode,
        SubStatus,
    )
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
    from flwr.common.secure_aggregation.secaggplus_constants import Key as SecAggKey
    from flwr.common.secure_aggregation.secaggplus_constants import Stage as SecAggStage
    from flwr.common.serde import context_from_proto, context_to_proto, message_from_proto, message_to_proto
    from flwr.proto.fleet_pb2 import ActivateNodeRequest, DeactivateNodeRequest
    from flwr.proto.message_pb2 import Context as ProtoContext
    from flwr.proto.message_pb2 import Message as ProtoMessage
    from flwr.supercore.app_utils import start_parent_process_monitor
    from flwr.supercore.cli import flower_superexec
    from flwr.supercore.constant import TASK_TYPE_TO_COMMAND, TaskType
    from flwr.supercore.error import ApiErrorCode, FlowerError
    from flwr.supercore.error.catalog import API_ERROR_MAP
    from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
    from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient
    from flwr.supercore.superexec.executor import LaunchResult, SubprocessExecutor
    from flwr.supercore.superexec.run_superexec import _get_task_poll_interval as get_task_poll_interval
    from flwr.supercore.tls import validate_and_resolve_root_certificates
    from flwr.supernode.cli import flower_supernode
    from flwr.supernode.cli.flower_supernode import (
        _try_setup_client_authentication as try_setup_client_authentication,
    )
    from flwr.supernode.fleet_http_client import FleetHttpClient
    from flwr.supernode.fleet_http_connection import http_request_response
    from flwr.supernode.node_auth_http_interceptor import NodeAuthHttpInterceptor
    from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

_SECAGGPLUS = "flwr.common.secure_aggregation.secaggplus_constants"
_RUN_CLIENTAPP = "flwr.supernode.runtime.run_clientapp"
FLOWER_NAMES: dict[str, str] = {
    # ClientApp mods (client.app, client.egress, simulations.run)
    "ClientAppCallable": "flwr.clientapp.typing:ClientAppCallable",
    "Mod": "flwr.clientapp.typing:Mod",
    # SecAgg+ messages as secaggplus_mod reads them (client.app, client.egress)
    "RECORD_KEY_CONFIGS": f"{_SECAGGPLUS}:RECORD_KEY_CONFIGS",
    "SecAggKey": f"{_SECAGGPLUS}:Key",
    "SecAggStage": f"{_SECAGGPLUS}:Stage",
    # the SuperNode's executor: the app processes it may start by name (client.deploy)
    "TASK_TYPE_TO_COMMAND": "flwr.supercore.constant:TASK_TYPE_TO_COMMAND",
    # the SuperNode's executor itself, run by client.executor with the gate in place of a process per message
    "flower_superexec": "flwr.supercore.cli:flower_superexec",
    "TaskType": "flwr.supercore.constant:TaskType",
    "LaunchResult": "flwr.supercore.superexec.executor:LaunchResult",
    "SubprocessExecutor": "flwr.supercore.superexec.executor:SubprocessExecutor",
    # flwr-clientapp's process, re-implemented by client.gate
    "ErrorCode": "flwr.common.constant:ErrorCode",
    "SubStatus": "flwr.common.constant:SubStatus",
    "add_args_flwr_app_common": "flwr.common.args:add_args_flwr_app_common",
    "try_obtain_flwr_app_token": "flwr.common.args:try_obtain_flwr_app_token",
    "start_parent_process_monitor": "flwr.supercore.app_utils:start_parent_process_monitor",
    "HeartbeatSender": "flwr.supercore.heartbeat:HeartbeatSender",
    "make_task_heartbeat_fn_http": "flwr.supercore.heartbeat:make_task_heartbeat_fn_http",
    "RuntimeTokenHttpInterceptor": "flwr.supercore.interceptors:RuntimeTokenHttpInterceptor",
    "RuntimeVersionHttpInterceptor": "flwr.supercore.interceptors:RuntimeVersionHttpInterceptor",
    "make_simple_http_retry_invoker": "flwr.supercore.retry:make_simple_http_retry_invoker",
    "RuntimeHttpClient": "flwr.supercore.runtime:RuntimeHttpClient",
    "validate_and_resolve_root_certificates": "flwr.supercore.tls:validate_and_resolve_root_certificates",
    "pull_task_input": f"{_RUN_CLIENTAPP}:pull_task_input",
    "push_message": f"{_RUN_CLIENTAPP}:push_message",
    "push_task_output": f"{_RUN_CLIENTAPP}:push_task_output",
    # a message and its context between the gate and the site's warm worker (client.worker)
    "message_to_proto": "flwr.common.serde:message_to_proto",
    "message_from_proto": "flwr.common.serde:message_from_proto",
    "context_to_proto": "flwr.common.serde:context_to_proto",
    "context_from_proto": "flwr.common.serde:context_from_proto",
    "ProtoMessage": "flwr.proto.message_pb2:Message",
    "ProtoContext": "flwr.proto.message_pb2:Context",
    # the executor's reading of its task poll interval (tests: Flower reads the variable client.deploy sets)
    "get_task_poll_interval": "flwr.supercore.superexec.run_superexec:_get_task_poll_interval",
    # the SuperNode's loader of its authentication key (tests: fedsilo's node keys load in Flower)
    "try_setup_client_authentication": "flwr.supernode.cli.flower_supernode:_try_setup_client_authentication",
    # the SuperNode's entry point, run by client.supernode after setting its waits
    "flower_supernode": "flwr.supernode.cli:flower_supernode",
    # why a site cannot join (client.join): a signed activation request with an out-of-range heartbeat interval,
    # the server's error codes, and the heartbeat window; the SuperNode's connection (tests: the line it logs)
    "HEARTBEAT_DEFAULT_INTERVAL": "flwr.common.constant:HEARTBEAT_DEFAULT_INTERVAL",
    "HEARTBEAT_MIN_INTERVAL": "flwr.common.constant:HEARTBEAT_MIN_INTERVAL",
    "HEARTBEAT_MAX_INTERVAL": "flwr.common.constant:HEARTBEAT_MAX_INTERVAL",
    "HEARTBEAT_PATIENCE": "flwr.common.constant:HEARTBEAT_PATIENCE",
    "ActivateNodeRequest": "flwr.proto.fleet_pb2:ActivateNodeRequest",
    "DeactivateNodeRequest": "flwr.proto.fleet_pb2:DeactivateNodeRequest",
    "ApiErrorCode": "flwr.supercore.error:ApiErrorCode",
    "FlowerError": "flwr.supercore.error:FlowerError",
    "API_ERROR_MAP": "flwr.supercore.error.catalog:API_ERROR_MAP",
    "public_key_to_bytes": "flwr.supercore.primitives.asymmetric:public_key_to_bytes",
    "FleetHttpClient": "flwr.supernode.fleet_http_client:FleetHttpClient",
    "NodeAuthHttpInterceptor": "flwr.supernode.node_auth_http_interceptor:NodeAuthHttpInterceptor",
    "http_request_response": "flwr.supernode.fleet_http_connection:http_request_response",
}
__all__ = ["API_ERROR_MAP", "FLOWER_NAMES", "HEARTBEAT_DEFAULT_INTERVAL", "HEARTBEAT_MAX_INTERVAL",
           "HEARTBEAT_MIN_INTERVAL",
           "HEARTBEAT_PATIENCE", "RECORD_KEY_CONFIGS", "TASK_TYPE_TO_COMMAND", "ActivateNodeRequest", "ApiErrorCode",
           "ClientAppCallable", "DeactivateNodeRequest", "ErrorCode", "FleetHttpClient",
           "FlowerError", "HeartbeatSender", "LaunchResult", "Mod", "NodeAuthHttpInterceptor", "ProtoContext",
           "ProtoMessage", "RuntimeHttpClient", "RuntimeTokenHttpInterceptor", "RuntimeVersionHttpInterceptor",
           "SecAggKey", "SecAggStage", "SubStatus", "SubprocessExecutor", "TaskType",
           "add_args_flwr_app_common", "context_from_proto", "context_to_proto", "flower_superexec",
           "flower_supernode",
           "get_task_poll_interval", "http_request_response", "make_simple_http_retry_invoker",
           "make_task_heartbeat_fn_http", "message_from_proto", "message_to_proto", "public_key_to_bytes",
           "pull_task_input", "push_message", "push_task_output", "start_parent_process_monitor",
           "try_obtain_flwr_app_token", "try_setup_client_authentication", "validate_and_resolve_root_certificates"]


# ---------------------------------------------------------------- the SuperNode's two fixed waits (client.supernode)
SUPERNODE_LOOP = "flwr.supernode.start_client_internal"
FLOWER_IDLE_POLL_SECONDS = 3.0  # no message for this node: `time.sleep(3)` before asking again
FLOWER_REPLY_POLL_SECONDS = 0.5  # a ClientApp runs: `time.sleep(0.5)` between looks for its reply


FIRST_IDLE_POLL_SECONDS = 0.05  # the first look for the next message after a ClientApp's reply
IDLE_POLL_GROWTH = 1.5  # then each idle wait half as long again, up to the site's idle wait


class _SuperNodeClock:
    """Stands in for the `time` module inside Flower's SuperNode loop: its two fixed waits take the site's
    values; every other call is the `time` module's own. After a ClientApp's reply (the loop waited for one), the
    idle wait starts at `FIRST_IDLE_POLL_SECONDS` and grows by `IDLE_POLL_GROWTH` up to `idle`: a round's next
    message (the next SecAgg+ stage, the evaluation) usually follows within a second, and an idle site soon asks
    only every `idle` seconds again."""

    def __init__(self, idle: float, reply: float) -> None:
        self.idle, self.reply = idle, reply
        self.next_idle = idle

    def sleep(self, seconds: float) -> None:
        if seconds == FLOWER_IDLE_POLL_SECONDS:
            seconds = self.next_idle
            self.next_idle = min(self.idle, self.next_idle * IDLE_POLL_GROWTH)
        elif seconds == FLOWER_REPLY_POLL_SECONDS:
            seconds = self.reply
            self.next_idle = min(self.idle, FIRST_IDLE_POLL_SECONDS)
        time.sleep(seconds)

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


def set_supernode_polls(idle: float, reply: float) -> None:
    """Make the SuperNode of this process wait `idle` seconds (not 3) before asking the SuperLink again for a
    message (less for a few looks after a reply: `_SuperNodeClock`), and `reply` seconds (not 0.5) between looks
    for a ClientApp's reply. In memory only, before Flower's SuperNode starts; `FlowerCompatError` (nothing
    changed) if the installed Flower's loop is not the one described here."""
    from common.compat import flower_mismatch, flower_source

    module, source = flower_source(SUPERNODE_LOOP)
    waits = [f"time.sleep({FLOWER_IDLE_POLL_SECONDS:g})", f"time.sleep({FLOWER_REPLY_POLL_SECONDS:g})"]
    missing = [w for w in waits if w not in source]
    if missing or not isinstance(getattr(module, "time", None), (types.ModuleType, _SuperNodeClock)):
        raise flower_mismatch(f"SuperNode loop ({SUPERNODE_LOOP}) has no "
                              f"{' and no '.join(missing) or 'module-level time'}")
    module.time = _SuperNodeClock(idle, reply)  # type: ignore[attr-defined]


# ---------------------------------------------------------------- the SuperNode's heartbeat (client.supernode)
# The SuperNode declares its heartbeat interval to the SuperLink (fleet connection) and sends heartbeats at that
# pace (Flower's HeartbeatSender): both read Flower's fixed HEARTBEAT_DEFAULT_INTERVAL (30 s) from their module.
SUPERNODE_HEARTBEAT_USES = {
    "flwr.supernode.fleet_http_connection": "heartbeat_interval=HEARTBEAT_DEFAULT_INTERVAL",
    "flwr.supercore.heartbeat": "HEARTBEAT_DEFAULT_INTERVAL - HEARTBEAT_CALL_TIMEOUT",
}


def set_supernode_heartbeat(seconds: float) -> None:
    """Make the SuperNode of this process declare, and keep, a heartbeat every `seconds` (Flower's is a fixed
    30 s): the SuperLink counts the node gone after `HEARTBEAT_PATIENCE` intervals without one. In memory only,
    before Flower's SuperNode starts; `FlowerCompatError` (nothing changed) if the installed Flower does not read
    the interval where described here, and `ValueError` outside the range Flower's SuperLink accepts."""
    from client import compat
    from common.compat import flower_mismatch, flower_source

    low, high = compat.HEARTBEAT_MIN_INTERVAL, compat.HEARTBEAT_MAX_INTERVAL
    if not low <= seconds <= high:
        raise ValueError(f"a heartbeat interval must be from {low} to {high} s, got {seconds:g}")
    modules = []
    for name, use in SUPERNODE_HEARTBEAT_USES.items():
        module, source = flower_source(name)
        if use not in source or not isinstance(getattr(module, "HEARTBEAT_DEFAULT_INTERVAL", None), int | float):
            raise flower_mismatch(f"{name} does not read its heartbeat interval as `{use}`")
        modules.append(module)
    for module in modules:
        module.HEARTBEAT_DEFAULT_INTERVAL = seconds  # type: ignore[attr-defined]


# ---------------------------------------------------------------- the SuperNode's executor (client.executor)
SUPEREXEC_LOOP = "flwr.supercore.superexec.run_superexec"
SUPEREXEC_BUILDS = "executor = get_executor("  # run_superexec builds its executor by this module-level name


def set_superexec_executor(wrap: Callable[[Any], Any]) -> None:
    """Make Flower's SuperExec of this process launch its tasks through `wrap(executor)`, where `executor` is the
    one Flower builds (its subprocess executor: a process per task). In memory only, before the SuperExec starts;
    setting it again wraps Flower's own builder, not the last wrapper. `FlowerCompatError` (nothing changed) if
    the installed Flower's SuperExec does not build its executor as described here."""
    from common.compat import flower_mismatch, flower_source

    module, source = flower_source(SUPEREXEC_LOOP)
    current = getattr(module, "get_executor", None)
    if SUPEREXEC_BUILDS not in source or not callable(current):
        raise flower_mismatch(f"SuperExec ({SUPEREXEC_LOOP}) does not build its executor as `{SUPEREXEC_BUILDS}`")
    flower_builder: Callable[..., Any] = getattr(current, "__wrapped__", current)

    @functools.wraps(flower_builder)
    def get_executor(*args: Any, **kwargs: Any) -> Any:
        return wrap(flower_builder(*args, **kwargs))

    module.get_executor = get_executor  # type: ignore[attr-defined]


__getattr__ = lazy_names(FLOWER_NAMES, globals())
