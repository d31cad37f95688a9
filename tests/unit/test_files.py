"""common.files: the one home of atomic writes, directory syncs, locks and durable appends."""

from __future__ import annotations

import fcntl
import os
import stat
from pathlib import Path
from typing import Any
from unittest import mock

import pytest

from common import files


class _RecordingOS:
    """`os` as seen by common.files, recording fsyncs of files and directories."""

    def __init__(self, fail_replace: bool = False, fail_dir_sync: bool = False) -> None:
        self.calls: list[str] = []
        self.fail_replace = fail_replace
        self.fail_dir_sync = fail_dir_sync

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)

    def fsync(self, fd: int) -> None:
        is_dir = os.path.isdir(f"/proc/self/fd/{fd}")
        self.calls.append("fsync-dir" if is_dir else "fsync-file")
        if is_dir and self.fail_dir_sync:
            raise OSError(5, "Input/output error")
        os.fsync(fd)

    def replace(self, src: Any, dst: Any) -> None:
        if self.fail_replace:
            raise OSError(28, "No space left on device")
        self.calls.append("rename")
        os.replace(src, dst)


def test_write_atomic_writes_syncs_and_renames(tmp_path: Path) -> None:
    rec = _RecordingOS()
    target = tmp_path / "sub" / "out.json"
    with mock.patch("common.files.os", rec):
        files.write_atomic(target, b"one")
    assert target.read_bytes() == b"one"
    assert rec.calls == ["fsync-file", "rename", "fsync-dir"]
    assert list(target.parent.iterdir()) == [target]


def test_write_atomic_modes_regardless_of_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        files.write_atomic(tmp_path / "key", b"secret", mode=files.PRIVATE_MODE)
        files.write_atomic(tmp_path / "pub", b"public")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "key").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "pub").stat().st_mode) == 0o644


def test_write_atomic_overwrites_by_default_and_refuses_on_request(tmp_path: Path) -> None:
    target = tmp_path / "f"
    files.write_atomic(target, b"old")
    files.write_atomic(target, b"new")
    assert target.read_bytes() == b"new"
    with pytest.raises(files.FileExistsRefusal, match="Refusing to overwrite"):
        files.write_atomic(target, b"newer", overwrite=False)
    assert target.read_bytes() == b"new"
    assert list(tmp_path.iterdir()) == [target]


def test_write_atomic_refuses_a_symlink_target(tmp_path: Path) -> None:
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "nowhere")
    with pytest.raises(files.FileExistsRefusal):
        files.write_atomic(link, b"x", overwrite=False)
    assert link.is_symlink()


def test_a_failed_write_leaves_the_target_and_no_temporary_file(tmp_path: Path) -> None:
    target = tmp_path / "f"
    files.write_atomic(target, b"old")
    with mock.patch("common.files.os", _RecordingOS(fail_replace=True)), pytest.raises(OSError, match="No space"):
        files.write_atomic(target, b"new")
    assert target.read_bytes() == b"old"
    assert list(tmp_path.iterdir()) == [target]


def test_a_failed_directory_sync_is_an_error(tmp_path: Path) -> None:
    with mock.patch("common.files.os", _RecordingOS(fail_dir_sync=True)), pytest.raises(OSError, match="Input"):
        files.write_atomic(tmp_path / "f", b"x")


def test_sync_dir_false_leaves_the_directory_sync_to_the_caller(tmp_path: Path) -> None:
    rec = _RecordingOS()
    with mock.patch("common.files.os", rec):
        files.write_atomic(tmp_path / "f", b"x", sync_dir=False)
        files.fsync_dir(tmp_path)
    assert rec.calls == ["fsync-file", "rename", "fsync-dir"]


def test_make_dirs_durable_syncs_each_new_directory_into_its_parent(tmp_path: Path) -> None:
    rec = _RecordingOS()
    with mock.patch("common.files.os", rec):
        files.make_dirs_durable(tmp_path / "a" / "b")
        files.make_dirs_durable(tmp_path / "a" / "b")  # already there: nothing to do
    assert (tmp_path / "a" / "b").is_dir()
    assert rec.calls == ["fsync-dir", "fsync-dir"]


def test_append_durable_appends_privately_and_syncs(tmp_path: Path) -> None:
    rec = _RecordingOS()
    log = tmp_path / "log"
    with mock.patch("common.files.os", rec):
        files.append_durable(log, b"a\n")
        files.append_durable(log, b"b\n")
    assert log.read_bytes() == b"a\nb\n"
    assert stat.S_IMODE(log.stat().st_mode) == 0o600
    assert rec.calls == ["fsync-file", "fsync-dir", "fsync-file"]  # the directory only when the file was new


def test_append_durable_fails_on_a_write_that_makes_no_progress(tmp_path: Path) -> None:
    class _Stuck(_RecordingOS):
        def write(self, fd: int, data: Any) -> int:
            return 0

    with mock.patch("common.files.os", _Stuck()), pytest.raises(OSError, match="short write"):
        files.append_durable(tmp_path / "log", b"data")


def _try_lock(path: Path) -> bool:
    """Whether another open file description could take the lock now (flock: per open file, not per process)."""
    with path.open("a") as other:
        try:
            fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(other, fcntl.LOCK_UN)
        return True


def test_exclusive_lock_excludes_and_releases(tmp_path: Path) -> None:
    lock = tmp_path / "dir" / "x.lock"
    with files.exclusive_lock(lock):
        assert lock.exists()
        assert not _try_lock(lock)
    assert _try_lock(lock)
    with pytest.raises(RuntimeError, match="inside"), files.exclusive_lock(lock):
        raise RuntimeError("inside")
    assert _try_lock(lock)  # released on an exception too
