"""Enforcement by default, over real gRPC: a coordinator with its default emergency settings and
busy sim agents on a row whose limit they exceed. Nobody declares anything: the coordinator's
own detection declares an emergency, and its caps bring the row's measured power under the
limit; the row next to it, under its limit, is left alone.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from shapectl.commands.demo import peak_node_power_w
from shapeshifter.api.v1 import agent_pb2 as pb
from shapeshifter.api.v1 import emergency_pb2 as epb
from shapeshifter.api.v1 import emergency_pb2_grpc as epb_grpc
from tests.conftest import poll
from tests.integration.coordinator_proc import Cluster, labelled_cluster

GPUS = 2
PEAK_W = peak_node_power_w("h100-80gb", GPUS)
ROW_LIMIT_W = round(0.8 * 2 * PEAK_W)  # r1: its two busy nodes draw ~25 % more than this
NODES = {
    "n1": {"site": "s1", "row": "r1", "rack": "k1", "aisle": "a1"},
    "n2": {"site": "s1", "row": "r1", "rack": "k1", "aisle": "a1"},
    "n3": {"site": "s1", "row": "r2", "rack": "k2", "aisle": "a2"},
}
TOPOLOGY = {
    "version": 1,
    "sites": [{
        "name": "s1",
        "aisles": [{"name": "a1", "aisle_airflow_cfm": 100000},
                   {"name": "a2", "aisle_airflow_cfm": 100000}],
        "rows": [
            {"name": "r1", "row_power_limit_w": ROW_LIMIT_W,
             "racks": [{"name": "k1", "aisle": "a1"}]},
            {"name": "r2", "row_power_limit_w": 2 * ROW_LIMIT_W,
             "racks": [{"name": "k2", "aisle": "a2"}]},
        ],
    }],
}
AGENT_CONFIG = {
    "version": 1,
    "sampling": {"interval_s": 0.2},
    "coordinator": {"report_interval_s": 0.25, "reconnect_initial_s": 0.1, "reconnect_max_s": 0.5},
}


@pytest.fixture
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    # No --emergency-* flag: the daemon's defaults are under test.
    with labelled_cluster(tmp_path_factory.mktemp("detect"), TOPOLOGY, AGENT_CONFIG, NODES,
                          ("--lease-ttl-s", "60"), ("--sim-load", "busy"), GPUS) as c:
        yield c


def row_power_w(c: Cluster, row: str) -> float:
    nodes = [c.agents[n].stub().GetNode(pb.GetNodeRequest(), timeout=5)
             for n in NODES if NODES[n]["row"] == row]
    return sum(n.budget.node_power_w for n in nodes)


def auto_emergencies(c: Cluster) -> list[epb.EmergencyStatus]:
    stub = epb_grpc.EmergencyStub(c.coordinator.channel())
    return [e for e in stub.ListEmergencies(epb.ListEmergenciesRequest(), timeout=5).emergencies
            if e.source == "auto"]


def test_a_row_over_its_limit_is_capped_under_it_without_a_human(cluster: Cluster) -> None:
    (em,) = poll(lambda: auto_emergencies(cluster), timeout_s=30)
    assert (em.scope, em.name, em.kind, em.state) == ("row", "r1", "power", "active")
    assert em.capacity_frac == 1.0 and em.power_limit_w == pytest.approx(ROW_LIMIT_W)
    assert "above the limit" in em.note
    poll(lambda: row_power_w(cluster, "r1") <= ROW_LIMIT_W, timeout_s=15)

    stub = epb_grpc.EmergencyStub(cluster.coordinator.channel())
    shown = poll(lambda: (s := stub.GetEmergency(epb.GetEmergencyRequest(
        emergency_id=em.emergency_id), timeout=5)).under_limit_s >= 0 and s, timeout_s=10)
    kinds = [e.kind for e in shown.timeline]
    assert kinds[:3] == ["declared", "broadcast", "plan"]
    assert {e.node_id for e in shown.timeline if e.kind == "caps_acked"} == {"n1", "n2"}
    assert shown.nodes_acked == 2
    for node_id in ("n1", "n2"):
        gpus = cluster.agents[node_id].stub().GetNode(pb.GetNodeRequest(), timeout=5).gpus
        assert any(g.power_ceiling_source == "emergency" for g in gpus)
    n3 = cluster.agents["n3"].stub().GetNode(pb.GetNodeRequest(), timeout=5).gpus
    assert not any(g.power_ceiling_source.startswith("emergency") for g in n3)  # r2 fits
    assert [e.name for e in auto_emergencies(cluster)] == ["r1"]  # one, and only r1's
