"""Why `fedsilo client start` cannot join the server, in words the site can act on.

Four join failures look alike in Flower 1.41's SuperNode (a TLS error retried, or "Failed to activate SuperNode."):

- **wrong CA** and **plaintext**: a pre-flight TLS handshake with the site's CA, before the SuperNode starts, tells a
  server certificate the CA does not verify (the message names the CA file and the certificate's issuer), a
  certificate for another host name, a server that does not speak TLS, and a site set to `insecure = true` facing a
  TLS server. A server not reachable yet is no failure: the SuperNode keeps trying, as it always has; should it give
  up connecting later (Flower gives up at a TLS error), fedsilo probes again and explains what it finds.
- **unregistered key** and **still online**: the SuperLink answers both with the same public error
  (`FLEET_NODE_ACTIVATION_FAILED`, "Failed to activate SuperNode."; the reason stays in the server's log). fedsilo
  runs the SuperNode as a child, forwards its output and signals, and when it fails to activate asks the server
  whether the key is registered: an `ActivateNode` request signed with the node key and an out-of-range heartbeat
  interval. Flower's handler looks the key up first (unknown: `FLEET_NODE_ACTIVATION_FAILED`) and checks the
  interval second (`FLEET_INVALID_HEARTBEAT_INTERVAL`), before it changes anything, so the answer says "registered"
  or "not registered" and activates nothing. A registered key refused activation is a node the server still sees
  online. Should a later Flower answer otherwise, the message lists both causes with the action for each. The
  server's log shows this request as an `ApiError:2003` ("Heartbeat interval ... is out of bounds") for a registered
  key, an `ApiError:2004` for an unknown one.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import os
import shlex
import signal
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from types import FrameType

from client.policy import split_address
from common.errors import JoinError
from common.logs import strip_ansi

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 10.0
ACTIVATION_FAILED = "Failed to activate SuperNode"  # Flower's public message for FLEET_NODE_ACTIVATION_FAILED
CONNECTION_FAILED = "Failed to initialize the connection to the SuperLink"  # the SuperNode gave up connecting
HOSTNAME_MISMATCH = 62  # X509_V_ERR_HOSTNAME_MISMATCH
FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
READER_JOIN_S = 5.0  # after the SuperNode exits: its last lines; a helper that kept the pipe open is not waited for
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


class Outcome(Enum):
    TLS = "tls"  # a TLS server the site's CA verifies (or, for an insecure site, any TLS server)
    WRONG_CA = "wrong-ca"
    HOSTNAME = "hostname"  # verified by the CA, but issued for another name
    PLAINTEXT = "plaintext"  # answered a plain HTTP request
    NOT_TLS = "not-tls"  # no TLS handshake, no HTTP answer either
    UNREACHABLE = "unreachable"


@dataclass(frozen=True)
class Probe:
    outcome: Outcome
    detail: str = ""
    issuer: str | None = None  # issuer of the certificate the server presented (WRONG_CA, HOSTNAME)


def heartbeat_window_s(interval: float | None = None) -> int:
    """How long the server keeps a node online after its last heartbeat: Flower's patience x the node's heartbeat
    interval (`interval`, the site's `heartbeat_seconds`; None: Flower's default)."""
    from client import compat

    return int(compat.HEARTBEAT_PATIENCE * (interval or compat.HEARTBEAT_DEFAULT_INTERVAL))


def _no_verify() -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # only to read what the server presents; nothing is sent over it
    return context


def _presented_issuer(host: str, port: int) -> str | None:
    from cryptography import x509

    try:
        with socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S) as raw, \
                _no_verify().wrap_socket(raw, server_hostname=host) as tls:
            der = tls.getpeercert(binary_form=True)
    except OSError as exc:
        log.debug("client: cannot read the server certificate of %s:%d: %s", host, port, exc)
        return None
    return x509.load_der_x509_certificate(der).issuer.rfc4514_string() if der else None


def _answers_http(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S) as raw:
            raw.sendall(f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode("ascii"))
            return raw.recv(5) == b"HTTP/"
    except OSError:
        return False


def probe_server(address: str, ca: Path | None) -> Probe:
    """One TLS handshake with the server at `address`, verified against `ca` (None: an insecure site, which only
    asks whether the server speaks TLS). No request is sent over TLS."""
    host, port = split_address(address)
    try:
        raw = socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S)
    except OSError as exc:
        return Probe(Outcome.UNREACHABLE, str(exc))
    context = _no_verify() if ca is None else ssl.create_default_context(cafile=str(ca))
    try:
        with raw, context.wrap_socket(raw, server_hostname=host):
            return Probe(Outcome.TLS)
    except ssl.SSLCertVerificationError as exc:
        outcome = Outcome.HOSTNAME if exc.verify_code == HOSTNAME_MISMATCH else Outcome.WRONG_CA
        return Probe(outcome, exc.verify_message or str(exc), _presented_issuer(host, port))
    except OSError as exc:  # ssl.SSLError (no handshake), reset, EOF
        outcome = Outcome.PLAINTEXT if _answers_http(host, port) else Outcome.NOT_TLS
        return Probe(outcome, str(exc))


def ca_subject(ca: Path) -> str | None:
    from cryptography import x509

    try:
        return x509.load_pem_x509_certificate(ca.read_bytes()).subject.rfc4514_string()
    except (OSError, ValueError):
        return None


def tls_failure_message(site: str, config: Path, address: str, ca: Path | None, probe: Probe,
                        subject: str | None = None) -> str | None:
    """What the site is told about a pre-flight probe; None when the SuperNode may start."""
    host, _ = split_address(address)
    if ca is None:  # insecure site
        if probe.outcome is Outcome.TLS:
            return (f"Site {site}: {config} sets insecure = true (plaintext), but the server at {address} speaks TLS "
                    "and accepts no plaintext. Remove 'insecure' and set 'ca' (the CA certificate of the server's "
                    "operator) and 'node_key' (this site's key, registered at the server).")
        return None
    if probe.outcome is Outcome.WRONG_CA:
        same = (f" The server's issuer and the CA file share the name {subject!r} but not the key: the server was "
                "provisioned with another CA of that name." if subject is not None and subject == probe.issuer
                else "")
        return (f"Site {site}: the server at {address} presents a certificate issued by "
                f"{probe.issuer or 'an unknown issuer'!r}, which the site's CA file {ca}"
                f"{f' ({subject!r})' if subject else ''} does not verify ({probe.detail}).{same} Set 'ca' in {config} "
                "to the CA certificate of this server's operator (the ca.crt that signed its server.pem), or check "
                "that 'server' names the right server.")
    if probe.outcome is Outcome.HOSTNAME:
        return (f"Site {site}: the server at {address} presents a certificate signed by the site's CA {ca} but not "
                f"issued for {host!r} ({probe.detail}). Set 'server' in {config} to a name the certificate lists, or "
                f"ask the server's operator to reissue it with that name (`fedsilo certs server --san {host}`).")
    if probe.outcome in (Outcome.PLAINTEXT, Outcome.NOT_TLS):
        what = ("answers in plaintext HTTP, not TLS" if probe.outcome is Outcome.PLAINTEXT
                else "does not complete a TLS handshake")
        return (f"Site {site}: the server at {address} {what} ({probe.detail}). The site sends its node key and "
                f"updates over TLS only. Check that 'server' in {config} is the coordination server's Fleet address, "
                "and ask its operator to run it with TLS (`fedsilo server start --certs DIR`).")
    return None


def check_server(site: str, config: Path, address: str, ca: Path | None) -> None:
    """Pre-flight before the SuperNode starts: JoinError for a wrong CA, a server without TLS, or an insecure site
    facing a TLS server. A server not reachable yet is logged; the SuperNode keeps trying to reach it."""
    probe = probe_server(address, ca)
    if probe.outcome is Outcome.UNREACHABLE:
        log.warning("client: site %s: the server at %s is not reachable yet (%s); the SuperNode keeps trying "
                    "(--max-retries to give up).", site, address, probe.detail)
        return
    message = tls_failure_message(site, config, address, ca, probe, ca_subject(ca) if ca is not None else None)
    if message is not None:
        raise JoinError(message)
    log.info("client: site %s: the server at %s speaks TLS%s", site, address,
             "" if ca is None else f" with a certificate {ca} verifies")


@contextlib.contextmanager
def _quiet(logger: str) -> Iterator[None]:
    """`logger` (httpx: a line per request) says only warnings while the probe runs."""
    target = logging.getLogger(logger)
    level = target.level
    target.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        target.setLevel(level)


def key_registered(address: str, ca: Path, node_key: Path) -> bool | None:
    """Whether the server knows `node_key`'s public key (None: its answer says neither). The request is an
    `ActivateNode` with a heartbeat interval below Flower's minimum: refused for an unknown key before the interval
    is read, refused for a known key because of the interval; it activates nothing."""
    import httpx
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key

    from client.compat import (
        HEARTBEAT_MIN_INTERVAL,
        ActivateNodeRequest,
        ApiErrorCode,
        DeactivateNodeRequest,
        FleetHttpClient,
        FlowerError,
        NodeAuthHttpInterceptor,
        public_key_to_bytes,
    )

    try:
        key = load_ssh_private_key(node_key.read_bytes(), None)
    except (OSError, ValueError) as exc:
        log.debug("client: cannot read node key %s: %s", node_key, exc)
        return None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        return None
    request = ActivateNodeRequest(public_key=public_key_to_bytes(key.public_key()),
                                  heartbeat_interval=HEARTBEAT_MIN_INTERVAL / 2)
    log.info("client: asking the server at %s whether node key %s is registered (an activation request with an "
             "out-of-range heartbeat interval, which the server refuses and logs as such)", address, node_key)
    try:
        with _quiet("httpx"), FleetHttpClient.from_server_address(address, False, str(ca), interceptors=[
                NodeAuthHttpInterceptor(key, key.public_key())]) as client:
            response = client.ActivateNode(request)
            # Only if a later Flower accepted the interval: the key is registered but the node was offline just now,
            # so the refusal's cause is not known; undo the activation and say both.
            client.DeactivateNode(DeactivateNodeRequest(node_id=response.node_id))
            return None
    except httpx.HTTPStatusError as exc:
        error = FlowerError.from_json(exc.response.text)
        code = None if error is None else error.code
        log.debug("client: registration probe of %s answered HTTP %d, code %s", address,
                  exc.response.status_code, code)
        return registration_from_code(code, invalid_interval=ApiErrorCode.FLEET_INVALID_HEARTBEAT_INTERVAL,
                                      activation_failed=ApiErrorCode.FLEET_NODE_ACTIVATION_FAILED)
    except (httpx.HTTPError, OSError, ValueError) as exc:
        log.debug("client: registration probe of %s failed: %s", address, exc)
        return None


def registration_from_code(code: int | None, *, invalid_interval: int, activation_failed: int) -> bool | None:
    if code == invalid_interval:
        return True
    if code == activation_failed:
        return False
    return None


def public_key_path(node_key: Path) -> Path:
    return node_key.with_name(node_key.name + ".pub")


def activation_failure_message(site: str, address: str, node_key: Path, registered: bool | None,
                               window_s: int) -> str:
    """The SuperNode was refused activation: why, and what to do."""
    head = f"Site {site}: the server at {address} refused to activate this SuperNode"
    pub = public_key_path(node_key)
    register = (f"ask the server's operator to register this site's public key ({pub}): `fedsilo server register "
                f"--state-dir SERVER_STATE_DIR --key {pub.name} --name {site}`, then start the client again")
    online = (f"stop the other `fedsilo client start` of this site if one is running; otherwise wait {window_s} s "
              "(the server's heartbeat window) until the server marks the old connection offline, then start again")
    if registered is False:
        return f"{head}: its node key {node_key} is not registered there. To join, {register}."
    if registered is True:
        return (f"{head}: its node key is registered, and the server still sees this site online (another client of "
                f"this site is connected, or the previous one ended less than {window_s} s ago without signing off, "
                f"e.g. killed or its host lost). To join, {online}.")
    return (f"{head}, and its answer does not say which of two causes it is. If the node key {node_key} is not "
            f"registered: {register}. If the server still sees this site online (a previous client was killed less "
            f"than {window_s} s ago, or another is running): {online}.")


class LineWatch:
    """Flower's output lines that fedsilo explains; fed each line the SuperNode writes."""

    def __init__(self) -> None:
        self.activation_failed = False
        self.connection_failed = False

    def __call__(self, line: str) -> None:
        if ACTIVATION_FAILED in line:
            self.activation_failed = True
        if CONNECTION_FAILED in line:
            self.connection_failed = True


def _forward_lines(stream: object, watch: Callable[[str], None]) -> None:
    for line in stream:  # type: ignore[attr-defined]
        sys.stderr.write(strip_ansi(line))  # Flower colours its lines; a site's log is kept in a file
        sys.stderr.flush()
        watch(line)


def exit_status(returncode: int) -> int:
    """A child's status as a shell reports it: 128 + N for a child signal N ended."""
    return 128 - returncode if returncode < 0 else returncode


def parent_death_signal(signum: int = signal.SIGTERM) -> Callable[[], None] | None:
    """A `preexec_fn` that has the child sent `signum` when fedsilo dies, also by SIGKILL, which fedsilo cannot
    forward (Linux's PR_SET_PDEATHSIG); None where the platform has no such call (the child then outlives a
    SIGKILLed fedsilo). libc is looked up here, in the parent: the function run between fork and exec only calls it.

    Linux sends the signal when the thread that started the child ends: `supervise` runs on the main thread, which
    ends only with the process. A parent that dies before the call is caught by the parent id check."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).prctl
    except (OSError, AttributeError):
        log.warning("prctl is not available: a SuperNode would outlive a SIGKILLed `fedsilo client start`")
        return None
    parent = os.getpid()

    def set_death_signal() -> None:
        prctl(PR_SET_PDEATHSIG, signum, 0, 0, 0)
        if os.getppid() != parent:  # fedsilo died before the call: nobody would send the signal
            os.kill(os.getpid(), signum)

    return set_death_signal


def supervise(cmd: list[str], env: dict[str, str], watch: Callable[[str], None]) -> int:
    """Run `cmd` as a child: its stderr forwarded line by line (and shown to `watch`), SIGINT/SIGTERM/SIGHUP passed
    on to it; returns its exit status. The child has its own process group, so a Ctrl-C reaches it once (through
    fedsilo), not twice: Flower's SuperNode handles the first signal and restores Python's default handlers, so a
    second one would interrupt its sign-off at the server. Should fedsilo be SIGKILLed (no signal to forward), the
    child gets a SIGTERM from the kernel (`parent_death_signal`), so that no SuperNode is left serving the site."""
    child = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True, errors="replace", bufsize=1,
                             process_group=0, preexec_fn=parent_death_signal())  # only prctl: see parent_death_signal

    def forward(signum: int, _frame: FrameType | None) -> None:
        if child.poll() is None:
            child.send_signal(signum)

    previous = {signum: signal.signal(signum, forward) for signum in FORWARDED_SIGNALS}
    reader = threading.Thread(target=_forward_lines, args=(child.stderr, watch), daemon=True)
    reader.start()
    try:
        returncode = child.wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    reader.join(READER_JOIN_S)
    return exit_status(returncode)


def start_supernode(site: str, config: Path, address: str, ca: Path | None, node_key: Path | None,
                    cmd: list[str], env: dict[str, str]) -> int:
    """Pre-flight, then the SuperNode as a child; JoinError when it cannot join, with the reason."""
    check_server(site, config, address, ca)
    print(f"fedsilo: starting {shlex.join(cmd)}", file=sys.stderr, flush=True)
    watch = LineWatch()
    status = supervise(cmd, env, watch)
    if status == 0:
        return status
    if watch.activation_failed and ca is not None and node_key is not None:
        registered = key_registered(address, ca, node_key)
        from client.supernode import HEARTBEAT_ENV

        interval = float(env[HEARTBEAT_ENV]) if HEARTBEAT_ENV in env else None
        raise JoinError(activation_failure_message(site, address, node_key, registered,
                                                   heartbeat_window_s(interval)))
    if watch.connection_failed:  # e.g. the server was not up at the pre-flight, and came up with another CA
        probe = probe_server(address, ca)
        message = tls_failure_message(site, config, address, ca, probe,
                                      ca_subject(ca) if ca is not None else None)
        if message is not None:
            raise JoinError(message)
    return status
