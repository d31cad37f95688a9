"""client.reuse: what a worker keeps for a run is bounded, keyed, and dropped when another run starts."""

from __future__ import annotations

from client.reuse import RunCache


def test_entries_are_built_once_per_key_and_bounded() -> None:
    cache = RunCache(max_entries=2)
    cache.begin("run-1")
    built: list[str] = []

    def make(key: str) -> str:
        built.append(key)
        return key.upper()

    assert cache.get("a", lambda: make("a")) == "A"
    assert cache.get("a", lambda: make("a")) == "A"
    cache.get("b", lambda: make("b"))
    cache.get("a", lambda: make("a"))  # "a" is now the most recently used
    cache.get("c", lambda: make("c"))  # over the bound: "b", the least recently used, goes
    cache.get("a", lambda: make("a"))
    cache.get("b", lambda: make("b"))
    assert built == ["a", "b", "c", "b"]
    assert len(cache) == 2


def test_one_model_skeleton_per_key() -> None:
    cache = RunCache()
    cache.begin("run-1")
    first = cache.model("job-1", object)
    assert cache.model("job-1", object) is first
    assert cache.model("job-2", object) is not first  # another job's model replaces it
    assert len(cache) == 1


def test_another_run_drops_everything() -> None:
    cache = RunCache()
    cache.begin("run-1")
    model = cache.model("job", object)
    cache.get("split", lambda: 1)
    cache.begin("run-1")  # the same run: kept
    assert cache.model("job", object) is model and len(cache) == 2
    cache.begin("run-2")
    assert len(cache) == 0 and cache.model("job", object) is not model
