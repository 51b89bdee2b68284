"""Agent lifecycle as real processes: sd_notify, SIGTERM keeps the GPUs' settings (a restart
re-applies them; only `--release` hands the node back), kill -9 + journal, refusals to start
(bad config, corrupt journal, NVML missing, state dir in use)."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from shapeshifter.api.v1 import agent_pb2 as pb
from tests.conftest import AgentProcess, console_script, start_agent


@pytest.fixture
def notify_socket() -> Iterator[tuple[socket.socket, str]]:
    """A datagram socket the agent notifies (abstract name: no path-length limit)."""
    name = f"@shapeshifter-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(b"\0" + name[1:].encode())
    sock.settimeout(20.0)
    yield sock, name
    sock.close()


def receive_until(sock: socket.socket, wanted: str) -> list[str]:
    messages: list[str] = []
    while not any(wanted in m.split("\n") for m in messages):
        messages.append(sock.recv(4096).decode())
    return messages


def journal(state_dir: Path) -> dict:
    return json.loads((state_dir / "journal.json").read_text())


def gpu(agent: AgentProcess, index: int) -> pb.Gpu:
    return agent.stub().GetNode(pb.GetNodeRequest(), timeout=5).gpus[index]


def test_sd_notify_and_sigterm_keeps_settings_until_release(
    tmp_path: Path, notify_socket: tuple[socket.socket, str]
) -> None:
    sock, name = notify_socket
    env = {"NOTIFY_SOCKET": name, "WATCHDOG_USEC": "1000000"}
    agent = start_agent(tmp_path / "state", "--interval-s", "0.1", env=env, sim_gpus=4)
    messages = receive_until(sock, "READY=1")
    assert any("STATUS=serving" in m for m in messages)
    receive_until(sock, "WATCHDOG=1")
    receive_until(sock, "WATCHDOG=1")  # pinged repeatedly from the sampling loop

    stub = agent.stub()
    stub.SetPowerLimit(pb.SetPowerLimitRequest(gpu_index=0, power_limit_w=350), timeout=5)
    stub.LockClocks(pb.LockClocksRequest(gpu_index=1, min_mhz=900, max_mhz=1200), timeout=5)
    stub.SetMigMode(pb.SetMigModeRequest(gpu_index=2, enabled=True), timeout=5)
    stub.ApplyMigLayout(pb.ApplyMigLayoutRequest(gpu_index=2, profiles=["7g.80gb"]), timeout=5)
    requested = journal(agent.state_dir)["requested"]
    assert requested["0"]["power_limit_w"] == 350
    assert requested["1"]["clock_lock_mhz"] == [900, 1200]
    assert requested["2"]["mig_profiles"] == ["7g.80gb"]

    assert agent.stop(signal.SIGTERM) == 0, agent.log_text()
    receive_until(sock, "STOPPING=1")
    assert journal(agent.state_dir)["requested"] == requested  # a stop undoes nothing
    assert "restored gpu" not in agent.log_text()

    # The next agent (a fresh sim: the "driver" forgot) starts with the caps in force.
    again = start_agent(agent.state_dir, sim_gpus=4)
    assert gpu(again, 0).power_limit_w == 350
    assert (gpu(again, 1).clock_lock.min_mhz, gpu(again, 1).clock_lock.max_mhz) == (900, 1200)
    assert [m.profile for m in gpu(again, 2).mig_instances] == ["7g.80gb"]
    assert again.stop() == 0, again.log_text()

    result = run_agent(*SIM_ARGS, "--sim-gpus", "4", "--state-dir", str(agent.state_dir),
                       "--release")
    assert result.returncode == 0, result.stderr
    saved = journal(agent.state_dir)
    assert saved["requested"] == {}  # everything undone at the hand-back
    assert {d["power_limit_w"] for d in saved["defaults"].values()} == {700}
    restored = [json.loads(line) for line in result.stderr.splitlines() if "restored gpu" in line]
    assert sorted(r["gpu"] for r in restored) == [0, 1, 2, 3]


def test_journal_survives_kill_9_and_is_reapplied(tmp_path: Path) -> None:
    state = tmp_path / "state"
    first = start_agent(state, sim_gpus=2)
    first.stub().SetPowerLimit(pb.SetPowerLimitRequest(gpu_index=0, power_limit_w=350), timeout=5)
    first.stub().LockClocks(pb.LockClocksRequest(gpu_index=1, min_mhz=900, max_mhz=1100), timeout=5)
    defaults_before = journal(state)["defaults"]
    assert first.stop(signal.SIGKILL) == -signal.SIGKILL

    second = start_agent(state, sim_gpus=2)  # a fresh sim: the "driver" forgot everything
    assert gpu(second, 0).power_limit_w == 350
    lock = gpu(second, 1).clock_lock
    assert (lock.min_mhz, lock.max_mhz) == (900, 1100)
    assert journal(state)["defaults"] == defaults_before  # first-start defaults kept
    requested = journal(state)["requested"]
    assert second.stop() == 0
    assert journal(state)["requested"] == requested  # still in force for the next agent
    assert requested["0"]["power_limit_w"] == 350


def test_corrupt_journal_refuses_to_start(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / "journal.json").write_text("{not json")
    agent = start_agent(state, sim_gpus=1, wait=False)
    assert agent.proc.wait(20) != 0
    assert f"journal {state / 'journal.json'} is corrupt" in agent.log_text()
    assert (state / "journal.json").read_text() == "{not json"  # not silently reset


SIM_ARGS = ("--backend", "sim", "--listen", "127.0.0.1:0", "--metrics-listen", "")


def run_agent(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*console_script("nodeagent"), *args], capture_output=True, text=True, timeout=30
    )


@pytest.mark.parametrize(
    ("content", "suffix", "words"),
    [
        (
            "version: 1\nsampling: {interval_s: 100}\n",
            ".yaml",
            ["sampling.interval_s=100", "[0.05, 60] s"],
        ),
        ("version: 1\nsim: {gpus: 2, colour: red}\n", ".yaml", ["sim.colour", "not permitted"]),
        ("version = 2\n", ".toml", ["version=2"]),
        ("backend: sim\n", ".yaml", ["version: field required"]),
        ("version: 1\nbackend: [sim\n", ".yaml", ["not valid YAML", "line 2"]),
        ('version = 1\n[sim]\ngpu_type = "v100"\n', ".toml", ["sim.gpu_type='v100'", "h100-80gb"]),
    ],
)
def test_bad_config_file_is_refused(
    tmp_path: Path, content: str, suffix: str, words: list[str]
) -> None:
    path = tmp_path / f"agent{suffix}"
    path.write_text(content)
    result = run_agent("--config", str(path), "--state-dir", str(tmp_path / "state"))
    assert result.returncode == 2
    assert str(path) in result.stderr
    for word in words:
        assert word in result.stderr


def test_cli_flag_out_of_range_is_refused(tmp_path: Path) -> None:
    result = run_agent("--backend", "sim", "--interval-s", "0.001", "--state-dir", str(tmp_path))
    assert result.returncode == 2
    assert "sampling.interval_s=0.001 is outside the allowed range [0.05, 60] s" in result.stderr


def test_nvml_unavailable_is_fatal_never_sim(tmp_path: Path) -> None:
    pynvml = pytest.importorskip("pynvml")
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        pass  # the case under test: no driver here
    else:
        pynvml.nvmlShutdown()
        pytest.skip("NVML works on this machine")
    result = run_agent(
        "--backend",
        "nvml",
        "--listen",
        "127.0.0.1:0",
        "--metrics-listen",
        "",
        "--state-dir",
        str(tmp_path / "state"),
    )
    assert result.returncode == 1
    assert "backend nvml unavailable" in result.stderr
    assert '"backend": "sim"' not in result.stderr


def test_config_file_with_overrides(tmp_path: Path) -> None:
    path = tmp_path / "agent.yaml"
    path.write_text(
        "version: 1\nbackend: sim\nsim: {gpus: 3, gpu_type: a100-40gb}\n"
        "node: {id: from-file, labels: {site: s1, row: r1}}\n"
    )
    agent = start_agent(
        tmp_path / "state",
        "--config",
        str(path),
        "--node-id",
        "from-flag",
        sim_gpus=2,
        gpu_type="a100-80gb",
    )
    try:
        node = agent.stub().GetNode(pb.GetNodeRequest(), timeout=5)
        assert node.node_id == "from-flag"  # CLI beats file
        assert dict(node.labels) == {"site": "s1", "row": "r1"}  # file beats default
        assert len(node.gpus) == 2 and node.gpus[0].gpu_type == "a100-80gb"
        assert node.gpus[0].power_limit_max_w == 400
    finally:
        assert agent.stop() == 0
