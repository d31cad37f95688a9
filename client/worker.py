"""A warm worker per run at a site: the site's installed ClientApp kept in one process for the messages of a run.

Without it, every message a site answers starts a fresh process through the gate (`client.gate`), which imports
torch, transformers, peft and Opacus and rebuilds the model skeleton and the tokenised data (seconds per message).
With it (site config `warm_worker`, on by default), the gate of the run's first message starts this worker, and the
gate of every message, after the same checks as before (the job's bundle digest against the site's policy, the
pinned server), forwards the message to it and pushes its reply:

- the worker runs the site's installed fedsilo only (`python -m client.worker`: the module the gate would import,
  `client.app:app`), for one run and the one approved app digest it was started for; a message of another run or
  digest is refused;
- it listens on a Unix socket `run-<run id>.sock` (mode 0600) in `.fedsilo-workers/` beside the site's ledger, a
  directory of mode 0700 owned by the site's user (checked before every use: a directory that is a link, owned by
  another user or open to others is refused), and accepts a connection only from a process of the site's own user
  (SO_PEERCRED);
- it keeps what `client.reuse.RUN_CACHE` keeps within one process (the model skeleton, the split, the tokenised
  data); the ledger is charged in the worker, by the same `Department` code, before training, as before;
- its log is `run-<run id>.log` there (the newest `KEPT_RUN_LOGS` runs' logs are kept);
- it ends once it has answered the evaluation of the job's last round, after `warm_worker_idle_seconds` without a
  message (a run stopped or ended early), and with the SuperNode's executor (its `--parent-pid`).

Messages and contexts travel as Flower's own protobuf messages (no pickle); the context the worker returns (SecAgg+
keeps its state there) replaces the gate's before the gate pushes the reply.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import logging
import os
import socket
import stat
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from flwr.app import Context, Error, Message, MessageType

from client.compat import (
    ErrorCode,
    ProtoContext,
    ProtoMessage,
    context_from_proto,
    context_to_proto,
    message_from_proto,
    message_to_proto,
    start_parent_process_monitor,
)
from client.failures import public_reason
from client.site import SiteConfig
from common import keys
from common.errors import FedsiloError, PolicyError
from common.logs import FORMAT

log = logging.getLogger(__name__)

WORKER_DIR = ".fedsilo-workers"
START_TIMEOUT_SECONDS = 180.0  # imports and the first connection: seconds on a loaded machine
REPLY_TIMEOUT_SECONDS = 3600.0  # one message's work (training included)
MAX_FRAME_BYTES = 2**31
_COUNT = struct.Struct("!I")
_LENGTH = struct.Struct("!Q")
_PEERCRED = struct.Struct("3i")  # pid, uid, gid


class WorkerError(FedsiloError):
    """The site's warm worker could not be started or reached, or broke off a message (the message says which)."""


# ---------------------------------------------------------------- the directory and the socket


def worker_dir(site: SiteConfig) -> Path:
    """The site's worker directory beside its ledger: created 0700 if absent; refused unless it is a directory (not
    a link) owned by this user and closed to others."""
    path = Path(site.ledger).resolve().parent / WORKER_DIR
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=0o700)
    st = path.lstat()
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise PolicyError(f"Site {site.name}: the worker directory {path} must be a directory (not a link) owned by "
                          f"uid {os.getuid()} with mode 0700; it is {stat.filemode(st.st_mode)} owned by uid "
                          f"{st.st_uid}. Remove it; the site recreates it.")
    return path


def socket_name(run_id: int) -> str:
    return f"run-{run_id}.sock"


@contextlib.contextmanager
def _in_dir(path: Path) -> Iterator[None]:
    """Inside `path` (a socket's full path may be longer than the 107 bytes AF_UNIX allows: names are relative)."""
    here = os.open(".", os.O_RDONLY)
    try:
        os.chdir(path)
        yield
    finally:
        os.fchdir(here)
        os.close(here)


def _send(sock: socket.socket, *parts: bytes) -> None:
    sock.sendall(_COUNT.pack(len(parts)) + b"".join(_LENGTH.pack(len(p)) + p for p in parts))


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    chunks, left = [], n
    while left:
        chunk = sock.recv(min(left, 1 << 20))
        if not chunk:
            raise WorkerError("the worker connection closed mid-message")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _recv(sock: socket.socket) -> list[bytes]:
    (count,) = _COUNT.unpack(_recv_exactly(sock, _COUNT.size))
    if count > 8:
        raise WorkerError(f"a worker frame of {count} parts; at most 8")
    parts = []
    for _ in range(count):
        (length,) = _LENGTH.unpack(_recv_exactly(sock, _LENGTH.size))
        if length > MAX_FRAME_BYTES:
            raise WorkerError(f"a worker frame part of {length} bytes; at most {MAX_FRAME_BYTES}")
        parts.append(_recv_exactly(sock, length))
    return parts


# ---------------------------------------------------------------- the gate's side


def _connect(directory: Path, name: str) -> socket.socket | None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with _in_dir(directory):
            sock.connect(name)
    except (FileNotFoundError, ConnectionRefusedError):
        sock.close()
        return None
    return sock


KEPT_RUN_LOGS = 50  # the newest run logs a site keeps in its worker directory (one log per run)


def prune_run_logs(directory: Path, keep: int = KEPT_RUN_LOGS) -> list[Path]:
    """Remove all but the `keep` newest run logs of `directory`, with the lock of each run whose worker is gone (no
    socket); the removed paths."""
    logs = sorted(directory.glob("run-*.log"), key=lambda p: p.stat().st_mtime, reverse=True)
    removed = []
    for old in logs[keep:]:
        if old.with_suffix(".sock").exists():
            continue  # its worker still listens
        for path in (old, old.with_suffix(".lock")):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed.append(path)
    return removed


def _start(site: SiteConfig, directory: Path, context: Context, digest: str, parent_pid: int | None) -> None:
    prune_run_logs(directory)
    args = [sys.executable, "-m", "client.worker", "--dir", str(directory), "--run-id", str(context.run_id),
            "--digest", digest, "--idle-seconds", str(site.warm_worker_idle_seconds)]
    if parent_pid is not None:
        args += ["--parent-pid", str(parent_pid)]
    with (directory / f"run-{context.run_id}.log").open("a") as out:
        subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                         start_new_session=True, close_fds=True)
    log.info("worker: site %s started a warm worker for run %s (app %s)", site.name, context.run_id, digest)


def _worker_socket(site: SiteConfig, context: Context, digest: str, parent_pid: int | None) -> socket.socket:
    """A connection to the run's worker, started (once: under a lock) if none listens."""
    directory = worker_dir(site)
    name = socket_name(context.run_id)
    sock = _connect(directory, name)
    if sock is not None:
        return sock
    with (directory / f"run-{context.run_id}.lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        sock = _connect(directory, name)
        if sock is not None:
            return sock
        _start(site, directory, context, digest, parent_pid)
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while (sock := _connect(directory, name)) is None:
            if time.monotonic() > deadline:
                raise WorkerError(f"Site {site.name}: the warm worker for run {context.run_id} did not listen "
                                  f"within {START_TIMEOUT_SECONDS:.0f}s; see {directory}/run-{context.run_id}.log")
            time.sleep(0.05)
        return sock


def forward(site: SiteConfig, digest: str, message: Message, context: Context, parent_pid: int | None) -> Message:
    """The run's worker's reply to `message` (the gate has admitted the job); `context` takes the worker's state."""
    try:
        with _worker_socket(site, context, digest, parent_pid) as sock:
            sock.settimeout(REPLY_TIMEOUT_SECONDS)
            header = json.dumps({"run_id": context.run_id, "digest": digest}).encode()
            _send(sock, header, message_to_proto(message).SerializeToString(),
                  context_to_proto(context).SerializeToString())
            parts = _recv(sock)
    except OSError as exc:
        raise WorkerError(f"Site {site.name}: the warm worker for run {context.run_id} failed: {exc}") from exc
    status = json.loads(parts[0])
    if not status.get("ok"):
        raise WorkerError(f"Site {site.name}: the warm worker for run {context.run_id} refused the message: "
                          f"{status.get('error')}")
    reply = message_from_proto(ProtoMessage.FromString(parts[1]))
    context.state = context_from_proto(ProtoContext.FromString(parts[2])).state
    return reply


# ---------------------------------------------------------------- the worker's side


def run_installed(message: Message, context: Context, site_name: str | None) -> Message:
    """The reply of the site's installed ClientApp (`client.app:app`); any failure becomes an error reply, as with
    `flwr-clientapp`."""
    from client.app import app  # the site's own, reviewed code

    try:
        return app(message=message, context=context)
    except Exception as exc:  # as flwr-clientapp: any failure becomes an error reply, nothing else
        log.exception("site %s: the ClientApp raised", site_name)
        return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=public_reason(exc, site_name)),
                       reply_to=message)


def _peer_uid(conn: socket.socket) -> int:
    _pid, uid, _gid = _PEERCRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
    return int(uid)


def last_message(message: Message, context: Context) -> bool:
    """The evaluation of the job's last round: the last message of a run that ends as planned (the last round is
    always evaluated, whatever `evaluate-every`)."""
    rounds = context.run_config.get(keys.CFG_NUM_ROUNDS)
    return (message.metadata.message_type == MessageType.EVALUATE and isinstance(rounds, int)
            and message.metadata.group_id == str(rounds))


def _serve_one(conn: socket.socket, run_id: int, digest: str) -> bool:
    """Answer one gate's message; True when it was the run's last (`last_message`)."""
    parts = _recv(conn)
    header = json.loads(parts[0])
    if header.get("run_id") != run_id or header.get("digest") != digest or len(parts) != 3:
        log.error("worker: refused a message for run %s, app %s (serves run %s, app %s)", header.get("run_id"),
                  header.get("digest"), run_id, digest)
        _send(conn, json.dumps({"ok": False, "error": f"this worker serves run {run_id}, app {digest}"}).encode())
        return False
    context = context_from_proto(ProtoContext.FromString(parts[2]))
    if context.run_id != run_id:
        _send(conn, json.dumps({"ok": False, "error": f"this worker serves run {run_id}"}).encode())
        return False
    message = message_from_proto(ProtoMessage.FromString(parts[1]))
    if message.metadata.run_id != run_id:
        _send(conn, json.dumps({"ok": False, "error": f"this worker serves run {run_id}"}).encode())
        return False
    site_name = None
    with contextlib.suppress(FedsiloError):
        from client.gate import site_of

        site_name = site_of(context).name
    start = time.perf_counter()
    reply = run_installed(message, context, site_name)
    log.info("worker: run %s: %s message of round %s answered in %.2fs", run_id, message.metadata.message_type,
             message.metadata.group_id or "-", time.perf_counter() - start)
    _send(conn, b'{"ok": true}', message_to_proto(reply).SerializeToString(),
          context_to_proto(context).SerializeToString())
    return last_message(message, context)


def serve(directory: Path, run_id: int, digest: str, idle_seconds: float) -> int:
    """Serve run `run_id`'s messages on `directory`/run-<id>.sock until `idle_seconds` pass without one."""
    name = socket_name(run_id)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with _in_dir(directory):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name)  # a worker that died left it; the starting gate holds the run's lock
        old = os.umask(0o177)
        try:
            listener.bind(name)
        finally:
            os.umask(old)
    listener.listen(4)
    listener.settimeout(idle_seconds)
    log.info("worker: serving run %s (app %s) in %s, idle timeout %.0fs", run_id, digest, directory, idle_seconds)
    from client import app as _warm  # noqa: F401 (imports torch, transformers, peft, Opacus once, for the run)

    try:
        while True:
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                log.info("worker: run %s: no message for %.0fs; ending", run_id, idle_seconds)
                break
            if _serve_connection(conn, run_id, digest):
                log.info("worker: run %s: answered the evaluation of its last round; ending", run_id)
                break
        # No new gate finds this worker now; serve those that connected just before.
        with _in_dir(directory), contextlib.suppress(FileNotFoundError):
            os.unlink(name)
        listener.setblocking(False)
        while True:
            try:
                conn, _ = listener.accept()
            except BlockingIOError:
                return 0
            _serve_connection(conn, run_id, digest)
    finally:
        listener.close()


def _serve_connection(conn: socket.socket, run_id: int, digest: str) -> bool:
    """Serve one connection; True when it brought the run's last message."""
    with conn:
        conn.setblocking(True)
        uid = _peer_uid(conn)
        if uid != os.getuid():
            log.error("worker: refused a connection from uid %s", uid)
            return False
        try:
            return _serve_one(conn, run_id, digest)
        except Exception as exc:  # noqa: BLE001 (an unreadable request is answered, and the worker serves on)
            log.error("worker: run %s: a request failed: %s: %s", run_id, type(exc).__name__, exc)
            with contextlib.suppress(OSError):
                _send(conn, json.dumps({"ok": False, "error": f"unreadable request ({type(exc).__name__})"}).encode())
            return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedsilo-worker", description="a site's warm worker for one run")
    parser.add_argument("--dir", type=Path, required=True)
    parser.add_argument("--run-id", type=int, required=True)
    parser.add_argument("--digest", required=True)
    parser.add_argument("--idle-seconds", type=float, required=True)
    parser.add_argument("--parent-pid", type=int)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=FORMAT)
    if args.parent_pid is not None:
        start_parent_process_monitor(args.parent_pid)  # end with the SuperNode's executor
    st = args.dir.lstat()
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise PolicyError(f"the worker directory {args.dir} must be a directory owned by uid {os.getuid()}, mode "
                          "0700")
    return serve(args.dir, args.run_id, args.digest, args.idle_seconds)


if __name__ == "__main__":
    raise SystemExit(main())
