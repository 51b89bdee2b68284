"""Scale-in through the rebalance loop, with the fake engine and with the real vLLM CPU build.

Two TP1 instances of one endpoint run on two GPUs for a demand one of them serves (the profile
says 10 req/s per GPU; demand 3 req/s). `plan propose` keeps one and stops the other, `plan
apply` drains and stops it over the node's stream, and afterwards one GPU serves the endpoint:
the reports show one READY instance, and a completion on it succeeds.
"""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import AgentProcess, free_port, poll, run_cli, start_agent
from tests.fakes.engine_harness import fake_launcher, make_model_dir, post_json
from tests.integration.coordinator_proc import CoordinatorProcess, start_coordinator
from tests.integration.test_rebalance_loop import HEADER, TOPOLOGY
from tests.integration.test_vllm_engine import ENGINE_ENV, READY_TIMEOUT_S, _engine_paths

PROFILES = ["h100-80gb,tiny,1,none,full,,,LISO,10,20,,,,,,400,,10,,measured,test"]


@dataclass
class Setup:
    coordinator: CoordinatorProcess
    agent: AgentProcess
    model: str
    ready_timeout_s: float


def _fake_engines(tmp: Path) -> tuple[dict[str, Any], str, float]:
    engines = {"launcher": list(fake_launcher()), "health_interval_s": 0.1,
               "shutdown_timeout_s": 5, "kill_grace_s": 2}
    return engines, str(make_model_dir(tmp / "model")), 20.0


def _vllm_engines(tmp: Path) -> tuple[dict[str, Any], str, float]:
    python, model = _engine_paths()
    engines = {"python": python, "env": ENGINE_ENV, "health_interval_s": 0.5,
               "ready_timeout_s": READY_TIMEOUT_S, "shutdown_timeout_s": 30, "kill_grace_s": 10}
    return engines, model, READY_TIMEOUT_S


@pytest.fixture(params=[pytest.param(_fake_engines, id="fake", marks=pytest.mark.slow),
                        pytest.param(_vllm_engines, id="vllm", marks=pytest.mark.vllm)])
def setup(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Setup]:
    engines, model, ready_timeout_s = request.param(tmp_path)
    (tmp_path / "topology.yaml").write_text(yaml.safe_dump(TOPOLOGY))
    (tmp_path / "profiles.csv").write_text("\n".join([HEADER, *PROFILES]) + "\n")
    (tmp_path / "agent.yaml").write_text(yaml.safe_dump({
        "version": 1, "sampling": {"interval_s": 0.25},
        "coordinator": {"report_interval_s": 0.25, "reconnect_initial_s": 0.1},
        "engines": {**engines, "stop_on_exit": True}}))  # no engine outlives the test
    coordinator = start_coordinator(
        tmp_path, free_port(), "--profiles", str(tmp_path / "profiles.csv"),
        "--rebalance-hysteresis-s", "0", "--rebalance-interval-s", "3600",
        "--rebalance-verify-timeout-s", "120", "--instance-action-timeout-s", "300")
    agent = None
    try:
        agent = start_agent(tmp_path / "n1", "--config", str(tmp_path / "agent.yaml"),
                            "--node-id", "n1", "--coordinator", coordinator.address,
                            "--labels", "site=s1,row=r1,aisle=a1,rack=k1", sim_gpus=2)
        yield Setup(coordinator, agent, model, ready_timeout_s)
    finally:
        if agent is not None:
            agent.stop(signal.SIGTERM, timeout_s=120)
        coordinator.stop(signal.SIGKILL)


def _cli(*args: str, timeout_s: float = 30.0) -> str:
    out = run_cli("shapectl", *args, timeout_s=timeout_s)
    assert out.returncode == 0, out.stderr
    return out.stdout


def _serving(s: Setup) -> list[dict]:
    listed = json.loads(_cli("--agent", s.agent.address, "instance", "list", "--json"))
    return [i for i in listed["instances"] if i["state"] != "STOPPED"]


def test_plan_scales_in_onto_one_gpu(setup: Setup) -> None:
    s, via = setup, ("--coordinator", setup.coordinator.address)
    for iid, device in (("tiny-a", "0"), ("tiny-b", "1")):
        _cli("--agent", s.agent.address, "instance", "start", iid, "--endpoint", "tiny",
             "--model", s.model, "--devices", device, "--tp", "1", "--max-num-seqs", "4",
             "--max-model-len", "256")
    poll(lambda: sum(i["state"] == "READY" for i in _serving(s)) == 2,
         timeout_s=s.ready_timeout_s, interval_s=0.5)
    _cli(*via, "endpoint", "set", "tiny", "--model", "tiny", "--model-path", s.model,
         "--slo-p95", "20", "--demand-rps", "3", "--query-class", "LISO")

    plan = json.loads(_cli(*via, "plan", "propose", "--json"))
    assert (plan["gpus_before"], plan["gpus_after"]) == (2, 1), plan
    actions = [a for stage in plan["stages"] for a in stage["actions"]]
    assert [a["kind"] for a in actions] == ["stop_instance"], actions
    assert actions[0]["reason"]
    stopped = actions[0]["instance_id"]

    applied = json.loads(_cli(*via, "plan", "apply", plan["plan_id"], "--wait", "--json",
                              timeout_s=s.ready_timeout_s))
    assert applied["state"] == "applied", applied
    serving = _serving(s)
    assert [i["spec"]["instance_id"] for i in serving] == [
        iid for iid in ("tiny-a", "tiny-b") if iid != stopped]
    kept = serving[0]
    assert kept["state"] == "READY"
    reply = post_json(kept["spec"]["port"], "/v1/completions",
                      {"model": "tiny", "prompt": "hello", "max_tokens": 4}, timeout_s=120)
    assert reply["choices"][0]["text"] is not None
