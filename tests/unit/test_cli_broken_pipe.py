"""`fedsilo ... | head`: a reader that goes away ends the command quietly with 141, not with a traceback."""

from __future__ import annotations

import io
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from common import cli


class ClosedPipe(io.StringIO):
    """A stdout whose reader has gone: every write raises, as a pipe to an exited `head` does."""

    def write(self, text: str) -> int:
        raise BrokenPipeError(32, "Broken pipe")


@pytest.fixture
def closed_pipe() -> Iterator[io.TextIOWrapper]:
    """A real pipe whose read end is closed, block-buffered like stdout into `| head`."""
    read_fd, write_fd = os.pipe()
    os.close(read_fd)
    stdout = open(write_fd, "w", encoding="utf-8")
    yield stdout
    stdout.close()


def _node_key(tmp_path: Path) -> list[str]:
    return ["certs", "node", "--out", str(tmp_path), "--name", "cardiology"]


def test_a_write_into_a_closed_pipe_exits_141_without_a_traceback(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(sys, "stdout", ClosedPipe())
    assert cli.main(_node_key(tmp_path)) == cli.EXIT_BROKEN_PIPE == 141
    err = capsys.readouterr().err
    assert "Traceback" not in err and "BrokenPipeError" not in err and "fedsilo: error" not in err
    assert (tmp_path / "cardiology.pub").is_file()  # the command's work was done; only its output was cut


def test_output_still_buffered_meets_the_closed_pipe_in_main_and_stdout_is_then_discarded(
        tmp_path: Path, closed_pipe: io.TextIOWrapper, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(sys, "stdout", closed_pipe)  # here, not in the fixture: pytest's capture resets it per phase
    assert cli.main(_node_key(tmp_path)) == 141
    assert "Traceback" not in capsys.readouterr().err
    # stdout's descriptor now leads to /dev/null: the interpreter's flush at exit cannot raise again
    assert os.path.samestat(os.fstat(closed_pipe.fileno()), os.stat(os.devnull))
    closed_pipe.write("late output\n")
    closed_pipe.flush()


def test_other_errors_are_not_mistaken_for_a_closed_pipe(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "cardiology").write_text("")  # an existing key: refused, exit 2 with the message
    assert cli.main(_node_key(tmp_path)) == cli.EXIT_ERROR
    assert capsys.readouterr().err.startswith("fedsilo: error:")
