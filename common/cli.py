"""The `fedsilo` command line: the entry point, and what every command shares.

Each package owns its commands (`client/cli.py`, `server/cli.py`, `simulations/cli.py`, and common's own `certs` and
`app` here); they are found through the `fedsilo.commands` entry-point group (pyproject.toml), so this module, in the
bottom layer, imports none of them. Every fedsilo error becomes one clear message on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import signal
import sys
from collections.abc import Callable, Sequence
from importlib.metadata import entry_points
from pathlib import Path

from common.errors import FedsiloError
from common.logs import configure_logging, unconfigure_logging

# Flower sends an event to telemetry.flower.ai at each start of a SuperLink, SuperNode, simulation or run, unless
# this is "0" (flwr/supercore/telemetry.py, read when Flower is imported). A fedsilo site or server sends nothing
# but its protocol messages: off unless the operator sets it. Set here, before any Flower import, so every process
# fedsilo starts (SuperLink, SuperNode, executor, app processes, Ray workers) inherits it.
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

EXIT_ERROR = 2
EXIT_BROKEN_PIPE = 128 + signal.SIGPIPE  # 141: what a shell reports for a writer whose reader went away
COMMAND_GROUP = "fedsilo.commands"
# Order of the command groups in `fedsilo --help` (a group not named here comes after, by name).
GROUP_ORDER = ("simulations", "common", "server", "client")

AddCommands = Callable[["argparse._SubParsersAction[argparse.ArgumentParser]"], None]
RunConfig = dict[str, bool | int | float | str]

# The one mapping of command-line flags (argparse attribute names) to run-config keys, for every command that
# builds a run config (simulate, study utility, server run).
FLAG_KEYS = {
    "rounds": "num-server-rounds", "local_epochs": "local-epochs", "epsilon": "sim-epsilon", "delta": "sim-delta",
    "model": "model", "finetune": "finetune", "data": "sim-data", "text_column": "sim-text-column",
    "label_column": "sim-label-column", "department_column": "sim-department-column", "seed": "seed",
    "labels": "labels",
}
# Flags that switch a run-config key off.
OFF_FLAGS = {"no_dp": "dp", "no_secagg": "secagg"}


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


def key_value(text: str) -> tuple[str, bool | int | float | str]:
    """argparse type of `--config KEY=VALUE`."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key.strip(), _parse_value(value.strip())


def add_config_option(parser: argparse.ArgumentParser, help_text: str) -> None:
    """`--config/-c KEY=VALUE` (repeatable); the parser's epilog lists every run-config key with its help."""
    from common.config import run_config_help

    parser.add_argument("--config", "-c", action="append", default=[], type=key_value, metavar="KEY=VALUE",
                        help=help_text)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = run_config_help()


def run_config_from_args(args: argparse.Namespace) -> RunConfig:
    """The run config a command's flags ask for: `--config` pairs, then every flag in `FLAG_KEYS`/`OFF_FLAGS` the
    command has and the user gave (a flag wins over the same key in `--config`)."""
    rc: RunConfig = dict(getattr(args, "config", []))
    for attr, key in FLAG_KEYS.items():
        value = getattr(args, attr, None)
        if value is not None:
            rc[key] = value
    for attr, key in OFF_FLAGS.items():
        if getattr(args, attr, False):
            rc[key] = False
    if getattr(args, "site_epsilon", None):
        rc["sim-site-epsilons"] = ",".join(args.site_epsilon)
    return rc


def exec_tool(cmd: list[str], env: dict[str, str] | None = None, *, path_first: Path | None = None) -> int:
    """Replace this process with a Flower executable (signals and exit status go straight to it)."""
    print(f"fedsilo: exec {shlex.join(cmd)}", file=sys.stderr, flush=True)
    from common.runtime import tool_env

    os.execve(cmd[0], cmd, tool_env(env, first=path_first))  # noqa: S606 (argument list, no shell)
    return 0  # not reached


def _add_certs(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("certs", help="create TLS certificates and SuperNode authentication keys",
                       description="Provision a Flower deployment: a CA (ca.crt/ca.key), the SuperLink's "
                                   "certificate (server.pem/server.key, for --ssl-ca-certfile/--ssl-certfile/"
                                   "--ssl-keyfile) and SuperNode keys (OpenSSH EC P-384, for "
                                   "--auth-supernode-private-key and `fedsilo server register`). Existing files "
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


def register_hint(public_key: Path, name: str) -> str:
    """The command that registers a department's node key on the server (README, deployment step 3)."""
    return f"fedsilo server register --state-dir <state-dir> --key {shlex.quote(str(public_key))} --name {name}"


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
        print(f"Register it:    {register_hint(node.public_key, args.name)}")
    else:
        done = certs.provision(out, sans=args.san, nodes=args.node, days=args.days, common_name=args.common_name)
        show_ca(done.ca)
        show_server(done.server)
        for node in done.nodes:
            show_node(node)
        print(f"SuperLink: --ssl-ca-certfile {done.ca.cert} --ssl-certfile {done.server.cert} "
              f"--ssl-keyfile {done.server.key}")
        print(f"SuperNode: --root-certificates {done.ca.cert} --auth-supernode-private-key <node key>")
        for node in done.nodes:
            print(f"Register:       {register_hint(node.public_key, node.private_key.name)}")
    return 0


def _cmd_app_digest(args: argparse.Namespace) -> int:
    from common.appbundle import app_dir, build_bundle, bundle_digest

    print(bundle_digest(build_bundle(args.app or app_dir())))
    return 0


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """common's own commands: `certs` and `app digest`."""
    _add_certs(sub)
    app = sub.add_parser("app", help="the identity of fedsilo's job code, which sites approve")
    asub = app.add_subparsers(dest="app_command", required=True)
    digest = asub.add_parser("digest", help="print the sha256 of the app bundle `flwr run` submits for an app dir")
    digest.add_argument("--app", type=Path, help="a fedsilo app directory (default: this installation)")
    digest.set_defaults(func=_cmd_app_digest)


def command_groups() -> list[tuple[str, AddCommands]]:
    """The installed command groups, in `GROUP_ORDER`. Raises `FedsiloError` when fedsilo is not installed (its
    entry points are how the groups are found)."""
    found = {ep.name: ep for ep in entry_points(group=COMMAND_GROUP)}
    if not found:
        raise FedsiloError(f"No fedsilo commands are registered (entry-point group {COMMAND_GROUP!r}): install "
                           "fedsilo, e.g. `make setup` or `pip install -e .`.")
    rank = {name: i for i, name in enumerate(GROUP_ORDER)}
    names = sorted(found, key=lambda n: (rank.get(n, len(rank)), n))
    return [(name, found[name].load()) for name in names]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedsilo", description="Privacy-preserving federated fine-tuning.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for _, add in command_groups():
        add(sub)
    return parser


def _run(argv: Sequence[str] | None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' bar per weight load (common/logs.py)
    try:
        parser = build_parser()
    except FedsiloError as exc:
        print(f"fedsilo: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    args = parser.parse_args(argv)
    configure_logging(args.verbose)
    try:
        return int(args.func(args))
    except FedsiloError as exc:
        print(f"fedsilo: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("fedsilo: interrupted", file=sys.stderr)
        return 130


def _discard_stdout() -> None:
    """Point stdout's file descriptor at /dev/null, so that the interpreter's final flush of what is still buffered
    does not raise BrokenPipeError a second time, at exit (Python docs, "Note on SIGPIPE")."""
    try:
        fd = sys.stdout.fileno()
    except (OSError, ValueError):  # no descriptor (a replaced or closed stdout): nothing will flush to the pipe
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
    finally:
        os.close(devnull)


def main(argv: Sequence[str] | None = None) -> int:
    """The `fedsilo` entry point: the command's exit status.

    When whoever reads stdout goes away (`fedsilo budget | head`), the command stops without a traceback or message
    and exits 141 (128 + SIGPIPE), as `seq 1 1000000 | head` does: the status a shell reports for a writer ended by
    SIGPIPE, so `set -o pipefail` scripts see fedsilo like any other tool, and not 0 because the command did not
    finish (a `budget --check` cut short has not checked everything). Python ignores SIGPIPE, so this is the
    BrokenPipeError of a write to stdout; restoring SIGPIPE's default instead would also kill fedsilo silently for a
    broken socket or a child's pipe (the docs advise against it). With --verbose the exception is logged.
    """
    try:
        status = _run(argv)
        sys.stdout.flush()  # output still buffered meets the closed pipe here, not at interpreter exit
    except BrokenPipeError:
        _discard_stdout()
        logging.getLogger(__name__).debug("stdout was closed by its reader", exc_info=True)
        return EXIT_BROKEN_PIPE
    finally:
        unconfigure_logging()  # tests call main in-process: leave logging as it was found
    return status


if __name__ == "__main__":
    sys.exit(main())
