"""fedsilo's console: one handler, Flower's records once and only from WARNING unless --verbose, plain-text log file."""

from __future__ import annotations

import io
import logging
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

from common import logs


class Console:
    def __init__(self, capsys: pytest.CaptureFixture[str]) -> None:
        self.capsys = capsys

    def getvalue(self) -> str:
        return self.capsys.readouterr().err


@pytest.fixture
def console(capsys: pytest.CaptureFixture[str]) -> Iterator[Console]:
    flower = logging.getLogger("flwr")
    saved = (list(flower.handlers), flower.propagate, logging.getLogger().level)
    yield Console(capsys)
    logs.unconfigure_logging()
    flower.handlers[:] = saved[0]
    flower.propagate = saved[1]
    logging.getLogger().setLevel(saved[2])


def test_flower_records_once_and_quiet_below_warning(console: Console) -> None:
    flower = logging.getLogger("flwr")
    flower.addHandler(logging.StreamHandler(sys.stderr))  # as Flower's import does (its coloured console handler)
    logs.configure_logging(verbose=False)
    logs.configure_logging(verbose=False)  # twice: still one handler
    flower.info("configure_fit: strategy sampled 2 clients")
    flower.warning("DEPRECATED FEATURE: `run_simulation` ... This is a deprecated feature.")
    flower.warning("something Flower warns about")
    logging.getLogger("server.recording").info("round 1/2: 3.0s")
    lines = console.getvalue().splitlines()
    assert [line.split(": ", 1)[1] for line in lines] == ["something Flower warns about", "round 1/2: 3.0s"]
    assert sum(getattr(h, "_fedsilo", False) for h in logging.getLogger().handlers) == 1
    logs.unconfigure_logging()
    assert not any(getattr(h, "_fedsilo", False) for h in logging.getLogger().handlers)


def test_verbose_shows_flower_info(console: Console) -> None:
    logs.configure_logging(verbose=True)
    logging.getLogger("flwr").info("configure_fit: strategy sampled 2 clients")
    assert "configure_fit" in console.getvalue()


def test_log_file_is_plain_text_and_holds_what_the_console_hides(console: Console, tmp_path: Path) -> None:
    logs.configure_logging(verbose=False)
    handler = logs.add_log_file(tmp_path / logs.LOG_FILE)
    try:
        logging.getLogger("flwr").info("\x1b[92mconfigure_fit\x1b[0m")
    finally:
        logs.remove_log_file(handler)
    assert "configure_fit" in (tmp_path / logs.LOG_FILE).read_text()
    assert "configure_fit" not in console.getvalue()


def test_opacus_root_handler_is_kept_to_warnings() -> None:
    handler = logging.StreamHandler(io.StringIO())
    handler.setFormatter(logging.Formatter("%(asctime)s:%(levelname)s:%(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        logs.quiet_third_party_warnings()
        assert handler.level == logging.WARNING
    finally:
        root.removeHandler(handler)


def test_known_library_warnings_are_filtered_others_not() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        logs.quiet_third_party_warnings()
        warnings.warn("Secure RNG turned off. This is perfectly fine for experimentation", UserWarning, stacklevel=1)
        warnings.warn("something else", UserWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["something else"]
