"""The site's SuperNode executor: Flower's own `flower-superexec`, which answers a message in a gate thread.

Flower's SuperNode starts its executor (`flower-superexec`, found on its PATH) once, and the executor starts a
fresh `flwr-clientapp` process for every message (its subprocess executor). At a fedsilo site that process is the
gate (`client.gate`): importing Flower's runtime costs it about 0.5 s of CPU before it looks at the message, and
a SecAgg+ round is five messages per site, so a round waited seconds on imports alone.

`fedsilo client start` puts this module in the executor's place (`client.deploy.install_gate`). It runs Flower's
own `flower-superexec` (same arguments, same loop, same task poll) with one change to how a task is launched
(`client.compat.set_superexec_executor`, in memory; nothing on disk is patched): a ClientApp task of a site that
serves runs in a warm worker (site config `warm_worker`, on by default) runs the gate's `run` in a thread of this
process instead of a fresh gate process. Every other task, and every task of a site without a warm worker, goes to
Flower's subprocess executor as before: a site without a warm worker runs the ClientApp in a fresh process per
message, never in this long-lived one. The decision is made per task, from the site config as it is then.

The gate thread does what the gate process did, with the same code: it pulls the message with the task's token,
checks the bundle digest and the pinned server, and forwards the message to the run's warm worker, which runs the
site's installed ClientApp and charges its ledger. This process holds no job state between messages and never
imports a job's bundle. The security argument is in `docs/threat-model.md` ("The site's executor").
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from pathlib import Path
from typing import Any

from client.site import SiteConfig
from common.errors import FedsiloError

log = logging.getLogger(__name__)

# Flower's executor process name: the SuperNode starts it by this name (see client.deploy)
FLOWER_SUPEREXEC = "flower-superexec"
SITE_CONFIG_ENV = "FEDSILO_SITE_CONFIG"  # set by `client start` (client.deploy.supernode_env)


class GateExecutor:
    """Flower's executor, except that a ClientApp task of a site with a warm worker runs the gate in a thread of
    this process (see the module docstring); everything else is `inner`'s (Flower's subprocess executor)."""

    def __init__(self, inner: Any, site_config: Path) -> None:
        self.inner, self.site_config = inner, site_config

    def __getattr__(self, name: str) -> Any:  # capacity, reconcile, close: Flower's own
        return getattr(self.inner, name)

    def _in_thread(self, spec: Any) -> bool:
        from client.compat import TaskType

        if spec.task_type != TaskType.CLIENT_APP or spec.runtime_dependency_install:
            return False  # the gate process refuses runtime installs itself; other task types meet its stand-ins
        try:
            return SiteConfig.from_toml(self.site_config).warm_worker
        except FedsiloError as exc:  # the gate process reports the config error in the message's reply
            log.error("executor: site config %s: %s", self.site_config, exc)
            return False

    def launch(self, spec: Any) -> Any:
        from client.compat import LaunchResult

        if not self._in_thread(spec):
            return self.inner.launch(spec)
        threading.Thread(target=_serve, args=(spec,), name=f"gate-task-{spec.task_id}", daemon=True).start()
        return LaunchResult.accepted()


def _serve(spec: Any) -> None:
    """One message through the gate (`client.gate.run`), in this process, with the task's own token."""
    from client.compat import validate_and_resolve_root_certificates
    from client.gate import run

    try:
        certificates = validate_and_resolve_root_certificates(spec.root_certificates_path, spec.insecure)
        run(spec.runtime_api_address, spec.token, spec.insecure, certificates, os.getpid(), in_process=True)
    except (Exception, SystemExit):  # one message's failure (Flower's own checks exit) must not end the site's
        # executor, nor pass unsaid: Flower expires the task
        log.exception("executor: the gate failed on task %d", spec.task_id)


def gate_executor(site_config: Path) -> Any:
    """The wrapper `client.compat.set_superexec_executor` applies to the executor Flower builds."""

    def wrap(inner: Any) -> Any:
        from client.compat import SubprocessExecutor

        return GateExecutor(inner, site_config) if isinstance(inner, SubprocessExecutor) else inner

    return wrap


def main() -> None:
    from client import compat
    from client.gate import configure_gate_logging
    from common.compat import FlowerCompatError, quicken_object_pulls

    configure_gate_logging()
    quicken_object_pulls(log, "executor")
    site_config = os.environ.get(SITE_CONFIG_ENV)
    if site_config:
        try:
            compat.set_superexec_executor(gate_executor(Path(site_config)))
        except FlowerCompatError as exc:  # slower messages, nothing else: a gate process per message, as before
            log.warning("executor: %s; every message starts a gate process.", exc)
    else:
        log.warning("executor: %s is not set; every message starts a gate process.", SITE_CONFIG_ENV)
    sys.argv[0] = FLOWER_SUPEREXEC
    compat.flower_superexec()


if __name__ == "__main__":
    main()
