"""What fedsilo prints: one line per event, nothing twice, no colour codes in files, third-party noise filtered on
purpose (each filter says why).

`configure_logging` is called once by the `fedsilo` entry point. `quiet_third_party_warnings` is also called by the
code that trains (it runs in Ray workers and in the sites' ClientApp processes, not only in the CLI). transformers'
progress bars (one per weight load, in every message of every department) are switched off through
`HF_HUB_DISABLE_PROGRESS_BARS`, which the entry point sets and its child processes inherit.
"""

from __future__ import annotations

import logging
import re
import sys
import warnings
from collections import deque
from collections.abc import Iterable, Iterator
from pathlib import Path

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LOG_FILE = "fedsilo.log"  # in a run's directory: its whole log (what the console filters out included)
FLOWER_LOGGER = "flwr"
OWN_PACKAGES = frozenset({"server", "client", "common", "simulations"})  # fedsilo's loggers are named after modules

# Flower's own messages that say nothing to a fedsilo user by default (shown with --verbose).
_FLOWER_QUIET_BELOW = logging.WARNING
# `flwr.simulation.run_simulation` is deprecated in favour of `flwr run` with a local SuperLink; fedsilo runs the
# simulation in-process (progress bar, injected site view, one Python process), which only `run_simulation` offers
# in Flower 1.41 and 1.42. Its deprecation notice is therefore filtered, on purpose, from the console.
_FLOWER_DEPRECATION = "This is a deprecated feature"


class _FlowerConsoleFilter(logging.Filter):
    """Drop Flower's INFO/DEBUG records (and its deprecation notice for run_simulation) from the console."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith(FLOWER_LOGGER):
            return True
        if _FLOWER_DEPRECATION in record.getMessage() or "run_simulation" in record.getMessage():
            return False
        return record.levelno >= _FLOWER_QUIET_BELOW


def configure_logging(verbose: bool = False) -> logging.Handler:
    """One console handler on stderr (INFO, or DEBUG with `verbose`), Flower's coloured console handler removed so
    its records are printed once, by ours. Returns the handler (`unconfigure_logging` removes it)."""
    unconfigure_logging()  # an earlier call's handler; other handlers (a test runner's) stay
    root = logging.getLogger()
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(logging.Formatter(FORMAT))
    console.setLevel(logging.DEBUG if verbose else logging.INFO)
    if not verbose:
        console.addFilter(_FlowerConsoleFilter())
    root.addHandler(console)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    console._fedsilo = True  # type: ignore[attr-defined]  # marks the handler adopt_flower_logger defers to
    # Libraries that log chattily at INFO: Flower's in-memory state database runs alembic migrations at start.
    logging.getLogger("alembic").setLevel(logging.WARNING)
    adopt_flower_logger()
    quiet_third_party_warnings()
    return console


def unconfigure_logging() -> None:
    """Remove `configure_logging`'s handler (the entry point does when it returns: tests call it in-process), and
    `configure_app_logging`'s, which a ServerApp run in this process without the entry point left (a test's)."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_fedsilo", False) or getattr(handler, "_fedsilo_app", False):
            root.removeHandler(handler)


def adopt_flower_logger() -> None:
    """Remove the coloured console handler Flower adds to its logger when first imported, so that its records are
    printed once, by the handler `configure_logging` installed (call after importing Flower, before running it)."""
    if not any(getattr(h, "_fedsilo", False) for h in logging.getLogger().handlers):
        return  # logging was not configured by fedsilo's entry point (a library user's own setup): leave it
    flower = logging.getLogger(FLOWER_LOGGER)
    for handler in list(flower.handlers):
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            flower.removeHandler(handler)
    flower.propagate = True


class PlainFormatter(logging.Formatter):
    """fedsilo's format without ANSI escape codes, which some libraries put in their messages: for log files."""

    def format(self, record: logging.LogRecord) -> str:
        return strip_ansi(super().format(record))


def add_log_file(path: Path) -> logging.Handler:
    """Append every record the root logger passes (INFO; DEBUG with --verbose), Flower's included, to `path` as
    plain text, in addition to the console."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(PlainFormatter(FORMAT))
    handler.setLevel(logging.DEBUG)
    logging.getLogger().addHandler(handler)
    return handler


def remove_log_file(handler: logging.Handler) -> None:
    logging.getLogger().removeHandler(handler)
    handler.close()


# Opacus calls `logging.basicConfig` with this format when imported (opacus/utils/module_utils.py). In a process
# fedsilo's entry point did not configure (a Ray worker, a site's ClientApp process) that handler prints every
# library's DEBUG records, e.g. one line per SecAgg+ stage per department; it is kept to warnings.
_OPACUS_FORMAT = "%(asctime)s:%(levelname)s:%(message)s"


def quiet_third_party_warnings() -> None:
    """Filter the library warnings fedsilo's own use triggers and has checked to be harmless, and keep a root
    handler installed by Opacus' import to warnings."""
    for handler in logging.getLogger().handlers:
        if handler.formatter is not None and handler.formatter._fmt == _OPACUS_FORMAT:
            handler.setLevel(logging.WARNING)
    # Opacus warns that its noise is not from a cryptographically secure generator unless `secure_mode` (which
    # needs torchcsprng). fedsilo seeds its noise generator from the OS's entropy pool (client/train.py).
    warnings.filterwarnings("ignore", message="Secure RNG turned off", category=UserWarning)
    # Opacus' hooks register full backward hooks; with LoRA the embeddings are frozen, so the first hooked module's
    # inputs need no gradient and torch says its hook fires on outputs only. Per-sample gradients are unaffected
    # (the bench's equivalence check compares every Opacus mode).
    warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed",
                            category=UserWarning)
    # Ray announces a future change for actors with num_gpus=0 (it will stop hiding GPUs from them); departments
    # on a GPU machine ask for a GPU share, so the change does not concern them.
    warnings.filterwarnings("ignore", message="Tip: In future versions of Ray", category=FutureWarning)
    # transformers 5 deprecates `is_gradient_checkpointing`, which peft/opacus still read; nothing to change here.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


# ANSI escape sequences: CSI (colours, `\x1b[92m`), OSC (`\x1b]...BEL`) and two-character escapes. Flower colours
# its console lines whether or not they go to a terminal.
_ANSI = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)|[@-Z\\-_])")


def strip_ansi(text: str) -> str:
    """`text` without ANSI escape sequences (colour codes): what fedsilo prints or writes of other tools' output."""
    return _ANSI.sub("", text)


def is_own(record: logging.LogRecord) -> bool:
    """A record of fedsilo's own loggers."""
    return record.name.split(".", 1)[0] in OWN_PACKAGES


def _own_or_warning(record: logging.LogRecord) -> bool:
    """fedsilo's records, and other libraries' warnings; not Flower's, which its own console handler prints."""
    return is_own(record) or (record.levelno >= logging.WARNING and not record.name.startswith(FLOWER_LOGGER))


def configure_app_logging() -> None:
    """In a process fedsilo's entry point did not configure (the ServerApp's under the SuperLink, whose output is
    the job's log): one handler on stderr for fedsilo's own records from INFO up and other libraries' warnings, in
    fedsilo's format (which `JobLogFilter` recognises). It takes the place of the handler Opacus' import installs
    (which printed fedsilo's warnings in its own format and dropped its INFO lines, the per-round summary among
    them). Nothing in a process `configure_logging` configured (a simulation), or on a second call."""
    root = logging.getLogger()
    if any(getattr(h, "_fedsilo", False) or getattr(h, "_fedsilo_app", False) for h in root.handlers):
        return
    for other in list(root.handlers):
        if other.formatter is not None and other.formatter._fmt == _OPACUS_FORMAT:
            root.removeHandler(other)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT))
    handler.setLevel(logging.INFO)
    handler.addFilter(_own_or_warning)
    handler._fedsilo_app = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    if root.getEffectiveLevel() > logging.INFO:
        root.setLevel(logging.INFO)
    from common.compat import update_console_handler

    update_console_handler(colored=False)  # the job's log is text that `server logs` prints and files keep


_LEVELS = {"DEBUG": logging.DEBUG, "INFO": logging.INFO, "WARNING": logging.WARNING, "ERROR": logging.ERROR,
           "CRITICAL": logging.CRITICAL}
# The line formats a job's log holds: fedsilo's (FORMAT, with the logger's name), Flower's console format
# ("INFO :      text"), Opacus' basicConfig format and Python's default one.
_OWN_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (?P<level>[A-Z]+) (?P<name>[\w.]+): ")
_OTHER_LINES = (re.compile(r"^(?P<level>DEBUG|INFO|WARNING|ERROR|CRITICAL)\s*:\s"),
                re.compile(r"^\d\d/\d\d/\d{4} \d\d:\d\d:\d\d:(?P<level>[A-Z]+):"),
                re.compile(r"^(?P<level>DEBUG|INFO|WARNING|ERROR|CRITICAL):[\w.]*:"))
_CONTINUATION = re.compile(r"^(?:\s|Traceback |During handling|The above exception|[\w.]+(?:Error|Exception)\b)")
DROPPED_TAIL = 20  # lines the default view dropped, shown when the tool that printed them failed


class JobLogFilter:
    """What fedsilo prints of a job's log (Flower's `flwr log`): colour codes stripped, a line repeated at once
    printed once, and by default only fedsilo's own records (one line per round, the job's start and end, its
    warnings) and other libraries' warnings and errors, each with its traceback; `verbose` keeps every line.

    The dropped lines' tail is kept (`dropped`), for a caller to show when the tool that printed them failed."""

    def __init__(self, verbose: bool = False) -> None:
        self.verbose = verbose
        self.dropped: deque[str] = deque(maxlen=DROPPED_TAIL)
        self._previous: str | None = None
        self._keeping = False  # the last record was kept: its continuation lines (a traceback) are too

    def keep(self, line: str) -> bool:
        """Whether the default view keeps `line` (colour codes already stripped)."""
        own = _OWN_LINE.match(line)
        if own is not None:
            self._keeping = (own["name"].split(".", 1)[0] in OWN_PACKAGES
                             or _LEVELS.get(own["level"], logging.INFO) >= logging.WARNING)
            return self._keeping
        for pattern in _OTHER_LINES:
            other = pattern.match(line)
            if other is not None:
                self._keeping = _LEVELS[other["level"]] >= logging.WARNING
                return self._keeping
        if line.strip() and _CONTINUATION.match(line):
            return self._keeping
        self._keeping = False
        return False

    def lines(self, raw: Iterable[str]) -> Iterator[str]:
        """The lines to print (without line ends) of `raw`."""
        for text in raw:
            line = strip_ansi(text).rstrip("\r\n")
            if line == self._previous:
                continue
            self._previous = line
            if self.verbose or self.keep(line):
                yield line
            else:
                self.dropped.append(line)
