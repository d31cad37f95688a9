"""The department ClientApp: thin wiring of `client.runner.Department` into Flower.

This is the only client module that uses Flower's legacy API (`NumPyClient`, `client_fn`, `flwr.client.mod`),
which SecAgg+ requires in Flower 1.41.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
from flwr.app import Context, Message, MessageType
from flwr.client import Client, ClientApp, NumPyClient
from flwr.client.mod import secaggplus_mod

from client.compat import RECORD_KEY_CONFIGS, ClientAppCallable, Mod
from client.egress import EgressAudit
from client.failures import UNKNOWN_SITE, failure_metrics
from common import keys
from common.errors import FedsiloError, SecureAggregationError
from common.paths import run_out_dir

if TYPE_CHECKING:
    from client.runner import Department
    from client.site import SiteConfig

log = logging.getLogger(__name__)

Scalars = dict[str, bool | int | float | str | bytes]


class DepartmentClient(NumPyClient):
    """The department behind Flower's NumPyClient. A failure of its fit or evaluate (building the department from
    the site's config included) is answered, not raised: the failed status and one public line
    (`client.failures.public_reason`) go to the server, with no update (zeros of the global model's shapes and no
    weight, exactly as a decline: SecAgg+ masks such a reply like any other, so the protocol goes on); the whole
    error stays in the site's log, which names the site. The ledger is untouched by this: a failure after the
    charge (during or after training) stays charged, as before."""

    def __init__(self, department: Department | None = None, *,
                 make: Callable[[], Department] | None = None) -> None:
        """`department`, or `make` to build it on first use (so that a failure to build it is answered too)."""
        if (department is None) == (make is None):
            raise TypeError("DepartmentClient needs a department or a way to make one, not both.")
        self._built = department
        self._make = make

    @property
    def department(self) -> Department:
        if self._built is None and self._make is not None:
            self._built = self._make()
        if self._built is None:
            raise TypeError("DepartmentClient has no department.")
        return self._built

    def _site_name(self) -> str | None:
        return self._built.site.name if self._built is not None else None

    def _failed(self, stage: str, exc: Exception) -> dict[str, bool | int | float | str]:
        site = self._site_name()
        if isinstance(exc, FedsiloError):
            log.error("%s: site %s failed: %s: %s", stage, site or UNKNOWN_SITE, type(exc).__name__, exc)
        else:
            log.error("%s: site %s failed with an internal error", stage, site or UNKNOWN_SITE, exc_info=exc)
        metrics = failure_metrics(exc, site)
        log.warning("%s: site %s tells the server: %s", stage, site or UNKNOWN_SITE, metrics[keys.M_REASON])
        return metrics

    def fit(self, parameters: list[np.ndarray], config: Scalars) -> tuple[list[np.ndarray], int, Scalars]:
        try:
            fingerprint = config.get(keys.CFG_MODEL_FINGERPRINT)
            job_id = config.get(keys.CFG_JOB_ID)  # absent from servers before job ids: the department uses the run id
            outcome = self.department.fit(parameters, int(config[keys.CFG_ROUND]), int(config[keys.CFG_NUM_ROUNDS]),
                                          str(fingerprint) if fingerprint else None,
                                          job_id=str(job_id) if job_id is not None else None)
        except Exception as exc:  # noqa: BLE001 (answered as a failure; the error is logged at the site)
            # Nothing the department computed leaves: zeros of the global model's shapes, with no weight.
            return [np.zeros_like(a) for a in parameters], 0, dict(self._failed("fit", exc))
        return outcome.update, outcome.num_examples, dict(outcome.metrics)

    def evaluate(self, parameters: list[np.ndarray], config: Scalars) -> tuple[float, int, Scalars]:
        try:
            fingerprint = config.get(keys.CFG_MODEL_FINGERPRINT)
            loss, n, metrics = self.department.evaluate(parameters, str(fingerprint) if fingerprint else None)
        except Exception as exc:  # noqa: BLE001 (answered as a failure; the error is logged at the site)
            return 0.0, 0, dict(self._failed("evaluate", exc))
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
        return DepartmentClient(make=lambda: _department(context, fixed)).to_client()

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
