"""Run fedsilo for real with Flower's own deployment runtime: the SuperLink, node registration and jobs.

fedsilo does not re-implement any of it: it checks its inputs, then drives `flower-superlink` and the `flwr` CLI
with the right flags (TLS, node authentication, persistent state, no runtime dependency installation). The
operator's `flwr` connection lives in `<state-dir>/flwr-home/config.toml` (Flower's FLWR_HOME).
"""

from __future__ import annotations

import functools
import ipaddress
import json
import logging
import os
import re
import shlex
import signal
import stat
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

from common.appbundle import app_dir, stage_app
from common.certs import check_certificate, check_key_matches
from common.config import JobConfig, RunConfig, check_known_keys
from common.errors import ConfigError, JobInterruptedError
from common.files import PRIVATE_MODE, exclusive_lock, write_atomic
from common.logs import JobLogFilter
from common.runtime import DeploymentError, check_port_free, flower_tool, tool_env

log = logging.getLogger(__name__)

CONNECTION = "fedsilo"
STATE_DIR_MODE = 0o700
DATABASE_MODE = 0o600
# SQLite's companions of the database (WAL mode: -wal, -shm; rollback journal): they hold the same rows.
DATABASE_SUFFIXES = ("", "-wal", "-shm", "-journal")
CA_FILE, SERVER_CERT, SERVER_KEY = "ca.crt", "server.pem", "server.key"
DEFAULT_PORT = 47100
# One call of the Control API (submit without streaming, list, stop): a server that does not answer in this time is
# down or unreachable.
CONTROL_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class ServerState:
    """The server's state directory: SuperLink database and the operator's Flower connection."""

    root: Path

    @property
    def flwr_home(self) -> Path:
        return self.root / "flwr-home"

    @property
    def database(self) -> Path:
        return self.root / "superlink.db"

    @property
    def jobs(self) -> Path:
        """fedsilo's record of the jobs it submitted (`<run-id>.json`: out dir, rounds asked)."""
        return self.root / "jobs"

    def database_files(self) -> list[Path]:
        """The database and SQLite's companion files beside it."""
        return [self.database.with_name(self.database.name + suffix) for suffix in DATABASE_SUFFIXES]

    def env(self) -> dict[str, str]:
        return tool_env({**os.environ, "FLWR_HOME": str(self.flwr_home)})

    def write_connection(self, address: str, ca: Path | None) -> None:
        """Point the operator's `flwr` CLI at the SuperLink (TLS with `ca`, or plaintext when None)."""
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        tls = f'root-certificates = "{ca.resolve()}"' if ca is not None else "insecure = true"
        text = f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\naddress = "{address}"\n{tls}\n'
        write_atomic(self.flwr_home / "config.toml", text.encode())

    def require_connection(self) -> None:
        if not (self.flwr_home / "config.toml").is_file():
            raise ConfigError(f"{self.root} is not a fedsilo server state directory: run `fedsilo server start "
                              f"--state-dir {self.root}` first.")


def _tighten(path: Path, mode: int) -> None:
    """Give `path` (owned by this user) exactly `mode`, warning when that removes access others had."""
    info = path.stat()
    if info.st_uid != os.getuid():
        raise ConfigError(f"{path} belongs to uid {info.st_uid}, not to this user (uid {os.getuid()}): the server's "
                          "state must be readable by its owner only. Use a state directory this user owns (a new "
                          "path is created with mode 0700).")
    current = stat.S_IMODE(info.st_mode)
    if current != mode:
        os.chmod(path, mode)
        if current & 0o077:
            log.warning("%s had mode %04o, readable by others: tightened to %04o (what was readable before "
                        "stays exposed to whoever read it)", path, current, mode)


def prepare_state_dir(state: ServerState) -> None:
    """Make the server's state private before Flower writes to it: the directory 0700 and the SuperLink database
    0600.

    Flower's SQLite database (`superlink.db`, with its `-wal`/`-shm` files) holds every registered node, job, run
    config and message, so the file is created here, empty and 0600, before `flower-superlink` opens it (SQLite
    takes an empty file as a new database and creates its companion files with the database file's mode); a mode
    fixed after start would leave a window in which Flower's file is 0644. An existing state directory or database
    with a looser mode is tightened (with a warning) rather than refused: earlier fedsilo versions created them
    with the default umask (0755/0644), the directory is this server's own, and a refusal would only add a manual
    `chmod` to every upgrade. A state directory or database owned by another user is refused (it cannot be made
    private to this one), as is a path that is not a directory.
    """
    root = state.root
    if root.exists() and not root.is_dir():
        raise ConfigError(f"--state-dir {root} is not a directory.")
    if not root.exists():
        root.mkdir(parents=True, mode=STATE_DIR_MODE)
    _tighten(root, STATE_DIR_MODE)
    for path in state.database_files():
        if path.is_symlink() or (path.exists() and not path.is_file()):
            raise ConfigError(f"{path} is not a regular file: the SuperLink's database must be one.")
        if path.exists():
            _tighten(path, DATABASE_MODE)
    if not state.database.exists():
        os.close(os.open(state.database, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, DATABASE_MODE))


def superlink_command(state: ServerState, certs: Path | None, host: str, port: int,
                      operator_networks: Sequence[str] = ()) -> list[str]:
    """The SuperLink invocation (Flower's, with the Control/Runtime APIs for the operator only: `server.superlink`):
    TLS + node authentication, or plaintext when `certs` is None."""
    cmd = [sys.executable, "-m", "server.superlink", "--host", host, "--port", str(port),
           "--database", str(state.database), "--disable-runtime-dependency-installation"]
    for net in operator_networks:
        cmd += ["--operator-network", net]
    if certs is None:
        return [*cmd, "--insecure"]
    return [*cmd, "--ssl-ca-certfile", str(certs / CA_FILE), "--ssl-certfile", str(certs / SERVER_CERT),
            "--ssl-keyfile", str(certs / SERVER_KEY), "--enable-supernode-auth"]


def prepare_server(state_dir: Path, certs: Path | None, host: str, port: int, *, insecure: bool,
                   operator_networks: Sequence[str] = ()) -> list[str]:
    """Check certificates and port, write the operator's connection, return the SuperLink command."""
    for net in operator_networks:
        try:
            ipaddress.ip_network(net, strict=False)
        except ValueError as exc:
            raise ConfigError(f"--operator-network {net!r} is not a network (CIDR, e.g. 10.0.5.0/24): {exc}") from exc
    if certs is None and not insecure:
        raise ConfigError("TLS certificates are required (--certs DIR from `fedsilo certs init`); plaintext only with "
                          "--insecure, for local development.")
    if certs is not None and insecure:
        raise ConfigError("--certs and --insecure exclude each other.")
    if certs is not None:
        for name in (CA_FILE, SERVER_CERT, SERVER_KEY):
            if not (certs / name).is_file():
                raise ConfigError(f"{certs / name} is missing (create it with `fedsilo certs init`).")
        check_certificate(certs / SERVER_CERT, certs / CA_FILE)
        check_key_matches(certs / SERVER_CERT, certs / SERVER_KEY)
    check_port_free(host, port)
    state = ServerState(state_dir)
    prepare_state_dir(state)
    # The operator's flwr CLI runs on the server host: a wildcard listen address is reached over loopback (so the
    # server certificate needs a 127.0.0.1 SAN for it).
    local = {"0.0.0.0": "127.0.0.1", "::": "[::1]"}.get(host, f"[{host}]" if ":" in host else host)  # noqa: S104 (mapping a wildcard to loopback, not binding)
    state.write_connection(f"{local}:{port}", certs / CA_FILE if certs is not None else None)
    return superlink_command(state, certs, host, port, operator_networks)


def _flwr(state: ServerState, *args: str, capture: bool = True, own_session: bool = False,
          timeout: float | None = None) -> subprocess.CompletedProcess[str]:
    """Run Flower's `flwr` CLI on this server's connection. `own_session`: in a session of its own, so that a
    Ctrl-C at the terminal reaches only fedsilo, which decides what becomes of the job."""
    state.require_connection()
    cmd = [flower_tool("flwr"), *args]
    log.debug("flwr: %s", shlex.join(cmd))
    try:
        return subprocess.run(cmd, env=state.env(), capture_output=capture, text=True, check=False,
                              start_new_session=own_session, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise DeploymentError(f"`flwr {args[0]}` did not answer within {timeout:.0f} s: is the server running "
                              f"(`fedsilo server start --state-dir {state.root}`)?") from exc


def _flwr_lines(state: ServerState, *args: str, own_session: bool = False) -> subprocess.Popen[str]:
    """`flwr ARGS` started with its output (stdout and stderr) to be read line by line, as it comes."""
    state.require_connection()
    cmd = [flower_tool("flwr"), *args]
    log.debug("flwr: %s", shlex.join(cmd))
    return subprocess.Popen(cmd, env=state.env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            errors="replace", bufsize=1, start_new_session=own_session)


NODE_NAMES = "node-names.json"  # in the state directory: node id -> the name given at registration
_REGISTERED = re.compile(r"SuperNode (\d+) registered successfully")


def _names_file(state: ServerState) -> Path:
    return state.root / NODE_NAMES


def read_node_names(state_dir: Path) -> dict[int, str]:
    """Node id -> the name it was registered with by `fedsilo server register` (empty before any). Flower 1.41
    keeps that name too (the SuperLink's node table, `NodeInfo.name`: the ServerApp reads it through
    `Grid.get_nodes`), but `flwr supernode list` shows neither it nor a way to it, only the owner account ("none"
    without accounts), so fedsilo keeps its own copy for `server nodes`. ConfigError if the file is unreadable."""
    path = _names_file(ServerState(state_dir))
    if not path.exists():
        return {}
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        return {int(node_id): str(name) for node_id, name in doc["nodes"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ConfigError(f"{path} (the registered nodes' names) is unreadable: {exc}. Remove it and register "
                          "the departments' keys again, or restore it.") from exc


def _remember_name(state: ServerState, node_id: int, name: str) -> None:
    """Add node id -> name to the state directory's names (0600, written atomically, under a lock)."""
    with exclusive_lock(state.root / f".{NODE_NAMES}.lock"):
        names = read_node_names(state.root)
        names[node_id] = name
        doc = {"nodes": {str(k): v for k, v in sorted(names.items())}}
        write_atomic(_names_file(state), (json.dumps(doc, indent=2) + "\n").encode(), mode=PRIVATE_MODE)


def register_node(state_dir: Path, public_key: Path, name: str) -> str:
    """Register a department's node public key under `name` (kept by Flower, and by fedsilo for `server nodes`)."""
    if not public_key.is_file():
        raise ConfigError(f"Public key {public_key} does not exist.")
    state = ServerState(state_dir)
    proc = _flwr(state, "supernode", "register", str(public_key), CONNECTION, "--name", name)
    if proc.returncode != 0 or "registered successfully" not in proc.stdout:
        raise DeploymentError(f"Registering {public_key} failed: {(proc.stdout + proc.stderr).strip()[-800:]}")
    found = _REGISTERED.search(proc.stdout)
    if found is None:
        log.warning("register: Flower did not say the new node's id; `server nodes` will not show its name %r",
                    name)
    else:
        _remember_name(state, int(found.group(1)), name)
    return proc.stdout.strip()


def list_nodes(state_dir: Path, as_json: bool = False) -> str:
    """The registered nodes, with the name each was registered with: a table (node id, name, status, since when),
    or Flower's JSON (node-id, status, online-at, offline-at, ...) with each node's "name" added (null: registered
    without fedsilo, or before fedsilo kept names)."""
    proc = _flwr(ServerState(state_dir), "supernode", "list", CONNECTION, "--format", "json")
    if proc.returncode != 0:
        raise DeploymentError(f"Listing nodes failed: {(proc.stdout + proc.stderr).strip()[-800:]}")
    try:
        doc = json.loads(proc.stdout)
        nodes = doc["nodes"]
    except (ValueError, KeyError, TypeError) as exc:
        raise DeploymentError(f"Listing nodes failed: Flower's answer is not its JSON listing: "
                              f"{proc.stdout.strip()[-800:]}") from exc
    names = read_node_names(state_dir)
    for node in nodes:
        node["name"] = names.get(int(node["node-id"]))
    return json.dumps(doc) + "\n" if as_json else nodes_table(nodes)


def nodes_table(nodes: Sequence[dict[str, Any]]) -> str:
    """Nodes (Flower's JSON listing, with names) as a plain table, without unregistered nodes."""
    since_field = {"online": "online-at", "offline": "offline-at", "registered": "created-at"}
    rows = [("NODE ID", "NAME", "STATUS", "SINCE")]
    for node in nodes:
        status = str(node.get("status", ""))
        if status == "unregistered":  # as Flower's own table: `--json` lists them
            continue
        rows.append((str(node.get("node-id", "")), str(node.get("name") or "(unknown)"), status,
                     str(node.get(since_field.get(status, "deleted-at")) or "")))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows]
    return "\n".join(lines) + "\n" + ("" if len(rows) > 1 else "(no nodes registered)\n")


def _toml_value(value: bool | int | float | str) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if "'" in value:
        raise ConfigError(f"Config value {value!r} must not contain a single quote.")
    return f"'{value}'"


def _one_line(text: str) -> str:
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def flwr_json(proc: subprocess.CompletedProcess[str], what: str) -> dict[str, Any]:
    """The JSON document a `flwr ... --format json` call printed; DeploymentError with Flower's message when the call
    failed. (With `--format json` Flower prints `{"success": false, "error-message": ...}` and may still exit 0.)"""
    text = proc.stdout or ""
    start = text.find("{")
    doc: Any = None
    if start >= 0:
        try:
            doc, _ = json.JSONDecoder().raw_decode(text[start:])
        except ValueError:
            doc = None
    if not isinstance(doc, dict):
        output = ((proc.stdout or "") + (proc.stderr or "")).strip()[-800:] or "no output"
        raise DeploymentError(f"{what} failed (flwr exit status {proc.returncode}): {output}")
    if doc.get("success") is not True:
        raise DeploymentError(f"{what} failed: {_one_line(str(doc.get('error-message') or doc))}")
    return doc


def parse_run_id(doc: dict[str, Any]) -> int:
    """The run id in `flwr run --format json`'s answer."""
    try:
        return int(doc["run-id"])
    except (KeyError, TypeError, ValueError) as exc:
        raise DeploymentError(f"Flower's answer to the submission names no run id: {doc}") from exc


@dataclass(frozen=True)
class JobEntry:
    """What fedsilo recorded when it submitted a job (`<state-dir>/jobs/<run-id>.json`): Flower's run list does
    not carry the run config."""

    run_id: int
    out_dir: str
    rounds: int
    submitted: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"run-id": self.run_id, "out-dir": self.out_dir, "rounds": self.rounds, "submitted": self.submitted}

    @classmethod
    def from_json(cls, doc: Any) -> JobEntry:
        if not isinstance(doc, dict):
            raise ConfigError("not a JSON object")
        try:
            return cls(int(doc["run-id"]), str(doc["out-dir"]), int(doc["rounds"]), str(doc.get("submitted", "")))
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"missing or malformed field: {exc}") from exc


def record_job(state: ServerState, entry: JobEntry) -> None:
    state.jobs.mkdir(mode=STATE_DIR_MODE, exist_ok=True)
    write_atomic(state.jobs / f"{entry.run_id}.json", json.dumps(entry.to_json(), indent=2).encode())


def read_job_entries(state: ServerState) -> dict[int, JobEntry]:
    """fedsilo's records of its submitted jobs by run id; an unreadable one is skipped with a warning."""
    entries: dict[int, JobEntry] = {}
    if not state.jobs.is_dir():
        return entries
    for path in sorted(state.jobs.glob("*.json")):
        try:
            entry = JobEntry.from_json(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError, ConfigError) as exc:
            log.warning("skipping the job record %s: %s", path, exc)
            continue
        entries[entry.run_id] = entry
    return entries


@dataclass(frozen=True)
class JobStatus:
    """One job as `fedsilo server jobs` shows it: Flower's status, and what fedsilo's record and report add."""

    run_id: int
    status: str  # Flower's: pending, starting, running, finished:completed|failed|stopped
    elapsed: float | None = None
    out_dir: str | None = None
    rounds_done: int | None = None
    rounds_asked: int | None = None
    departments: tuple[str, ...] = ()
    outcome: str | None = None  # the report's: completed, ended_early (None while it runs)

    def to_json(self) -> dict[str, Any]:
        return {"run-id": self.run_id, "status": self.status, "elapsed-seconds": self.elapsed,
                "out-dir": self.out_dir, "rounds-done": self.rounds_done, "rounds-asked": self.rounds_asked,
                "departments": list(self.departments), "outcome": self.outcome}


def _report_facts(out_dir: str) -> tuple[int | None, int | None, tuple[str, ...], str | None]:
    """Rounds done, rounds asked, departments and outcome from the run's report.json (Nones when there is none
    yet, or it cannot be read)."""
    from server.records import AggregateStatus, read_report
    from server.report import REPORT_JSON

    path = Path(out_dir) / REPORT_JSON
    if not path.is_file():
        return None, None, (), None
    try:
        report = read_report(path)
    except ConfigError as exc:
        log.warning("%s", exc)
        return None, None, (), None
    names = set(report.departments)
    for record in report.rounds:
        names.update(record.departments)
    done = (report.final.rounds_completed if report.final is not None
            else sum(1 for r in report.rounds if r.aggregate != AggregateStatus.PENDING))
    asked = report.config.get("num-server-rounds")
    return (done, asked if isinstance(asked, int) else None, tuple(sorted(names)),
            report.final.outcome if report.final is not None else None)


def job_statuses(doc: dict[str, Any], entries: dict[int, JobEntry]) -> list[JobStatus]:
    """`flwr ls --format json`'s runs, newest first (by the time Flower queued them: run ids are random), each with
    what fedsilo knows of it."""
    runs = doc.get("runs")
    if not isinstance(runs, list):
        raise DeploymentError(f"Flower's run list has no runs: {doc}")
    jobs: list[tuple[str, JobStatus]] = []
    for run in runs:
        try:
            run_id = int(run["run-id"])
            status = str(run["status"])
        except (KeyError, TypeError, ValueError) as exc:
            raise DeploymentError(f"Flower's run list has a malformed run: {run}") from exc
        elapsed = run.get("elapsed")
        queued = str(run.get("pending-at") or "")  # Flower's ISO 8601 UTC text: sorts as the times do
        queued = "" if queued == "N/A" else queued  # Flower's text for no time
        entry = entries.get(run_id)
        if entry is None:
            jobs.append((queued, JobStatus(run_id, status, elapsed if isinstance(elapsed, int | float) else None)))
            continue
        done, asked, departments, outcome = _report_facts(entry.out_dir)
        jobs.append((queued, JobStatus(run_id, status, elapsed if isinstance(elapsed, int | float) else None,
                                       entry.out_dir, done, asked or entry.rounds, departments, outcome)))
    return [job for _, job in sorted(jobs, key=lambda pair: (pair[0], pair[1].run_id), reverse=True)]


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    whole = int(seconds)
    return f"{whole // 3600}:{whole // 60 % 60:02d}:{whole % 60:02d}"


def format_jobs(jobs: Sequence[JobStatus]) -> str:
    """The table `fedsilo server jobs` prints."""
    if not jobs:
        return "No jobs on this server.\n"
    header = ("RUN ID", "STATUS", "ROUNDS", "ELAPSED", "DEPARTMENTS", "OUT")
    rows = [header]
    for job in jobs:
        rounds = "-" if job.rounds_asked is None else f"{job.rounds_done or 0}/{job.rounds_asked}"
        status = job.status if job.outcome in (None, "completed") else f"{job.status} ({job.outcome})"
        rows.append((str(job.run_id), status, rounds, _duration(job.elapsed), ",".join(job.departments) or "-",
                     job.out_dir or "-"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
    lines = ["  ".join([*(cell.ljust(w) for cell, w in zip(row[:-1], widths, strict=True)), row[-1]]).rstrip()
             for row in rows]
    return "\n".join(lines) + "\n"


def list_jobs(state_dir: Path) -> list[JobStatus]:
    """Every job the SuperLink knows (Flower's `flwr ls`), with out dir, rounds and departments where fedsilo
    submitted it."""
    state = ServerState(state_dir)
    proc = _flwr(state, "ls", CONNECTION, "--format", "json", timeout=CONTROL_TIMEOUT_S)
    return job_statuses(flwr_json(proc, "Listing jobs"), read_job_entries(state))


def stop_unfinished_jobs(state_dir: Path, out_dir: Path) -> list[int]:
    """Stop the jobs fedsilo submitted with output `out_dir` that the SuperLink still lists as unfinished; their run
    ids. Before `--resume` continues a run there: only the resumed job may write to it. After a server crash the
    dead job is listed as running until Flower gives up on its ServerApp (a minute: its heartbeats), and a site
    still fetching that job's last message waits as long; stopped, the site gets no more of it at once."""
    stale = [job.run_id for job in list_jobs(state_dir)
             if job.out_dir == str(out_dir) and not job.status.startswith("finished")]
    for run_id in stale:
        stop_job(state_dir, run_id)
    return stale


def stop_job(state_dir: Path, run_id: int) -> None:
    """Stop a job on the server (Flower's `flwr stop`): the SuperLink marks it finished:stopped and its ServerApp
    ends; departments get no more of its messages."""
    proc = _flwr(ServerState(state_dir), "stop", str(run_id), CONNECTION, "--format", "json",
                 timeout=CONTROL_TIMEOUT_S)
    flwr_json(proc, f"Stopping job {run_id}")


def print_job_log(state: ServerState, run_id: int, *, follow: bool, verbose: bool = False,
                  own_session: bool = False) -> int:
    """Print a job's ServerApp log (Flower's `flwr log`) through `JobLogFilter`: no colour codes, no line twice, by
    default fedsilo's own lines (one per round, the job's start and end) and warnings, everything with `verbose`.
    Flower's exit status; when it is not 0, the lines the filter dropped last are printed to stderr (Flower's
    reason). The `flwr` process is killed should this be interrupted (`JobSignals`)."""
    view = JobLogFilter(verbose)
    proc = _flwr_lines(state, "log", str(run_id), CONNECTION, "--stream" if follow else "--show",
                       own_session=own_session)
    try:
        assert proc.stdout is not None  # noqa: S101 (stdout=PIPE)
        for line in view.lines(proc.stdout):
            print(line, flush=True)
        status = proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if status != 0 and view.dropped:
        print("\n".join(view.dropped), file=sys.stderr)
    return status


def show_logs(state_dir: Path, run_id: int, *, follow: bool = False, verbose: bool = False) -> int:
    """Print a job's ServerApp log: what it logged so far, or (`follow`) until the job ends (`print_job_log`)."""
    return print_job_log(ServerState(state_dir), run_id, follow=follow, verbose=verbose)


class _Signalled(BaseException):
    """A SIGINT/SIGTERM while a job is followed (a BaseException: nothing on the way may swallow it)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


class JobSignals:
    """SIGINT and SIGTERM while `server run` submits and follows a job.

    While the job is being submitted a signal is only remembered (the run id is not known yet: cutting the
    submission short could leave a job nobody knows to stop); once armed, a signal (or the remembered one) raises
    `_Signalled` where the main thread is, e.g. waiting for the log stream, whose process `subprocess.run` then
    kills. `disarm` goes back to remembering, so that a second Ctrl-C does not cut the stop short. The previous
    handlers come back on exit.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.received: int | None = None
        self.armed = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> JobSignals:
        for signum in self.SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        if self.received is None:
            self.received = signum
        if self.armed:
            raise _Signalled(signum)

    def arm(self) -> None:
        self.armed = True
        if self.received is not None:
            raise _Signalled(self.received)

    def disarm(self) -> None:
        self.armed = False




def _stop_run(state: ServerState, run_id: int) -> None:
    stop_job(state.root, run_id)


def follow_job(state_dir: Path, run_id: int, signals: JobSignals,
               stream: Callable[[ServerState, int], int] | None = None,
               stop: Callable[[ServerState, int], None] = _stop_run, *, verbose: bool = False) -> int:
    """Stream the job's log until it ends (Flower's exit status; `print_job_log`, `verbose` for every line). A
    SIGINT or SIGTERM, also one received while the job was submitted, stops the job on the server and raises
    JobInterruptedError (exit status 128 + signal)."""
    state = ServerState(state_dir)
    if stream is None:
        stream = functools.partial(print_job_log, follow=True, verbose=verbose, own_session=True)
    try:
        signals.arm()
        return stream(state, run_id)
    except _Signalled as sig:
        signum = sig.signum
    finally:
        signals.disarm()
    name = signal.Signals(signum).name
    try:
        stop(state, run_id)
    except DeploymentError as exc:
        raise JobInterruptedError(signum, f"{name}: could not stop job {run_id} on the server: {exc} (check it "
                                          f"with `fedsilo server jobs --state-dir {state_dir}`)") from exc
    raise JobInterruptedError(signum, f"{name}: stopped job {run_id} on the server.")


def submit_job(state_dir: Path, rc: RunConfig, app: Path | None = None) -> int:
    """Validate the job here, then submit it (this installation's app, or `app`) to the SuperLink without
    following it: its Flower run id, recorded in the state directory with its out dir and rounds. Sites run only
    app bundles their policy approves (`fedsilo app digest`)."""
    check_known_keys(rc)
    job = JobConfig.from_run_config(rc)
    if not job.label_names:
        raise ConfigError("A deployed job must name its labels (--labels a,b): the server holds no data.")
    if not job.out_dir:
        raise ConfigError("A deployed job needs an output directory on the server (--out).")
    from common.model import resolve_model_dir  # imports torch: only when a job is submitted

    resolve_model_dir(job.model)  # the ServerApp builds the model on this host: an unknown path fails here, not there
    overrides = " ".join(f"{k}={_toml_value(v)}" for k, v in rc.items())
    state = ServerState(state_dir)
    with tempfile.TemporaryDirectory(prefix="fedsilo-app-") as staged:
        stage_app(app or app_dir(), Path(staged))
        # Its own session: a Ctrl-C at the terminal must not cut the submission short (JobSignals).
        proc = _flwr(state, "run", staged, CONNECTION, "--run-config", overrides, "--format", "json",
                     own_session=True, timeout=CONTROL_TIMEOUT_S)
    run_id = parse_run_id(flwr_json(proc, "Submitting the job"))
    record_job(state, JobEntry(run_id, job.out_dir, job.num_server_rounds,
                               datetime.now(UTC).isoformat(timespec="seconds")))
    return run_id
