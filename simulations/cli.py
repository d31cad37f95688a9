"""The simulation commands: `simulate`, `study`, `bench` and `audit`."""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

from common.cli import add_config_option, run_config_from_args
from common.errors import FedsiloError

RAY_ADDRESS_HELP = ("HOST:PORT of a running Ray cluster's head (`ray start --head`) to run the departments on, "
                    "instead of a Ray started on this machine (default: $RAY_ADDRESS); every node needs fedsilo "
                    "installed and the data and output directory at the same paths")


def _add_simulate(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("simulate", help="run a federated DP fine-tuning simulation (this machine, or a Ray cluster)",
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
    p.add_argument("--data", help="CSV/TSV/JSONL/Parquet file split into departments, or hutto-small (the "
                   "small-department scenario; default: the Hutto corpora)")
    p.add_argument("--text-column", help="text column of --data (default text)")
    p.add_argument("--label-column", help="label column of --data (default label)")
    p.add_argument("--department-column", help="department column of --data (default department)")
    p.add_argument("--seed", type=int, help="base seed")
    add_config_option(p, "any run-config key of pyproject.toml's [tool.flwr.app.config] (repeatable)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--resume", type=Path, metavar="OUT",
                   help="continue the interrupted simulation in OUT from its last completed round (other options "
                        "may only repeat its job, except min-departments and round-retries)")
    p.add_argument("--ray-address", metavar="HOST:PORT", help=RAY_ADDRESS_HELP)
    p.set_defaults(func=_cmd_simulate)


def _cmd_simulate(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from client.plan import Plan, format_plans
    from simulations.run import simulate

    rc = run_config_from_args(args)
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

        def on_plans(plans: list[Plan]) -> None:
            progress.console.print(f"Privacy-utility plan per department (before anything is charged):\n"
                                   f"{format_plans(plans)}", markup=False, highlight=False,
                                   soft_wrap=True)

        report = simulate(rc, args.out, on_round=on_round, resume=args.resume is not None, on_plans=on_plans,
                          ray_address=args.ray_address)
    final = report["final"]
    accuracy = final["global_accuracy"]
    print(f"Simulation finished: {len(report['rounds'])} rounds, global held-out accuracy "
          f"{'n/a' if accuracy is None else f'{accuracy:.4f}'}")
    for name, eps in final["epsilon"].items():
        print(f"  {name:>12}: epsilon spent {eps if eps is None else round(eps, 4)}")
    print(f"Report, CSV and plots in {args.out}")
    return 0


def _add_study(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("study", help="accuracy studies: what privacy costs under one compute budget",
                       description="utility: centralized non-private on the pooled data, federated non-private and "
                                   "federated DP at several epsilons, all processing the same number of examples, "
                                   "each tuned on the same grid on a validation split of the training rows; "
                                   "writes study.json, study.md and utility.png.")
    ssub = p.add_subparsers(dest="study_command", required=True)
    u = ssub.add_parser("utility", help="accuracy vs epsilon against centralized and federated baselines")
    u.add_argument("--out", type=Path, required=True, help="output directory, must not hold a study yet")
    u.add_argument("--rounds", type=int, help="federated rounds (the compute budget with --local-epochs)")
    u.add_argument("--local-epochs", type=float, help="fraction of each department's data per round")
    u.add_argument("--epsilons", default="8,3,1", help="per-site budgets of the DP arms (default 8,3,1)")
    u.add_argument("--model", help="'minilm', 'tiny-random' or a local Hugging Face model directory")
    u.add_argument("--data", help="CSV/TSV/JSONL/Parquet file split into departments, or hutto-small (the "
                   "small-department scenario; default: the Hutto corpora)")
    u.add_argument("--per-department", type=int, help="train/test on at most this many rows per department "
                                                       "(seeded sample; a smaller compute budget)")
    u.add_argument("--repeats", type=int, default=3, help="runs per arm, seeds seed, seed+1, ...; the tables give "
                                                          "medians and ranges (default 3)")
    u.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,...",
                   help="tune run-config KEY over these values (repeatable: every combination is a point; KEY: "
                        "learning-rate, batch-size, clip-norm, lora-r, lora-alpha or a probe-* rate, batch or share); "
                        "replaces the default grid, learning-rate at 0.5x, 1x and 2x the configured value. Every "
                        "arm runs every point once (base seed) on a train/validation split of its training rows and "
                        "keeps the best validation accuracy; the tuning runs' privacy cost is not in epsilon")
    u.add_argument("--resume", action="store_true", help="run only the runs --out's study.json lacks, tuning runs "
                                                         "included (same settings; more --repeats or other "
                                                         "--epsilons may be asked)")
    u.add_argument("--render", action="store_true", help="run nothing: rewrite study.md, utility.png (and --docs) "
                                                         "from --out's study.json, finished or not")
    u.add_argument("--docs", type=Path, help="also rewrite the study's section of this markdown file "
                                             "(e.g. docs/benchmarks.md: section study for the Hutto corpora, "
                                             "study-<data> for other data, e.g. study-hutto-small) and put the "
                                             "plot beside it")
    add_config_option(u, "any run-config key except dp, sim-epsilon, sim-site-epsilons and sim-split-seed "
                         "(repeatable)")
    u.set_defaults(func=_cmd_study)


def _cmd_study(args: argparse.Namespace) -> int:
    from simulations.study import parse_grid, run_study_command

    rc = run_config_from_args(args)
    grid = parse_grid(args.grid) if args.grid else None
    try:
        epsilons = [float(x) for x in args.epsilons.split(",") if x.strip()]
    except ValueError as exc:
        raise FedsiloError(f"--epsilons must be comma-separated numbers, got {args.epsilons!r}.") from exc
    print(run_study_command(rc, args.out, epsilons, args.docs, args.per_department,
                            args.resume, args.render, args.repeats, grid), end="")
    return 0


def _add_bench(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("bench", help="measure DP, SecAgg+, communication, framework overhead and scale",
                       description="Side-by-side measurements on this machine (medians over repeats, variants "
                                   "interleaved): DP-SGD step cost per Opacus mode, SecAgg+ round cost, bytes sent "
                                   "per round, framework overhead, 100-department scale. Writes bench.json and "
                                   "bench.md.")
    p.add_argument("--out", type=Path, required=True, help="output directory, must not hold a bench yet")
    p.add_argument("--quick", action="store_true", help="tiny model and sizes: checks the bench runs, no figures")
    p.add_argument("--repeats", type=int, help="repeats per measurement (default 3; --quick 1)")
    p.add_argument("--only", action="append", default=[], metavar="PART",
                   help="run only these parts (repeatable): dp, secagg, overhead, comm, scale; and deploy (a real "
                        "SuperLink and SuperNodes on 127.0.0.1), measured only when named")
    p.add_argument("--secagg-departments", type=int, action="append", default=[], metavar="N",
                   help="department counts of the secagg part (repeatable; default 4 and 10)")
    p.add_argument("--docs", type=Path, help="also rewrite the bench's section of this markdown file")
    p.add_argument("--ray-address", metavar="HOST:PORT", help=f"scale part only: {RAY_ADDRESS_HELP}")
    p.set_defaults(func=_cmd_bench)


def _cmd_bench(args: argparse.Namespace) -> int:
    from simulations.bench import run_bench_command

    print(run_bench_command(args.out, quick=args.quick, repeats=args.repeats, only=args.only, docs=args.docs,
                            secagg_departments=args.secagg_departments, ray_address=args.ray_address), end="")
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


def _add_audit(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
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


def _ledger_option(text: str) -> tuple[str, Path]:
    name, sep, path = text.partition("=")
    if not sep or not name.strip() or not path.strip():
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {text!r}")
    return name.strip(), Path(path.strip())


def _cmd_export(args: argparse.Namespace) -> int:
    from simulations.export import CARD, export_run

    ledgers = dict(args.ledger)
    if len(ledgers) != len(args.ledger):
        raise FedsiloError("--ledger names a department twice.")
    done = export_run(args.run_dir, args.out, adapter=args.adapter, ledgers=ledgers)
    kind = "PEFT adapter" if done.adapter else "merged model"
    print(f"Exported the {kind} to {done.out} ({'mean' if done.mean_pooling else '[CLS]'} pooling); model card "
          f"{done.out / CARD}")
    for d in done.departments:
        eps = "n/a" if d.epsilon is None else f"{d.epsilon:.4f}"
        print(f"  {d.name:>12}: epsilon {eps} ({'ledger checked' if d.ledger_checked else 'as reported'})")
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from simulations.predict import predict_file

    with Progress(TextColumn("[bold]predicting"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=Console(stderr=True), disable=args.quiet) as bar:

        def progress(total: int) -> Callable[[int], None]:
            task = bar.add_task("rows", total=total)
            return lambda n: bar.advance(task, n)

        rows = predict_file(args.model, args.input, args.text_column, args.output, batch_size=args.batch_size,
                            progress=progress)
    print(f"Predicted {rows} rows into {args.output}")
    return 0


def _add_model_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    ex = sub.add_parser("export", help="export a run's global model (Hugging Face format + privacy model card)",
                        description="Write a finished run's global model where transformers loads it without "
                                    "fedsilo: config.json with the labels, safetensors weights, tokenizer, and a "
                                    "model card (README.md) generated from the run's report, checkpoint and "
                                    "ledgers. Refuses (nothing written) when a ledger disagrees with the report.")
    ex.add_argument("run_dir", type=Path, help="the run's directory (simulate --out, or server run --out)")
    ex.add_argument("--out", type=Path, required=True, help="new directory for the export")
    ex.add_argument("--adapter", action="store_true",
                    help="write a PEFT adapter directory (naming its base model) instead of merged weights")
    ex.add_argument("--ledger", action="append", default=[], type=_ledger_option, metavar="NAME=PATH",
                    help="a department's ledger file, cross-checked against the report (repeatable; a "
                         "simulation's own ledgers are read from RUN_DIR/sites)")
    ex.set_defaults(func=_cmd_export)
    pr = sub.add_parser("predict", help="batch prediction with an exported model",
                        description="Classify every row of a CSV/TSV/JSONL/Parquet file with a `fedsilo export` "
                                    "directory; writes the same format with the input's columns, predicted_label "
                                    "and one probability_<label> column per class.")
    pr.add_argument("--model", type=Path, required=True, help="an export directory")
    pr.add_argument("--input", type=Path, required=True, help="CSV/TSV/JSONL/Parquet file")
    pr.add_argument("--text-column", default="text", help="the column holding the texts (default text)")
    pr.add_argument("--output", type=Path, required=True, help="new file, same format as --input")
    pr.add_argument("--batch-size", type=int, default=64, help="texts per forward pass (default 64)")
    pr.add_argument("--quiet", action="store_true", help="no progress bar")
    pr.set_defaults(func=_cmd_predict)


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    _add_simulate(sub)
    _add_study(sub)
    _add_bench(sub)
    _add_audit(sub)
    _add_model_commands(sub)
