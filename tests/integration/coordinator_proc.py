"""A coordinator subprocess for the integration tests, waited on until its health is SERVING."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shapeshifter.api.v1 import coordinator_pb2 as cpb
from shapeshifter.api.v1 import coordinator_pb2_grpc as cpb_grpc
from tests.conftest import (
    AgentProcess,
    console_script,
    free_port,
    poll,
    start_agent,
    stop_process,
)


@dataclass
class CoordinatorProcess:
    proc: subprocess.Popen[bytes]
    address: str
    log_path: Path
    _channel: grpc.Channel | None = field(default=None, repr=False)
    credentials: grpc.ChannelCredentials | None = None  # mTLS coordinators

    def channel(self) -> grpc.Channel:
        if self._channel is None:
            self._channel = (grpc.insecure_channel(self.address) if self.credentials is None
                             else grpc.secure_channel(self.address, self.credentials))
        return self._channel

    def stub(self) -> cpb_grpc.CoordinatorStub:
        return cpb_grpc.CoordinatorStub(self.channel())

    def cluster(self) -> cpb.ClusterStatus:
        return self.stub().GetCluster(cpb.GetClusterRequest(), timeout=5)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 20.0) -> int:
        if self._channel is not None:
            self._channel.close()
            self._channel = None
        return stop_process(self.proc, sig, timeout_s, lambda: f"coordinator:\n{self.log_text()}")


def start_coordinator(workdir: Path, port: int, *extra: str,
                      credentials: grpc.ChannelCredentials | None = None) -> CoordinatorProcess:
    """`coordinator` on 127.0.0.1:port with workdir/topology.yaml and workdir/c.db.
    credentials: what the health probe and channel() use (mTLS coordinators)."""
    address = f"127.0.0.1:{port}"
    log_path = workdir / f"coordinator-{time.monotonic_ns()}.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [*console_script("coordinator"), "--listen", address,
             "--topology", str(workdir / "topology.yaml"), "--db", str(workdir / "c.db"),
             "--persist-interval-s", "0.2", "--action-timeout-s", "5", *extra],
            stdout=log, stderr=subprocess.STDOUT)
    coord = CoordinatorProcess(proc, address, log_path, credentials=credentials)
    health = health_pb2_grpc.HealthStub(coord.channel())

    def serving() -> bool:
        assert proc.poll() is None, coord.log_text()
        try:
            reply = health.Check(health_pb2.HealthCheckRequest(), timeout=1)
        except grpc.RpcError:
            return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    try:
        poll(serving, timeout_s=20, interval_s=0.1)
    except AssertionError:
        coord.stop(signal.SIGKILL)
        raise
    return coord


@dataclass
class Cluster:
    """A coordinator and labelled sim agents sharing one work dir (topology.yaml, agent.yaml)."""

    workdir: Path
    port: int
    coordinator: CoordinatorProcess
    agents: dict[str, AgentProcess]


@contextlib.contextmanager
def labelled_cluster(workdir: Path, topology: dict[str, Any], agent_config: dict[str, Any],
                     nodes: dict[str, dict[str, str]], coordinator_args: Sequence[str] = (),
                     agent_args: Sequence[str] = (), gpus: int = 2) -> Iterator[Cluster]:
    """Start the coordinator, then one agent per node id with its topology labels; SIGKILL all
    at the end (the tests that need a graceful stop do it themselves)."""
    (workdir / "topology.yaml").write_text(yaml.safe_dump(topology))
    (workdir / "agent.yaml").write_text(yaml.safe_dump(agent_config))
    port = free_port()
    c = Cluster(workdir, port, start_coordinator(workdir, port, *coordinator_args), {})
    try:
        for node_id, labels in nodes.items():
            c.agents[node_id] = start_agent(
                workdir / node_id, "--config", str(workdir / "agent.yaml"), "--node-id", node_id,
                "--coordinator", c.coordinator.address, *agent_args,
                "--labels", ",".join(f"{k}={v}" for k, v in labels.items()), sim_gpus=gpus)
        yield c
    finally:
        for a in c.agents.values():
            a.stop(signal.SIGKILL)
        c.coordinator.stop(signal.SIGKILL)
