"""Emergency load shedding over real gRPC: a coordinator and three busy sim agents.

Tests run in file order on one cluster: bad input changes nothing; a 75% row emergency brings
the row's measured power under the new limit; clearing relaxes in steps and lifts the caps;
the coordinator killed right after a declaration leaves the agents under their pre-armed caps;
a new coordinator on the same database resumes that emergency and clears it; a SIGSTOPped node
does not delay the fan-out to the others.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator

import grpc
import pytest

from shapectl.commands.demo import peak_node_power_w
from shapeshifter.api.v1 import agent_pb2 as pb
from shapeshifter.api.v1 import emergency_pb2 as epb
from shapeshifter.api.v1 import emergency_pb2_grpc as epb_grpc
from tests.conftest import AgentProcess, poll, run_cli
from tests.integration.coordinator_proc import (
    Cluster,
    labelled_cluster,
    start_coordinator,
)

GPUS = 2
PEAK_W = peak_node_power_w("h100-80gb", GPUS)
ROW_LIMIT_W = round(1.1 * 2 * PEAK_W)  # r1: two busy nodes fit with 10% to spare
NODES = {
    "n1": {"site": "s1", "row": "r1", "rack": "k1", "aisle": "a1"},
    "n2": {"site": "s1", "row": "r1", "rack": "k2", "aisle": "a1"},
    "n3": {"site": "s1", "row": "r2", "rack": "k3", "aisle": "a1"},
}
TOPOLOGY = {
    "version": 1,
    "sites": [{
        "name": "s1",
        "aisles": [{"name": "a1", "aisle_airflow_cfm": 100000}],
        "rows": [
            {"name": "r1", "row_power_limit_w": ROW_LIMIT_W,
             "racks": [{"name": "k1", "aisle": "a1"}, {"name": "k2", "aisle": "a1"}]},
            {"name": "r2", "row_power_limit_w": ROW_LIMIT_W,
             "racks": [{"name": "k3", "aisle": "a1"}]},
        ],
    }],
}
COORDINATOR_ARGS = ("--lease-ttl-s", "60", "--emergency-clear-step-s", "0.3",
                    "--emergency-phase2-after-s", "1", "--emergency-prearm-interval-s", "1")


AGENT_CONFIG = {
    "version": 1,
    "sampling": {"interval_s": 0.2},
    "coordinator": {"report_interval_s": 0.25, "reconnect_initial_s": 0.1, "reconnect_max_s": 0.5},
}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with labelled_cluster(tmp_path_factory.mktemp("emergency"), TOPOLOGY, AGENT_CONFIG, NODES,
                          COORDINATOR_ARGS, ("--sim-load", "busy"), GPUS) as c:
        yield c


def stub(c: Cluster) -> epb_grpc.EmergencyStub:
    return epb_grpc.EmergencyStub(c.coordinator.channel())


def node(agent: AgentProcess) -> pb.Node:
    return agent.stub().GetNode(pb.GetNodeRequest(), timeout=5)


def row_power_w(c: Cluster, row: str = "r1") -> float:
    return sum(node(a).budget.node_power_w for n, a in c.agents.items()
               if NODES[n]["row"] == row)


def emergency_ceilings(c: Cluster, only: tuple[str, ...] = ()
                        ) -> dict[str, dict[int, tuple[float, str]]]:
    out = {}
    for n, a in c.agents.items():
        if only and n not in only:
            continue
        out[n] = {g.index: (g.power_ceiling_w, g.power_ceiling_source) for g in node(a).gpus
                  if g.power_ceiling_source.startswith("emergency")}
    return out


def cli(c: Cluster, *args: str):
    return run_cli("shapectl", "--coordinator", c.coordinator.address, "emergency", *args)


def ready(c: Cluster) -> None:
    """Every node reported busy and acknowledged its pre-armed caps."""
    poll(lambda: stub(c).ListEmergencies(epb.ListEmergenciesRequest(), timeout=5)
         .prearmed_nodes == len(NODES), timeout_s=30)
    poll(lambda: row_power_w(c) > 0.9 * 2 * PEAK_W * 0.8, timeout_s=30)


def test_bad_input_is_refused_and_changes_nothing(cluster: Cluster) -> None:
    ready(cluster)
    with pytest.raises(grpc.RpcError) as err:
        stub(cluster).DeclareEmergency(epb.DeclareEmergencyRequest(
            scope="rack", name="k1", capacity_frac=0.5), timeout=5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "scope='rack'" in err.value.details() and "row, aisle, site" in err.value.details()
    for capacity in ("1.5", "0", "-0.2"):
        r = cli(cluster, "declare", "--row", "r1", "--capacity", capacity)
        assert r.returncode == 1 and "INVALID_ARGUMENT" in r.stderr, r.stderr
        assert "capacity_frac=" in r.stderr and "(0, 1]" in r.stderr
    r = cli(cluster, "declare", "--row", "nope", "--capacity", "0.75")
    assert r.returncode == 1 and "NOT_FOUND" in r.stderr and "name='nope'" in r.stderr
    r = cli(cluster, "clear", "no-such-id")
    assert r.returncode == 1 and "NOT_FOUND" in r.stderr and "emergency_id" in r.stderr
    listed = stub(cluster).ListEmergencies(epb.ListEmergenciesRequest(), timeout=5)
    assert list(listed.emergencies) == []
    assert all(not caps for caps in emergency_ceilings(cluster).values())


def test_row_emergency_brings_measured_power_under_the_new_limit(cluster: Cluster) -> None:
    before_w = row_power_w(cluster)
    new_limit_w = 0.75 * ROW_LIMIT_W
    assert before_w > new_limit_w  # the emergency has something to do
    r = cli(cluster, "declare", "--row", "r1", "--capacity", "0.75", "--source", "ups", "--json")
    assert r.returncode == 0, r.stderr
    declared = json.loads(r.stdout)
    assert declared["power_limit_w"] == pytest.approx(new_limit_w)
    eid = declared["emergency_id"]
    poll(lambda: row_power_w(cluster) <= new_limit_w, timeout_s=20)
    caps = emergency_ceilings(cluster)
    assert caps["n1"] and caps["n2"] and not caps["n3"]  # only row r1 is capped

    def shown() -> dict | None:
        s = json.loads(cli(cluster, "show", eid, "--json").stdout)
        kinds = [e["kind"] for e in s["timeline"]]
        return s if "under_limit" in kinds and "phase2" in kinds else None

    s = poll(shown, timeout_s=20)
    kinds = [e["kind"] for e in s["timeline"]]
    assert kinds[:3] == ["declared", "broadcast", "plan"]
    assert {e["node_id"] for e in s["timeline"] if e["kind"] == "caps_acked"} == {"n1", "n2"}
    assert s["nodes"] == 2 and s["nodes_acked"] == 2 and s["under_limit_s"] >= 0
    assert s["state"] == "active" and s["source"] == "ups"
    poll(lambda: row_power_w(cluster) <= new_limit_w, timeout_s=10)  # still, with Phase 2 clocks
    cluster.eid = eid  # type: ignore[attr-defined]


def test_clear_relaxes_in_steps_and_lifts_the_caps(cluster: Cluster) -> None:
    eid = cluster.eid  # type: ignore[attr-defined]
    r = cli(cluster, "clear", eid, "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["state"] == "clearing"
    r = cli(cluster, "clear", eid)  # a second clear: refused, nothing changes
    assert r.returncode == 1 and "FAILED_PRECONDITION" in r.stderr

    def cleared() -> dict | None:
        s = json.loads(cli(cluster, "show", eid, "--json").stdout)
        return s if s["state"] == "cleared" else None

    s = poll(cleared, timeout_s=30)
    events = s["timeline"]
    steps = [e["detail"]["step"] for e in events if e["kind"] == "relax_step"]
    assert steps == [1, 2]  # 3 steps: two relaxations, then lifted
    issued = [e for e in events if e["kind"] == "caps_issued" and e["node_id"] == "n1"]
    totals = [sum(e["detail"]["caps_w"].values()) for e in issued if e["detail"]["caps_w"]]
    assert len(totals) >= 3 and totals == sorted(totals)  # caps only go up while clearing
    assert {e["node_id"] for e in events if e["kind"] == "caps_lifted"} == {"n1", "n2"}
    poll(lambda: all(not caps for caps in emergency_ceilings(cluster).values()), timeout_s=10)
    for g in node(cluster.agents["n1"]).gpus:
        assert g.power_limit_w == pytest.approx(g.power_limit_max_w)
        assert not g.clock_lock.max_mhz  # Phase 2 clock locks reset


def test_coordinator_killed_after_declaration_agents_apply_prearmed_caps(
        cluster: Cluster) -> None:
    poll(lambda: row_power_w(cluster) > 0.75 * ROW_LIMIT_W, timeout_s=20)
    stub(cluster).DeclareEmergency(epb.DeclareEmergencyRequest(
        scope="row", name="r1", capacity_frac=0.75, source="ups"), timeout=5)
    cluster.coordinator.stop(signal.SIGKILL)

    # Each r1 agent lost its link during the emergency and applied its pre-armed caps itself.
    # Its own caps may have arrived just before the kill (the declaration waits until they are
    # written); the effective ceiling is the lower of the two, so either source may show.
    def fallback() -> bool:
        caps = emergency_ceilings(cluster)
        applied = all("pre-armed emergency caps applied" in cluster.agents[n].log_text()
                      for n in ("n1", "n2"))
        return applied and all(len(caps[n]) == 2 for n in ("n1", "n2"))

    poll(fallback, timeout_s=10)
    poll(lambda: row_power_w(cluster) <= 0.75 * ROW_LIMIT_W, timeout_s=20)
    assert not emergency_ceilings(cluster)["n3"]


def test_restarted_coordinator_resumes_the_emergency_and_clears_it(cluster: Cluster) -> None:
    """After the kill above: a new coordinator on the same database still has the emergency
    in force (nothing forgotten), re-issues caps from what the agents report, and clears it."""
    cluster.coordinator = start_coordinator(cluster.workdir, cluster.port, *COORDINATOR_ARGS)
    listed = stub(cluster).ListEmergencies(epb.ListEmergenciesRequest(), timeout=5).emergencies
    (em,) = [e for e in listed if e.state == "active"]
    assert em.scope == "row" and em.name == "r1" and em.capacity_frac == pytest.approx(0.75)
    poll(lambda: stub(cluster).GetEmergency(epb.GetEmergencyRequest(
        emergency_id=em.emergency_id), timeout=5).nodes_acked == 2, timeout_s=20)
    assert row_power_w(cluster) <= 0.75 * ROW_LIMIT_W  # never released in between
    r = cli(cluster, "clear", em.emergency_id)
    assert r.returncode == 0, r.stderr
    poll(lambda: all(not caps for caps in emergency_ceilings(cluster).values()), timeout_s=20)


def test_stopped_node_does_not_delay_the_fan_out(cluster: Cluster) -> None:
    """n2 is SIGSTOPped (alive, silent): declaring on its row still answers at once and n1 is
    capped within the deadline; n2 applies its caps when it runs again."""
    ready(cluster)
    cluster.agents["n2"].proc.send_signal(signal.SIGSTOP)
    try:
        started = time.monotonic()
        declared = stub(cluster).DeclareEmergency(epb.DeclareEmergencyRequest(
            scope="row", name="r1", capacity_frac=0.75, source="ups"), timeout=10)
        answered_s = time.monotonic() - started
        poll(lambda: emergency_ceilings(cluster, only=("n1",))["n1"], timeout_s=2,
             interval_s=0.05)
        capped_s = time.monotonic() - started
    finally:
        cluster.agents["n2"].proc.send_signal(signal.SIGCONT)
    assert answered_s < 1.0 and capped_s < 2.0, (answered_s, capped_s)
    poll(lambda: emergency_ceilings(cluster)["n2"], timeout_s=20)
    assert cli(cluster, "clear", declared.emergency_id).returncode == 0
    poll(lambda: all(not caps for caps in emergency_ceilings(cluster).values()), timeout_s=20)
