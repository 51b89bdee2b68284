"""A highly available coordinator over real processes: a 3-member etcd, two coordinator replicas
(`--state etcd`) and three busy sim agents given both replica addresses.

Tests run in file order on one cluster: bad flags are refused; one replica leads and the other
points at it; the leader killed in steady state is replaced without the agents falling back to
their fail-safe caps; killed during an emergency, the new leader keeps the emergency in force and
clears it; a SIGSTOPped leader is replaced, its plans are refused by the agents, and it exits as
soon as it runs again.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
import yaml

from shapeshifter.api.v1 import agent_pb2 as pb
from shapeshifter.api.v1 import coordinator_pb2 as cpb
from shapeshifter.api.v1 import emergency_pb2 as epb
from shapeshifter.api.v1 import emergency_pb2_grpc as epb_grpc
from tests.conftest import AgentProcess, console_script, free_port, poll, run_cli, start_agent
from tests.etcd_cluster import EtcdCluster, etcd_binary
from tests.integration.coordinator_proc import CoordinatorProcess
from tests.integration.test_emergency import AGENT_CONFIG, NODES, ROW_LIMIT_W, TOPOLOGY

pytestmark = pytest.mark.skipif(
    etcd_binary() is None,
    reason="etcd is not installed (Debian: apt-get install etcd-server); HA tests skipped")

LEADER_TTL_S = 2
AGENT_LEASE_TTL_S = 15  # longer than a failover: agents must ride it out under normal caps
FAILSAFE_LOG = "lease expired: fail-safe caps applied"
REPLICA_ARGS = ("--lease-ttl-s", str(AGENT_LEASE_TTL_S), "--emergency-clear-step-s", "0.3",
                "--emergency-phase2-after-s", "1", "--emergency-prearm-interval-s", "1",
                "--persist-interval-s", "0.2", "--action-timeout-s", "5")


@dataclass
class Ha:
    workdir: Path
    etcd: EtcdCluster
    replicas: dict[str, CoordinatorProcess] = field(default_factory=dict)
    agents: dict[str, AgentProcess] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)

    def start_replica(self, name: str) -> CoordinatorProcess:
        address = f"127.0.0.1:{self.ports[name]}"
        log_path = self.workdir / f"{name}-{time.monotonic_ns()}.log"
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                [*console_script("coordinator"), "--listen", address,
                 "--topology", str(self.workdir / "topology.yaml"),
                 "--db", str(self.workdir / f"{name}.db"), "--state", "etcd",
                 "--etcd-endpoints", ",".join(self.etcd.endpoints), "--replica-id", name,
                 "--leader-ttl-s", str(LEADER_TTL_S), *REPLICA_ARGS],
                stdout=log, stderr=subprocess.STDOUT)
        rep = CoordinatorProcess(proc, address, log_path)
        self.replicas[name] = rep
        poll(lambda: proc.poll() is None and '"following"' in rep.log_text(), timeout_s=20)
        return rep

    def leader(self, skip: str = "") -> tuple[str, cpb.ClusterStatus]:
        """The replica that serves, with its view of the cluster (fails while none does).
        skip: a replica not to ask (a stopped one would only time out)."""
        for name, rep in self.replicas.items():
            if name == skip or rep.proc.poll() is not None:
                continue
            try:
                return name, rep.cluster()
            except grpc.RpcError as err:
                assert err.code() == grpc.StatusCode.UNAVAILABLE, err
        raise AssertionError("no replica serves")

    def wait_leader(self, timeout_s: float = 20.0, other_than: str = "",
                    nodes_up: int = len(NODES)) -> tuple[str, cpb.ClusterStatus]:
        seen: list[str] = ["no replica served"]

        def serving() -> tuple[str, cpb.ClusterStatus] | None:
            try:
                name, status = self.leader(skip=other_than)
            except AssertionError:
                return None
            seen[0] = f"{name} serves, nodes " + ", ".join(
                f"{n.name}={n.state}" for n in status.nodes)
            up = sum(n.state == "up" for n in status.nodes)
            return (name, status) if name != other_than and up == nodes_up else None

        try:
            return poll(serving, timeout_s=timeout_s, interval_s=0.1)  # type: ignore[return-value]
        except AssertionError as err:
            raise AssertionError(f"{err}; last seen: {seen[0]}\n{self.link_logs()}") from None

    def link_logs(self, lines: int = 6) -> str:
        """The agents' last link events, for a failure message (CI keeps no temp files)."""
        out = []
        for name, agent in self.agents.items():
            events = [line[:300] for line in agent.log_text().splitlines()
                      if "coordinator" in line]
            out.append(f"--- {name}\n" + "\n".join(events[-lines:]))
        return "\n".join(out)


@pytest.fixture(scope="module")
def ha(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ha]:
    workdir = tmp_path_factory.mktemp("ha")
    (workdir / "topology.yaml").write_text(yaml.safe_dump(TOPOLOGY))
    (workdir / "agent.yaml").write_text(yaml.safe_dump(AGENT_CONFIG))
    h = Ha(workdir, EtcdCluster(workdir / "etcd").start(3), ports={"c1": free_port(),
                                                                    "c2": free_port()})
    try:
        h.start_replica("c1")
        h.start_replica("c2")
        addresses = ",".join(f"127.0.0.1:{p}" for p in h.ports.values())
        for node_id, labels in NODES.items():
            h.agents[node_id] = start_agent(
                workdir / node_id, "--config", str(workdir / "agent.yaml"), "--node-id", node_id,
                "--coordinator", addresses, "--sim-load", "busy",
                "--labels", ",".join(f"{k}={v}" for k, v in labels.items()), sim_gpus=2)
        yield h
    finally:
        for a in h.agents.values():
            a.stop(signal.SIGKILL)
        for rep in h.replicas.values():
            if rep.proc.poll() is None:
                rep.stop(signal.SIGKILL)
        h.etcd.stop()


def emergencies(rep: CoordinatorProcess) -> epb_grpc.EmergencyStub:
    return epb_grpc.EmergencyStub(rep.channel())


def node(agent: AgentProcess) -> pb.Node:
    return agent.stub().GetNode(pb.GetNodeRequest(), timeout=5)


def row_power_w(h: Ha) -> float:
    return sum(node(a).budget.node_power_w for n, a in h.agents.items() if NODES[n]["row"] == "r1")


def emergency_capped(h: Ha) -> bool:
    return all(all(g.power_ceiling_source.startswith("emergency") for g in node(h.agents[n]).gpus)
               for n in ("n1", "n2"))


def no_failsafe(h: Ha) -> None:
    for n, a in h.agents.items():
        assert FAILSAFE_LOG not in a.log_text(), f"{n} fell back to its fail-safe caps"


def test_bad_ha_flags_are_refused(ha: Ha, tmp_path: Path) -> None:
    base = [*console_script("coordinator"), "--listen", "127.0.0.1:1", "--topology",
            str(ha.workdir / "topology.yaml"), "--db", str(tmp_path / "x.db"), "--state", "etcd"]
    for extra, words in (([], ("etcd_endpoints", "at least one")),
                         (["--etcd-endpoints", "ftp://x:1"], ("etcd_endpoints", "http://HOST")),
                         (["--etcd-endpoints", ha.etcd.endpoints[0], "--leader-ttl-s", "1"],
                          ("leader_ttl_s=1 s", "[2, 60] s")),
                         (["--etcd-endpoints", ha.etcd.endpoints[0], "--listen", "0.0.0.0:1",
                           "--insecure"],
                          ("advertise", "--advertise")),
                         (["--etcd-endpoints", "http://10.1.2.3:2379"],
                          ("etcd_endpoints='10.1.2.3:2379' is not a loopback", "--insecure")),
                         (["--etcd-endpoints", ha.etcd.endpoints[0], "--etcd-cert", "c.pem"],
                          ("etcd_cert", "--etcd-key")),
                         (["--etcd-endpoints", ha.etcd.endpoints[0], "--etcd-ca",
                           str(tmp_path / "missing.pem")],
                          ("etcd_ca: cannot load", "missing.pem"))):
        r = subprocess.run([*base, *extra], capture_output=True, text=True, timeout=30)
        assert r.returncode == 2, r.stderr
        assert all(w in r.stderr for w in words), r.stderr
    assert not (tmp_path / "x.db").exists()  # refused before anything was opened


def test_one_replica_leads_and_the_other_points_to_it(ha: Ha) -> None:
    leader, status = ha.wait_leader()
    follower = next(n for n in ha.replicas if n != leader)
    with pytest.raises(grpc.RpcError) as err:
        ha.replicas[follower].cluster()
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert f"the leader is at {ha.replicas[leader].address}" in err.value.details()
    assert dict(err.value.trailing_metadata())["shapeshifter-leader"] == \
        ha.replicas[leader].address
    assert status.epoch > 0
    # shapectl given both replicas finds the leader (listed first or second).
    for order in (list(ha.replicas.values()), list(ha.replicas.values())[::-1]):
        r = run_cli("shapectl", "--coordinator", ",".join(rep.address for rep in order),
                    "status", "--json")
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["epoch"] == status.epoch
    no_failsafe(ha)


def test_leader_killed_in_steady_state_is_replaced(ha: Ha) -> None:
    old, before = ha.wait_leader()
    ha.replicas[old].stop(signal.SIGKILL)
    killed_at = time.monotonic()
    new, after = ha.wait_leader(other_than=old)
    failover_s = time.monotonic() - killed_at
    assert after.epoch > before.epoch
    assert failover_s < LEADER_TTL_S + 8, failover_s
    time.sleep(1.0)
    no_failsafe(ha)  # the agents' leases outlived the failover
    ha.start_replica(old)  # back as a follower
    assert ha.leader()[0] == new


def test_leader_killed_during_an_emergency_keeps_it_in_force(ha: Ha) -> None:
    leader, _ = ha.wait_leader()
    poll(lambda: row_power_w(ha) > 0.75 * ROW_LIMIT_W, timeout_s=30)
    stub = emergencies(ha.replicas[leader])
    declared = stub.DeclareEmergency(epb.DeclareEmergencyRequest(
        scope="row", name="r1", capacity_frac=0.75, source="ups"), timeout=5)
    poll(lambda: emergency_capped(ha), timeout_s=10)
    ha.replicas[leader].stop(signal.SIGKILL)
    new, _ = ha.wait_leader(other_than=leader)
    shown = emergencies(ha.replicas[new]).GetEmergency(
        epb.GetEmergencyRequest(emergency_id=declared.emergency_id), timeout=5)
    assert shown.state == "active" and shown.power_limit_w == pytest.approx(0.75 * ROW_LIMIT_W)
    for _ in range(10):  # under the limit all along the failover and after it
        assert emergency_capped(ha)
        time.sleep(0.2)
    poll(lambda: row_power_w(ha) <= 0.75 * ROW_LIMIT_W, timeout_s=20)
    cleared = emergencies(ha.replicas[new]).ClearEmergency(
        epb.ClearEmergencyRequest(emergency_id=declared.emergency_id), timeout=5)
    assert cleared.state == "clearing"
    poll(lambda: not any(g.power_ceiling_source.startswith("emergency")
                         for a in ha.agents.values() for g in node(a).gpus), timeout_s=30)
    ha.start_replica(leader)


def test_stopped_leader_is_replaced_fenced_and_exits(ha: Ha) -> None:
    old, before = ha.wait_leader()
    ha.replicas[old].proc.send_signal(signal.SIGSTOP)
    try:
        # A stopped leader keeps its TCP connections: agents notice only by its silence, one
        # lease TTL, then redial; the bound leaves that much again for a loaded CI machine.
        new, after = ha.wait_leader(other_than=old, timeout_s=2 * AGENT_LEASE_TTL_S + 10)
        assert after.epoch > before.epoch
        # The deposed leader's plan (its epoch) is refused by every agent: they saw the new one.
        for a in ha.agents.values():
            plan = pb.ApplyPlanRequest(plan=pb.Plan(plan_id="late", epoch=before.epoch, actions=[
                pb.Action(action_id="late-1", set_power_limit=pb.SetPowerLimitRequest(
                    gpu_index=0, power_limit_w=300))]))
            with pytest.raises(grpc.RpcError) as err:
                a.stub().ApplyPlan(plan, timeout=5)
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert f"older than the newest seen epoch {after.epoch}" in err.value.details()
    finally:
        ha.replicas[old].proc.send_signal(signal.SIGCONT)
    assert ha.replicas[old].proc.wait(LEADER_TTL_S + 15) == 3  # EXIT_LEADERSHIP_LOST
    assert "leadership_lost" in ha.replicas[old].log_text()
    assert ha.leader()[0] == new
