"""The coordinator process: refuses bad configuration with a named field, serves reflection,
health and Prometheus rollup gauges, stops cleanly on SIGTERM; its systemd unit's essentials."""

from __future__ import annotations

import signal
import subprocess
import urllib.request
from pathlib import Path

import pytest
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import console_script, free_port
from tests.integration.coordinator_proc import start_coordinator

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = (ROOT / "systemd" / "topology.example.yaml").read_text()


def run_coordinator(tmp_path: Path, topology: str, *extra: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "t.yaml").write_text(topology)
    return subprocess.run(
        [*console_script("coordinator"), "--listen", f"127.0.0.1:{free_port()}",
         "--topology", str(tmp_path / "t.yaml"), "--db", str(tmp_path / "c.db"), *extra],
        capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ("row_power_limit_w: 120000\n        inlet_offset_c: 1.0",
         "row_power_limit_w: 0\n        inlet_offset_c: 1.0",
         "(line 30): sites.0.rows.1.row_power_limit_w: Input should be greater than 0"),
        ("suspect_after_s: 3", "suspect_after: 3", "(line 5): liveness.suspect_after:"),
        ("- {name: k3, aisle: a2,", "- {name: k3, aisle: a7,", "aisle 'a7' is not one of"),
    ],
)
def test_malformed_topology_refuses_to_start(tmp_path: Path, old: str, new: str,
                                             expected: str) -> None:
    assert old in EXAMPLE
    result = run_coordinator(tmp_path, EXAMPLE.replace(old, new))
    assert result.returncode == 2
    assert expected in result.stderr, result.stderr
    assert not (tmp_path / "c.db").exists()  # refused before touching any state


def test_bad_flag_value_names_the_flag(tmp_path: Path) -> None:
    result = run_coordinator(tmp_path, EXAMPLE, "--lease-ttl-s", "0.01")
    assert result.returncode == 2
    assert "lease_ttl_s=0.01 s is outside the allowed range [0.5, 3600] s" in result.stderr


def test_missing_topology_file(tmp_path: Path) -> None:
    result = subprocess.run(
        [*console_script("coordinator"), "--listen", "127.0.0.1:0", "--topology",
         str(tmp_path / "absent.yaml"), "--db", str(tmp_path / "c.db")],
        capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "cannot read topology" in result.stderr


def test_reflection_metrics_and_graceful_sigterm(tmp_path: Path) -> None:
    (tmp_path / "topology.yaml").write_text(EXAMPLE)
    metrics_port = free_port()
    coord = start_coordinator(tmp_path, free_port(), "--metrics-listen",
                              f"127.0.0.1:{metrics_port}")
    try:
        db = ProtoReflectionDescriptorDatabase(coord.channel())
        services = set(db.get_services())
        v1 = "shapeshifter.coordinator.v1"
        assert {f"{v1}.Coordinator", f"{v1}.AgentLink", f"{v1}.Emergency", f"{v1}.Planner",
                f"{v1}.Placement", f"{v1}.Routing", "grpc.health.v1.Health"} <= services
        url = f"http://127.0.0.1:{metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            families = {f.name: f for f in text_string_to_metric_families(response.read().decode())}
        limits = {s.labels["row"]: s.value
                  for s in families["shapeshifter_row_power_limit_watts"].samples}
        assert limits == {"r1": 120000.0, "r2": 120000.0}
        airflow = {s.labels["aisle"]: s.value
                   for s in families["shapeshifter_aisle_airflow_limit_cfm"].samples}
        assert airflow == {"a1": 20000.0, "a2": 20000.0}
        assert families["shapeshifter_coordinator_epoch"].samples[0].value == 1
    finally:
        assert coord.stop(signal.SIGTERM, timeout_s=10) == 0
    assert '"event": "coordinator_stopped"' in coord.log_text()


def test_coordinator_unit_essentials() -> None:
    text = (ROOT / "systemd" / "coordinator.service").read_text()
    for line in ("Type=notify", "WatchdogSec=", "Restart=on-failure", "DynamicUser=yes",
                 "StateDirectory=shapeshifter-coordinator", "NoNewPrivileges=yes",
                 "CapabilityBoundingSet=\n", "ProtectSystem=strict", "PrivateDevices=yes",
                 "--topology /etc/shapeshifter/topology.yaml",
                 "--db /var/lib/shapeshifter-coordinator/coordinator.db"):
        assert line in text, line
