"""fedsilo's console: one handler, Flower's records once and only from WARNING unless --verbose, plain-text log file."""

from __future__ import annotations

import io
import itertools
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
    assert "\x1b" not in (tmp_path / logs.LOG_FILE).read_text()
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


def test_strip_ansi_removes_colour_and_other_escapes_only() -> None:
    assert logs.strip_ansi("\x1b[92mINFO \x1b[0m:      [ROUND 1]") == "INFO :      [ROUND 1]"
    assert logs.strip_ansi("\x1b]0;title\x07a\x1b[2Kb\x1b[1;31mc") == "abc"
    assert logs.strip_ansi("round 1/3: 12.5s [ok] 50% done") == "round 1/3: 12.5s [ok] 50% done"


# A job's log as `flwr log` prints it (Flower's coloured lines, the ServerApp's fedsilo lines, Opacus' format).
JOB_LOG = [
    "Using SuperLink: fedsilo (127.0.0.1:47100)\n",
    "\x1b[92mINFO \x1b[0m:      Start `flwr-serverapp` process\n",
    "Successfully installed fedsilo to /state/flwr-home/apps/fedsilo.\n",
    "2026-12-07 13:48:01,100 INFO server.app: server: job with 3 rounds, model tiny-random (lora)\n",
    "\x1b[92mINFO \x1b[0m:      [ROUND 1]\n",
    "\x1b[92mINFO \x1b[0m:      [ROUND 1]\n",
    "2026-12-07 13:48:18,200 WARNING server.strategy: aggregate_fit: round 1: no department trained\n",
    "2026-12-07 13:48:19,300 INFO server.recording: round 1/3: 17.2s, global accuracy 0.5000; cardiology: trained\n",
    "2026-12-07 13:48:19,300 INFO server.recording: round 1/3: 17.2s, global accuracy 0.5000; cardiology: trained\n",
    "2026-12-07 13:48:19,400 INFO httpx: HTTP Request: POST /v1/runtime/pull-object 200\n",
    "\x1b[93mWARNING \x1b[0m:   DEPRECATED FEATURE: something\n",
    "12/07/2026 13:48:20:WARNING:a library warning\n",
    "\x1b[91mERROR \x1b[0m:     ServerApp raised an exception\n",
    "Traceback (most recent call last):\n",
    '  File "x.py", line 1, in <module>\n',
    "ValueError: boom\n",
    "\x1b[92mINFO \x1b[0m:      \n",
    "/lib/x.py:3: UserWarning: chatter\n",
    "  warnings.warn(\n",
]


def test_job_log_default_view_is_fedsilo_lines_and_warnings_once_without_colour() -> None:
    view = logs.JobLogFilter()
    shown = list(view.lines(JOB_LOG))
    assert shown == [
        "2026-12-07 13:48:01,100 INFO server.app: server: job with 3 rounds, model tiny-random (lora)",
        "2026-12-07 13:48:18,200 WARNING server.strategy: aggregate_fit: round 1: no department trained",
        "2026-12-07 13:48:19,300 INFO server.recording: round 1/3: 17.2s, global accuracy 0.5000; cardiology: trained",
        "WARNING :   DEPRECATED FEATURE: something",
        "12/07/2026 13:48:20:WARNING:a library warning",
        "ERROR :     ServerApp raised an exception",
        "Traceback (most recent call last):",
        '  File "x.py", line 1, in <module>',
        "ValueError: boom",
    ]
    assert "Using SuperLink: fedsilo (127.0.0.1:47100)" in view.dropped  # shown should flwr fail


def test_job_log_verbose_view_is_every_line_once_without_colour() -> None:
    shown = list(logs.JobLogFilter(verbose=True).lines(JOB_LOG))
    assert len(shown) == len(JOB_LOG) - 2  # the two lines repeated at once
    assert not any("\x1b" in line for line in shown)
    assert all(a != b for a, b in itertools.pairwise(shown))
    assert "INFO :      [ROUND 1]" in shown and "  warnings.warn(" in shown


def test_app_logging_prints_fedsilo_info_once_in_fedsilo_format(capsys: pytest.CaptureFixture[str]) -> None:
    """The ServerApp's process under a SuperLink: fedsilo's INFO lines (the per-round summary) reach its log, in
    the format `JobLogFilter` keeps, and other libraries' INFO lines do not; Opacus' handler is replaced."""
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    opacus = logging.StreamHandler(sys.stderr)
    opacus.setFormatter(logging.Formatter(logs._OPACUS_FORMAT))
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.addHandler(opacus)
    root.setLevel(logging.WARNING)
    try:
        logs.configure_app_logging()
        logs.configure_app_logging()  # a second call adds nothing
        logging.getLogger("server.recording").info("round 1/3: done")
        logging.getLogger("server.strategy").warning("no department trained")
        logging.getLogger("httpx").info("HTTP Request")
        logging.getLogger("some.lib").warning("careful")
        err = capsys.readouterr().err.splitlines()
        logs.configure_logging()  # the entry point after a ServerApp ran in-process: its handler only, no second
        logging.getLogger("server.recording").info("round 2/3: done")
        assert capsys.readouterr().err.count("round 2/3: done") == 1
        logs.unconfigure_logging()
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in saved[0]:
            root.addHandler(handler)
        root.setLevel(saved[1])
        from common.compat import update_console_handler

        update_console_handler(colored=True)
    assert len(err) == 3, err
    assert all(logs.JobLogFilter().keep(line) for line in err), err
    assert err[0].endswith("INFO server.recording: round 1/3: done")
    assert err[1].endswith("WARNING server.strategy: no department trained")
    assert err[2].endswith("WARNING some.lib: careful")


def test_the_sites_gate_keeps_httpx_requests_and_flowers_second_copy_out_of_the_sites_log() -> None:
    from client.gate import configure_gate_logging

    flower, httpx = logging.getLogger("flwr"), logging.getLogger("httpx")
    saved = (flower.propagate, httpx.level)
    try:
        configure_gate_logging()
        assert not httpx.isEnabledFor(logging.INFO) and httpx.isEnabledFor(logging.WARNING)
        assert flower.propagate is False
    finally:
        flower.propagate, _ = saved
        httpx.setLevel(saved[1])
