"""The live loop locks clocks through a plan: coordinator in auto mode + one sim agent running the
fake engine over gRPC on localhost.

An endpoint's one TP1 instance serves 10 req/s at the maximum clock; its demand is 2 req/s, so the
loop's plan (with only a clock stage) locks the instance's GPU at a lower clock, applies it and
verifies it from the reports; the agent's own API then shows the lock on that GPU and the other
GPU unlocked.
"""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from shapeshifter.api.v1 import agent_pb2
from shapeshifter.hw.models import GPU_MODELS
from tests.conftest import AgentProcess, free_port, poll, run_cli, start_agent
from tests.fakes.engine_harness import (
    fast_agent_config,
    kill_fake_engines,
    make_model_dir,
)
from tests.integration.coordinator_proc import CoordinatorProcess, start_coordinator
from tests.integration.test_rebalance_loop import HEADER, PROFILES, TOPOLOGY

MAX_MHZ = GPU_MODELS["h100-80gb"].sm_max_clock_mhz


@pytest.fixture
def auto_cluster(tmp_path: Path) -> Iterator[tuple[CoordinatorProcess, AgentProcess, Path]]:
    (tmp_path / "topology.yaml").write_text(yaml.safe_dump(TOPOLOGY))
    (tmp_path / "profiles.csv").write_text("\n".join([HEADER, *PROFILES]) + "\n")
    (tmp_path / "agent.yaml").write_text(yaml.safe_dump(fast_agent_config()))
    coordinator = start_coordinator(
        tmp_path, free_port(), "--profiles", str(tmp_path / "profiles.csv"),
        "--rebalance-mode", "auto", "--rebalance-interval-s", "1", "--demand-sample-s", "0.2",
        "--rebalance-verify-timeout-s", "20")
    agent = None
    try:
        agent = start_agent(tmp_path / "n1", "--config", str(tmp_path / "agent.yaml"),
                            "--node-id", "n1", "--coordinator", coordinator.address,
                            "--labels", "site=s1,row=r1,aisle=a1,rack=k1", sim_gpus=2)
        yield coordinator, agent, make_model_dir(tmp_path / "model")
    finally:
        if agent is not None:
            agent.stop(signal.SIGTERM)
        coordinator.stop(signal.SIGKILL)
        kill_fake_engines(tmp_path / "model")


def _cli(*args: str) -> Any:
    out = run_cli("shapectl", *args)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout) if "--json" in args else out.stdout


def _gpu(agent: AgentProcess, index: int) -> agent_pb2.Gpu:
    node = agent.stub().GetNode(agent_pb2.GetNodeRequest(), timeout=5)
    return next(g for g in node.gpus if g.index == index)


def _clock_plan(coordinator: CoordinatorProcess) -> dict[str, Any] | None:
    for p in _cli("--coordinator", coordinator.address, "plan", "list", "--json").get("plans", []):
        doc = _cli("--coordinator", coordinator.address, "plan", "show", p["plan_id"], "--json")
        kinds = {a["kind"] for s in doc.get("stages", []) for a in s.get("actions", [])}
        if "lock_clocks" in kinds and doc["state"] in ("applied", "failed", "paused"):
            return doc
    return None


@pytest.mark.slow
def test_auto_loop_locks_the_endpoints_gpu_clock_through_a_plan(
        auto_cluster: tuple[CoordinatorProcess, AgentProcess, Path]) -> None:
    coordinator, agent, model = auto_cluster
    via = ("--coordinator", coordinator.address)
    _cli("--agent", agent.address, "instance", "start", "tiny-a", "--endpoint", "tiny",
         "--model", str(model), "--devices", "0", "--tp", "1")
    poll(lambda: [i for i in agent.stub().ListInstances(
        agent_pb2.ListInstancesRequest(), timeout=5).instances if i.state == "READY"],
        timeout_s=20)
    _cli(*via, "endpoint", "set", "tiny", "--model", "tiny", "--model-path", str(model),
         "--slo-p95", "20", "--demand-rps", "2", "--query-class", "LISO")

    doc = poll(lambda: _clock_plan(coordinator), timeout_s=20, interval_s=0.5)
    assert isinstance(doc, dict)
    assert doc["state"] == "applied", doc
    assert doc["trigger"] == "loop"
    (action,) = [a for s in doc["stages"] for a in s["actions"]]
    assert (action["kind"], action["node_id"], action["gpu_indices"], action["instance_id"]) == (
        "lock_clocks", "n1", [0], "tiny-a")
    assert action["state"] == "done"
    mhz = action["sm_clock_mhz"]
    assert 0 < mhz < MAX_MHZ

    locked = _gpu(agent, 0)  # the agent's own view: the lock it holds, the clock it runs at
    assert locked.HasField("clock_lock") and locked.clock_lock.max_mhz == mhz
    assert locked.sm_clock_mhz <= mhz
    assert not _gpu(agent, 1).HasField("clock_lock")  # no instance there: left alone
    audit = _cli(*via, "audit", "--json")["entries"]
    assert any(e["action"] == "lock_clocks" and e["ok"] and e["actor"].startswith("rebalancer:")
               for e in audit)
