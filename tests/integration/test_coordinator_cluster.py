"""A coordinator and three nodeagent processes over real localhost gRPC.

One cluster is shared by the tests of this module, which run in file order: registration and
rollups; operator actions and bad input (admin API and shapectl); coordinator loss (fail-safe caps)
and restart (epoch, state and normal caps back); an agent killed with -9 going suspect then lost.
Timings are short: reports every 0.25 s, leases of 1.5 s, suspect after 1 s, lost after 2.5 s.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator

import grpc
import pytest

from shapeshifter.api.v1 import agent_pb2 as pb
from shapeshifter.api.v1 import coordinator_pb2 as cpb
from tests.conftest import AgentProcess, poll, run_cli
from tests.integration.coordinator_proc import (
    Cluster,
    CoordinatorProcess,
    labelled_cluster,
    start_coordinator,
)

SUSPECT_AFTER_S, LOST_AFTER_S, LEASE_TTL_S = 1.0, 2.5, 1.5
COORDINATOR_ARGS = ("--lease-ttl-s", str(LEASE_TTL_S))
FAILSAFE_FRAC = 0.5
H100_MAX_W = 700.0
NODES = {  # node id -> labels
    "n1": {"site": "s1", "row": "r1", "rack": "k1", "aisle": "a1"},
    "n2": {"site": "s1", "row": "r1", "rack": "k2", "aisle": "a1"},
    "n3": {"site": "s1", "row": "r2", "rack": "k3", "aisle": "a2"},
}
TOPOLOGY = {
    "version": 1,
    "liveness": {"suspect_after_s": SUSPECT_AFTER_S, "lost_after_s": LOST_AFTER_S},
    "sites": [{
        "name": "s1",
        "aisles": [{"name": "a1", "aisle_airflow_cfm": 900},
                   {"name": "a2", "aisle_airflow_cfm": 500}],
        "rows": [
            {"name": "r1", "row_power_limit_w": 4000,
             "racks": [{"name": "k1", "aisle": "a1"}, {"name": "k2", "aisle": "a1"}]},
            {"name": "r2", "row_power_limit_w": 2500, "racks": [{"name": "k3", "aisle": "a2"}]},
        ],
    }],
}


AGENT_CONFIG = {
    "version": 1,
    "sampling": {"interval_s": 0.25},
    "failsafe": {"power_limit_frac": FAILSAFE_FRAC},
    "coordinator": {"report_interval_s": 0.25, "reconnect_initial_s": 0.1, "reconnect_max_s": 0.5},
}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with labelled_cluster(tmp_path_factory.mktemp("cluster"), TOPOLOGY, AGENT_CONFIG, NODES,
                          COORDINATOR_ARGS) as c:
        yield c


def agent_node(agent: AgentProcess) -> pb.Node:
    return agent.stub().GetNode(pb.GetNodeRequest(), timeout=5)


def all_up(coord: CoordinatorProcess) -> cpb.ClusterStatus | None:
    status = coord.cluster()
    ok = len(status.nodes) == len(NODES) and all(
        n.state == "up" and n.gpus == 2 and n.safety_state == "leased" for n in status.nodes)
    return status if ok else None


def test_agents_register_and_rollups_sum_their_own_numbers(cluster: Cluster) -> None:
    status = poll(lambda: all_up(cluster.coordinator))
    assert {n.name for n in status.nodes} == set(NODES)
    assert all(n.topology_known for n in status.nodes)
    own = {node_id: agent_node(a) for node_id, a in cluster.agents.items()}
    assert all(n.safety_state == "leased" for n in own.values())
    status = cluster.coordinator.cluster()
    rows = {r.name: r for r in status.rows}
    for row, members in (("r1", ["n1", "n2"]), ("r2", ["n3"])):
        expect_w = sum(own[m].budget.node_power_w for m in members)
        assert rows[row].power_draw_w == pytest.approx(expect_w, rel=0.02)
        assert rows[row].gpus == 2 * len(members) and rows[row].nodes == len(members)
        expect_c = max(g.temperature_c for m in members for g in own[m].gpus)
        assert rows[row].max_gpu_temp_c == pytest.approx(expect_c, abs=1.0)
    aisles = {a.name: a for a in status.aisles}
    expect_cfm = own["n1"].budget.airflow_cfm + own["n2"].budget.airflow_cfm
    assert aisles["a1"].airflow_cfm == pytest.approx(expect_cfm, rel=0.02)
    assert aisles["a1"].airflow_limit_cfm == 900
    assert rows["r1"].power_limit_w == 4000 and rows["r2"].power_limit_w == 2500
    assert status.sites[0].power_draw_w == pytest.approx(
        sum(n.budget.node_power_w for n in own.values()), rel=0.02)


def test_shapectl_status_json_matches(cluster: Cluster) -> None:
    out = run_cli("shapectl", "--coordinator", cluster.coordinator.address, "status", "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    status = cluster.coordinator.cluster()
    assert [r["name"] for r in data["rows"]] == ["r1", "r2"]
    assert [a["name"] for a in data["aisles"]] == ["a1", "a2"]
    for row, mine in zip(data["rows"], status.rows, strict=True):
        assert row["power_limit_w"] == mine.power_limit_w
        assert row["nodes"] == mine.nodes
        assert row["power_draw_w"] == pytest.approx(mine.power_draw_w, rel=0.02)
    nodes = {n["name"]: n for n in data["nodes"]}
    assert set(nodes) == set(NODES)
    for node_id, labels in NODES.items():
        n = nodes[node_id]
        assert (n["state"], n["row"], n["rack"]) == ("up", labels["row"], labels["rack"])
        assert n["power_draw_w"] > 0
    table = run_cli("shapectl", "--coordinator", cluster.coordinator.address, "status")
    assert table.returncode == 0 and "r1" in table.stdout and "%" in table.stdout
    nodes_json = run_cli("shapectl", "--coordinator", cluster.coordinator.address, "nodes",
                         "--json")
    assert {n["name"] for n in json.loads(nodes_json.stdout)["nodes"]} == set(NODES)
    one = run_cli("shapectl", "--coordinator", cluster.coordinator.address, "node", "n3", "--json")
    assert one.returncode == 0, one.stderr
    assert json.loads(one.stdout)["node_id"] == "n3" and len(json.loads(one.stdout)["gpus"]) == 2


def test_operator_action_goes_through_the_stream_and_is_audited(cluster: Cluster) -> None:
    stub = cluster.coordinator.stub()
    req = cpb.NodeSetPowerLimitRequest(
        node_id="n1", request=pb.SetPowerLimitRequest(gpu_index=0, power_limit_w=300))
    result = stub.SetPowerLimit(req, timeout=10, metadata=(("x-shapeshifter-actor", "tester"),))
    assert result.ok and result.changed
    assert agent_node(cluster.agents["n1"]).gpus[0].power_limit_w == 300
    out = run_cli("shapectl", "--coordinator", cluster.coordinator.address, "gpu", "lock-clocks",
                  "--node", "n2", "1", "900", "1200")
    assert out.returncode == 0, out.stderr
    lock = agent_node(cluster.agents["n2"]).gpus[1].clock_lock
    assert (lock.min_mhz, lock.max_mhz) == (900, 1200)
    audit = stub.ListAudit(cpb.ListAuditRequest(limit=10), timeout=5).entries
    assert [(e.node_id, e.action, e.ok) for e in audit[:2]] == [
        ("n2", "lock_clocks", True), ("n1", "set_power_limit", True)]
    assert audit[1].actor == "tester" and audit[0].actor.startswith("shapectl:")
    assert json.loads(audit[1].request_json)["set_power_limit"]["power_limit_w"] == 300


@pytest.mark.parametrize(
    ("node_id", "gpu", "watts", "code", "words"),
    [
        ("nope", 0, 300, grpc.StatusCode.NOT_FOUND, ["node_id='nope'"]),
        ("n1", 7, 300, grpc.StatusCode.INVALID_ARGUMENT, ["request.gpu_index=7", "[0, 1]"]),
        ("n1", 0, 5000, grpc.StatusCode.INVALID_ARGUMENT,
         ["request.power_limit_w=5000", "[200, 700]"]),
    ],
)
def test_bad_input_is_refused_naming_the_field_and_changes_nothing(
        cluster: Cluster, node_id: str, gpu: int, watts: float, code: grpc.StatusCode,
        words: list[str]) -> None:
    before = [g.power_limit_w for g in agent_node(cluster.agents["n1"]).gpus]
    req = cpb.NodeSetPowerLimitRequest(
        node_id=node_id, request=pb.SetPowerLimitRequest(gpu_index=gpu, power_limit_w=watts))
    with pytest.raises(grpc.RpcError) as e:
        cluster.coordinator.stub().SetPowerLimit(req, timeout=10)
    assert e.value.code() == code
    assert all(w in e.value.details() for w in words), e.value.details()
    out = run_cli("shapectl", "--coordinator", cluster.coordinator.address, "gpu", "set-power",
                  "--node", node_id, str(gpu), str(watts))
    assert out.returncode != 0
    assert out.stderr.count("\n") == 1 and code.name in out.stderr
    assert all(w in out.stderr for w in words), out.stderr
    assert [g.power_limit_w for g in agent_node(cluster.agents["n1"]).gpus] == before
    audit = cluster.coordinator.stub().ListAudit(cpb.ListAuditRequest(limit=1), timeout=5)
    assert (audit.entries[0].ok, audit.entries[0].code) == (False, code.name)


def test_lock_clocks_range_and_missing_node_name(cluster: Cluster) -> None:
    req = cpb.NodeLockClocksRequest(
        node_id="n2", request=pb.LockClocksRequest(gpu_index=0, min_mhz=1200, max_mhz=900))
    with pytest.raises(grpc.RpcError) as e:
        cluster.coordinator.stub().LockClocks(req, timeout=10)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "request.min_mhz=1200" in e.value.details()
    out = run_cli("shapectl", "--coordinator", cluster.coordinator.address, "gpu", "reset-clocks",
                  "0")
    assert out.returncode == 2 and "--node NODE" in out.stderr


def failsafe_everywhere(agents: dict[str, AgentProcess]) -> bool:
    nodes = [agent_node(a) for a in agents.values()]
    return all(n.safety_state == "failsafe" for n in nodes)


def test_coordinator_loss_applies_failsafe_and_restart_restores(cluster: Cluster) -> None:
    epoch_before = cluster.coordinator.cluster().epoch
    cluster.coordinator.stop(signal.SIGKILL)
    lost_at = time.monotonic()
    poll(lambda: failsafe_everywhere(cluster.agents), timeout_s=LEASE_TTL_S + 10)
    # Not before the lease ran out: the last renewal came at most a third of the TTL before.
    assert time.monotonic() - lost_at >= LEASE_TTL_S * 2 / 3 - 0.1
    failsafe_w = FAILSAFE_FRAC * H100_MAX_W
    for node_id, agent in cluster.agents.items():
        limits = [g.power_limit_w for g in agent_node(agent).gpus]  # the agents keep serving
        expect = [min(300.0, failsafe_w), failsafe_w] if node_id == "n1" else [failsafe_w] * 2
        assert limits == expect, node_id

    cluster.coordinator = start_coordinator(cluster.workdir, cluster.port, *COORDINATOR_ARGS)
    status = cluster.coordinator.cluster()
    assert status.epoch > epoch_before
    assert {n.name for n in status.nodes} == set(NODES)  # known from SQLite
    audit = cluster.coordinator.stub().ListAudit(cpb.ListAuditRequest(limit=50), timeout=5)
    assert any(e.action == "lock_clocks" and e.epoch == epoch_before for e in audit.entries)
    poll(lambda: all_up(cluster.coordinator), timeout_s=20)
    for node_id, agent in cluster.agents.items():
        node = poll(lambda a=agent: (n := agent_node(a)).safety_state == "leased" and n)
        assert node.lease.epoch == status.epoch
        limits = [g.power_limit_w for g in node.gpus]
        assert limits == ([300.0, H100_MAX_W] if node_id == "n1" else [H100_MAX_W] * 2)


def test_killed_agent_turns_suspect_then_lost(cluster: Cluster) -> None:
    poll(lambda: all_up(cluster.coordinator))
    cluster.agents["n3"].stop(signal.SIGKILL)
    killed_at = time.monotonic()

    def state() -> str:
        return next(n.state for n in cluster.coordinator.cluster().nodes if n.name == "n3")

    poll(lambda: state() == "suspect", timeout_s=SUSPECT_AFTER_S + 3, interval_s=0.05)
    assert time.monotonic() - killed_at < LOST_AFTER_S
    poll(lambda: state() == "lost", timeout_s=LOST_AFTER_S + 3, interval_s=0.05)
    assert time.monotonic() - killed_at >= LOST_AFTER_S - 0.5
    r2 = next(r for r in cluster.coordinator.cluster().rows if r.name == "r2")
    assert (r2.nodes, r2.nodes_lost, r2.nodes_up) == (1, 1, 0)
    with pytest.raises(grpc.RpcError) as e:  # the node is gone: actions are UNAVAILABLE
        cluster.coordinator.stub().ResetClocks(
            cpb.NodeResetClocksRequest(node_id="n3", request=pb.ResetClocksRequest(gpu_index=0)),
            timeout=10)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE and "n3" in e.value.details()
