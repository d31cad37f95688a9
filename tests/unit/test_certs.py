"""Provisioning of TLS certificates and SuperNode keys (common.certs) and the `fedsilo certs` CLI."""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
import shutil
import socket
import ssl
import stat
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from common import certs
from common.cli import main
from common.errors import ConfigError

SANS = ["localhost", "127.0.0.1", "::1"]


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


@pytest.fixture
def umask0():
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> certs.Provisioned:
    """One provisioned directory shared by the read-only tests (EC key generation is cheap, but TLS setup is not)."""
    return certs.provision(tmp_path_factory.mktemp("pki"), sans=SANS, nodes=["site-a", "site_b.1"])


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory: pytest.TempPathFactory) -> certs.CaFiles:
    return certs.create_ca(tmp_path_factory.mktemp("other"), common_name="other CA")


# --------------------------------------------------------------------------------------------------------------
# Files and modes


def test_create_files_with_modes_regardless_of_umask(tmp_path: Path, umask0: None) -> None:
    ca = certs.create_ca(tmp_path)
    server = certs.create_server_cert(tmp_path, sans=["localhost"])
    node = certs.create_node_key(tmp_path, "site-a")
    assert (ca.cert, ca.key) == (tmp_path / "ca.crt", tmp_path / "ca.key")
    assert (server.cert, server.key) == (tmp_path / "server.pem", tmp_path / "server.key")
    assert (node.private_key, node.public_key) == (tmp_path / "site-a", tmp_path / "site-a.pub")
    for private in (ca.key, server.key, node.private_key):
        assert _mode(private) == 0o600, private
    for public in (ca.cert, server.cert, node.public_key):
        assert _mode(public) == 0o644, public
    # no temporary files left behind
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["ca.crt", "ca.key", "server.pem", "server.key", "site-a", "site-a.pub"])


def test_private_keys_never_group_or_world_readable_with_default_umask(tmp_path: Path) -> None:
    done = certs.provision(tmp_path, sans=["localhost"], nodes=["n1"])
    for private in (done.ca.key, done.server.key, done.nodes[0].private_key):
        assert _mode(private) & 0o077 == 0


def test_ca_certificate_properties(pki: certs.Provisioned) -> None:
    ca = x509.load_pem_x509_certificate(pki.ca.cert.read_bytes())
    assert ca.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "fedsilo CA"
    bc = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca
    ku = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.key_cert_sign
    assert isinstance(ca.public_key(), ec.EllipticCurvePublicKey)
    assert isinstance(ca.public_key().curve, ec.SECP384R1)
    ca.verify_directly_issued_by(ca)  # self-signed
    key = serialization.load_pem_private_key(pki.ca.key.read_bytes(), password=None)
    assert key.public_key() == ca.public_key()
    validity = ca.not_valid_after_utc - ca.not_valid_before_utc
    assert dt.timedelta(days=365) <= validity <= dt.timedelta(days=365, minutes=10)


def test_server_certificate_verifies_and_has_sans(pki: certs.Provisioned) -> None:
    ca = x509.load_pem_x509_certificate(pki.ca.cert.read_bytes())
    cert = x509.load_pem_x509_certificate(pki.server.cert.read_bytes())
    cert.verify_directly_issued_by(ca)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1"),
                                                      ipaddress.ip_address("::1")]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in eku
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    key = serialization.load_pem_private_key(pki.server.key.read_bytes(), password=None)
    assert key.public_key() == cert.public_key()
    assert pki.server.sans == ("localhost", "127.0.0.1", "::1")
    assert cert.not_valid_after_utc <= ca.not_valid_after_utc
    certs.check_certificate(pki.server.cert, pki.ca.cert)  # no error


def test_node_key_is_openssh_p384(pki: certs.Provisioned) -> None:
    node = pki.nodes[0]
    private = serialization.load_ssh_private_key(node.private_key.read_bytes(), password=None)
    assert isinstance(private, ec.EllipticCurvePrivateKey)
    assert isinstance(private.curve, ec.SECP384R1)
    assert node.private_key.read_bytes().startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----")
    public = serialization.load_ssh_public_key(node.public_key.read_bytes())
    assert isinstance(public, ec.EllipticCurvePublicKey)
    assert public == private.public_key()
    assert node.public_key.read_text().startswith("ecdsa-sha2-nistp384 ")


def test_node_key_accepted_by_flower(pki: certs.Provisioned) -> None:
    """Flower's own loaders: `flwr supernode register` (public) and `flower-supernode` (private)."""
    from client.compat import try_setup_client_authentication
    from server.compat import try_load_public_key

    assert try_load_public_key(pki.nodes[0].public_key)  # exits the process on a bad key
    args = argparse.Namespace(auth_supernode_private_key=str(pki.nodes[0].private_key),
                              auth_supernode_public_key=None)
    keys = try_setup_client_authentication(args)
    assert keys is not None
    assert keys[1] == serialization.load_ssh_public_key(pki.nodes[0].public_key.read_bytes())


# --------------------------------------------------------------------------------------------------------------
# Fingerprints


def test_public_key_fingerprint_format(pki: certs.Provisioned) -> None:
    fp = certs.public_key_fingerprint(pki.nodes[0].public_key)
    assert fp == pki.nodes[0].fingerprint
    assert fp.startswith("SHA256:")
    body = fp.removeprefix("SHA256:")
    assert len(body) == 43 and "=" not in body  # 32 bytes -> 43 base64 chars without padding
    assert fp != certs.public_key_fingerprint(pki.nodes[1].public_key)


def test_certificate_fingerprint(pki: certs.Provisioned) -> None:
    fp = certs.certificate_fingerprint(pki.server.cert)
    cert = x509.load_pem_x509_certificate(pki.server.cert.read_bytes())
    assert fp == cert.fingerprint(hashes.SHA256()).hex() == pki.server.fingerprint
    assert len(fp) == 64 and fp == fp.lower() and ":" not in fp
    int(fp, 16)


def test_fingerprint_of_bad_files_is_config_error(tmp_path: Path) -> None:
    junk = tmp_path / "junk"
    junk.write_text("not a key\n")
    with pytest.raises(ConfigError, match="junk"):
        certs.public_key_fingerprint(junk)
    with pytest.raises(ConfigError, match="junk"):
        certs.certificate_fingerprint(junk)
    with pytest.raises(ConfigError, match="missing"):
        certs.certificate_fingerprint(tmp_path / "missing")


# --------------------------------------------------------------------------------------------------------------
# Never overwrite, all or nothing, validation


def test_rerun_never_overwrites(tmp_path: Path) -> None:
    certs.create_ca(tmp_path)
    certs.create_server_cert(tmp_path, sans=["localhost"])
    certs.create_node_key(tmp_path, "n1")
    before = _snapshot(tmp_path)
    with pytest.raises(ConfigError, match="ca"):
        certs.create_ca(tmp_path)
    with pytest.raises(ConfigError, match="server"):
        certs.create_server_cert(tmp_path, sans=["localhost"])
    with pytest.raises(ConfigError, match="n1"):
        certs.create_node_key(tmp_path, "n1")
    assert _snapshot(tmp_path) == before


def test_one_existing_target_refuses_whole_pair(tmp_path: Path) -> None:
    (tmp_path / "ca.crt").write_bytes(b"mine")
    with pytest.raises(ConfigError, match=r"ca\.crt"):
        certs.create_ca(tmp_path)
    assert _snapshot(tmp_path) == {"ca.crt": b"mine"}  # ca.key was not written either
    (tmp_path / "n1.pub").write_bytes(b"pub")
    with pytest.raises(ConfigError, match=r"n1\.pub"):
        certs.create_node_key(tmp_path, "n1")
    assert not (tmp_path / "n1").exists()


@pytest.mark.parametrize("existing", ["ca.key", "server.pem", "site-b.pub"])
def test_init_refuses_before_writing(tmp_path: Path, existing: str) -> None:
    (tmp_path / existing).write_bytes(b"keep me")
    with pytest.raises(ConfigError, match=existing.replace(".", r"\.")):
        certs.provision(tmp_path, sans=["localhost"], nodes=["site-a", "site-b"])
    assert _snapshot(tmp_path) == {existing: b"keep me"}


def test_failed_write_removes_what_it_created(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = certs._write_atomic
    calls = []

    def flaky(path: Path, data: bytes, *, private: bool) -> None:
        calls.append(path)
        if len(calls) == 4:
            raise OSError("disk full")
        real(path, data, private=private)

    monkeypatch.setattr(certs, "_write_atomic", flaky)
    with pytest.raises(OSError, match="disk full"):
        certs.provision(tmp_path, sans=["localhost"], nodes=["n1"])
    assert list(tmp_path.iterdir()) == []


def test_server_cert_needs_ca(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"ca\.crt"):
        certs.create_server_cert(tmp_path, sans=["localhost"])
    assert list(tmp_path.iterdir()) == []


def test_server_cert_rejects_mismatched_ca_key(tmp_path: Path, other_ca: certs.CaFiles) -> None:
    certs.create_ca(tmp_path)
    (tmp_path / "ca.key").unlink()
    shutil.copy(other_ca.key, tmp_path / "ca.key")
    with pytest.raises(ConfigError, match="does not belong"):
        certs.create_server_cert(tmp_path, sans=["localhost"])


@pytest.mark.parametrize("sans", [[], [""], ["  "], [" localhost"], ["bad host"], ["-x.example"], ["ünï.example"]])
def test_bad_sans(tmp_path: Path, sans: list[str]) -> None:
    with pytest.raises(ConfigError):
        certs.provision(tmp_path, sans=sans)
    assert not tmp_path.exists() or list(tmp_path.iterdir()) == []


def test_sans_are_typed_and_deduplicated(tmp_path: Path) -> None:
    done = certs.provision(tmp_path, sans=["LocalHost", "localhost", "10.0.0.1", "superlink.example.org", "*.x.org"])
    cert = x509.load_pem_x509_certificate(done.server.cert.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost", "superlink.example.org", "*.x.org"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.0.0.1")]


@pytest.mark.parametrize("days", [0, -1, True])
def test_bad_days(tmp_path: Path, days: int) -> None:
    with pytest.raises(ConfigError, match="days"):
        certs.create_ca(tmp_path, days=days)
    with pytest.raises(ConfigError, match="days"):
        certs.provision(tmp_path, sans=["localhost"], days=days)
    assert not tmp_path.exists() or list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["", ".hidden", "-x", "a/b", "../x", "a b", "x" * 65, "ca.key", "server.pem",
                                  "n.pub", "é"])
def test_bad_node_names(tmp_path: Path, name: str) -> None:
    with pytest.raises(ConfigError):
        certs.create_node_key(tmp_path, name)
    assert list(tmp_path.iterdir()) == []


def test_duplicate_node_names(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="Duplicate"):
        certs.provision(tmp_path, sans=["localhost"], nodes=["a", "a"])
    assert list(tmp_path.iterdir()) == []


def test_good_node_name_edge_cases(tmp_path: Path) -> None:
    for name in ["a", "A9_.-z", "x" * 64]:
        assert certs.create_node_key(tmp_path, name).private_key.name == name


# --------------------------------------------------------------------------------------------------------------
# check_certificate


def _ca_key(ca: certs.CaFiles) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(ca.key.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return key


def _issue(ca: certs.CaFiles, out: Path, *, not_before: dt.datetime, not_after: dt.datetime) -> Path:
    ca_cert = x509.load_pem_x509_certificate(ca.cert.read_bytes())
    key = ec.generate_private_key(ec.SECP384R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .sign(_ca_key(ca), hashes.SHA384()))
    out.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return out


def test_check_certificate_rejects_other_ca(pki: certs.Provisioned, other_ca: certs.CaFiles) -> None:
    with pytest.raises(ConfigError, match="not signed"):
        certs.check_certificate(pki.server.cert, other_ca.cert)


def test_check_certificate_rejects_same_name_other_ca(pki: certs.Provisioned, tmp_path: Path) -> None:
    impostor = certs.create_ca(tmp_path)  # same subject "fedsilo CA", different key: signature check must fail
    with pytest.raises(ConfigError, match="not signed"):
        certs.check_certificate(pki.server.cert, impostor.cert)


def test_check_certificate_rejects_expired_and_not_yet_valid(pki: certs.Provisioned, tmp_path: Path) -> None:
    now = dt.datetime.now(dt.UTC)
    expired = _issue(pki.ca, tmp_path / "expired.pem", not_before=now - dt.timedelta(days=10),
                     not_after=now - dt.timedelta(days=1))
    with pytest.raises(ConfigError, match="expired"):
        certs.check_certificate(expired, pki.ca.cert)
    future = _issue(pki.ca, tmp_path / "future.pem", not_before=now + dt.timedelta(days=1),
                    not_after=now + dt.timedelta(days=10))
    with pytest.raises(ConfigError, match="not valid yet"):
        certs.check_certificate(future, pki.ca.cert)
    fine = _issue(pki.ca, tmp_path / "fine.pem", not_before=now - dt.timedelta(days=1),
                  not_after=now + dt.timedelta(days=1))
    certs.check_certificate(fine, pki.ca.cert)


def test_check_certificate_rejects_non_ca_issuer(pki: certs.Provisioned) -> None:
    with pytest.raises(ConfigError, match="not a CA"):
        certs.check_certificate(pki.server.cert, pki.server.cert)


# --------------------------------------------------------------------------------------------------------------
# A real TLS handshake


class _OneShotTLSServer:
    """Accepts TLS connections on 127.0.0.1:<ephemeral> until `stop`, each with a short timeout; never hangs."""

    def __init__(self, cert: Path, key: Path) -> None:
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(cert, key)
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        deadline = threading.Timer(30.0, self.stopped.set)  # stops by itself even if a test forgets to
        deadline.start()
        try:
            while not self.stopped.is_set():
                try:
                    conn, _ = self.sock.accept()
                except (TimeoutError, OSError):
                    continue
                with conn:
                    conn.settimeout(5.0)
                    try:
                        with self.context.wrap_socket(conn, server_side=True) as tls:
                            tls.sendall(b"hello")
                    except (ssl.SSLError, OSError):
                        pass  # the client rejected us; that is what some tests want
        finally:
            deadline.cancel()

    def __enter__(self) -> _OneShotTLSServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopped.set()
        self.thread.join(timeout=10)
        self.sock.close()
        assert not self.thread.is_alive()


def _client_context(cafile: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(cafile))  # only this CA: no system store
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    assert ctx.check_hostname and ctx.verify_mode == ssl.CERT_REQUIRED
    return ctx


def _fetch(ctx: ssl.SSLContext, port: int, hostname: str) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5.0) as raw, \
            ctx.wrap_socket(raw, server_hostname=hostname) as tls:
        return tls.recv(5)


def test_tls_handshake(pki: certs.Provisioned, other_ca: certs.CaFiles) -> None:
    with _OneShotTLSServer(pki.server.cert, pki.server.key) as server:
        good = _client_context(pki.ca.cert)
        assert _fetch(good, server.port, "127.0.0.1") == b"hello"
        assert _fetch(good, server.port, "localhost") == b"hello"
        with pytest.raises(ssl.SSLCertVerificationError):  # hostname not in the SANs
            _fetch(good, server.port, "superlink.example.org")
        with pytest.raises(ssl.SSLCertVerificationError):  # a different CA
            _fetch(_client_context(other_ca.cert), server.port, "127.0.0.1")


# --------------------------------------------------------------------------------------------------------------
# CLI


def test_cli_init(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "pki"
    rc = main(["certs", "init", "--out", str(out), "--san", "localhost", "--san", "127.0.0.1",
               "--node", "site-a", "--node", "site-b"])
    assert rc == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["ca.crt", "ca.key", "server.pem", "server.key", "site-a", "site-a.pub", "site-b", "site-b.pub"])
    printed = capsys.readouterr().out
    assert str(out / "site-a.pub") in printed
    assert certs.public_key_fingerprint(out / "site-b.pub") in printed
    assert certs.certificate_fingerprint(out / "server.pem") in printed
    for name in ("site-a", "site-b"):  # the README's command, not Flower's `flwr supernode register`
        assert f"fedsilo server register --state-dir <state-dir> --key {out / name}.pub --name {name}" in printed
    assert "flwr supernode register" not in printed
    certs.check_certificate(out / "server.pem", out / "ca.crt")
    # a second run refuses and changes nothing
    before = _snapshot(out)
    assert main(["certs", "init", "--out", str(out), "--san", "localhost"]) == 2
    assert "Refusing to overwrite" in capsys.readouterr().err
    assert _snapshot(out) == before


def test_cli_step_by_step(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["certs", "ca", "--out", str(tmp_path), "--days", "30"]) == 0
    assert main(["certs", "server", "--out", str(tmp_path), "--san", "localhost", "--san", "127.0.0.1"]) == 0
    assert main(["certs", "node", "--out", str(tmp_path), "--name", "n1"]) == 0
    printed = capsys.readouterr().out
    assert str(tmp_path / "n1.pub") in printed
    assert certs.public_key_fingerprint(tmp_path / "n1.pub") in printed
    assert f"fedsilo server register --state-dir <state-dir> --key {tmp_path / 'n1.pub'} --name n1" in printed
    assert "flwr supernode register" not in printed
    ca = x509.load_pem_x509_certificate((tmp_path / "ca.crt").read_bytes())
    server = x509.load_pem_x509_certificate((tmp_path / "server.pem").read_bytes())
    assert server.not_valid_after_utc <= ca.not_valid_after_utc  # clamped to the 30-day CA


@pytest.mark.parametrize("argv", [
    ["certs", "ca", "--days", "0"],
    ["certs", "node", "--name", "../evil"],
    ["certs", "server", "--san", "localhost"],  # no CA in the directory
    ["certs", "init", "--san", ""],
    ["certs", "init", "--san", "localhost", "--node", "a", "--node", "a"],
])
def test_cli_bad_input_returns_2(tmp_path: Path, argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*argv, "--out", str(tmp_path / "pki")]) == 2
    assert capsys.readouterr().err.startswith("fedsilo: error:")
    assert not (tmp_path / "pki").exists() or list((tmp_path / "pki").iterdir()) == []


def test_cli_usage_errors_exit_2(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exc:  # argparse: --san is required
        main(["certs", "init", "--out", str(tmp_path)])
    assert exc.value.code == 2
