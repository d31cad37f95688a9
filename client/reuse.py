"""What a department would otherwise rebuild for every message of a run, kept for the run in the process that
handles its messages: the frozen model skeleton, the site's split and its tokenised data.

In simulation, Flower's Ray workers handle message after message of one run for many departments, each message
used to reload the model (about a second for MiniLM), re-read and re-split the site's data and re-tokenise it. In
deployment each message runs in a fresh process (the site's gate), so nothing here outlives a message there.

Bounded and explicit: one model skeleton per process (every department of a run shares the job's base model; the
trainable weights are overwritten with the global model at every message, see `Department._model`), and the data of
at most `MAX_DEPARTMENTS` departments, least recently used first out. Everything is keyed on the run id, the job's
config and the site's config, and a message of another run drops all of it.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any, TypeVar

log = logging.getLogger(__name__)

MAX_DEPARTMENTS = 64  # tokenised data per department: ~2 x 8 bytes x rows x max-length (8 MB for 8,000 rows at 64)

T = TypeVar("T")


class RunCache:
    """One process's reusable objects for the run it is serving (see the module docstring)."""

    def __init__(self, max_entries: int = 3 * MAX_DEPARTMENTS) -> None:
        self.max_entries = max_entries
        self.run_id: str | None = None
        self._model: tuple[Hashable, Any] | None = None
        self._entries: OrderedDict[Hashable, Any] = OrderedDict()

    def begin(self, run_id: str) -> None:
        """Serve `run_id`: whatever was kept for another run is dropped."""
        if run_id != self.run_id:
            if self.run_id is not None:
                log.debug("reuse: run %s replaces run %s; dropping %d entries", run_id, self.run_id,
                          len(self._entries))
            self.clear()
            self.run_id = run_id

    def clear(self) -> None:
        self.run_id = None
        self._model = None
        self._entries.clear()

    def model(self, key: Hashable, build: Callable[[], T]) -> T:
        """The one model skeleton, built by `build` unless the kept one was built for `key`."""
        if self._model is None or self._model[0] != key:
            self._model = None  # release the old one before building the next
            self._model = (key, build())
        kept: T = self._model[1]
        return kept

    def get(self, key: Hashable, build: Callable[[], T]) -> T:
        """The entry for `key`, built by `build` if absent (least recently used entries go beyond the bound)."""
        if key in self._entries:
            self._entries.move_to_end(key)
            found: T = self._entries[key]
            return found
        value = build()
        self._entries[key] = value
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
        return value

    def __len__(self) -> int:
        return len(self._entries) + (self._model is not None)


RUN_CACHE = RunCache()
