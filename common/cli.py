"""The `fedsilo` command line. Every fedsilo error becomes one clear message on stderr and exit status 2."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from common.errors import FedsiloError

EXIT_ERROR = 2


def _parse_value(text: str) -> bool | int | float | str:
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _key_value(text: str) -> tuple[str, bool | int | float | str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key.strip(), _parse_value(value.strip())


def _add_simulate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("simulate", help="run a federated DP fine-tuning simulation on this machine",
                       description="Simulate departments with Flower's simulation engine (Ray). Defaults: "
                                   "all-MiniLM-L6-v2 + LoRA, the four Hutto departments, DP eps=8 per site, "
                                   "delta=1e-5, SecAgg+ on.")
    p.add_argument("--out", type=Path, default=None,
                   help="output directory, must not hold a run yet (default runs/<date>-<time>)")
    p.add_argument("--rounds", type=int, help="federated rounds")
    p.add_argument("--epsilon", type=float, help="every site's privacy budget epsilon")
    p.add_argument("--delta", type=float, help="every site's delta")
    p.add_argument("--site-epsilon", action="append", default=[], metavar="NAME=EPS",
                   help="one site's budget (repeatable)")
    p.add_argument("--no-dp", action="store_true", help="train without DP-SGD (baselines only)")
    p.add_argument("--no-secagg", action="store_true", help="aggregate in the clear (the server sees updates)")
    p.add_argument("--model", help="'minilm', 'tiny-random' or a local Hugging Face model directory")
    p.add_argument("--finetune", choices=["lora", "full"], help="LoRA adapters (default) or all weights")
    p.add_argument("--data", help="CSV/TSV/JSONL/Parquet file split into departments (default: Hutto corpora)")
    p.add_argument("--text-column", help="text column of --data (default text)")
    p.add_argument("--label-column", help="label column of --data (default label)")
    p.add_argument("--department-column", help="department column of --data (default department)")
    p.add_argument("--seed", type=int, help="base seed")
    p.add_argument("--config", "-c", action="append", default=[], type=_key_value, metavar="KEY=VALUE",
                   help="any run-config key of pyproject.toml's [tool.flwr.app.config] (repeatable)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--resume", type=Path, metavar="OUT",
                   help="continue the interrupted simulation in OUT from its last completed round (other options "
                        "may only repeat its job, except min-departments and round-retries)")
    p.set_defaults(func=_cmd_simulate)


def _simulate_config(args: argparse.Namespace) -> dict[str, bool | int | float | str]:
    rc: dict[str, bool | int | float | str] = dict(args.config)
    mapping = {"rounds": "num-server-rounds", "epsilon": "sim-epsilon", "delta": "sim-delta", "model": "model",
               "finetune": "finetune", "data": "sim-data", "text_column": "sim-text-column",
               "label_column": "sim-label-column", "department_column": "sim-department-column", "seed": "seed"}
    for attr, key in mapping.items():
        value = getattr(args, attr)
        if value is not None:
            rc[key] = value
    if args.no_dp:
        rc["dp"] = False
    if args.no_secagg:
        rc["secagg"] = False
    if args.site_epsilon:
        rc["sim-site-epsilons"] = ",".join(args.site_epsilon)
    return rc


def _cmd_simulate(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from simulations.run import simulate

    rc = _simulate_config(args)
    if args.resume is not None:
        if args.out is not None and args.out.resolve() != args.resume.resolve():
            raise FedsiloError("--out and --resume name different directories; --resume OUT continues the run "
                               "in OUT.")
        args.out = args.resume
    if args.out is None:
        args.out = Path("runs") / time.strftime("%Y%m%d-%H%M%S")
    console = Console(stderr=True)
    rounds = int(rc.get("num-server-rounds", 0)) or None
    with Progress(TextColumn("[bold]federated rounds"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TextColumn("{task.description}"), TimeElapsedColumn(), console=console,
                  disable=args.quiet) as progress:
        task = progress.add_task("starting departments", total=rounds)

        def on_round(rec: object) -> None:
            last = rec.rounds[-1]  # type: ignore[attr-defined]
            acc = "n/a" if last.global_accuracy is None else f"{last.global_accuracy:.3f}"
            progress.update(task, completed=last.round, description=f"global accuracy {acc}",
                            total=rec.config["num-server-rounds"])  # type: ignore[attr-defined]

        report = simulate(rc, args.out, on_round=on_round, resume=args.resume is not None)
    final = report["final"]
    print(f"Simulation finished: {len(report['rounds'])} rounds, global held-out accuracy "
          f"{final['global_accuracy']:.4f}")
    for name, eps in final["epsilon"].items():
        print(f"  {name:>12}: epsilon spent {eps if eps is None else round(eps, 4)}")
    print(f"Report, CSV and plots in {args.out}")
    return 0


def _add_study(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("study", help="accuracy studies: what privacy costs under one compute budget",
                       description="utility: centralized non-private on the pooled data, federated non-private and "
                                   "federated DP at several epsilons, all with the same number of gradient steps; "
                                   "writes study.json, study.md and utility.png.")
    ssub = p.add_subparsers(dest="study_command", required=True)
    u = ssub.add_parser("utility", help="accuracy vs epsilon against centralized and federated baselines")
    u.add_argument("--out", type=Path, required=True, help="output directory, must not hold a study yet")
    u.add_argument("--rounds", type=int, help="federated rounds (the compute budget with --local-epochs)")
    u.add_argument("--local-epochs", type=float, help="fraction of each department's data per round")
    u.add_argument("--epsilons", default="8,3,1", help="per-site budgets of the DP arms (default 8,3,1)")
    u.add_argument("--model", help="'minilm', 'tiny-random' or a local Hugging Face model directory")
    u.add_argument("--data", help="CSV/TSV/JSONL/Parquet file split into departments (default: Hutto corpora)")
    u.add_argument("--per-department", type=int, help="train/test on at most this many rows per department "
                                                       "(seeded sample; a smaller compute budget)")
    u.add_argument("--repeats", type=int, default=1, help="runs per arm, seeds seed, seed+1, ...; the tables give "
                                                          "medians and ranges (default 1)")
    u.add_argument("--resume", action="store_true", help="run only the runs --out's study.json lacks (same "
                                                         "settings; more --repeats or other --epsilons may be asked)")
    u.add_argument("--render", action="store_true", help="run nothing: rewrite study.md, utility.png (and --docs) "
                                                         "from --out's study.json, finished or not")
    u.add_argument("--docs", type=Path, help="also rewrite the study's section of this markdown file "
                                             "(e.g. docs/benchmarks.md) and put the plot beside it")
    u.add_argument("--config", "-c", action="append", default=[], type=_key_value, metavar="KEY=VALUE",
                   help="any run-config key except dp and sim-epsilon (repeatable)")
    u.set_defaults(func=_cmd_study)


def _cmd_study(args: argparse.Namespace) -> int:
    from simulations.study import run_study_command

    rc: dict[str, bool | int | float | str] = dict(args.config)
    for attr, key in {"rounds": "num-server-rounds", "local_epochs": "local-epochs", "model": "model",
                      "data": "sim-data"}.items():
        if getattr(args, attr) is not None:
            rc[key] = getattr(args, attr)
    try:
        epsilons = [float(x) for x in args.epsilons.split(",") if x.strip()]
    except ValueError as exc:
        raise FedsiloError(f"--epsilons must be comma-separated numbers, got {args.epsilons!r}.") from exc
    print(run_study_command(rc, args.out, epsilons, args.docs, args.per_department,
                            args.resume, args.render, args.repeats), end="")
    return 0


def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="measure DP, SecAgg+, communication, framework overhead and scale",
                       description="Side-by-side measurements on this machine (medians over repeats, variants "
                                   "interleaved): DP-SGD step cost per Opacus mode, SecAgg+ round cost, bytes sent "
                                   "per round, framework overhead, 100-department scale. Writes bench.json and "
                                   "bench.md.")
    p.add_argument("--out", type=Path, required=True, help="output directory, must not hold a bench yet")
    p.add_argument("--quick", action="store_true", help="tiny model and sizes: checks the bench runs, no figures")
    p.add_argument("--repeats", type=int, help="repeats per measurement (default 3; --quick 1)")
    p.add_argument("--only", action="append", default=[], metavar="PART",
                   help="run only these parts (repeatable): dp, secagg, overhead, comm, scale")
    p.add_argument("--secagg-departments", type=int, action="append", default=[], metavar="N",
                   help="department counts of the secagg part (repeatable; default 4 and 10)")
    p.add_argument("--docs", type=Path, help="also rewrite the bench's section of this markdown file")
    p.set_defaults(func=_cmd_bench)


def _cmd_bench(args: argparse.Namespace) -> int:
    from simulations.bench import run_bench_command

    print(run_bench_command(args.out, quick=args.quick, repeats=args.repeats, only=args.only, docs=args.docs,
                            secagg_departments=args.secagg_departments), end="")
    return 0


def _require_agreement(checks: list, site: str) -> None:
    from common.accountant_check import require_agreement

    require_agreement(checks, site)


def _cmd_budget(args: argparse.Namespace) -> int:
    from client.egress import egress_log_path, format_record, read_egress_log
    from client.ledger import LedgerFile
    from client.site import SiteConfig

    site = SiteConfig.from_toml(args.site_config)
    ledger = LedgerFile(Path(site.ledger), site.name, site.epsilon, site.delta, site.accountant).read()
    egress_path = egress_log_path(Path(site.ledger))
    egress = read_egress_log(egress_path)
    checks = []
    if args.check:
        from common.accountant_check import check_ledger

        checks = check_ledger(ledger.entries, ledger.delta, ledger.accountant)
    if args.json:
        doc = ledger.body() | {"epsilon_spent": ledger.epsilon, "remaining": ledger.remaining,
                               "egress_log": str(egress_path), "egress": egress}
        if args.check:
            doc["accountant_check"] = [vars(c) | {"relative_difference": c.relative_difference, "agrees": c.agrees}
                                       for c in checks]
        print(json.dumps(doc, indent=2))
        _require_agreement(checks, ledger.site)
        return 0
    print(f"site {ledger.site}: spent epsilon {ledger.epsilon:.4f} of {ledger.epsilon_budget:g} "
          f"(delta {ledger.delta:g}, {ledger.accountant} accountant); remaining {ledger.remaining:.4f}")
    for e in ledger.entries:
        print(f"  run {e.run_id} round {e.round}: sigma={e.noise_multiplier:.4f} q={e.sample_rate:.4f} "
              f"steps={e.steps} -> epsilon {e.epsilon_after:.4f}")
    if args.check:
        print(f"accountant cross-check (recomputed with Opacus from the recorded sigma, q, steps, delta; "
              f"privacy unit: one record of {ledger.site}):")
        for c in checks:
            print(f"  run {c.run_id} round {c.round}: ledger {c.recorded:.4f}, {ledger.accountant} {c.configured:.4f} "
                  f"({100 * c.relative_difference:.3f}% off: {'agrees' if c.agrees else 'DISAGREES'}), "
                  f"RDP {c.rdp:.4f}, PRV {c.prv:.4f}")
    print(f"egress log {egress_path}: {len(egress)} message(s) sent, {sum(r.get('bytes', 0) for r in egress)} bytes")
    for record in egress:
        print(f"  {format_record(record)}")
    _require_agreement(checks, ledger.site)
    return 0


def _cmd_audit(args: argparse.Namespace) -> int:
    from simulations.audit import AUDIT_JSON, ROC_PNG, audit_run

    audit = audit_run(args.run_dir, out_dir=args.out, bootstrap=args.bootstrap, seed=args.seed,
                      accountant_check=not args.no_accountant_check)
    if args.json:
        print(json.dumps(audit, indent=2))
        return 0
    pct = round(100 * audit["confidence"])
    print(f"membership-inference audit of {audit['run_dir']} ({'DP' if audit['dp'] else 'no DP'}; "
          f"{audit['attack']}):")
    for name, r in audit["results"].items():
        print(f"  {name:>16}: AUC {r['auc']:.4f} [{pct}% CI {r['auc_ci'][0]:.4f}, {r['auc_ci'][1]:.4f}], "
              f"TPR@{audit['target_fpr']:.0%}FPR {r['tpr_at_fpr']:.4f} [{r['tpr_at_fpr_ci'][0]:.4f}, "
              f"{r['tpr_at_fpr_ci'][1]:.4f}]; mean loss members {r['member_loss']:.4f}, non-members "
              f"{r['non_member_loss']:.4f} ({r['members']}/{r['non_members']})")
    for site, checks in audit["accountant_check"].items():
        for c in checks:
            print(f"  ledger {site} round {c['round']}: recorded epsilon {c['recorded']:.4f}, recomputed "
                  f"{c['configured']:.4f} ({100 * c['relative_difference']:.3f}% off), RDP {c['rdp']:.4f}, "
                  f"PRV {c['prv']:.4f}")
    out = args.out or args.run_dir
    print(f"Audit in {out / AUDIT_JSON}, ROC curves in {out / ROC_PNG}")
    bad = [(site, c) for site, checks in audit["accountant_check"].items() for c in checks if not c["agrees"]]
    if bad:
        raise FedsiloError(f"Site {bad[0][0]}: ledger round {bad[0][1]['round']} disagrees with its accountant "
                           "by more than 1%.")
    return 0


def _add_audit(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("audit", help="membership-inference audit of a simulation's global model",
                       description="Loss-threshold membership inference against a finished simulation's global "
                                   "model (members: departments' training rows; non-members: their held-out rows): "
                                   "AUC and TPR at 1% FPR with bootstrap CIs, ROC plot; plus a cross-check of "
                                   "every site ledger with Opacus' RDP and PRV accountants.")
    p.add_argument("run_dir", type=Path, help="the simulation's output directory (fedsilo simulate --out)")
    p.add_argument("--out", type=Path, help="where to write audit.json and audit_roc.png (default: run_dir)")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the CIs (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    p.add_argument("--no-accountant-check", action="store_true", help="skip the ledger cross-check")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_cmd_audit)


def _add_certs(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("certs", help="create TLS certificates and SuperNode authentication keys",
                       description="Provision a Flower deployment: a CA (ca.crt/ca.key), the SuperLink's "
                                   "certificate (server.pem/server.key, for --ssl-ca-certfile/--ssl-certfile/"
                                   "--ssl-keyfile) and SuperNode keys (OpenSSH EC P-384, for "
                                   "--auth-supernode-private-key and `flwr supernode register`). Existing files "
                                   "are never overwritten.")
    csub = p.add_subparsers(dest="certs_command", required=True)
    days_help = "validity in days (default 365)"

    ca = csub.add_parser("ca", help="create a CA certificate and key")
    ca.add_argument("--out", type=Path, required=True, help="output directory")
    ca.add_argument("--days", type=int, default=365, help=days_help)
    ca.add_argument("--common-name", default="fedsilo CA", help="the CA's common name")
    ca.set_defaults(func=_cmd_certs)

    server = csub.add_parser("server", help="create the SuperLink certificate, signed by the CA in --out")
    server.add_argument("--out", type=Path, required=True, help="directory holding ca.crt and ca.key")
    server.add_argument("--san", action="append", default=[], required=True, metavar="NAME_OR_IP",
                        help="an address clients use: DNS name or IP (repeatable, e.g. localhost, 127.0.0.1)")
    server.add_argument("--days", type=int, default=365, help=days_help)
    server.set_defaults(func=_cmd_certs)

    node = csub.add_parser("node", help="create a SuperNode authentication key pair (<NAME>, <NAME>.pub)")
    node.add_argument("--out", type=Path, required=True, help="output directory")
    node.add_argument("--name", required=True, help="key file name (letters, digits, _ . -)")
    node.set_defaults(func=_cmd_certs)

    init = csub.add_parser("init", help="CA + SuperLink certificate + SuperNode keys in one go (all or nothing)")
    init.add_argument("--out", type=Path, required=True, help="output directory")
    init.add_argument("--san", action="append", default=[], required=True, metavar="NAME_OR_IP",
                      help="an address clients use: DNS name or IP (repeatable)")
    init.add_argument("--node", action="append", default=[], metavar="NAME",
                      help="create a SuperNode key pair with this name (repeatable)")
    init.add_argument("--days", type=int, default=365, help=days_help)
    init.add_argument("--common-name", default="fedsilo CA", help="the CA's common name")
    init.set_defaults(func=_cmd_certs)


def _cmd_certs(args: argparse.Namespace) -> int:
    from common import certs

    def show_ca(ca: certs.CaFiles) -> None:
        print(f"CA certificate: {ca.cert}  (sha256 {ca.fingerprint})")
        print(f"CA key:         {ca.key}  (keep offline; mode 0600)")

    def show_server(server: certs.ServerFiles) -> None:
        print(f"Server cert:    {server.cert}  (sha256 {server.fingerprint}; SANs {', '.join(server.sans)})")
        print(f"Server key:     {server.key}  (mode 0600)")

    def show_node(node: certs.NodeKeyFiles) -> None:
        print(f"Node key:       {node.private_key}  (mode 0600)")
        print(f"Node public:    {node.public_key}  ({node.fingerprint})")

    out: Path = args.out
    if args.certs_command == "ca":
        show_ca(certs.create_ca(out, common_name=args.common_name, days=args.days))
    elif args.certs_command == "server":
        server = certs.create_server_cert(out, sans=args.san, days=args.days)
        show_server(server)
        print(f"SuperLink: --ssl-ca-certfile {out / certs.CA_CERT} --ssl-certfile {server.cert} "
              f"--ssl-keyfile {server.key}")
    elif args.certs_command == "node":
        node = certs.create_node_key(out, args.name)
        show_node(node)
        print(f"Register it: flwr supernode register {node.public_key} ...")
    else:
        done = certs.provision(out, sans=args.san, nodes=args.node, days=args.days, common_name=args.common_name)
        show_ca(done.ca)
        show_server(done.server)
        for node in done.nodes:
            show_node(node)
        print(f"SuperLink: --ssl-ca-certfile {done.ca.cert} --ssl-certfile {done.server.cert} "
              f"--ssl-keyfile {done.server.key}")
        print(f"SuperNode: --root-certificates {done.ca.cert} --auth-supernode-private-key <node key>")
        if done.nodes:
            print("Register each node: flwr supernode register <node key>.pub ...")
    return 0


def _exec(cmd: list[str], env: dict[str, str] | None = None, *, path_first: Path | None = None) -> int:
    """Replace this process with a Flower executable (signals and exit status go straight to it)."""
    print(f"fedsilo: exec {shlex.join(cmd)}", file=sys.stderr, flush=True)
    from common.runtime import tool_env

    os.execve(cmd[0], cmd, tool_env(env, first=path_first))  # noqa: S606 (argument list, no shell)
    return 0  # not reached


def _cmd_server_start(args: argparse.Namespace) -> int:
    from server.deploy import ServerState, prepare_server

    if args.insecure:
        print("fedsilo: WARNING: --insecure: no TLS and no node authentication. Anyone on the network can read "
              "the traffic and join as a department. Local development only.", file=sys.stderr)
    cmd = prepare_server(args.state_dir, args.certs, args.host, args.port, insecure=args.insecure,
                         operator_networks=args.operator_network)
    return _exec(cmd, ServerState(args.state_dir).env())


def _cmd_server_register(args: argparse.Namespace) -> int:
    from server.deploy import register_node

    print(register_node(args.state_dir, args.key, args.name))
    return 0


def _cmd_server_nodes(args: argparse.Namespace) -> int:
    from server.deploy import list_nodes

    print(list_nodes(args.state_dir, as_json=args.json), end="")
    return 0


def _cmd_server_run(args: argparse.Namespace) -> int:
    from common.errors import FedsiloError
    from server.checkpoint import CHECKPOINT
    from server.deploy import submit_job
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
    rc: dict[str, bool | int | float | str] = dict(args.config)
    if args.labels is not None:
        rc["labels"] = args.labels
    rc["out-dir"] = str(out)
    for attr, key in {"rounds": "num-server-rounds", "model": "model", "finetune": "finetune"}.items():
        if getattr(args, attr) is not None:
            rc[key] = getattr(args, attr)
    if args.no_secagg:
        rc["secagg"] = False
    if args.no_dp:
        rc["dp"] = False
    if args.resume is not None:
        rc = resume_job(out, rc)
    status = submit_job(args.state_dir, rc, args.app)
    if not (out / REPORT_JSON).exists():
        raise FedsiloError(f"The job ended (flwr exit status {status}) without a report in {out}; see the log above.")
    final = read_report(out / REPORT_JSON).final
    print(f"Job finished: {final.rounds_completed if final else None} rounds, global accuracy "
          f"{final.global_accuracy if final else None}; report in {out}")
    return 0 if status == 0 else EXIT_ERROR


def _cmd_client_start(args: argparse.Namespace) -> int:
    from client.deploy import install_gate, supernode_command

    cmd = supernode_command(args.site_config, port=args.port, max_retries=args.max_retries)
    return _exec(cmd, path_first=install_gate())


def _cmd_app_digest(args: argparse.Namespace) -> int:
    from common.appbundle import app_dir, build_bundle, bundle_digest

    print(bundle_digest(build_bundle(args.app or app_dir())))
    return 0


def _add_deployment(sub: argparse._SubParsersAction) -> None:
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
    run = ssub.add_parser("run", help="submit a federated fine-tuning job and follow it to the end")
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
    run.add_argument("--config", "-c", action="append", default=[], type=_key_value, metavar="KEY=VALUE")
    run.add_argument("--app", type=Path, help="submit this app directory instead of this installation's "
                     "(sites run only app bundles their policy approves)")
    run.set_defaults(func=_cmd_server_run)

    client = sub.add_parser("client", help="run a department's client (Flower SuperNode)")
    csub = client.add_subparsers(dest="client_command", required=True)
    cstart = csub.add_parser("start", help="connect this department to the server, from its site config")
    cstart.add_argument("--site-config", type=Path, required=True, help="the site's TOML config")
    cstart.add_argument("--port", type=int, default=9094, help="local port of the SuperNode's runtime API")
    cstart.add_argument("--max-retries", type=int, help="give up after this many connection attempts")
    cstart.set_defaults(func=_cmd_client_start)

    app = sub.add_parser("app", help="the identity of fedsilo's job code, which sites approve")
    asub = app.add_subparsers(dest="app_command", required=True)
    digest = asub.add_parser("digest", help="print the sha256 of the app bundle `flwr run` submits for an app dir")
    digest.add_argument("--app", type=Path, help="a fedsilo app directory (default: this installation)")
    digest.set_defaults(func=_cmd_app_digest)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedsilo", description="Privacy-preserving federated fine-tuning.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_simulate(sub)
    _add_certs(sub)
    _add_deployment(sub)
    _add_study(sub)
    _add_bench(sub)
    _add_audit(sub)
    b = sub.add_parser("budget", help="show a site's privacy ledger (spent, remaining, per round) and egress log")
    b.add_argument("--site-config", type=Path, required=True, help="the site's TOML config")
    b.add_argument("--json", action="store_true", help="machine-readable output")
    b.add_argument("--check", action="store_true",
                   help="recompute every charge with Opacus' RDP and PRV accountants (exit 2 if the ledger "
                        "disagrees with its own accountant by more than 1%%)")
    b.set_defaults(func=_cmd_budget)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args))
    except FedsiloError as exc:
        print(f"fedsilo: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("fedsilo: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
