"""A simulation on a two-node Ray cluster started by the test: `fedsilo simulate --ray-address` joins it.

The cluster (`ray.cluster_utils.Cluster`: a head and a second node, one CPU each, both processes of this machine
sharing this venv) is what `ray start --head` and `ray start --address` would make on two machines. Each department
takes one CPU, so Flower's actor pool holds one actor per node. A client mod records, inside the actor, the Ray node
that handled each message; both nodes must appear, the run must complete, and the cluster must outlive the run.
A run without an address, meanwhile, must start a Ray of its own rather than join the cluster this machine runs.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import ray
from ray.cluster_utils import Cluster

from client.compat import Mod
from simulations.run import RayClusterError, simulate
from tests.conftest import TINY_JOB, make_department_frame

pytestmark = pytest.mark.slow


def ray_node_mod(out_dir: Path) -> Mod:
    """An outermost ClientApp mod that writes, per message, the department's partition and the Ray node it ran on.

    It runs in Ray's worker processes: a closure using only the standard library and Ray (shipped by value).
    """
    target = str(out_dir)

    def record(msg: Any, ctxt: Any, call_next: Any) -> Any:
        import json
        import os
        import uuid

        import ray

        reply = call_next(msg, ctxt)
        entry = {"partition": ctxt.node_config.get("partition-id"), "type": str(msg.metadata.message_type),
                 "ray_node": ray.get_runtime_context().get_node_id()}
        with open(os.path.join(target, f"{uuid.uuid4().hex}.json"), "w", encoding="utf-8") as fh:
            json.dump(entry, fh)
        return reply

    return record


@pytest.fixture(scope="module")
def cluster() -> Iterator[tuple[Cluster, set[str]]]:
    """A head and one more node, one CPU each; shut down (every process it started) at the end."""
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        worker = c.add_node(num_cpus=1)
        c.wait_for_nodes()
        yield c, {c.head_node.node_id, worker.node_id}
    finally:
        c.shutdown()


def _run(tmp_path: Path, ray_address: str | None) -> list[dict[str, Any]]:
    """A one-round tiny simulation of 2 departments, checked to complete; the records of its messages."""
    data = tmp_path / "departments.csv"
    make_department_frame({"cardiology": 40, "radiology": 40}).to_csv(data, index=False)
    seen = tmp_path / "messages"
    seen.mkdir()
    rc = {**TINY_JOB, "num-server-rounds": 1, "sim-data": str(data)}
    report = simulate(rc, tmp_path / "out", ray_address=ray_address, client_mods=[ray_node_mod(seen)])
    assert report["final"]["outcome"] == "completed"
    assert [r["aggregate"] for r in report["rounds"]] == ["applied"]
    assert {d["status"] for d in report["rounds"][0]["departments"].values()} == {"trained"}
    entries = [json.loads(p.read_text()) for p in seen.glob("*.json")]
    assert {e["partition"] for e in entries} == {0, 1}
    return entries


def test_simulation_places_departments_on_both_nodes(cluster: tuple[Cluster, set[str]], tmp_path: Path) -> None:
    c, node_ids = cluster
    entries = _run(tmp_path, c.address)
    assert {e["ray_node"] for e in entries} == node_ids  # messages ran on both nodes' actors, on no other node
    assert not ray.is_initialized()  # Flower's runtime disconnected this driver from the cluster ...
    assert c.remaining_processes_alive()  # ... and left the cluster it joined running


def test_run_without_address_starts_its_own_ray_beside_the_cluster(cluster: tuple[Cluster, set[str]], tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    c, node_ids = cluster
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    entries = _run(tmp_path, None)
    local = {e["ray_node"] for e in entries}
    assert len(local) == 1 and not local & node_ids  # one node of its own, none of the cluster's
    assert c.remaining_processes_alive()


def test_cluster_without_room_for_a_department_is_refused_before_the_run(cluster: tuple[Cluster, set[str]],
                                                                         tmp_path: Path) -> None:
    c, _ = cluster
    data = tmp_path / "departments.csv"
    make_department_frame({"cardiology": 40, "radiology": 40}).to_csv(data, index=False)
    rc = {**TINY_JOB, "num-server-rounds": 1, "sim-data": str(data)}
    with pytest.raises(RayClusterError, match=r"No node of the Ray cluster at .* has the 2 CPU\(s\) a department "
                                              r"takes \(its nodes' CPUs: \[1\.0, 1\.0\]\)"):
        simulate(rc, tmp_path / "out", ray_address=c.address, cpus_per_department=2.0)
    assert not (tmp_path / "out").exists()
    assert not ray.is_initialized() and c.remaining_processes_alive()
