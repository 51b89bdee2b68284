"""Agents whose wall clocks are an hour off the coordinator's keep their leases, stay up, and
take part in an emergency: leases run on durations and the agent's monotonic clock, and the
coordinator judges freshness by when it received a report, not by the agent's timestamps.

The skew is real for the agent process: tests/fakes/skewed_clock/sitecustomize.py shifts its
time.time() (PYTHONPATH), which every Unix timestamp the agent writes comes from."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from shapeshifter.api.v1 import agent_pb2 as pb
from shapeshifter.api.v1 import coordinator_pb2 as cpb
from shapeshifter.api.v1 import emergency_pb2 as epb
from shapeshifter.api.v1 import emergency_pb2_grpc as epb_grpc
from tests.conftest import AgentProcess, free_port, poll, start_agent
from tests.integration.coordinator_proc import CoordinatorProcess, start_coordinator

SKEW_S = {"n1": -3600.0, "n2": 3600.0}
LEASE_TTL_S = 1.5
TOPOLOGY = {
    "version": 1,
    "liveness": {"suspect_after_s": 1.0, "lost_after_s": 2.5},
    "sites": [{"name": "s1", "aisles": [{"name": "a1", "aisle_airflow_cfm": 100000}],
               "rows": [{"name": "r1", "row_power_limit_w": 4000,
                         "racks": [{"name": "k1", "aisle": "a1"}]}]}],
}
AGENT_CONFIG = {
    "version": 1,
    "sampling": {"interval_s": 0.25},
    "coordinator": {"report_interval_s": 0.25, "reconnect_initial_s": 0.1, "reconnect_max_s": 0.5},
}
SKEWED_CLOCK_DIR = Path(__file__).parents[1] / "fakes" / "skewed_clock"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[tuple[CoordinatorProcess, dict[str, AgentProcess]]]:
    work = tmp_path_factory.mktemp("skew")
    (work / "topology.yaml").write_text(yaml.safe_dump(TOPOLOGY))
    (work / "agent.yaml").write_text(yaml.safe_dump(AGENT_CONFIG))
    coord = start_coordinator(work, free_port(), "--lease-ttl-s", str(LEASE_TTL_S),
                              "--emergency-prearm-interval-s", "1")
    agents: dict[str, AgentProcess] = {}
    try:
        for node_id, skew_s in SKEW_S.items():
            agents[node_id] = start_agent(
                work / node_id, "--config", str(work / "agent.yaml"), "--node-id", node_id,
                "--coordinator", coord.address, "--sim-load", "busy",
                "--labels", "site=s1,row=r1,rack=k1,aisle=a1", sim_gpus=2,
                env={"PYTHONPATH": str(SKEWED_CLOCK_DIR), "SHAPESHIFTER_TEST_SKEW_S": str(skew_s)})
        yield coord, agents
    finally:
        for a in agents.values():
            a.stop()
        coord.stop()


def _node(agent: AgentProcess) -> pb.Node:
    return agent.stub().GetNode(pb.GetNodeRequest(), timeout=5)


def test_skew_is_real_and_leases_hold(cluster) -> None:
    coord, agents = cluster
    for node_id, agent in agents.items():
        assert _node(agent).sampled_at_unix_s - time.time() == pytest.approx(SKEW_S[node_id],
                                                                            abs=30)
    poll(lambda: all(_node(a).safety_state == "leased" for a in agents.values()), timeout_s=20)
    until = time.monotonic() + 4 * LEASE_TTL_S  # several lease lifetimes
    while time.monotonic() < until:
        for agent in agents.values():
            node = _node(agent)
            assert node.safety_state == "leased" and node.lease.remaining_s > 0, node.lease
        states = {n.name: n.state for n in coord.cluster().nodes}
        assert states == {"n1": "up", "n2": "up"}, states
        time.sleep(0.2)


def test_emergency_is_acknowledged_and_verified_with_skewed_agents(cluster) -> None:
    coord, agents = cluster
    em = epb_grpc.EmergencyStub(coord.channel())
    poll(lambda: em.ListEmergencies(epb.ListEmergenciesRequest(), timeout=5).prearmed_nodes == 2,
         timeout_s=20)
    declared = em.DeclareEmergency(epb.DeclareEmergencyRequest(
        scope="row", name="r1", capacity_frac=0.5, source="test"), timeout=10)

    def settled() -> epb.EmergencyStatus | None:
        s = em.GetEmergency(epb.GetEmergencyRequest(emergency_id=declared.emergency_id),
                            timeout=5)
        return s if s.nodes_acked == 2 and s.under_limit_s >= 0 else None

    status = poll(settled, timeout_s=20)
    assert not [e for e in status.timeline if e.kind == "caps_reissued"], list(status.timeline)
    row_w = sum(_node(a).budget.node_power_w for a in agents.values())
    assert row_w <= status.power_limit_w
    audit = coord.stub().ListAudit(cpb.ListAuditRequest(limit=50), timeout=5).entries
    assert any(e.action == "DeclareEmergency" for e in audit)
