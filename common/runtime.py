"""Helpers for driving Flower's own deployment executables (SuperLink, SuperNode, flwr CLI)."""

from __future__ import annotations

import os
import shutil
import socket
import sys
from pathlib import Path

from common.errors import ConfigError, FedsiloError


class DeploymentError(FedsiloError):
    """A Flower process or command of the deployment failed (the message carries its output)."""


def flower_tool(name: str) -> str:
    """Path of a Flower executable installed beside this Python (the venv's bin), else from PATH."""
    beside = Path(sys.executable).parent / name
    if beside.is_file():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise DeploymentError(f"'{name}' is not installed; install fedsilo (it depends on flwr).")
    return found


def tool_env(base: dict[str, str] | None = None, *, first: Path | None = None) -> dict[str, str]:
    """Environment for Flower's executables: they start each other by name (e.g. the SuperLink starts
    `flower-superexec`), so the directory holding them must be on PATH; `first` goes before it (a directory whose
    executables take the place of Flower's, e.g. the site's ClientApp gate)."""
    env = dict(os.environ if base is None else base)
    head = [str(first)] if first is not None else []
    env["PATH"] = os.pathsep.join([*head, str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def check_port_free(host: str, port: int) -> None:
    """Refuse a port another process listens on. SO_REUSEADDR as the servers themselves set it: connections of a
    server that just died (TIME_WAIT) must not keep its restart from binding the same port."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise ConfigError(f"Cannot listen on {host}:{port}: {exc.strerror} (is another server running?)") from exc
