"""mTLS and roles with real processes and the dev CA (scripts/dev-ca.sh): an agent registers over
mTLS; viewers cannot change caps (PERMISSION_DENIED, audited, nothing changed); no client
certificate fails the handshake; plaintext on a non-loopback address needs --insecure."""

from __future__ import annotations

import shutil
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import yaml

from shapeshifter.api.v1 import agent_pb2 as pb
from shapeshifter.api.v1 import agent_pb2_grpc as pb_grpc
from shapeshifter.api.v1 import coordinator_pb2 as cpb
from shapeshifter.api.v1 import coordinator_pb2_grpc as cpb_grpc
from shapeshifter.net.authz import token_sha256
from tests.conftest import AgentProcess, console_script, free_port, poll, run_cli, start_agent
from tests.integration.coordinator_proc import CoordinatorProcess, start_coordinator

ROOT = Path(__file__).resolve().parents[2]
NODE = "node-1"
LABELS = "site=s1,row=r1,rack=k1,aisle=a1"
TOPOLOGY = {
    "version": 1,
    "sites": [{"name": "s1", "aisles": [{"name": "a1", "aisle_airflow_cfm": 900}],
               "rows": [{"name": "r1", "row_power_limit_w": 8000,
                         "racks": [{"name": "k1", "aisle": "a1"}]}]}],
}

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI")


def creds(ca: Path, name: str | None) -> grpc.ChannelCredentials:
    """Client credentials of a dev-CA identity (None: trust the CA, present no certificate)."""
    root = (ca / "ca.pem").read_bytes()
    if name is None:
        return grpc.ssl_channel_credentials(root)
    key, cert = (ca / f"{name}.key").read_bytes(), (ca / f"{name}.pem").read_bytes()
    return grpc.ssl_channel_credentials(root, key, cert)


def tls_args(ca: Path, name: str) -> tuple[str, ...]:
    return ("--tls-cert", str(ca / f"{name}.pem"), "--tls-key", str(ca / f"{name}.key"),
            "--tls-ca", str(ca / "ca.pem"))


@dataclass
class SecureCluster:
    ca: Path
    coordinator: CoordinatorProcess
    agent: AgentProcess

    def coord_stub(self, name: str | None) -> cpb_grpc.CoordinatorStub:
        channel = grpc.secure_channel(self.coordinator.address, creds(self.ca, name))
        return cpb_grpc.CoordinatorStub(channel)

    def agent_stub(self, name: str | None) -> pb_grpc.NodeAgentStub:
        return pb_grpc.NodeAgentStub(grpc.secure_channel(self.agent.address, creds(self.ca, name)))


@pytest.fixture(scope="module")
def dev_ca(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ca") / "tls"
    subprocess.run([str(ROOT / "scripts" / "dev-ca.sh"), str(out), NODE], check=True,
                   capture_output=True, timeout=60)
    return out


@pytest.fixture(scope="module")
def cluster(dev_ca: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureCluster]:
    workdir = tmp_path_factory.mktemp("secure")
    (workdir / "topology.yaml").write_text(yaml.safe_dump(TOPOLOGY))
    port = free_port()
    coord = start_coordinator(workdir, port, *tls_args(dev_ca, "coordinator"),
                              credentials=creds(dev_ca, "viewer"))
    agent = start_agent(workdir / "agent", "--node-id", NODE, "--labels", LABELS,
                        "--coordinator", f"127.0.0.1:{port}", *tls_args(dev_ca, NODE),
                        sim_gpus=2, credentials=creds(dev_ca, "viewer"))
    try:
        yield SecureCluster(dev_ca, coord, agent)
    finally:
        agent.stop(signal.SIGKILL)
        coord.stop()


def _connected(c: SecureCluster) -> bool:
    nodes = c.coord_stub("viewer").ListNodes(cpb.ListNodesRequest(), timeout=5).nodes
    return any(n.name == NODE and n.state == "up" for n in nodes)


def _limit_w(c: SecureCluster) -> float:
    status = c.coord_stub("viewer").GetNode(cpb.GetNodeRequest(node_id=NODE), timeout=5)
    return status.last_report.gpus[0].power_limit_w


def _set_power(stub: cpb_grpc.CoordinatorStub, watts: float) -> pb.ActionResult:
    req = cpb.NodeSetPowerLimitRequest(
        node_id=NODE, request=pb.SetPowerLimitRequest(gpu_index=0, power_limit_w=watts))
    return stub.SetPowerLimit(req, timeout=10)


def test_agent_registers_over_mtls(cluster: SecureCluster) -> None:
    poll(lambda: _connected(cluster), timeout_s=20)
    assert '"tls": true' in cluster.coordinator.log_text()


def test_viewer_cannot_set_power_denied_audited_unchanged(cluster: SecureCluster) -> None:
    poll(lambda: _connected(cluster) and _limit_w(cluster) > 0, timeout_s=20)
    before_w = _limit_w(cluster)
    with pytest.raises(grpc.RpcError) as info:
        _set_power(cluster.coord_stub("viewer"), 400.0)
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "viewer (role viewer, certificate)" in info.value.details()
    audit = cluster.coord_stub("viewer").ListAudit(cpb.ListAuditRequest(node_id=NODE), timeout=5)
    denied = [e for e in audit.entries if e.code == "PERMISSION_DENIED"]
    assert denied and denied[0].action.endswith("Coordinator/SetPowerLimit")
    assert not denied[0].ok and denied[0].actor.startswith("viewer (role viewer")
    assert _limit_w(cluster) == before_w  # nothing changed
    assert cluster.agent_stub("viewer").GetNode(pb.GetNodeRequest(), timeout=5).gpus[
        0].power_limit_w == before_w


def test_operator_sets_power_through_coordinator(cluster: SecureCluster) -> None:
    poll(lambda: _connected(cluster), timeout_s=20)
    result = _set_power(cluster.coord_stub("operator"), 450.0)
    assert result.ok
    audit = cluster.coord_stub("viewer").ListAudit(cpb.ListAuditRequest(limit=1), timeout=5)
    assert audit.entries[0].ok and audit.entries[0].actor.startswith("operator (role operator")


def test_operator_cannot_change_mig_mode(cluster: SecureCluster) -> None:
    req = cpb.NodeSetMigModeRequest(node_id=NODE,
                                    request=pb.SetMigModeRequest(gpu_index=0, enabled=True))
    with pytest.raises(grpc.RpcError) as info:
        cluster.coord_stub("operator").SetMigMode(req, timeout=5)
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_agent_obeys_only_coordinator_and_admin(cluster: SecureCluster) -> None:
    request = pb.SetPowerLimitRequest(gpu_index=1, power_limit_w=500.0)
    for name in ("viewer", "operator", "norole"):
        with pytest.raises(grpc.RpcError) as info:
            cluster.agent_stub(name).SetPowerLimit(request, timeout=5)
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED, name
    node = cluster.agent_stub("viewer").GetNode(pb.GetNodeRequest(), timeout=5)
    assert node.gpus[1].power_limit_w != 500.0
    assert cluster.agent_stub("admin").SetPowerLimit(request, timeout=5).ok
    assert "request denied" in cluster.agent.log_text()


def test_agent_identity_cannot_use_admin_api(cluster: SecureCluster) -> None:
    with pytest.raises(grpc.RpcError) as info:
        cluster.coord_stub(NODE).GetCluster(cpb.GetClusterRequest(), timeout=5)
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_no_client_certificate_fails_handshake(cluster: SecureCluster) -> None:
    for call in (lambda: cluster.coord_stub(None).GetCluster(cpb.GetClusterRequest(), timeout=3),
                 lambda: cluster.agent_stub(None).GetNode(pb.GetNodeRequest(), timeout=3)):
        with pytest.raises(grpc.RpcError) as info:
            call()
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE  # TLS handshake refused
    plaintext = cpb_grpc.CoordinatorStub(grpc.insecure_channel(cluster.coordinator.address))
    with pytest.raises(grpc.RpcError):
        plaintext.GetCluster(cpb.GetClusterRequest(), timeout=3)


def test_shapectl_with_client_certificates(cluster: SecureCluster) -> None:
    ca = cluster.ca
    base = ("--coordinator", cluster.coordinator.address)
    ok = run_cli("shapectl", *base, *tls_args(ca, "viewer"), "nodes", "--json")
    assert ok.returncode == 0, ok.stderr
    assert NODE in ok.stdout
    denied = run_cli("shapectl", *base, *tls_args(ca, "viewer"),
                     "gpu", "set-power", "--node", NODE, "0", "420")
    assert denied.returncode == 1 and "PERMISSION_DENIED" in denied.stderr
    missing = run_cli("shapectl", *base, "--tls-cert", str(ca / "viewer.pem"), "nodes")
    assert missing.returncode == 2 and "--tls-key" in missing.stderr


def test_bearer_tokens_on_loopback(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens.yaml"
    tokens.write_text(yaml.safe_dump({"version": 1, "tokens": [
        {"name": "ci", "role": "viewer", "sha256": token_sha256("s3cret-viewer")}]}))
    agent = start_agent(tmp_path / "state", "--auth-tokens", str(tokens), sim_gpus=1)
    try:
        stub = agent.stub()
        with pytest.raises(grpc.RpcError) as info:
            stub.GetNode(pb.GetNodeRequest(), timeout=5)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as info:
            stub.GetNode(pb.GetNodeRequest(), timeout=5,
                         metadata=(("authorization", "Bearer wrong"),))
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        auth = (("authorization", "Bearer s3cret-viewer"),)
        assert stub.GetNode(pb.GetNodeRequest(), timeout=5, metadata=auth).gpus
        with pytest.raises(grpc.RpcError) as info:
            stub.SetPowerLimit(pb.SetPowerLimitRequest(gpu_index=0, power_limit_w=300),
                               timeout=5, metadata=auth)
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        out = run_cli("shapectl", "--agent", agent.address, "--token", "s3cret-viewer", "node")
        assert out.returncode == 0, out.stderr
    finally:
        agent.stop()


def test_non_loopback_plaintext_refused_unless_insecure(tmp_path: Path) -> None:
    (tmp_path / "topology.yaml").write_text(yaml.safe_dump(TOPOLOGY))
    port = free_port()
    cmd = [*console_script("coordinator"), "--listen", f"0.0.0.0:{port}", "--topology",
           str(tmp_path / "topology.yaml"), "--db", str(tmp_path / "c.db")]
    refused = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    assert refused.returncode == 2
    assert "--listen='0.0.0.0:" in refused.stderr and "--insecure" in refused.stderr
    agent = subprocess.run(
        [*console_script("nodeagent"), "--backend", "sim", "--listen", f"0.0.0.0:{port}",
         "--state-dir", str(tmp_path / "a")], capture_output=True, text=True, timeout=30)
    assert agent.returncode == 2
    assert "listen='0.0.0.0:" in agent.stderr and "insecure: true" in agent.stderr
    insecure = start_agent(tmp_path / "state", "--listen", f"0.0.0.0:{free_port()}",
                           "--insecure", sim_gpus=1, wait=False)
    try:
        poll(lambda: "insecure: plaintext gRPC" in insecure.log_text(), timeout_s=20)
    finally:
        insecure.stop(signal.SIGKILL)


def test_insecure_coordinator_on_any_address_warns(tmp_path: Path) -> None:
    (tmp_path / "topology.yaml").write_text(yaml.safe_dump(TOPOLOGY))
    log_path = tmp_path / "coordinator.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [*console_script("coordinator"), "--listen", f"0.0.0.0:{free_port()}", "--insecure",
             "--topology", str(tmp_path / "topology.yaml"), "--db", str(tmp_path / "c.db")],
            stdout=log, stderr=subprocess.STDOUT)
    try:
        poll(lambda: "coordinator_started" in log_path.read_text(), timeout_s=20)
        assert "insecure_plaintext" in log_path.read_text()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0


def test_agent_certificate_registers_only_its_own_node(cluster: SecureCluster,
                                                       tmp_path: Path) -> None:
    imposter = start_agent(tmp_path / "imp", "--node-id", "imposter", "--labels", LABELS,
                           "--coordinator", cluster.coordinator.address,
                           *tls_args(cluster.ca, NODE), sim_gpus=1,
                           credentials=creds(cluster.ca, "viewer"))
    try:
        poll(lambda: "may not register as node 'imposter'" in imposter.log_text(), timeout_s=20)
        nodes = cluster.coord_stub("viewer").ListNodes(cpb.ListNodesRequest(), timeout=5).nodes
        assert "imposter" not in {n.name for n in nodes}
    finally:
        imposter.stop(signal.SIGKILL)
