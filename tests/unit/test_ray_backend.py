"""The backend config handed to Flower's Ray backend: a Ray of this machine's own, or a running cluster joined."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator

import pytest

from common.errors import ConfigError
from simulations.run import RAY_LOCAL, SIM_CPUS_ENV, backend_config, local_cpus


@pytest.fixture
def listening_address() -> Iterator[str]:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
        yield f"127.0.0.1:{sock.getsockname()[1]}"


def test_local_run_starts_its_own_ray_with_this_machines_cpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(SIM_CPUS_ENV, raising=False)
    config = backend_config(4, 1.0, None)
    init_args = config["init_args"]
    # "local": never the cluster a `ray start` here wrote to /tmp/ray (ray.init() would join it and refuse num_cpus)
    assert init_args["address"] == RAY_LOCAL
    assert init_args["num_cpus"] == len(os.sched_getaffinity(0))  # the CPUs this process may run on
    assert config["client_resources"]["num_cpus"] == 1.0


def test_cluster_run_joins_the_address_and_says_nothing_of_this_machine(listening_address: str) -> None:
    config = backend_config(4, 2.0, listening_address)
    init_args = config["init_args"]
    assert init_args["address"] == listening_address
    # ray.init refuses these when joining a cluster; the pool is sized by the cluster's nodes
    assert not {"num_cpus", "num_gpus", "resources", "object_store_memory"} & set(init_args)
    assert config["client_resources"] == {"num_cpus": 2.0, "num_gpus": 0.0}


def test_fedsilo_sim_cpus_gives_the_local_ray_its_share(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SIM_CPUS_ENV, "1")
    assert backend_config(4, 1.0, None)["init_args"]["num_cpus"] == 1
    monkeypatch.setenv(SIM_CPUS_ENV, " 3 ")
    assert local_cpus() == 3


def test_fedsilo_sim_cpus_is_ignored_when_joining_a_cluster(monkeypatch: pytest.MonkeyPatch,
                                                           listening_address: str) -> None:
    monkeypatch.setenv(SIM_CPUS_ENV, "1")
    assert "num_cpus" not in backend_config(4, 1.0, listening_address)["init_args"]


@pytest.mark.parametrize("bad", ["0", "-2", "1.5", "two"])
def test_a_bad_fedsilo_sim_cpus_is_refused_with_its_name(monkeypatch: pytest.MonkeyPatch, bad: str) -> None:
    monkeypatch.setenv(SIM_CPUS_ENV, bad)
    with pytest.raises(ConfigError, match=r"\$FEDSILO_SIM_CPUS must be a whole number of CPUs, at least 1"):
        backend_config(4, 1.0, None)
