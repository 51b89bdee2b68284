"""The rebalance loop end to end: coordinator + two sim agents running the fake engine.

An endpoint runs wastefully (TP2 on two GPUs for a demand one GPU serves); `plan propose`
reshapes it with reasons, `plan apply` executes it over the nodes' streams, and the reports then
show fewer GPUs in use. Routing gives a not-READY instance zero weight (gRPC and HTTP).
"""

from __future__ import annotations

import json
import signal
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.conftest import AgentProcess, free_port, poll, run_cli, start_agent
from tests.fakes.engine_harness import (
    fast_agent_config,
    kill_fake_engines,
    make_model_dir,
)
from tests.integration.coordinator_proc import CoordinatorProcess, start_coordinator

TOPOLOGY = {
    "version": 1,
    "sites": [{
        "name": "s1",
        "aisles": [{"name": "a1", "aisle_airflow_cfm": 5000}],
        "rows": [{"name": "r1", "row_power_limit_w": 20000,
                  "racks": [{"name": "k1", "aisle": "a1"}]}],
    }],
}
HEADER = ("gpu_type,model,tensor_parallel,quantization,mig_profile,sm_clock_mhz,power_limit_w,"
          "query_class,msrr_rps,slo_p95_s,p95_latency_s,p99_latency_s,ttft_p95_s,throughput_rps,"
          "throughput_tok_s,avg_power_w,energy_per_token_j,memory_gb,max_concurrency,source,"
          "provenance")
PROFILES = [  # the fake model: TP1 serves 10 req/s at the SLO, TP2 12 req/s on two GPUs
    "h100-80gb,tiny,1,none,full,,,LISO,10,20,,,,,,400,,10,,measured,test",
    "h100-80gb,tiny,2,none,full,,,LISO,12,20,,,,,,800,,10,,measured,test",
]


@dataclass
class Cluster:
    coordinator: CoordinatorProcess
    agents: dict[str, AgentProcess]
    model: Path
    routes_port: int

    @property
    def via(self) -> tuple[str, str]:
        return ("--coordinator", self.coordinator.address)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    (tmp_path / "topology.yaml").write_text(yaml.safe_dump(TOPOLOGY))
    (tmp_path / "profiles.csv").write_text("\n".join([HEADER, *PROFILES]) + "\n")
    (tmp_path / "agent.yaml").write_text(yaml.safe_dump(fast_agent_config()))
    routes_port = free_port()
    coordinator = start_coordinator(
        tmp_path, free_port(), "--profiles", str(tmp_path / "profiles.csv"),
        "--rebalance-hysteresis-s", "0", "--rebalance-interval-s", "3600",
        "--rebalance-verify-timeout-s", "30", "--routes-listen", f"127.0.0.1:{routes_port}")
    agents: dict[str, AgentProcess] = {}
    try:
        for node in ("n1", "n2"):
            agents[node] = start_agent(
                tmp_path / node, "--config", str(tmp_path / "agent.yaml"), "--node-id", node,
                "--coordinator", coordinator.address,
                "--labels", "site=s1,row=r1,aisle=a1,rack=k1", sim_gpus=2)
        c = Cluster(coordinator, agents, make_model_dir(tmp_path / "model"), routes_port)
        yield c
        coordinator = c.coordinator  # a test may have replaced it
    finally:
        for agent in agents.values():
            agent.stop(signal.SIGTERM)
        coordinator.stop(signal.SIGKILL)
        kill_fake_engines(tmp_path / "model")  # engines outlive their agents by design


def _cli(*args: str, timeout_s: float = 30.0) -> str:
    out = run_cli("shapectl", *args, timeout_s=timeout_s)
    assert out.returncode == 0, out.stderr
    return out.stdout


def _instances(c: Cluster, node: str) -> list[dict]:
    return json.loads(_cli(*c.via, "instance", "list", "--node", node, "--json"))["instances"]


def _live(c: Cluster, endpoint: str) -> list[tuple[str, dict]]:
    return [(n, i) for n in c.agents for i in _instances(c, n)
            if i["spec"]["endpoint"] == endpoint and i["state"] != "STOPPED"]


def _refused(*args: str) -> str:
    out = run_cli("shapectl", *args)
    assert out.returncode != 0
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    return out.stderr


@pytest.mark.slow
def test_plan_reshapes_onto_fewer_gpus_and_routes_skip_unready(cluster: Cluster) -> None:
    c = cluster
    _cli("--agent", c.agents["n1"].address, "instance", "start", "tiny-a", "--endpoint", "tiny",
         "--model", str(c.model), "--devices", "0,1", "--tp", "2", "--max-num-seqs", "4")
    _cli("--agent", c.agents["n2"].address, "instance", "start", "slow-1", "--endpoint", "slow",
         "--model", str(c.model), "--devices", "1", "--tp", "1",
         "--env", "FAKE_VLLM_STARTUP_S=600")  # stays STARTING: not routable
    _cli(*c.via, "endpoint", "set", "tiny", "--model", "tiny", "--model-path", str(c.model),
         "--slo-p95", "20", "--demand-rps", "3", "--query-class", "LISO")

    # Bad input: one line naming the field and range; nothing changed.
    assert "slo_p95_s" in _refused(*c.via, "endpoint", "set", "bad", "--model", "tiny",
                                   "--slo-p95", "-1")
    assert "priority_class" in _refused(*c.via, "place", "--gpus", "1", "--class", "vip")
    assert "gpus" in _refused(*c.via, "place", "--gpus", "0", "--class", "iaas")
    assert "mode" in _refused(*c.via, "plan", "mode", "sometimes")
    assert "plan_id" in _refused(*c.via, "plan", "apply", "nosuchplan")
    names = [e["name"] for e in json.loads(_cli(*c.via, "endpoint", "list", "--json"))["endpoints"]]
    assert names == ["tiny"]
    assert json.loads(_cli(*c.via, "plan", "mode", "--json"))["mode"] == "propose"

    poll(lambda: [i for _, i in _live(c, "tiny") if i["state"] == "READY"], timeout_s=20)
    plan = json.loads(_cli(*c.via, "plan", "propose", "--json"))
    assert plan["state"] == "proposed" and plan["gpus_after"] < plan["gpus_before"], plan
    actions = [a for s in plan["stages"] for a in s["actions"]]
    kinds = sorted(a["kind"] for a in actions)
    assert kinds == ["start_instance", "stop_instance"], actions
    assert all(a["reason"] for a in actions)
    start = next(a for a in actions if a["kind"] == "start_instance")
    assert "TP1" in start["config"] and len(start["gpu_indices"]) == 1
    shown = json.loads(_cli(*c.via, "plan", "show", "--json"))
    assert shown["plan_id"] == plan["plan_id"]
    diff = _cli(*c.via, "plan", "diff", plan["plan_id"])
    assert "- [stage" in diff and "tiny-a" in diff and "+ [stage" in diff

    applied = json.loads(_cli(*c.via, "plan", "apply", plan["plan_id"], "--wait", "--json",
                              timeout_s=60))
    assert applied["state"] == "applied", applied
    assert all(a["state"] == "done" for s in applied["stages"] for a in s["actions"])

    live = _live(c, "tiny")
    assert [(n, i["spec"]["instance_id"]) for n, i in live] == [
        (start["node_id"], start["instance_id"])]
    inst = live[0][1]
    assert inst["state"] == "READY" and inst["spec"]["tensor_parallel_size"] == 1
    assert inst["spec"]["max_num_seqs"] == 4  # engine settings carried over from tiny-a
    assert len(inst["spec"]["devices"]) == 1  # 1 GPU instead of 2
    assert "applied" in _refused(*c.via, "plan", "apply", plan["plan_id"])  # not twice
    audit = json.loads(_cli(*c.via, "audit", "--json"))["entries"]
    assert {e["action"] for e in audit if e["actor"].startswith("rebalancer:")} >= {
        "start_instance", "stop_instance"}

    weights = json.loads(_cli(*c.via, "routes", "slow", "--json"))["weights"]
    assert [(w["instance_id"], w["weight"]) for w in weights] == [("slow-1", 0.0)]
    assert "not ready" in weights[0]["reason"]
    weights = json.loads(_cli(*c.via, "routes", "tiny", "--json"))["weights"]
    assert [(w["instance_id"], w["weight"]) for w in weights] == [(start["instance_id"], 1.0)]
    with urllib.request.urlopen(f"http://127.0.0.1:{c.routes_port}/routes/slow") as resp:
        body = json.loads(resp.read())
    assert body["weights"][0]["weight"] == 0.0 and body["weights"][0]["instance_id"] == "slow-1"
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"http://127.0.0.1:{c.routes_port}/routes/nosuch")
    assert err.value.code == 404

    ranked = json.loads(_cli(*c.via, "place", "--json", "--gpus", "1", "--class", "iaas",
                             "--power-w", "500"))
    assert ranked["workload"] == "opaque"
    assert {n["node_id"] for n in ranked["nodes"]} == {"n1"}  # n2's GPUs are both taken


@pytest.mark.slow
def test_coordinator_killed_mid_plan_resumes_without_repeating(cluster: Cluster,
                                                               tmp_path: Path) -> None:
    """SIGKILL the coordinator while a stage waits for its new instance to turn READY; a new
    coordinator on the same database resumes the plan from its journal: the start already
    answered is not sent again, and the rest of the plan runs."""
    c = cluster
    _cli("--agent", c.agents["n1"].address, "instance", "start", "tiny-a", "--endpoint", "tiny",
         "--model", str(c.model), "--devices", "0,1", "--tp", "2",
         "--env", "FAKE_VLLM_STARTUP_S=8")  # the plan's new instance inherits the slow start
    _cli(*c.via, "endpoint", "set", "tiny", "--model", "tiny", "--model-path", str(c.model),
         "--slo-p95", "20", "--demand-rps", "3", "--query-class", "LISO")
    poll(lambda: [i for _, i in _live(c, "tiny") if i["state"] == "READY"], timeout_s=30)
    plan = json.loads(_cli(*c.via, "plan", "propose", "--json"))
    start = next(a for s in plan["stages"] for a in s["actions"] if a["kind"] == "start_instance")
    _cli(*c.via, "plan", "apply", plan["plan_id"])

    def started() -> bool:  # the agent answered the start: the instance is STARTING
        audit = json.loads(_cli(*c.via, "audit", "--json"))["entries"]
        return any(e["action"] == "start_instance" and e["ok"] for e in audit)

    poll(started, timeout_s=20, interval_s=0.1)
    c.coordinator.stop(signal.SIGKILL)
    on_node = json.loads(_cli("--agent", c.agents[start["node_id"]].address, "instance", "list",
                              "--json"))["instances"]
    assert [i["state"] for i in on_node if i["spec"]["instance_id"] == start["instance_id"]] == [
        "STARTING"]  # killed before the stage was verified

    c.coordinator = start_coordinator(
        tmp_path, int(c.coordinator.address.rsplit(":", 1)[1]),
        "--profiles", str(tmp_path / "profiles.csv"), "--rebalance-hysteresis-s", "0",
        "--rebalance-interval-s", "3600", "--rebalance-verify-timeout-s", "30")

    def finished() -> dict | None:
        doc = json.loads(_cli(*c.via, "plan", "show", plan["plan_id"], "--json"))
        return doc if doc["state"] not in ("applying", "proposed") else None

    resumed = poll(finished, timeout_s=60, interval_s=0.3)
    assert resumed["state"] == "applied", resumed
    assert resumed["epoch"] > plan["epoch"]  # adopted by the new coordinator's epoch
    assert any("resumed" in w for w in resumed["warnings"]), resumed["warnings"]
    audit = json.loads(_cli(*c.via, "audit", "--json", "--limit", "500"))["entries"]
    starts = [e for e in audit if e["action"] == "start_instance" and e["ok"]]
    assert len(starts) == 1, starts  # applied once, by the first coordinator
    assert any(e["action"] == "ResumePlan" for e in audit)
    live = _live(c, "tiny")
    assert [(n, i["spec"]["instance_id"], i["state"], i["restarts"]) for n, i in live] == [
        (start["node_id"], start["instance_id"], "READY", 0)]
