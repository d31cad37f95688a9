"""`fedsilo client start`: each join failure has its own message (site, what happened, what to do).

The probes run here against in-process sockets (a thread, no child process); the real SuperLink refusals are in
`tests/deployment/test_tls_deployment.py`."""

from __future__ import annotations

import inspect
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from client import join
from client.compat import API_ERROR_MAP, ApiErrorCode, http_request_response
from client.join import Outcome, Probe
from common import certs

CONFIG = Path("/sites/cardiology/site.toml")
CA = Path("/sites/cardiology/ca.crt")
KEY = Path("/keys/cardiology")


@pytest.mark.parametrize("registered", [True, False, None])
def test_activation_failures_each_say_what_to_do(registered: bool | None) -> None:
    text = join.activation_failure_message("cardiology", "srv:9092", KEY, registered, 60)
    assert text.startswith("Site cardiology: the server at srv:9092 refused to activate this SuperNode")
    register = "fedsilo server register --state-dir SERVER_STATE_DIR --key cardiology.pub --name cardiology"
    wait = "wait 60 s"
    assert (register in text) == (registered is not True)
    assert (wait in text) == (registered is not False)
    if registered is False:
        assert "is not registered" in text
    if registered is True:
        assert "still sees this site online" in text
    if registered is None:
        assert "does not say which of two causes" in text


def test_the_three_activation_messages_differ() -> None:
    texts = {join.activation_failure_message("s", "a:1", KEY, r, 60) for r in (True, False, None)}
    assert len(texts) == 3


def test_registration_is_read_from_flowers_error_codes() -> None:
    codes = {"invalid_interval": ApiErrorCode.FLEET_INVALID_HEARTBEAT_INTERVAL,
             "activation_failed": ApiErrorCode.FLEET_NODE_ACTIVATION_FAILED}
    assert join.registration_from_code(ApiErrorCode.FLEET_INVALID_HEARTBEAT_INTERVAL, **codes) is True
    assert join.registration_from_code(ApiErrorCode.FLEET_NODE_ACTIVATION_FAILED, **codes) is False
    assert join.registration_from_code(None, **codes) is None
    assert join.registration_from_code(ApiErrorCode.FLEET_NODE_DEACTIVATION_FAILED, **codes) is None


def test_the_watched_line_is_flowers_public_activation_message() -> None:
    public = API_ERROR_MAP[ApiErrorCode.FLEET_NODE_ACTIVATION_FAILED].public_message
    watch = join.LineWatch()
    watch("INFO :      Starting Flower SuperNode\n")
    assert not watch.activation_failed
    watch(f"\x1b[91mERROR \x1b[0m:     [code: 2004] {public}\n")
    assert watch.activation_failed


def test_the_watched_lines_are_flowers() -> None:
    assert join.CONNECTION_FAILED in inspect.getsource(http_request_response)
    watch = join.LineWatch()
    watch("Failed to initialize the connection to the SuperLink.\n")
    assert watch.connection_failed and not watch.activation_failed


def test_heartbeat_window_and_exit_status() -> None:
    assert join.heartbeat_window_s() == 60  # Flower 1.41: patience 2 x 30 s
    assert join.exit_status(1) == 1 and join.exit_status(0) == 0
    assert join.exit_status(-15) == 143


@pytest.mark.parametrize(("probe", "expected"), [
    (Probe(Outcome.WRONG_CA, "unable to get local issuer certificate", "CN=other CA"),
     ["Site cardiology", "issued by 'CN=other CA'", f"CA file {CA}", "('CN=fedsilo CA')",
      "unable to get local issuer certificate", f"Set 'ca' in {CONFIG}"]),
    (Probe(Outcome.WRONG_CA, "unable to get local issuer certificate", "CN=fedsilo CA"),
     ["share the name 'CN=fedsilo CA' but not the key"]),
    (Probe(Outcome.HOSTNAME, "Hostname mismatch", "CN=fedsilo CA"),
     ["not issued for 'srv'", "fedsilo certs server --san srv"]),
    (Probe(Outcome.PLAINTEXT, "WRONG_VERSION_NUMBER"), ["answers in plaintext HTTP, not TLS", "--certs"]),
    (Probe(Outcome.NOT_TLS, "EOF"), ["does not complete a TLS handshake"]),
])
def test_tls_failures_name_the_site_the_problem_and_the_fix(probe: Probe, expected: list[str]) -> None:
    text = join.tls_failure_message("cardiology", CONFIG, "srv:9092", CA, probe, "CN=fedsilo CA")
    assert text is not None and text.startswith("Site cardiology: the server at srv:9092")
    for part in expected:
        assert part in text


def test_a_verified_or_unreachable_server_is_no_tls_failure() -> None:
    for outcome in (Outcome.TLS, Outcome.UNREACHABLE):
        assert join.tls_failure_message("s", CONFIG, "srv:1", CA, Probe(outcome)) is None


def test_an_insecure_site_facing_a_tls_server_is_told_to_use_tls() -> None:
    text = join.tls_failure_message("oncology", CONFIG, "srv:1", None, Probe(Outcome.TLS))
    assert text is not None and "sets insecure = true" in text and "Remove 'insecure'" in text
    assert join.tls_failure_message("oncology", CONFIG, "srv:1", None, Probe(Outcome.PLAINTEXT)) is None


def _serve(handle: Callable[[socket.socket], None], connections: int) -> Iterator[int]:
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(10)

    def run() -> None:
        for _ in range(connections):
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                handle(conn)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        listener.close()
        thread.join(10)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    ours = tmp_path_factory.mktemp("ours")
    theirs = tmp_path_factory.mktemp("theirs")
    certs.provision(ours, sans=["127.0.0.1"])
    certs.provision(theirs, sans=["127.0.0.1"], common_name="their CA")
    return {"ours": ours, "theirs": theirs}


def _tls_handler(directory: Path) -> Callable[[socket.socket], None]:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(directory / "server.pem", directory / "server.key")

    def handle(conn: socket.socket) -> None:
        try:
            with context.wrap_socket(conn, server_side=True):
                pass
        except OSError:
            pass  # the client refused our certificate

    return handle


def _http_handler(conn: socket.socket) -> None:
    conn.recv(4096)
    conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")


def test_probe_tells_a_server_from_another_ca(pki: dict[str, Path]) -> None:
    for port in _serve(_tls_handler(pki["theirs"]), connections=2):
        probe = join.probe_server(f"127.0.0.1:{port}", pki["ours"] / "ca.crt")
    assert probe.outcome is Outcome.WRONG_CA and probe.issuer == "CN=their CA"
    for port in _serve(_tls_handler(pki["ours"]), connections=1):
        assert join.probe_server(f"127.0.0.1:{port}", pki["ours"] / "ca.crt").outcome is Outcome.TLS


def test_probe_tells_a_plaintext_server(pki: dict[str, Path]) -> None:
    for port in _serve(_http_handler, connections=2):
        probe = join.probe_server(f"127.0.0.1:{port}", pki["ours"] / "ca.crt")
    assert probe.outcome is Outcome.PLAINTEXT
    for port in _serve(_tls_handler(pki["ours"]), connections=1):
        assert join.probe_server(f"127.0.0.1:{port}", None).outcome is Outcome.TLS


def test_probe_of_a_closed_port_is_unreachable() -> None:
    with socket.create_server(("127.0.0.1", 0)) as held:
        port = held.getsockname()[1]
    assert join.probe_server(f"127.0.0.1:{port}", None).outcome is Outcome.UNREACHABLE
