"""The command line's structure: each package owns its commands, found through entry points; one flag mapping."""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

import pytest

from common import cli
from common.errors import FedsiloError

ROOT = Path(__file__).resolve().parents[2]


def _commands() -> set[str]:
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return set(sub.choices)


def test_every_package_registers_its_commands() -> None:
    groups = [name for name, _ in cli.command_groups()]
    assert groups == ["simulations", "common", "server", "client"]
    assert _commands() == {"simulate", "study", "bench", "audit", "export", "predict", "certs", "app", "server",
                           "client", "budget"}


def test_missing_entry_points_is_a_clear_error(monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(cli, "entry_points", lambda group: [])
    with pytest.raises(FedsiloError, match="No fedsilo commands are registered"):
        cli.command_groups()
    assert cli.main(["--help"]) == cli.EXIT_ERROR
    assert "install fedsilo" in capsys.readouterr().err


def test_common_imports_nothing_above_it() -> None:
    upward = re.compile(r"^\s*(from|import)\s+(client|server|simulations)\b", re.MULTILINE)
    offenders = [p.name for p in (ROOT / "common").glob("*.py") if upward.search(p.read_text())]
    assert offenders == []


def _run_config(argv: list[str]) -> cli.RunConfig:
    args = cli.build_parser().parse_args(argv)
    return cli.run_config_from_args(args)


def test_one_flag_mapping_for_every_command() -> None:
    assert _run_config(["simulate", "--rounds", "3", "--epsilon", "2", "--no-dp", "--site-epsilon", "a=1",
                        "--site-epsilon", "b=2", "--data", "d.csv", "-c", "lora-r=4", "-c", "num-server-rounds=9"]) \
        == {"num-server-rounds": 3, "sim-epsilon": 2.0, "dp": False, "sim-site-epsilons": "a=1,b=2",
            "sim-data": "d.csv", "lora-r": 4}
    assert _run_config(["server", "run", "--state-dir", "s", "--out", "o", "--labels", "neg,pos", "--rounds", "2",
                        "--no-secagg", "--model", "tiny-random"]) \
        == {"labels": "neg,pos", "num-server-rounds": 2, "secagg": False, "model": "tiny-random"}
    assert _run_config(["study", "utility", "--out", "o", "--rounds", "2", "--local-epochs", "0.5",
                        "--data", "d.csv"]) == {"num-server-rounds": 2, "local-epochs": 0.5, "sim-data": "d.csv"}


def test_config_values_are_typed() -> None:
    assert _run_config(["simulate", "-c", "dp=false", "-c", "clip-norm=0.5", "-c", "model=x"]) \
        == {"dp": False, "clip-norm": 0.5, "model": "x"}
    with pytest.raises(SystemExit):
        _run_config(["simulate", "-c", "no-equals-sign"])


@pytest.mark.parametrize("argv", [["simulate", "--help"], ["server", "run", "--help"], ["study", "utility", "--help"]])
def test_help_lists_every_run_config_key(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    import tomllib

    keys = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(argv)
    out = capsys.readouterr().out
    assert [k for k in keys if f"\n  {k} (" not in out] == []


def test_flower_telemetry_is_off_unless_the_operator_turns_it_on(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib

    import common.cli

    monkeypatch.delenv("FLWR_TELEMETRY_ENABLED", raising=False)
    importlib.reload(common.cli)  # what a fresh `fedsilo` process does before anything imports Flower
    assert os.environ["FLWR_TELEMETRY_ENABLED"] == "0"
    monkeypatch.setenv("FLWR_TELEMETRY_ENABLED", "1")
    importlib.reload(common.cli)
    assert os.environ["FLWR_TELEMETRY_ENABLED"] == "1"
