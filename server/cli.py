"""The coordination server's commands: `server start`, `server register`, `server nodes`, `server run`, `server jobs`,
`server stop`, `server logs`."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from common.cli import EXIT_ERROR, add_config_option, exec_tool, run_config_from_args
from common.errors import FedsiloError, JobInterruptedError


def _cmd_server_start(args: argparse.Namespace) -> int:
    from server.deploy import ServerState, prepare_server

    if args.insecure:
        print("fedsilo: WARNING: --insecure: no TLS and no node authentication. Anyone on the network can read "
              "the traffic and join as a department. Local development only.", file=sys.stderr)
    cmd = prepare_server(args.state_dir, args.certs, args.host, args.port, insecure=args.insecure,
                         operator_networks=args.operator_network)
    return exec_tool(cmd, ServerState(args.state_dir).env())


def _cmd_server_register(args: argparse.Namespace) -> int:
    from server.deploy import register_node

    print(register_node(args.state_dir, args.key, args.name))
    return 0


def _cmd_server_nodes(args: argparse.Namespace) -> int:
    from server.deploy import list_nodes

    print(list_nodes(args.state_dir, as_json=args.json), end="")
    return 0


def _cmd_server_run(args: argparse.Namespace) -> int:
    from server.checkpoint import CHECKPOINT
    from server.deploy import JobSignals, follow_job, stop_unfinished_jobs, submit_job
    from server.records import read_report
    from server.report import REPORT_JSON
    from server.resume import resume_job

    if args.resume is None and (args.out is None or args.labels is None):
        raise FedsiloError("--out and --labels are required (unless --resume RUN_DIR continues a run).")
    if args.resume is not None and args.out is not None and args.out.resolve() != args.resume.resolve():
        raise FedsiloError("--out and --resume name different directories; --resume RUN_DIR continues that run.")
    out = (args.resume or args.out).resolve()
    if args.resume is None and ((out / REPORT_JSON).exists() or (out / CHECKPOINT).exists()):
        raise FedsiloError(f"{out} already holds a run; choose another --out, or continue it with --resume {out}.")
    rc = run_config_from_args(args)
    rc["out-dir"] = str(out)
    if args.resume is not None:
        rc = resume_job(out, rc)
        for stale in stop_unfinished_jobs(args.state_dir, out):
            print(f"fedsilo: stopped job {stale}, which wrote {out} and was still listed as running on the server "
                  "(its ServerApp died with the server, or still ran): only the resumed job writes there.",
                  file=sys.stderr, flush=True)
    state = shlex.quote(str(args.state_dir))
    with JobSignals() as signals:
        run_id = submit_job(args.state_dir, rc, args.app)
        if args.detach:
            print(f"Job {run_id} submitted; it runs on the server until it ends (report in {out}).\n"
                  f"  follow it:  fedsilo server logs --state-dir {state} {run_id} --follow\n"
                  f"  stop it:    fedsilo server stop --state-dir {state} {run_id}\n"
                  f"  all jobs:   fedsilo server jobs --state-dir {state}")
            return 0
        print(f"fedsilo: job {run_id} submitted; following its log (Ctrl-C stops the job on the server; "
              "--detach leaves a job running)", file=sys.stderr, flush=True)
        try:
            status = follow_job(args.state_dir, run_id, signals, verbose=args.verbose)
        except JobInterruptedError as exc:
            # The checkpoint is written before the first round; the report after each completed one.
            try:
                done = len(read_report(out / REPORT_JSON).rounds) if (out / REPORT_JSON).exists() else 0
            except FedsiloError:  # an unreadable report: say nothing of a resume
                done = 0
            if done and (out / CHECKPOINT).exists():
                print(f"fedsilo: {exc} The {done} round(s) it completed are in {out}; continue it with `fedsilo "
                      f"server run --state-dir {state} --resume {shlex.quote(str(out))}`.", file=sys.stderr)
            else:
                print(f"fedsilo: {exc} It had completed no round.", file=sys.stderr)
            return exc.exit_status
    if not (out / REPORT_JSON).exists():
        raise FedsiloError(f"The job ended (flwr exit status {status}) without a report in {out}; see the log above.")
    final = read_report(out / REPORT_JSON).final
    if final is None:
        raise FedsiloError(f"The job ended (flwr exit status {status}) before its last round: {out / REPORT_JSON} "
                           "records the rounds it completed, but no final result; see the log above, and continue "
                           f"it with --resume {out}.")
    if final.outcome == "ended_early":
        raise FedsiloError(f"The job ended early after {final.rounds_completed} round(s): {final.outcome_reason}. "
                           f"Report in {out}.")
    print(f"Job finished: {final.rounds_completed} rounds, global accuracy {final.global_accuracy}; report in {out}")
    return 0 if status == 0 else EXIT_ERROR


def _cmd_server_jobs(args: argparse.Namespace) -> int:
    from server.deploy import format_jobs, list_jobs

    jobs = list_jobs(args.state_dir)
    if args.json:
        print(json.dumps({"jobs": [job.to_json() for job in jobs]}, indent=2))
    else:
        print(format_jobs(jobs), end="")
    return 0


def _cmd_server_stop(args: argparse.Namespace) -> int:
    from server.deploy import stop_job

    stop_job(args.state_dir, args.run_id)
    print(f"Job {args.run_id} stopped.")
    return 0


def _cmd_server_logs(args: argparse.Namespace) -> int:
    from server.deploy import show_logs

    status = show_logs(args.state_dir, args.run_id, follow=args.follow, verbose=args.verbose)
    return 0 if status == 0 else EXIT_ERROR


def _add_verbose(parser: argparse.ArgumentParser) -> None:
    """`--verbose` after the command too (`fedsilo -v` before it sets the same): the job's whole log."""
    parser.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="print the job's whole log (Flower's lines included); by default fedsilo's own lines "
                             "(one per round, the job's start and end) and warnings")


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`server start|register|nodes|run|jobs|stop|logs`."""
    server = sub.add_parser("server", help="run the coordination server (Flower SuperLink) and submit jobs")
    ssub = server.add_subparsers(dest="server_command", required=True)
    start = ssub.add_parser("start", help="start the SuperLink: TLS, node authentication, persistent state")
    start.add_argument("--state-dir", type=Path, required=True, help="server state (database, operator connection)")
    start.add_argument("--certs", type=Path, help="directory from `fedsilo certs init` (ca.crt, server.pem, ...)")
    start.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    start.add_argument("--port", type=int, default=47100, help="HTTPS port (default 47100)")
    start.add_argument("--insecure", action="store_true", help="plaintext, no node authentication (dev only)")
    start.add_argument("--operator-network", action="append", default=[], metavar="CIDR",
                       help="also let this network submit jobs (Control API); default: this host only")
    start.set_defaults(func=_cmd_server_start)
    reg = ssub.add_parser("register", help="register a department's node public key")
    reg.add_argument("--state-dir", type=Path, required=True)
    reg.add_argument("--key", type=Path, required=True, help="the department's <name>.pub")
    reg.add_argument("--name", required=True, help="the department's name")
    reg.set_defaults(func=_cmd_server_register)
    nodes = ssub.add_parser("nodes", help="list registered departments' nodes and whether they are online")
    nodes.add_argument("--state-dir", type=Path, required=True)
    nodes.add_argument("--json", action="store_true", help="Flower's JSON listing (node-id, status, ...), for scripts")
    nodes.set_defaults(func=_cmd_server_nodes)
    run = ssub.add_parser("run", help="submit a federated fine-tuning job and follow it to the end (or --detach)")
    run.add_argument("--state-dir", type=Path, required=True)
    run.add_argument("--out", type=Path, help="where the server writes report, CSV, plots (required)")
    run.add_argument("--labels", help="class names in label order, e.g. negative,positive (required)")
    run.add_argument("--resume", type=Path, metavar="RUN_DIR",
                     help="continue the interrupted job in RUN_DIR from its last completed round (its job config "
                          "comes from the checkpoint; other options may only repeat it)")
    run.add_argument("--rounds", type=int)
    run.add_argument("--model", help="'minilm', 'tiny-random' or a model directory present on every host")
    run.add_argument("--finetune", choices=["lora", "full"])
    run.add_argument("--no-secagg", action="store_true", help="sites that require SecAgg+ will refuse")
    run.add_argument("--no-dp", action="store_true", help="sites that do not allow it will refuse")
    add_config_option(run, "any run-config key of pyproject.toml's [tool.flwr.app.config] (repeatable)")
    run.add_argument("--app", type=Path, help="submit this app directory instead of this installation's "
                     "(sites run only app bundles their policy approves)")
    run.add_argument("--detach", action="store_true",
                     help="submit the job, print its run id and return; it runs on until it ends (follow it with "
                          "`server logs`, stop it with `server stop`). Without it, Ctrl-C or SIGTERM stops the job")
    _add_verbose(run)
    run.set_defaults(func=_cmd_server_run)
    jobs = ssub.add_parser("jobs", help="list the server's jobs: run id, status, rounds done, departments, out dir")
    jobs.add_argument("--state-dir", type=Path, required=True)
    jobs.add_argument("--json", action="store_true", help="one JSON document, for scripts")
    jobs.set_defaults(func=_cmd_server_jobs)
    stop = ssub.add_parser("stop", help="stop a running job on the server")
    stop.add_argument("--state-dir", type=Path, required=True)
    stop.add_argument("run_id", type=int, metavar="RUN_ID", help="the job's run id (`server jobs`)")
    stop.set_defaults(func=_cmd_server_stop)
    logs = ssub.add_parser("logs", help="print a job's server log (ServerApp): fedsilo's lines, or --verbose all")
    logs.add_argument("--state-dir", type=Path, required=True)
    logs.add_argument("run_id", type=int, metavar="RUN_ID", help="the job's run id (`server jobs`)")
    logs.add_argument("--follow", "-f", action="store_true", help="keep printing until the job ends")
    _add_verbose(logs)
    logs.set_defaults(func=_cmd_server_logs)
