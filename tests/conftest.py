"""Shared fixtures: small synthetic department data and fast job settings for the tiny model."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pandas as pd
import pytest

from simulations.localdeploy import shared_threads
from simulations.run import SIM_CPUS_ENV

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# Under pytest-xdist each worker gets its share of the cores for torch's (OpenMP's) threads, and so do the processes
# its tests start (servers, sites): workers with a thread per core each would oversubscribe the machine, and
# threads spinning for a core slow every process. Its simulations' Ray gets the same share of CPUs (one actor
# process per CPU, each loading torch and the model: on 2 cores and 2 workers, one actor per simulation instead of
# two). An OMP_NUM_THREADS or FEDSILO_SIM_CPUS already set stands.
_XDIST_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 1)
if _XDIST_WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(shared_threads(_XDIST_WORKERS)))
    os.environ.setdefault(SIM_CPUS_ENV, str(shared_threads(_XDIST_WORKERS)))

POSITIVE = ["great", "excellent", "wonderful", "love", "superb", "happy", "delightful", "best"]
NEGATIVE = ["awful", "terrible", "horrible", "hate", "poor", "sad", "boring", "worst"]
FILLER = ["the", "service", "film", "product", "day", "story", "food", "really", "was", "very", "and", "quite"]


def make_department_frame(departments: dict[str, int], seed: int = 0) -> pd.DataFrame:
    """Short texts whose label is given by sentiment words; `departments` maps name -> number of rows."""
    rng = random.Random(seed)
    rows = []
    for dept, n in departments.items():
        for i in range(n):
            label = "positive" if i % 2 == 0 else "negative"
            words = rng.sample(FILLER, 4) + rng.sample(POSITIVE if label == "positive" else NEGATIVE, 2)
            rng.shuffle(words)
            rows.append({"text": " ".join(words), "label": label, "department": dept})
    return pd.DataFrame(rows)


@pytest.fixture
def three_departments_csv(tmp_path: Path) -> Path:
    path = tmp_path / "departments.csv"
    make_department_frame({"cardiology": 60, "oncology": 48, "radiology": 40}).to_csv(path, index=False)
    return path


# Fast settings for the tiny model: a handful of DP steps per round.
TINY_JOB = {"model": "tiny-random", "batch-size": 8, "local-epochs": 0.5, "max-length": 16,
            "learning-rate": 0.05}


@pytest.fixture(autouse=True)
def _fresh_run_cache() -> None:
    """Each test starts with nothing kept from another test's departments (client.reuse: tests reuse run ids)."""
    from client.reuse import RUN_CACHE

    RUN_CACHE.clear()


@pytest.fixture
def rdp_curves(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The noise multiplier of every Opacus RDP curve `common.privacy` computes from now on (its cache emptied
    first): what a noise search costs, ~0.05 s per curve."""
    import common.privacy as privacy

    calls: list[float] = []
    real = privacy.compute_rdp

    def counting(**kwargs: float) -> object:
        calls.append(kwargs["noise_multiplier"])
        return real(**kwargs)

    monkeypatch.setattr(privacy, "compute_rdp", counting)
    privacy._rdp_step.cache_clear()
    return calls


# The modules that take a minute or more (fresh-clone CI runs, 2 workers): started first, longest first, so that
# the two workers end together. Only the order: every module runs either way.
LONGEST_FIRST = ("deployment/test_failures.py", "deployment/test_bench_deploy.py", "integration/test_soak.py",
                 "integration/test_study.py", "integration/test_bench.py", "integration/test_secagg_equivalence.py",
                 "deployment/test_netns.py", "deployment/test_job_lifecycle.py", "deployment/test_trust.py",
                 "integration/test_resume.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The longest modules first (`LONGEST_FIRST`), then the other modules with slow tests (deployments,
    simulations), then the rest; each group in its usual order.

    Under `make test` (`--dist loadfile --no-loadscope-reorder`) the two workers start on the long modules and the
    many quick ones fill the end. xdist's default order (most tests first) would leave the modules of one or two
    tests that take a minute or more for last, each on one worker while the other has nothing left to do.
    """
    def module(item: pytest.Item) -> str:
        return item.nodeid.split("::")[0].removeprefix("tests/")

    slow = {module(item) for item in items if item.get_closest_marker("slow")}
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: (rank.get(module(item), len(rank)), module(item) not in slow))  # stable
