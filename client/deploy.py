"""Start a department's Flower SuperNode from the site's own config: TLS, node key, site config as node config.

The site config file (not the server's job) says where the data and the ledger are and what the budget is; the
SuperNode hands its path to every ClientApp run as `node_config["site-config"]`.

The SuperNode (subprocess isolation) starts Flower's executor (`flower-superexec`), which starts a `flwr-clientapp`
process per message, both by name. `install_gate` provides a directory put first on the SuperNode's PATH: its
`flwr-clientapp` is fedsilo's gate (`client.gate`), and its `flower-superexec` is Flower's executor run by
`client.executor`, which runs the gate in a thread where the site has a warm worker: the site runs its own installed
ClientApp for approved jobs only, never the job's bundle.

Latency: the executor (`flower-superexec`, started by the SuperNode with the SuperNode's environment) asks for new
tasks every second by default; `supernode_env` sets its interval (`FLWR_SUPEREXEC_TASK_POLL_INTERVAL`, read and
checked by Flower's `flower-superexec`) to 0.1 s unless the operator set it. The SuperNode itself is Flower's
`flower-supernode`, run through `client.supernode`, which sets its two fixed waits (3 s idle, hard-coded in Flower
1.41 and 1.42) to the site config's `poll_seconds` and 0.1 s for a reply, in memory (`supernode_env` passes them).
"""

from __future__ import annotations

import logging
import os
import shlex
import sys
import tempfile
from pathlib import Path

from client.executor import FLOWER_SUPEREXEC, SITE_CONFIG_ENV
from client.gate import FLOWER_CLIENTAPP
from client.site import SiteConfig
from common import keys
from common.certs import check_ca_certificate
from common.errors import ConfigError
from common.runtime import check_port_free

log = logging.getLogger(__name__)

DEFAULT_CLIENTAPP_PORT = 9094
SUPEREXEC_POLL_ENV = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"  # Flower accepts 0.01 to 60 seconds; its default is 1
SUPEREXEC_POLL_SECONDS = "0.1"
THREADS_ENV = "OMP_NUM_THREADS"  # torch's intra-op threads (and OpenMP's) in every process the SuperNode starts


def supernode_env(base: dict[str, str] | None = None, site: SiteConfig | None = None,
                  site_config: Path | None = None) -> dict[str, str]:
    """The environment the SuperNode runs with (the current one if `base` is None): its executor polls for
    tasks every 0.1 s, unless `base` already sets the interval (the operator's choice stands); with `site`, the
    SuperNode's idle wait is the site's `poll_seconds`, its wait for a reply 0.1 s and its heartbeat interval the
    site's `heartbeat_seconds` (`client.supernode`), and the site's `threads` (if set) bound the CPU threads of
    its training (OMP_NUM_THREADS, which torch reads); with `site_config` (the file), its executor reads whether the
    site has a warm worker there (`client.executor`)."""
    from client.supernode import HEARTBEAT_ENV, POLL_ENV, REPLY_POLL_ENV, REPLY_POLL_SECONDS

    env = dict(os.environ if base is None else base)
    env.setdefault(SUPEREXEC_POLL_ENV, SUPEREXEC_POLL_SECONDS)
    if site is not None:
        env[POLL_ENV] = repr(site.poll_seconds)
        env[HEARTBEAT_ENV] = repr(site.heartbeat_seconds)
        env.setdefault(REPLY_POLL_ENV, REPLY_POLL_SECONDS)
        if site.threads:
            env[THREADS_ENV] = str(site.threads)
    if site_config is not None:
        env[SITE_CONFIG_ENV] = str(site_config.resolve())
    return env


def supernode_command(site_config: Path, *, port: int = DEFAULT_CLIENTAPP_PORT,
                      max_retries: int | None = None) -> list[str]:
    """Validate the site config and return the SuperNode's invocation for it: Flower's `flower-supernode`, run by
    `client.supernode`."""
    site = SiteConfig.from_toml(site_config)
    if not site.server:
        raise ConfigError(f"Site config {site_config}: set 'server' (the coordination server's host:port).")
    if not site.policy.approved_apps:
        raise ConfigError(f"Site config {site_config}: [policy] approved_apps is empty, so this site would refuse "
                          'every job. Approve the app you run (approved_apps = ["installed"]) or digests from '
                          "`fedsilo app digest`.")
    approved = site.policy.approved_digests()  # fails here, not at the first job, if a digest cannot be built
    log.info("client: site %s approves app(s) %s", site.name, ", ".join(sorted(approved)))
    rows = site.check_data()  # a missing, unreadable or malformed data file fails now, not at the first round
    log.info("client: site %s has %d rows of data in %s", site.name, rows, site.data)
    cmd = [sys.executable, "-m", "client.supernode", "--superlink", site.server, "--port", str(port),
           "--isolation", "subprocess",
           "--node-config", f'{keys.NODE_SITE_CONFIG}="{site_config.resolve()}"']
    if max_retries is not None:
        cmd += ["--max-retries", str(max_retries)]
    if site.insecure:
        if site.node_key:
            raise ConfigError(f"Site config {site_config}: node authentication needs TLS; drop 'insecure' or "
                              "'node_key'.")
        log.warning("client: site %s connects WITHOUT TLS or node authentication (insecure = true): local "
                    "development only.", site.name)
        cmd.append("--insecure")
    else:
        for key, value in (("ca", site.ca), ("node_key", site.node_key)):
            if not value:
                raise ConfigError(f"Site config {site_config}: '{key}' is required for a TLS connection.")
            if not Path(value).is_file():
                raise ConfigError(f"Site config {site_config}: {key} file {value} does not exist.")
        check_ca_certificate(Path(site.ca))
        cmd += ["--root-certificates", site.ca, "--auth-supernode-private-key", site.node_key]
    check_port_free("127.0.0.1", port)  # the SuperNode's local runtime API
    return cmd


REFUSED_EXIT = 126


def install_gate(parent: Path | None = None) -> Path:
    """A fresh private directory holding `flwr-clientapp` -> this Python running `client.gate`, `flower-superexec` ->
    `client.executor` (Flower's executor, which runs the gate in a thread where the site has a warm worker), and, for
    every other app process Flower's executor can start by name (agent apps, connectors, ...; each would load the
    job's own bundle), a stand-in that refuses: a job cannot reach the site's data by declaring another task type."""
    from client.compat import TASK_TYPE_TO_COMMAND

    site_modules = {FLOWER_CLIENTAPP: "client.gate", FLOWER_SUPEREXEC: "client.executor"}
    bin_dir = Path(tempfile.mkdtemp(prefix="fedsilo-gate-", dir=parent))  # mode 0700
    for command in set(TASK_TYPE_TO_COMMAND.values()) | set(site_modules):
        if command in site_modules:
            body = f"exec {shlex.quote(sys.executable)} -m {site_modules[command]} \"$@\""
        else:
            body = (f"echo 'fedsilo: this site runs only its own ClientApp; refusing {command}' >&2\n"
                    f"exit {REFUSED_EXIT}")
        script = bin_dir / command
        script.write_text(f"#!/bin/sh\n{body}\n", encoding="utf-8")
        script.chmod(0o700)
    return bin_dir
