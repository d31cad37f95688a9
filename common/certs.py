"""TLS certificates and SuperNode authentication keys for a Flower deployment, made with `cryptography` only.

The files match what Flower 1.41 reads:

- SuperLink: ``--ssl-ca-certfile ca.crt --ssl-certfile server.pem --ssl-keyfile server.key`` (one certificate for
  all its HTTPS APIs, so its SANs must name every address clients dial, e.g. ``localhost`` and ``127.0.0.1``).
- SuperNode: ``--root-certificates ca.crt`` and ``--auth-supernode-private-key <name>``; the matching
  ``<name>.pub`` is registered with ``fedsilo server register --key <name>.pub`` (which runs Flower's
  ``flwr supernode register``). Flower requires an EC key on a NIST curve in OpenSSH format; fedsilo uses P-384.

Rules every writer here follows: an existing file is never overwritten (all targets are checked before anything is
written, and a failed multi-file write removes what it created), every file is written atomically by ``common.files``
(temporary file in the same directory, then ``os.replace``; the directory synced before success is reported), and
private keys are created with mode 0600 from the first byte.
Key material is never logged; only paths and fingerprints are.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import hashlib
import ipaddress
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from common.errors import ConfigError
from common.files import PRIVATE_MODE, PUBLIC_MODE, FileExistsRefusal, fsync_dir, write_atomic

log = logging.getLogger(__name__)

CA_CERT = "ca.crt"
CA_KEY = "ca.key"
SERVER_CERT = "server.pem"
SERVER_KEY = "server.key"
RESERVED_NAMES = frozenset({CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY})

NODE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_DNS_LABEL_RE = re.compile(r"^(?!-)[A-Za-z0-9_-]{1,63}(?<!-)$")
_MAX_CN = 64  # ub-common-name (RFC 5280)
_CLOCK_SKEW = dt.timedelta(minutes=5)  # certificates are valid from a little before "now"
_CURVE = ec.SECP384R1
_HASH = hashes.SHA384


@dataclass(frozen=True)
class CaFiles:
    """The CA certificate and key written by `create_ca`."""

    cert: Path
    key: Path
    fingerprint: str  # sha256 hex of the DER certificate


@dataclass(frozen=True)
class ServerFiles:
    """The server (SuperLink) certificate and key written by `create_server_cert`."""

    cert: Path
    key: Path
    sans: tuple[str, ...]
    fingerprint: str  # sha256 hex of the DER certificate


@dataclass(frozen=True)
class NodeKeyFiles:
    """A SuperNode authentication key pair written by `create_node_key`."""

    private_key: Path
    public_key: Path
    fingerprint: str  # "SHA256:..." like `ssh-keygen -lf`


@dataclass(frozen=True)
class Provisioned:
    """Everything `provision` wrote: CA, server certificate and node keys."""

    ca: CaFiles
    server: ServerFiles
    nodes: tuple[NodeKeyFiles, ...]


@dataclass(frozen=True)
class _Pending:
    """One file to write: its path, its bytes, and whether it holds a private key."""

    path: Path
    data: bytes
    private: bool


# ---------------------------------------------------------------------------------------------------------------
# Validation


def _check_days(days: int) -> None:
    if isinstance(days, bool) or not isinstance(days, int) or days < 1:
        raise ConfigError(f"Certificate validity 'days' must be an integer >= 1, got {days!r}.")


def _check_node_name(name: str) -> None:
    if not isinstance(name, str) or not NODE_NAME_RE.fullmatch(name):
        raise ConfigError(f"Node key name {name!r} is invalid: use 1-64 characters from A-Z a-z 0-9 _ . - "
                          "starting with a letter or digit.")
    if name in RESERVED_NAMES or name.endswith(".pub"):
        raise ConfigError(f"Node key name {name!r} is reserved (CA/server file names and '*.pub' are not allowed).")


def _check_common_name(common_name: str) -> None:
    if not isinstance(common_name, str) or not common_name.strip() or len(common_name) > _MAX_CN:
        raise ConfigError(f"CA common name must be 1-{_MAX_CN} characters, got {common_name!r}.")


def _parse_san(san: str) -> x509.GeneralName:
    """An IP address SAN if `san` parses as one, otherwise a (validated, ASCII) DNS name SAN."""
    if not isinstance(san, str) or not san.strip():
        raise ConfigError(f"Empty subject alternative name {san!r}.")
    if san != san.strip():
        raise ConfigError(f"Subject alternative name {san!r} has leading or trailing whitespace.")
    try:
        return x509.IPAddress(ipaddress.ip_address(san))
    except ValueError:
        pass
    name = san[:-1] if san.endswith(".") else san
    labels = name.split(".")
    if labels[0] == "*" and len(labels) > 1:  # a wildcard only as the whole left-most label
        labels = labels[1:]
    if len(name) > 253 or not all(_DNS_LABEL_RE.fullmatch(label) for label in labels):
        raise ConfigError(f"Subject alternative name {san!r} is neither an IP address nor a valid DNS name "
                          "(ASCII letters, digits, '-' and '_' in dot-separated labels; use punycode for IDNs).")
    return x509.DNSName(name.lower())


def _parse_sans(sans: Sequence[str]) -> list[x509.GeneralName]:
    if isinstance(sans, str):
        raise ConfigError("'sans' must be a list of names, not a single string.")
    if not sans:
        raise ConfigError("A server certificate needs at least one subject alternative name (e.g. localhost).")
    parsed: list[x509.GeneralName] = []
    for san in sans:
        general = _parse_san(san)
        if general not in parsed:
            parsed.append(general)
    return parsed


def _san_text(general: x509.GeneralName) -> str:
    return str(general.value)


# ---------------------------------------------------------------------------------------------------------------
# Atomic, never-overwriting file writes


def _existing(paths: Sequence[Path]) -> list[Path]:
    return [p for p in paths if p.exists() or p.is_symlink()]


def _refuse_existing(paths: Sequence[Path]) -> None:
    """Raise `ConfigError` naming every target that exists already (or that is named twice)."""
    seen: set[Path] = set()
    for p in paths:
        if p in seen:
            raise ConfigError(f"Two outputs would be written to the same file {p}.")
        seen.add(p)
    existing = _existing(paths)
    if existing:
        names = ", ".join(str(p) for p in existing)
        raise ConfigError(f"Refusing to overwrite existing file(s): {names}. Remove them or choose another --out.")


def _prepare_dir(out_dir: Path) -> Path:
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"Output path {out_dir} exists and is not a directory.")
    return out_dir


def _write_all(out_dir: Path, pending: Sequence[_Pending]) -> None:
    """Write all files or none: refuse up front if any exists; on a failure remove what this call created.

    Each file goes through `common.files.write_atomic` (private keys created 0600, never overwriting); the
    directory is synced once at the end, and a failed sync removes every file too (nothing is reported written
    that is not durable). The existence check and the rename are not one atomic step, so a file created
    concurrently by another process in that window would be replaced; the last-moment check in `write_atomic`
    keeps the window tiny.
    """
    _refuse_existing([p.path for p in pending])
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    try:
        for item in pending:
            try:
                _write_atomic(item.path, item.data, private=item.private)
            except FileExistsRefusal as exc:
                raise ConfigError(str(exc)) from exc
            written.append(item.path)
        fsync_dir(out_dir)
    except BaseException:
        for path in reversed(written):
            with contextlib.suppress(OSError):
                path.unlink()
        raise


def _write_atomic(path: Path, data: bytes, *, private: bool) -> None:
    """One file of `_write_all`: never overwriting, private keys 0600 from the first byte, directory synced later."""
    write_atomic(path, data, mode=PRIVATE_MODE if private else PUBLIC_MODE, overwrite=False, sync_dir=False)


# ---------------------------------------------------------------------------------------------------------------
# Building certificates and keys (in memory)


def _now() -> dt.datetime:
    """The current UTC time, whole seconds (X.509 times have no fractions, so comparisons stay exact)."""
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _fingerprint(cert: x509.Certificate) -> str:
    return cert.fingerprint(hashes.SHA256()).hex()


def _build_ca(common_name: str, days: int, now: dt.datetime) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(_CURVE())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        .sign(key, _HASH())
    )
    return cert, key


def _build_server(ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, sans: list[x509.GeneralName],
                  days: int, now: dt.datetime) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(_CURVE())
    not_after = now + dt.timedelta(days=days)
    if not_after > ca_cert.not_valid_after_utc:
        log.info("Server certificate validity clamped to the CA's expiry %s.", ca_cert.not_valid_after_utc)
        not_after = ca_cert.not_valid_after_utc
    common_name = _san_text(sans[0])[:_MAX_CN]
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(max(now - _CLOCK_SKEW, ca_cert.not_valid_before_utc))
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                     crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, _HASH())
    )
    return cert, key


def _build_node_key(name: str) -> tuple[bytes, bytes, str]:
    """OpenSSH private key bytes, OpenSSH public key line (comment = name) and its fingerprint."""
    key = ec.generate_private_key(_CURVE())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return private, public + b" " + name.encode("ascii") + b"\n", _ssh_fingerprint(public)


def _ssh_fingerprint(public_line: bytes) -> str:
    fields = public_line.split()
    if len(fields) < 2:
        raise ConfigError("Not an OpenSSH public key line.")
    try:
        blob = base64.b64decode(fields[1], validate=True)
    except ValueError as exc:
        raise ConfigError("OpenSSH public key has an invalid base64 body.") from exc
    digest = hashlib.sha256(blob).digest()
    return "SHA256:" + base64.b64encode(digest).decode("ascii").rstrip("=")


def _ca_pending(out_dir: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> list[_Pending]:
    return [_Pending(out_dir / CA_KEY, _key_pem(key), True), _Pending(out_dir / CA_CERT, _cert_pem(cert), False)]


def _server_pending(out_dir: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> list[_Pending]:
    return [_Pending(out_dir / SERVER_KEY, _key_pem(key), True),
            _Pending(out_dir / SERVER_CERT, _cert_pem(cert), False)]


def _node_paths(out_dir: Path, name: str) -> tuple[Path, Path]:
    return out_dir / name, out_dir / f"{name}.pub"


# ---------------------------------------------------------------------------------------------------------------
# Loading


def _read(path: Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError as exc:
        raise ConfigError(f"{what} {path} does not exist.") from exc
    except OSError as exc:
        raise ConfigError(f"Cannot read {what} {path}: {exc.strerror or exc}.") from exc


def load_certificate(path: Path) -> x509.Certificate:
    """Load a PEM certificate, raising `ConfigError` naming the file when it is missing or not a certificate."""
    data = _read(path, "Certificate")
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError as exc:
        raise ConfigError(f"{path} is not a PEM X.509 certificate.") from exc


def _load_ca(out_dir: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert_path, key_path = out_dir / CA_CERT, out_dir / CA_KEY
    cert = load_certificate(cert_path)
    data = _read(key_path, "CA key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise ConfigError(f"{key_path} is not an unencrypted PEM private key.") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"{key_path} is not an EC private key (fedsilo CAs use ECDSA P-384).")
    if key.public_key() != cert.public_key():
        raise ConfigError(f"{key_path} does not belong to the CA certificate {cert_path}.")
    _check_validity(cert, cert_path)
    _check_is_ca(cert, cert_path)
    try:
        cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    except x509.ExtensionNotFound as exc:
        raise ConfigError(f"CA certificate {cert_path} has no subject key identifier.") from exc
    return cert, key


def _check_validity(cert: x509.Certificate, path: Path) -> None:
    now = _now()
    if now < cert.not_valid_before_utc:
        raise ConfigError(f"Certificate {path} is not valid yet (valid from {cert.not_valid_before_utc}).")
    if now > cert.not_valid_after_utc:
        raise ConfigError(f"Certificate {path} expired on {cert.not_valid_after_utc}.")


def _check_is_ca(cert: x509.Certificate, path: Path) -> None:
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound as exc:
        raise ConfigError(f"Certificate {path} is not a CA certificate (no basic constraints).") from exc
    if not constraints.ca:
        raise ConfigError(f"Certificate {path} is not a CA certificate (basic constraints CA=false).")


# ---------------------------------------------------------------------------------------------------------------
# Public API


def create_ca(out_dir: Path, *, common_name: str = "fedsilo CA", days: int = 365) -> CaFiles:
    """Create a self-signed ECDSA P-384 CA: ``ca.crt`` (PEM) and ``ca.key`` (PEM, mode 0600) in `out_dir`.

    Raises `ConfigError` for bad arguments or if either file exists (then nothing is written).
    """
    _check_days(days)
    _check_common_name(common_name)
    out_dir = _prepare_dir(out_dir)
    _refuse_existing([out_dir / CA_KEY, out_dir / CA_CERT])
    cert, key = _build_ca(common_name, days, _now())
    _write_all(out_dir, _ca_pending(out_dir, cert, key))
    files = CaFiles(cert=out_dir / CA_CERT, key=out_dir / CA_KEY, fingerprint=_fingerprint(cert))
    log.info("Created CA %s (sha256 %s) and its key %s", files.cert, files.fingerprint, files.key)
    return files


def create_server_cert(out_dir: Path, *, sans: list[str], days: int = 365) -> ServerFiles:
    """Create ``server.pem`` and ``server.key`` (0600) in `out_dir`, signed by the CA (``ca.crt``/``ca.key``) there.

    Each SAN that parses as an IP address becomes an IPAddress SAN, every other one a DNSName. The validity is
    clamped to the CA's. Raises `ConfigError` for bad arguments, a missing/invalid CA, or existing targets.
    """
    _check_days(days)
    general = _parse_sans(sans)
    out_dir = _prepare_dir(out_dir)
    _refuse_existing([out_dir / SERVER_KEY, out_dir / SERVER_CERT])
    ca_cert, ca_key = _load_ca(out_dir)
    cert, key = _build_server(ca_cert, ca_key, general, days, _now())
    _write_all(out_dir, _server_pending(out_dir, cert, key))
    files = ServerFiles(cert=out_dir / SERVER_CERT, key=out_dir / SERVER_KEY,
                        sans=tuple(_san_text(g) for g in general), fingerprint=_fingerprint(cert))
    log.info("Created server certificate %s for %s (sha256 %s) and its key %s", files.cert, ", ".join(files.sans),
             files.fingerprint, files.key)
    return files


def create_node_key(out_dir: Path, name: str) -> NodeKeyFiles:
    """Create a SuperNode authentication key pair: ``<name>`` (OpenSSH private key, 0600) and ``<name>.pub``.

    The key is EC P-384, as Flower's node authentication requires a NIST curve.
    """
    _check_node_name(name)
    out_dir = _prepare_dir(out_dir)
    private_path, public_path = _node_paths(out_dir, name)
    _refuse_existing([private_path, public_path])
    private, public, fingerprint = _build_node_key(name)
    _write_all(out_dir, [_Pending(private_path, private, True), _Pending(public_path, public, False)])
    log.info("Created node key %s and %s (%s)", private_path, public_path, fingerprint)
    return NodeKeyFiles(private_key=private_path, public_key=public_path, fingerprint=fingerprint)


def provision(out_dir: Path, *, sans: list[str], nodes: Sequence[str] = (), days: int = 365,
              common_name: str = "fedsilo CA") -> Provisioned:
    """Create the CA, the server certificate and one key pair per node in `out_dir`, all or nothing.

    Every argument and every target path is checked before anything is written; if any target exists, or a later
    write fails, no new file is left behind.
    """
    _check_days(days)
    _check_common_name(common_name)
    general = _parse_sans(sans)
    if isinstance(nodes, str):
        raise ConfigError("'nodes' must be a list of names, not a single string.")
    for name in nodes:
        _check_node_name(name)
    if len(set(nodes)) != len(nodes):
        raise ConfigError(f"Duplicate node names in {list(nodes)}.")
    out_dir = _prepare_dir(out_dir)
    node_paths = [_node_paths(out_dir, name) for name in nodes]
    targets = [out_dir / CA_KEY, out_dir / CA_CERT, out_dir / SERVER_KEY, out_dir / SERVER_CERT]
    targets += [p for pair in node_paths for p in pair]
    _refuse_existing(targets)

    now = _now()
    ca_cert, ca_key = _build_ca(common_name, days, now)
    server_cert, server_key = _build_server(ca_cert, ca_key, general, days, now)
    pending = _ca_pending(out_dir, ca_cert, ca_key) + _server_pending(out_dir, server_cert, server_key)
    node_files: list[NodeKeyFiles] = []
    for name, (private_path, public_path) in zip(nodes, node_paths, strict=True):
        private, public, fingerprint = _build_node_key(name)
        pending += [_Pending(private_path, private, True), _Pending(public_path, public, False)]
        node_files.append(NodeKeyFiles(private_key=private_path, public_key=public_path, fingerprint=fingerprint))
    _write_all(out_dir, pending)

    result = Provisioned(
        ca=CaFiles(cert=out_dir / CA_CERT, key=out_dir / CA_KEY, fingerprint=_fingerprint(ca_cert)),
        server=ServerFiles(cert=out_dir / SERVER_CERT, key=out_dir / SERVER_KEY,
                           sans=tuple(_san_text(g) for g in general), fingerprint=_fingerprint(server_cert)),
        nodes=tuple(node_files),
    )
    log.info("Provisioned %s: CA %s, server certificate %s for %s, %d node key(s)", out_dir,
             result.ca.fingerprint, result.server.fingerprint, ", ".join(result.server.sans), len(node_files))
    return result


def public_key_fingerprint(pub_path: Path) -> str:
    """``SHA256:`` + unpadded base64 of the sha256 of the OpenSSH public key blob, as ``ssh-keygen -lf`` prints."""
    data = _read(pub_path, "Public key")
    try:
        serialization.load_ssh_public_key(data.strip())
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise ConfigError(f"{pub_path} is not an OpenSSH public key.") from exc
    return _ssh_fingerprint(data)


def certificate_fingerprint(cert_path: Path) -> str:
    """Lower-case sha256 hex (no colons) of the DER encoding of the PEM certificate at `cert_path`."""
    return _fingerprint(load_certificate(cert_path))


def check_certificate(cert_path: Path, ca_path: Path) -> None:
    """Raise `ConfigError` unless `cert_path` is currently valid and directly signed by the CA at `ca_path`.

    The CA certificate itself must be a currently valid CA certificate too.
    """
    cert = load_certificate(cert_path)
    ca_cert = load_certificate(ca_path)
    _check_is_ca(ca_cert, ca_path)
    _check_validity(ca_cert, ca_path)
    _check_validity(cert, cert_path)
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise ConfigError(f"Certificate {cert_path} is not signed by the CA {ca_path}.") from exc


def check_ca_certificate(ca_path: Path) -> None:
    """Raise `ConfigError` unless `ca_path` is a currently valid CA certificate (what a department trusts)."""
    ca_cert = load_certificate(ca_path)
    _check_is_ca(ca_cert, ca_path)
    _check_validity(ca_cert, ca_path)


def check_key_matches(cert_path: Path, key_path: Path) -> None:
    """Raise `ConfigError` unless the PEM private key at `key_path` belongs to the certificate at `cert_path`."""
    cert = load_certificate(cert_path)
    data = _read(key_path, "Private key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise ConfigError(f"{key_path} is not an unencrypted PEM private key.") from exc
    if key.public_key() != cert.public_key():
        raise ConfigError(f"{key_path} is not the private key of the certificate {cert_path} (mismatched pair).")
