"""File safety in one place: atomic writes, durable renames, exclusive locks, durable appends.

Every file fedsilo writes that a crash must not leave half-written (reports, checkpoints, ledgers, keys, configs)
goes through `write_atomic`: readers see the old file or the new one, never a torn one, and the rename itself is
synced into the directory so it survives a power loss.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

PUBLIC_MODE = 0o644
PRIVATE_MODE = 0o600


class FileExistsRefusal(FileExistsError):
    """`write_atomic(..., overwrite=False)` found its target already there."""


def fsync_dir(directory: Path) -> None:
    """Sync `directory`'s entries (a rename or a new file in it) to disk. Errors propagate: durability that was
    asked for and cannot be had is a failure, not something to skip."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_dirs_durable(directory: Path, *, mode: int = 0o777) -> None:
    """Create `directory` and any missing parents, syncing each new entry into its parent."""
    created: list[Path] = []
    current = directory
    while not current.exists():
        created.append(current)
        current = current.parent
    if not created:
        return
    directory.mkdir(parents=True, exist_ok=True, mode=mode)
    for new in reversed(created):
        fsync_dir(new.parent)


def write_atomic(path: Path, data: bytes, *, mode: int = PUBLIC_MODE, overwrite: bool = True,
                 sync_dir: bool = True) -> None:
    """Write `data` to `path` through a temporary file in the same directory, fsync it, rename it over `path` and
    sync the directory.

    `mode` is given to `os.open` when the temporary file is created (the umask can only remove bits), so a private
    file (`PRIVATE_MODE`) is never readable by others, not even for an instant. With `overwrite=False` an existing
    `path` raises `FileExistsRefusal` (checked at the last moment before the rename) and nothing is written. On an
    error the temporary file is removed and `path` is left as it was. A process that dies mid-write (a crash, or a
    `BaseException` such as `KeyboardInterrupt`) may leave the temporary file `.<name>.<pid>.<hex>.tmp` behind:
    readers never see it, and its owner may remove such files under its lock (the ledger does).

    `sync_dir=False` leaves the directory sync to a caller that writes several files and syncs their directory once
    (with `fsync_dir`) before it reports success; an error from that sync is then the caller's to handle.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        if not overwrite and (path.exists() or path.is_symlink()):
            raise FileExistsRefusal(f"Refusing to overwrite existing file {path}.")
        os.replace(tmp, path)
    except Exception:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    if sync_dir:
        fsync_dir(path.parent)


@contextlib.contextmanager
def exclusive_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive `flock` on `path` (created if missing) for the `with` block."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def append_durable(path: Path, data: bytes, *, mode: int = PRIVATE_MODE) -> None:
    """Append `data` to `path` (created with `mode` if missing) and fsync the file, and the directory when the file
    was new. The caller holds the lock that orders appends. A write that makes no progress raises `OSError`."""
    existed = path.exists()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, mode)
    try:
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            if written <= 0:
                raise OSError(errno.EIO, f"short write to {path}: {len(data) - len(view)} of {len(data)} bytes")
            view = view[written:]
        os.fsync(fd)
    finally:
        os.close(fd)
    if not existed:
        fsync_dir(path.parent)
