"""The site's ClientApp process: it runs the site's own fedsilo, never the code a job ships.

In a Flower deployment the SuperNode hands each message of a run to a fresh `flwr-clientapp` process, which
installs the run's app bundle (FAB) and imports its ClientApp: whoever submits a job chooses the code that runs on
the site's data. `fedsilo client start` puts this module in that place instead (see `client.deploy`). For each
message it:

1. pulls the message, the run and the FAB from the local SuperNode (Flower's Runtime API, as `flwr-clientapp`);
2. checks the FAB's sha256 against the site's policy (`approved_apps`) using only its bytes: the bundle is never
   unpacked, installed or imported, approved or not;
3. checks the job against the policy (server pinning here; rounds and per-job epsilon in `client.runner`);
4. runs the ClientApp of the fedsilo installed at this site (`client.app:app`), whose ledger and checks the site
   has reviewed, and pushes its reply: in the run's warm worker (`client.worker`, started here on the run's first
   admitted message), or in this process when the site config sets `warm_worker = false`.

A refused job gets an error reply naming the reason; the server records it in the round's report.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from flwr.app import Context, Error, Message

from client.compat import (
    ErrorCode,
    HeartbeatSender,
    RuntimeHttpClient,
    RuntimeTokenHttpInterceptor,
    RuntimeVersionHttpInterceptor,
    SubStatus,
    add_args_flwr_app_common,
    make_simple_http_retry_invoker,
    make_task_heartbeat_fn_http,
    pull_task_input,
    push_message,
    push_task_output,
    start_parent_process_monitor,
    try_obtain_flwr_app_token,
    validate_and_resolve_root_certificates,
)
from client.egress import record_refusal
from client.failures import UNKNOWN_SITE, public_reason
from client.site import SiteConfig
from common import keys
from common.compat import quicken_object_pulls
from common.errors import ConfigError, FedsiloError, PolicyError, PrivacyError

log = logging.getLogger(__name__)

# Flower's own ClientApp process name: the SuperNode's executor starts it by this name (see client.deploy).
FLOWER_CLIENTAPP = "flwr-clientapp"


def site_of(context: Context) -> SiteConfig:
    """The site config the SuperNode was started with (node config, set by the site, not by the job)."""
    path = context.node_config.get(keys.NODE_SITE_CONFIG)
    if not isinstance(path, str) or not path:
        raise ConfigError(f"This SuperNode has no '{keys.NODE_SITE_CONFIG}' node config: start it with "
                          "`fedsilo client start`.")
    return SiteConfig.from_toml(Path(path))


def admit(site: SiteConfig, fab: bytes) -> str:
    """Everything the site checks before any job code could matter; returns the approved app digest."""
    digest = site.policy.check_app(site.name, fab)
    if site.server and site.ca and not site.insecure:
        site.policy.check_server(site.name, site.server, Path(site.ca))
    return digest


def handle(message: Message, context: Context, fab: bytes, parent_pid: int | None = None,
           in_process: bool = False) -> Message:
    """The reply to one message: the installed ClientApp's (in the run's warm worker if the site has one, see
    `client.worker`; `context` then takes its state), or an error naming why the site refused. `in_process`: this
    is a thread of the site's long-lived executor (`client.executor`), which never runs the ClientApp itself."""
    site: SiteConfig | None = None
    try:
        site = site_of(context)
        digest = admit(site, fab)
        if in_process and not site.warm_worker:
            raise PolicyError(f"Site {site.name} turned its warm worker off while this message was dispatched; "
                              "the next message runs in a process of its own.")
    except FedsiloError as exc:
        log.error("gate: site %s refused run %s: %s", site.name if site is not None else UNKNOWN_SITE,
                  context.run_id, exc)
        # The server sees the error's type and one public line (no paths, no values): `public_reason`.
        reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION,
                              reason=public_reason(exc, site.name if site is not None else None)),
                        reply_to=message)
        if site is not None:
            try:
                record_refusal(site, message, context.run_id, reply)  # the refusal leaves the site too
            except PrivacyError as failure:
                log.error("gate: could not record the refusal in the egress log: %s", failure)
        return reply
    log.info("gate: site %s runs its installed ClientApp for run %s (app %s approved)%s", site.name,
             context.run_id, digest, " in its warm worker" if site.warm_worker else "")
    from client.worker import WorkerError, forward, run_installed

    if not site.warm_worker:
        return run_installed(message, context, site.name)
    try:
        return forward(site, digest, message, context, parent_pid)
    except (WorkerError, PolicyError) as exc:
        log.error("gate: site %s: %s", site.name, exc)
        reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=public_reason(exc, site.name)),
                        reply_to=message)
        try:
            record_refusal(site, message, context.run_id, reply)  # what leaves the site is recorded
        except PrivacyError as failure:
            log.error("gate: could not record the failure in the egress log: %s", failure)
        return reply


def run(runtime_api_address: str, token: str, insecure: bool, certificates: bytes | None,
        parent_pid: int | None = None, in_process: bool = False) -> int:
    """One message, as Flower's `flwr-clientapp` does it, with `handle` in place of loading the FAB; in a process
    of its own, or (`in_process`) in a thread of the site's executor (`client.executor`)."""
    retry_invoker = make_simple_http_retry_invoker()
    client = RuntimeHttpClient.from_server_address(
        server_address=runtime_api_address, insecure=insecure, root_certificates=certificates,
        interceptors=[RuntimeVersionHttpInterceptor(component_name=FLOWER_CLIENTAPP),
                      RuntimeTokenHttpInterceptor(token)],
        retry_invoker=retry_invoker)
    heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
    heartbeat.start()
    context: Context | None = None
    status, details = SubStatus.FAILED, "ClientApp task failed"
    try:
        message, context, _run, fab = pull_task_input(client)
        reply = handle(message, context, fab.content, parent_pid, in_process)
        push_message(client, reply, context)
        if reply.has_error():
            details = reply.error.reason
        else:
            status, details = SubStatus.COMPLETED, ""
    except (FedsiloError, OSError, RuntimeError, ValueError) as exc:
        log.error("gate: task failed: %s", exc)
        details = str(exc)
    finally:
        retry_invoker.max_tries = 1
        push_task_output(client=client, context=context, sub_status=status, details=details)
        if heartbeat.is_running:
            heartbeat.stop()
        client.close()
    return 0 if status == SubStatus.COMPLETED else 1


def configure_gate_logging() -> None:
    """The gate's lines in the site's log: fedsilo's from INFO, other libraries' warnings. httpx logs each Runtime
    API request at INFO (dozens per message), and Flower's records are printed by its own console handler (through
    the root handler too, they came twice, with Flower's DEBUG records)."""
    from common.logs import FORMAT

    logging.basicConfig(level=logging.INFO, format=FORMAT)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("flwr").propagate = False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=FLOWER_CLIENTAPP, description="fedsilo's site-approved ClientApp process")
    parser.add_argument("--runtime-api-address", required=True)
    add_args_flwr_app_common(parser)
    args = parser.parse_args(argv)
    if args.parent_pid is not None:
        start_parent_process_monitor(args.parent_pid)  # die with the SuperNode
    configure_gate_logging()
    quicken_object_pulls(log, "gate")
    if getattr(args, "runtime_dependency_install", False):
        raise PolicyError("Runtime dependency installation is not allowed at a fedsilo site.")
    certificates = validate_and_resolve_root_certificates(args.root_certificates, args.insecure)
    return run(args.runtime_api_address, try_obtain_flwr_app_token(args), args.insecure, certificates,
               args.parent_pid)


if __name__ == "__main__":
    raise SystemExit(main())
