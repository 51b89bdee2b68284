"""`shapectl instance start|list|reconfigure|stop`, straight to an agent and through the
coordinator, against a real nodeagent process (sim backend) running the fake engine."""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.conftest import AgentProcess, free_port, poll, run_cli, start_agent
from tests.fakes.engine_harness import fast_agent_config, make_model_dir
from tests.integration.coordinator_proc import CoordinatorProcess, start_coordinator

TOPOLOGY = {
    "version": 1,
    "sites": [{
        "name": "s1",
        "aisles": [{"name": "a1", "aisle_airflow_cfm": 900}],
        "rows": [{"name": "r1", "row_power_limit_w": 4000,
                  "racks": [{"name": "k1", "aisle": "a1"}]}],
    }],
}


@dataclass
class Setup:
    coordinator: CoordinatorProcess
    agent: AgentProcess
    model: Path


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[Setup]:
    (tmp_path / "topology.yaml").write_text(yaml.safe_dump(TOPOLOGY))
    (tmp_path / "agent.yaml").write_text(yaml.safe_dump(fast_agent_config()))
    coordinator = start_coordinator(tmp_path, free_port())
    agent = None
    try:
        agent = start_agent(tmp_path / "n1", "--config", str(tmp_path / "agent.yaml"),
                            "--node-id", "n1", "--coordinator", coordinator.address,
                            "--labels", "site=s1,row=r1,aisle=a1,rack=k1", sim_gpus=2)
        yield Setup(coordinator, agent, make_model_dir(tmp_path / "model"))
    finally:
        if agent is not None:
            agent.stop(signal.SIGTERM)
        coordinator.stop(signal.SIGKILL)


def _list(*target: str) -> list[dict]:
    out = run_cli("shapectl", *target, "instance", "list", "--json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)["instances"]


def _ready(*target: str, iid: str = "e1") -> dict | None:
    found = [i for i in _list(*target) if i["spec"]["instance_id"] == iid]
    return found[0] if found and found[0]["state"] == "READY" else None


@pytest.mark.slow
def test_instance_commands_direct_and_through_the_coordinator(setup: Setup) -> None:
    direct = ("--agent", setup.agent.address)
    via = ("--coordinator", setup.coordinator.address)
    out = run_cli("shapectl", *direct, "instance", "start", "e1", "--endpoint", "tiny",
                  "--model", str(setup.model), "--devices", "0", "--tp", "1",
                  "--max-num-seqs", "4")
    assert out.returncode == 0, out.stderr
    assert "e1: STARTING" in out.stdout
    first = poll(lambda: _ready(*direct))
    assert first["spec"]["max_num_seqs"] == 4

    # Through the coordinator: listed from the node's report, changed over the node's stream.
    poll(lambda: _ready_via(via))
    out = run_cli("shapectl", *via, "instance", "reconfigure", "e1", "--node", "n1",
                  "--max-num-seqs", "8", timeout_s=90)
    assert out.returncode == 0, out.stderr
    after = poll(lambda: _ready(*direct))
    assert after["spec"]["max_num_seqs"] == 8
    assert after["spec"]["devices"] == ["0"] and after["spec"]["endpoint"] == "tiny"
    assert after["pid"] != first["pid"]
    audit = run_cli("shapectl", *via, "audit", "--node", "n1", "--json")
    assert audit.returncode == 0, audit.stderr
    entry = json.loads(audit.stdout)["entries"][0]
    assert entry["action"] == "reconfigure_instance" and entry["ok"]
    assert entry["actor"].startswith("shapectl:")

    out = run_cli("shapectl", *via, "instance", "stop", "e2", "--node", "n1")
    assert out.returncode != 0
    assert "instance_id" in out.stderr and "e1" in out.stderr
    out = run_cli("shapectl", *via, "instance", "stop", "e1", "--node", "n1", timeout_s=60)
    assert out.returncode == 0, out.stderr
    assert poll(lambda: [i for i in _list(*direct) if i["state"] != "STOPPED"] == [])


def _ready_via(via: tuple[str, str]) -> dict | None:
    out = run_cli("shapectl", *via, "instance", "list", "--node", "n1", "--json")
    assert out.returncode == 0, out.stderr
    found = [i for i in json.loads(out.stdout)["instances"] if i["state"] == "READY"]
    return found[0] if found else None


def test_bad_spec_is_refused_naming_the_field(setup: Setup) -> None:
    direct = ("--agent", setup.agent.address)
    out = run_cli("shapectl", *direct, "instance", "start", "e1", "--endpoint", "tiny",
                  "--model", str(setup.model),
                  "--devices", "0,1", "--tp", "1")
    assert out.returncode != 0
    assert "tensor_parallel_size" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    assert _list(*direct) == []
