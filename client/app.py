"""The department ClientApp: thin wiring of `client.runner.Department` into Flower.

This is the only client module that uses Flower's legacy API (`NumPyClient`, `client_fn`, `flwr.client.mod`),
which SecAgg+ requires in Flower 1.41.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
from flwr.app import Context, Message, MessageType
from flwr.client import Client, ClientApp, NumPyClient
from flwr.client.mod import secaggplus_mod

from client.compat import RECORD_KEY_CONFIGS, ClientAppCallable, Mod
from client.egress import EgressAudit
from common import keys
from common.errors import SecureAggregationError
from common.paths import run_out_dir

if TYPE_CHECKING:
    from client.runner import Department
    from client.site import SiteConfig

log = logging.getLogger(__name__)

Scalars = dict[str, bool | int | float | str | bytes]


class DepartmentClient(NumPyClient):
    def __init__(self, department: Department) -> None:
        self.department = department

    def fit(self, parameters: list[np.ndarray], config: Scalars) -> tuple[list[np.ndarray], int, Scalars]:
        fingerprint = config.get(keys.CFG_MODEL_FINGERPRINT)
        job_id = config.get(keys.CFG_JOB_ID)  # absent from servers before job ids: the department uses the run id
        outcome = self.department.fit(parameters, int(config[keys.CFG_ROUND]), int(config[keys.CFG_NUM_ROUNDS]),
                                      str(fingerprint) if fingerprint else None,
                                      job_id=str(job_id) if job_id is not None else None)
        return outcome.update, outcome.num_examples, dict(outcome.metrics)

    def evaluate(self, parameters: list[np.ndarray], config: Scalars) -> tuple[float, int, Scalars]:
        fingerprint = config.get(keys.CFG_MODEL_FINGERPRINT)
        loss, n, metrics = self.department.evaluate(parameters, str(fingerprint) if fingerprint else None)
        return loss, n, dict(metrics)


def _site(context: Context, overrides: Mapping[str, bool | int | float | str]) -> SiteConfig:
    """This node's site config (no torch import: every message needs it for the egress record)."""
    from client.site import resolve_site
    from common.data import resolve_job

    job, sim = resolve_job({**context.run_config, **overrides})
    return resolve_site(dict(context.node_config), job, sim, run_out_dir(job.out_dir, context.run_id))


def _department(context: Context, overrides: Mapping[str, bool | int | float | str]) -> Department:
    # Imported here, not at module level: Flower starts a fresh process for every message, and three of SecAgg+'s
    # four stages never reach the department's code; they should not pay for importing torch and transformers.
    from client.runner import Department
    from common.data import resolve_job

    job, _ = resolve_job({**context.run_config, **overrides})
    return Department(_site(context, overrides), job, str(context.run_id))


def build_client_app(overrides: Mapping[str, bool | int | float | str] | None = None,
                     mods: Sequence[Mod] = ()) -> ClientApp:
    """A ClientApp; `overrides` are merged over the run config (used by the in-process simulation).

    Mods, outermost first: `mods` (extra Flower client mods; tests use them to intercept what leaves or to inject
    failures), the egress audit (records every reply at the site, after SecAgg+ masking), then the SecAgg+ guard.
    """
    fixed = dict(overrides or {})

    def site_of(context: Context) -> SiteConfig:
        return _site(context, fixed)

    def client_fn(context: Context) -> Client:
        return DepartmentClient(_department(context, fixed)).to_client()

    def secagg_guard_mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
        """Run SecAgg+ when the server drives it; otherwise refuse to train if the site requires it."""
        if msg.metadata.message_type != MessageType.TRAIN:
            return call_next(msg, ctxt)
        if RECORD_KEY_CONFIGS in msg.content.config_records:
            return secaggplus_mod(msg, ctxt, call_next)
        if _department(ctxt, fixed).site.require_secagg:
            raise SecureAggregationError("This site requires SecAgg+, but the server sent an unmasked training "
                                         "request; refusing to send an update in the clear.")
        return call_next(msg, ctxt)

    return ClientApp(client_fn=client_fn, mods=[*mods, EgressAudit(site_of).mod, secagg_guard_mod])


app = build_client_app()
