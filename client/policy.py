"""A site's own policy: which job code it runs, how much of its budget one job may spend, which server it trusts.

The policy lives in the `[policy]` table of the site's TOML file (never in the job): a job can only be accepted
or declined by it, never widen it. The checks here are pure, apart from `check_server`, which opens one TLS
connection to read the server's certificate.
"""

from __future__ import annotations

import functools
import hashlib
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from common.appbundle import DIGEST_PREFIX, app_dir, build_bundle, bundle_digest, normalise_digest
from common.config import JobConfig
from common.errors import ConfigError, PolicyError
from common.settings import Settings, option

INSTALLED = "installed"  # approved_apps entry: the app bundle of the fedsilo installed at this site
SERVER_CHECK_TIMEOUT_S = 10.0


def _fingerprint(value: str) -> str:
    """Normalise a certificate fingerprint ('sha256:AB:CD...', 'abcd...') to lower-case hex ("" stays "")."""
    if not value:
        return ""
    text = value.strip()
    if text.lower().startswith(DIGEST_PREFIX):
        text = text[len(DIGEST_PREFIX):]
    text = text.replace(":", "").lower()
    if len(text) != 64 or any(c not in "0123456789abcdef" for c in text):
        raise ConfigError(f"{value!r} is not a SHA-256 certificate fingerprint (64 hex digits, as `fedsilo certs` "
                          "prints it)")
    return text


def _approved(apps: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(a if a == INSTALLED else normalise_digest(a) for a in apps)


@dataclass(frozen=True)
class SitePolicy(Settings):
    """The `[policy]` table of a site's TOML file: what the site accepts from a job."""

    label: ClassVar[str] = "Site policy key"

    approved_apps: tuple[str, ...] = option((), help=f'app digests (sha256:...) the site runs, or "{INSTALLED}" '
                                            "for the app bundle of the fedsilo installed at the site; empty: refuse "
                                            "every job", convert=_approved)
    max_epsilon_per_job: float | None = option(None, help="most epsilon one job may spend here, counted over "
                                               "all its runs (a resumed job keeps its job-id) and, to be strict, "
                                               "all charges of the current run; absent: the whole budget", gt=0)
    max_rounds_per_job: int | None = option(None, help="most training rounds a job may ask for; absent: no limit",
                                            gt=0)
    server_fingerprint: str = option("", help="SHA-256 fingerprint of the server certificate this site trusts "
                                     '(pinning, as `fedsilo certs` prints it); "": the CA alone',
                                     convert=_fingerprint)

    def approved_digests(self) -> frozenset[str]:
        digests = {a for a in self.approved_apps if a != INSTALLED}
        if INSTALLED in self.approved_apps:
            digests.add(bundle_digest(build_bundle(app_dir())))
        return frozenset(digests)

    def check_app(self, site: str, fab: bytes) -> str:
        """The bundle's digest if this site approves it; PolicyError otherwise. Nothing in the bundle is read
        but its bytes."""
        digest = bundle_digest(fab)
        if digest not in self.approved_digests():
            raise PolicyError(f"Site {site} refuses the job: its app {digest} is not approved by the site's policy "
                              "(approved_apps); none of its code was run.")
        return digest

    def check_job(self, site: str, job: JobConfig) -> None:
        if self.max_rounds_per_job is not None and job.num_server_rounds > self.max_rounds_per_job:
            raise PolicyError(f"Site {site} refuses the job: it asks for {job.num_server_rounds} rounds, the site's "
                              f"policy allows at most {self.max_rounds_per_job} per job.")

    def check_server(self, site: str, address: str, ca: Path) -> None:
        """Pinning: the server at `address` must present the certificate whose fingerprint the policy names."""
        if not self.server_fingerprint:
            return
        seen = observed_server_fingerprint(address, ca)
        if seen != self.server_fingerprint:
            raise PolicyError(f"Site {site} refuses to work with {address}: its certificate fingerprint {seen} is "
                              f"not the pinned {self.server_fingerprint} (policy server_fingerprint).")


def split_address(address: str) -> tuple[str, int]:
    """(host, port) of a `host:port` server address (an IPv6 host may be bracketed); ConfigError otherwise."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ConfigError(f"Server address {address!r} must be host:port.")
    return host.strip("[]"), int(port)


def server_certificate_fingerprint(address: str, ca: Path) -> str:
    """SHA-256 (hex) of the DER certificate the TLS server at host:port presents, verified against `ca`."""
    host, port = split_address(address)
    context = ssl.create_default_context(cafile=str(ca))
    try:
        with socket.create_connection((host, port), timeout=SERVER_CHECK_TIMEOUT_S) as raw, \
                context.wrap_socket(raw, server_hostname=host) as tls:
            der = tls.getpeercert(binary_form=True)
    except OSError as exc:  # ssl.SSLError included
        raise PolicyError(f"Cannot check the server certificate of {address}: {exc}") from exc
    if der is None:
        raise PolicyError(f"The server at {address} presented no certificate.")
    return hashlib.sha256(der).hexdigest()


@functools.lru_cache(maxsize=8)
def _observed(address: str, ca: str) -> str:
    return server_certificate_fingerprint(address, Path(ca))


def observed_server_fingerprint(address: str, ca: Path) -> str:
    """`server_certificate_fingerprint`, fetched once per process: Flower starts one ClientApp process per message,
    in which the gate checks the pin and the egress log records the same certificate (one TLS handshake, not two).
    A failure is not cached."""
    return _observed(address, str(ca))
