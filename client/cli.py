"""A department's commands: `client start` (its SuperNode) and `budget` (its privacy ledger and egress log)."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path


def _cmd_client_start(args: argparse.Namespace) -> int:
    """The site's SuperNode, as a child whose join failures fedsilo explains (`client.join`)."""
    from client.deploy import install_gate, supernode_command, supernode_env
    from client.join import start_supernode
    from client.site import SiteConfig
    from common.runtime import tool_env

    cmd = supernode_command(args.site_config, port=args.port, max_retries=args.max_retries)
    site = SiteConfig.from_toml(args.site_config)
    ca = None if site.insecure else Path(site.ca)
    node_key = Path(site.node_key) if site.node_key else None
    gate = install_gate()
    try:
        return start_supernode(site.name, args.site_config, site.server, ca, node_key, cmd,
                               tool_env(supernode_env(site=site, site_config=args.site_config), first=gate))
    finally:
        shutil.rmtree(gate, ignore_errors=True)  # the gate's private bin directory, one per `client start`


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
    egress_highest = 0.0
    if args.check:
        from client.egress_log import check_against_egress
        from common.accountant_check import check_ledger

        # First, before anything is shown: a ledger showing less spent than the egress log is refused (exit 2).
        egress_highest = check_against_egress(ledger, egress, egress_path, Path(site.ledger),
                                              epsilon_recomputed=ledger.epsilon)
        checks = check_ledger(ledger.entries, ledger.delta, ledger.accountant)
    if args.json:
        doc = ledger.body() | {"epsilon_spent": ledger.epsilon, "remaining": ledger.remaining,
                               "egress_log": str(egress_path), "egress": egress}
        if args.check:
            doc["egress_check"] = {"ledger_epsilon": ledger.epsilon_recorded, "egress_highest": egress_highest,
                                   "agrees": True}
            doc["accountant_check"] = [vars(c) | {"relative_difference": c.relative_difference, "agrees": c.agrees}
                                       for c in checks]
        print(json.dumps(doc, indent=2))
        _require_agreement(checks, ledger.site)
        return 0
    print(f"site {ledger.site}: spent epsilon {ledger.epsilon:.4f} of {ledger.epsilon_budget:g} "
          f"(delta {ledger.delta:g}, {ledger.accountant} accountant); remaining {ledger.remaining:.4f}")
    for e in ledger.entries:
        print(f"  run {e.run_id} job {e.job_id} round {e.round}: sigma={e.noise_multiplier:.4f} q={e.sample_rate:.4f} "
              f"steps={e.steps} -> epsilon {e.epsilon_after:.4f}")
    if args.check:
        print(f"accountant cross-check (recomputed with Opacus from the recorded sigma, q, steps, delta; "
              f"privacy unit: one record of {ledger.site}):")
        for c in checks:
            print(f"  run {c.run_id} round {c.round}: ledger {c.recorded:.4f}, {ledger.accountant} {c.configured:.4f} "
                  f"({100 * c.relative_difference:.3f}% off: {'agrees' if c.agrees else 'DISAGREES'}), "
                  f"RDP {c.rdp:.4f}, PRV {c.prv:.4f}")
        print(f"egress cross-check: the ledger shows epsilon {ledger.epsilon_recorded:.4f} (recomputed "
              f"{ledger.epsilon:.4f}), the egress log's highest is {egress_highest:.4f}, and every epsilon it "
              "recorded is one the ledger's charges reached: agrees")
    print(f"egress log {egress_path}: {len(egress)} message(s) sent, {sum(r.get('bytes', 0) for r in egress)} bytes")
    for record in egress:
        print(f"  {format_record(record)}")
    _require_agreement(checks, ledger.site)
    return 0


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`client start` and `budget`."""
    from client.site import site_config_help

    client = sub.add_parser("client", help="run a department's client (Flower SuperNode)")
    csub = client.add_subparsers(dest="client_command", required=True)
    cstart = csub.add_parser("start", help="connect this department to the server, from its site config",
                             epilog=site_config_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    cstart.add_argument("--site-config", type=Path, required=True, help="the site's TOML config")
    cstart.add_argument("--port", type=int, default=9094, help="local port of the SuperNode's runtime API")
    cstart.add_argument("--max-retries", type=int, help="give up after this many connection attempts")
    cstart.set_defaults(func=_cmd_client_start)
    b = sub.add_parser("budget", help="show a site's privacy ledger (spent, remaining, per round) and egress log",
                       epilog=site_config_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    b.add_argument("--site-config", type=Path, required=True, help="the site's TOML config")
    b.add_argument("--json", action="store_true", help="machine-readable output")
    b.add_argument("--check", action="store_true",
                   help="recompute every charge with Opacus' RDP and PRV accountants (exit 2 if the ledger "
                        "disagrees with its own accountant by more than 1%%), and compare the ledger with the "
                        "egress log's epsilon records (exit 2 if the ledger shows less spent)")
    b.set_defaults(func=_cmd_budget)
