"""fedsilo's key fingerprints agree with OpenSSH's own tool (a real `ssh-keygen` process)."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from common import certs


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> certs.Provisioned:
    return certs.provision(tmp_path_factory.mktemp("pki"), sans=["localhost"], nodes=["site-a"])


@pytest.mark.skipif(shutil.which("ssh-keygen") is None, reason="ssh-keygen not installed")
def test_public_key_fingerprint_matches_ssh_keygen(pki: certs.Provisioned) -> None:
    out = subprocess.run(["ssh-keygen", "-lf", str(pki.nodes[0].public_key)], capture_output=True, text=True,
                         check=True, timeout=30).stdout
    assert out.split()[1] == certs.public_key_fingerprint(pki.nodes[0].public_key)
