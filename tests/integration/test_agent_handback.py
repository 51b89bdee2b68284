"""`nodeagent --release` (the hand-back) as a real process: refused while the agent runs, while
an engine still serves or when restore_on_exit is false, changing nothing; and a second agent
cannot share a state dir."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import psutil

from shapeshifter.api.v1 import agent_pb2 as pb
from tests.conftest import console_script, start_agent

SIM = ("--backend", "sim", "--sim-gpus", "2", "--listen", "127.0.0.1:0", "--metrics-listen", "")


def release(state: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*console_script("nodeagent"), *SIM, "--state-dir", str(state), *args, "--release"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip


def requested(state: Path) -> dict:
    return json.loads((state / "journal.json").read_text())["requested"]


def capped_node(state: Path) -> None:
    """A stopped agent that left GPU 0 capped at 350 W."""
    agent = start_agent(state, sim_gpus=2)
    agent.stub().SetPowerLimit(pb.SetPowerLimitRequest(gpu_index=0, power_limit_w=350), timeout=5)
    assert agent.stop() == 0, agent.log_text()


def test_release_and_second_agent_refused_while_the_agent_runs(tmp_path: Path) -> None:
    state = tmp_path / "state"
    agent = start_agent(state, sim_gpus=2)
    try:
        agent.stub().SetPowerLimit(
            pb.SetPowerLimitRequest(gpu_index=0, power_limit_w=350), timeout=5
        )
        result = release(state)
        assert result.returncode == 3, result.stderr
        assert f"in use by another nodeagent (pid {agent.proc.pid})" in result.stderr
        assert requested(state)["0"]["power_limit_w"] == 350

        second = start_agent(state, sim_gpus=2, wait=False)
        assert second.proc.wait(20) == 1
        assert f"state dir {state} is in use" in second.log_text()
        assert agent.proc.poll() is None  # the first one is unharmed
    finally:
        assert agent.stop() == 0, agent.log_text()


def test_release_refused_while_an_engine_serves(tmp_path: Path) -> None:
    state = tmp_path / "state"
    capped_node(state)
    engine = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        proc = psutil.Process(engine.pid)
        (state / "engines.json").write_text(json.dumps({"llama-a": {
            "pid": engine.pid, "create_time": proc.create_time(), "command": proc.cmdline(),
        }}))  # fmt: skip
        result = release(state)
        assert result.returncode == 3, result.stderr
        assert f"engines still serving: llama-a (pid {engine.pid})" in result.stderr
        assert requested(state)["0"]["power_limit_w"] == 350
    finally:
        engine.kill()
        engine.wait()
    result = release(state)  # the engine is gone: the hand-back goes through
    assert result.returncode == 0, result.stderr
    assert requested(state) == {}


def test_release_refused_when_restore_on_exit_is_false(tmp_path: Path) -> None:
    state = tmp_path / "state"
    capped_node(state)
    config = tmp_path / "agent.yaml"
    config.write_text("version: 1\nrestore_on_exit: false\n")
    result = release(state, "--config", str(config))
    assert result.returncode == 2
    assert "restore_on_exit is false" in result.stderr
    assert requested(state)["0"]["power_limit_w"] == 350
