"""Shared fixtures: free ports, a nodeagent subprocess that is waited on until healthy.

Reuse: ``start_agent(tmp_path / "state", "--sim-gpus", "4")`` (plain function) or the
``agent_factory`` fixture, which stops every agent it started at the end of the test.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shapectl.commands.demo import free_port
from shapeshifter.api.v1 import agent_pb2_grpc

STARTUP_TIMEOUT_S = 20.0
BIN_DIR = Path(sys.executable).parent
# ../shared beside the checkout (DESIGN.md, the seed papers, the Azure trace); CI provides it.
SHARED_DIR = Path(__file__).resolve().parents[2] / "shared"


def console_script(name: str) -> list[str]:
    """The venv's console script (nodeagent, shapectl, coordinator)."""
    path = BIN_DIR / name
    if path.exists():
        return [str(path)]
    module = {"nodeagent": "nodeagent.daemon", "shapectl": "shapectl.cli"}[name]
    return [sys.executable, "-m", module]


def poll(check: Callable[[], object], timeout_s: float = 20.0, interval_s: float = 0.05) -> object:
    """Call check() until it returns something truthy; fail with its last value at the deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s} s (last: {value!r})")
        time.sleep(interval_s)


@dataclass
class AgentProcess:
    proc: subprocess.Popen[bytes]
    port: int
    metrics_port: int
    state_dir: Path
    log_path: Path
    _channel: grpc.Channel | None = field(default=None, repr=False)
    credentials: grpc.ChannelCredentials | None = None  # mTLS agents (tests/integration/...)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def channel(self) -> grpc.Channel:
        if self._channel is None:
            self._channel = (
                grpc.insecure_channel(self.address)
                if self.credentials is None
                else grpc.secure_channel(self.address, self.credentials)
            )
        return self._channel

    def stub(self) -> agent_pb2_grpc.NodeAgentStub:
        return agent_pb2_grpc.NodeAgentStub(self.channel())

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_healthy(self, timeout_s: float = STARTUP_TIMEOUT_S) -> None:
        health = health_pb2_grpc.HealthStub(self.channel())
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"agent exited with {self.proc.returncode}:\n{self.log_text()}"
                )
            try:
                reply = health.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"agent not healthy within {timeout_s} s:\n{self.log_text()}")

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 20.0) -> int:
        """Send sig and wait for the exit code (killing it if it hangs)."""
        if self._channel is not None:
            self._channel.close()
            self._channel = None
        return stop_process(self.proc, sig, timeout_s, lambda: f"agent:\n{self.log_text()}")


def stop_process(proc: subprocess.Popen[bytes], sig: int, timeout_s: float,
                 describe: Callable[[], str]) -> int:
    """Send sig and wait for the exit code; a process that ignores it is killed and the test
    fails with describe() (e.g. its log)."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise AssertionError(f"ignored signal {sig}: {describe()}") from None
    return proc.returncode


def start_agent(
    state_dir: Path,
    *args: str,
    sim_gpus: int = 8,
    gpu_type: str = "h100-80gb",
    env: dict[str, str] | None = None,
    wait: bool = True,
    credentials: grpc.ChannelCredentials | None = None,
) -> AgentProcess:
    """Start `nodeagent --backend sim` on free ports; extra CLI args override the defaults."""
    state_dir.mkdir(parents=True, exist_ok=True)
    port, metrics_port = free_port(), free_port()
    cmd = [
        *console_script("nodeagent"),
        "--backend",
        "sim",
        "--sim-gpus",
        str(sim_gpus),
        "--sim-gpu-type",
        gpu_type,
        "--listen",
        f"127.0.0.1:{port}",
        "--metrics-listen",
        f"127.0.0.1:{metrics_port}",
        "--state-dir",
        str(state_dir),
        *args,
    ]
    log_path = state_dir.parent / f"{state_dir.name}-agent-{port}.log"
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("SHAPESHIFTER_")}
    full_env.update(env or {})
    with log_path.open("wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=full_env)
    agent = AgentProcess(proc, port, metrics_port, state_dir, log_path, credentials=credentials)
    if wait:
        try:
            agent.wait_healthy()
        except AssertionError:
            agent.stop(signal.SIGKILL)
            raise
    return agent


@pytest.fixture
def agent_factory(tmp_path: Path) -> Iterator[Callable[..., AgentProcess]]:
    started: list[AgentProcess] = []

    def factory(*args: str, state_dir: Path | None = None, **kwargs: object) -> AgentProcess:
        agent = start_agent(state_dir or tmp_path / "state", *args, **kwargs)  # type: ignore[arg-type]
        started.append(agent)
        return agent

    yield factory
    for agent in started:
        if agent.proc.poll() is None:
            agent.stop(signal.SIGKILL)


def run_cli(name: str, *args: str, timeout_s: float = 30.0) -> subprocess.CompletedProcess[str]:
    """Run a console script (e.g. shapectl) and capture its output."""
    return subprocess.run(
        [*console_script(name), *args], capture_output=True, text=True, timeout=timeout_s
    )
