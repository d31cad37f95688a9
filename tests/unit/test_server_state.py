"""The server's state is private: `--state-dir` 0700 and the SuperLink database 0600, before Flower opens it."""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from common.errors import ConfigError
from server.deploy import DATABASE_MODE, STATE_DIR_MODE, ServerState, prepare_state_dir


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def loose_umask() -> Iterator[None]:
    """The default umask of most systems, under which Flower's own database file would be 0644."""
    previous = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(previous)


@pytest.mark.usefixtures("loose_umask")
def test_a_new_state_dir_is_0700_and_its_database_0600_before_flower_opens_it(tmp_path: Path) -> None:
    state = ServerState(tmp_path / "deploy" / "state")
    prepare_state_dir(state)
    assert _mode(state.root) == STATE_DIR_MODE == 0o700
    assert state.database.is_file() and state.database.stat().st_size == 0
    assert _mode(state.database) == DATABASE_MODE == 0o600


@pytest.mark.usefixtures("loose_umask")
def test_flower_keeps_the_precreated_database_and_its_wal_files_private(tmp_path: Path) -> None:
    """Flower's SuperLink state (opened as `create_app` opens it) takes the empty file as a new database; SQLite
    gives the -wal/-shm files the database's mode, so nothing Flower writes there is readable by others."""
    from server.compat import get_federation_manager, get_objectstore_linkstate_factories

    state = ServerState(tmp_path / "state")
    prepare_state_dir(state)
    _, factory = get_objectstore_linkstate_factories(str(state.database), get_federation_manager(is_simulation=False))
    factory.state()
    written = [p for p in state.database_files() if p.exists()]
    assert state.database in written and state.database.stat().st_size > 0
    assert {p.name: _mode(p) for p in written} == {p.name: 0o600 for p in written}


def test_an_existing_loose_state_dir_and_database_are_tightened_with_a_warning(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    state = ServerState(tmp_path / "state")
    state.root.mkdir(mode=0o755)
    os.chmod(state.root, 0o755)
    for path in (state.database, state.database.with_name("superlink.db-wal")):
        path.write_bytes(b"rows")
        os.chmod(path, 0o644)
    with caplog.at_level(logging.WARNING, logger="server.deploy"):
        prepare_state_dir(state)
    assert _mode(state.root) == 0o700
    assert _mode(state.database) == 0o600 and _mode(state.database.with_name("superlink.db-wal")) == 0o600
    assert state.database.read_bytes() == b"rows"  # tightened, not replaced
    assert sum("tightened to" in r.getMessage() for r in caplog.records) == 3


def test_a_private_state_dir_is_left_as_it_is_silently(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    state = ServerState(tmp_path / "state")
    prepare_state_dir(state)
    state.database.write_bytes(b"rows")
    with caplog.at_level(logging.WARNING, logger="server.deploy"):
        prepare_state_dir(state)
    assert state.database.read_bytes() == b"rows" and not caplog.records


def test_a_state_dir_that_is_a_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "state").write_text("")
    with pytest.raises(ConfigError, match="is not a directory"):
        prepare_state_dir(ServerState(tmp_path / "state"))


def test_a_database_that_is_not_a_regular_file_is_refused(tmp_path: Path) -> None:
    state = ServerState(tmp_path / "state")
    state.root.mkdir(mode=0o700)
    state.database.mkdir()
    with pytest.raises(ConfigError, match="not a regular file"):
        prepare_state_dir(state)


def test_a_state_dir_owned_by_another_user_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    state = ServerState(tmp_path / "state")
    state.root.mkdir(mode=0o755)
    monkeypatch.setattr(os, "getuid", lambda: state.root.stat().st_uid + 1)
    with pytest.raises(ConfigError, match="not to this user"):
        prepare_state_dir(state)
    assert not state.database.exists()
