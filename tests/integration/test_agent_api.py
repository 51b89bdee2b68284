"""The agent as a real subprocess on the sim backend (8 x H100), every RPC over a real channel.

One agent serves the whole module. It runs a constant full load (sim.load busy) so that a power
cap visibly lowers power and clock; the thermal guard is off (via the environment) so that no
limit moves on its own.
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from prometheus_client.parser import text_string_to_metric_families

from shapectl.cli import main as shapectl_main
from shapeshifter.api.v1 import agent_pb2 as pb
from tests.conftest import AgentProcess, poll, run_cli, start_agent

H100_RANGE = "[200, 700] W"


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProcess]:
    state = tmp_path_factory.mktemp("agent") / "state"
    env = {
        "SHAPESHIFTER_NODEAGENT_THERMAL_GUARD__ENABLED": "false",
        # The engine manager has its own tests; here the agent's no-manager path is checked.
        "SHAPESHIFTER_NODEAGENT_ENGINES__ENABLED": "false",
    }
    proc = start_agent(state, "--sim-load", "busy", "--interval-s", "0.2", env=env)
    yield proc
    assert proc.stop() == 0, proc.log_text()


def gpu(agent: AgentProcess, index: int) -> pb.Gpu:
    return agent.stub().GetNode(pb.GetNodeRequest(), timeout=5).gpus[index]


def settings(agent: AgentProcess) -> list[tuple[object, ...]]:
    """What a refused request must not change: limits, clock locks, MIG, per GPU."""
    node = agent.stub().GetNode(pb.GetNodeRequest(), timeout=5)
    return [
        (
            g.power_limit_w,
            g.HasField("clock_lock") and (g.clock_lock.min_mhz, g.clock_lock.max_mhz),
            g.mig_enabled,
            tuple(i.profile for i in g.mig_instances),
        )
        for g in node.gpus
    ]


def refused(call: object, code: grpc.StatusCode) -> str:
    with pytest.raises(grpc.RpcError) as info:
        call()  # type: ignore[operator]
    assert info.value.code() == code, info.value.details()
    return info.value.details()


def journal(agent: AgentProcess) -> str:
    return (agent.state_dir / "journal.json").read_text()


def test_get_node_reports_every_gpu(agent: AgentProcess) -> None:
    node = agent.stub().GetNode(pb.GetNodeRequest(), timeout=5)
    assert node.backend == "sim"
    assert node.safety_state == "standalone"
    assert [g.index for g in node.gpus] == list(range(8))
    assert len({g.uuid for g in node.gpus}) == 8
    g = node.gpus[0]
    assert g.gpu_type == "h100-80gb"
    assert (g.power_limit_min_w, g.power_limit_max_w) == (200, 700)
    assert g.memory_total_mib > 80_000 and g.supported_sm_clocks_mhz[0] == g.sm_clock_max_mhz
    assert g.budget.memory_total_mib == g.memory_total_mib
    assert node.budget.node_power_w > node.budget.gpu_power_w > 0


def test_watch_telemetry_streams_samples(agent: AgentProcess) -> None:
    stream = agent.stub().WatchTelemetry(pb.WatchTelemetryRequest(interval_s=0.1, max_samples=3))
    samples = list(stream)
    assert len(samples) == 3
    assert samples[-1].sampled_at_unix_s >= samples[0].sampled_at_unix_s
    details = refused(
        lambda: list(agent.stub().WatchTelemetry(pb.WatchTelemetryRequest(interval_s=0.01))),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert "interval_s" in details and "[0.1, 3600]" in details


def test_power_cap_lowers_power_and_clock(agent: AgentProcess) -> None:
    stub = agent.stub()
    before = gpu(agent, 1)
    assert before.power_draw_w > 400  # busy at the 700 W default
    reply = stub.SetPowerLimit(pb.SetPowerLimitRequest(gpu_index=1, power_limit_w=300), timeout=5)
    assert reply.ok and reply.changed
    capped = poll(lambda: (g := gpu(agent, 1)).power_draw_w <= 300 * 1.02 and g)
    assert capped.power_limit_w == capped.power_limit_requested_w == 300
    assert capped.power_ceiling_source == ""
    assert capped.sm_clock_mhz < before.sm_clock_mhz
    again = stub.SetPowerLimit(pb.SetPowerLimitRequest(gpu_index=1, power_limit_w=300), timeout=5)
    assert again.ok and not again.changed  # read-before-write
    stub.SetPowerLimit(pb.SetPowerLimitRequest(gpu_index=1, power_limit_w=700), timeout=5)
    poll(lambda: gpu(agent, 1).power_draw_w > 400)


@pytest.mark.parametrize(
    ("request_", "code", "words"),
    [
        (
            pb.SetPowerLimitRequest(gpu_index=0, power_limit_w=900),
            "INVALID_ARGUMENT",
            ["power_limit_w=900 W", H100_RANGE],
        ),
        (
            pb.SetPowerLimitRequest(gpu_index=0, power_limit_w=50),
            "INVALID_ARGUMENT",
            ["power_limit_w=50 W", H100_RANGE],
        ),
        (
            pb.SetPowerLimitRequest(gpu_index=8, power_limit_w=300),
            "NOT_FOUND",
            ["gpu_index=8", "[0, 7]"],
        ),
        (
            pb.LockClocksRequest(gpu_index=0, min_mhz=100, max_mhz=1500),
            "INVALID_ARGUMENT",
            ["min_mhz=100 MHz", "allowed range"],
        ),
        (
            pb.LockClocksRequest(gpu_index=0, min_mhz=1500, max_mhz=1000),
            "INVALID_ARGUMENT",
            ["min_mhz=1500", "max_mhz=1000"],
        ),
        (
            pb.ApplyMigLayoutRequest(gpu_index=3, profiles=["9g.99gb"]),
            "INVALID_ARGUMENT",
            ["profiles", "9g.99gb", "3g.40gb"],
        ),
        (
            pb.ApplyMigLayoutRequest(gpu_index=3, profiles=["4g.40gb", "4g.40gb"]),
            "INVALID_ARGUMENT",
            ["profiles", "4g.40gb"],
        ),
        (
            pb.ApplyMigLayoutRequest(gpu_index=3, profiles=["7g.80gb", "1g.10gb"]),
            "INVALID_ARGUMENT",
            ["profiles"],
        ),
        (
            pb.ApplyMigLayoutRequest(gpu_index=3, mig_parted_yaml="version: v1\n",
                                     mig_parted_config="a", restart_instances=True),
            "INVALID_ARGUMENT",
            ["restart_instances", "profiles"],
        ),
    ],
)
def test_bad_requests_are_refused_and_change_nothing(
    agent: AgentProcess, request_: object, code: str, words: list[str]
) -> None:
    stub = agent.stub()
    method = {
        pb.SetPowerLimitRequest: stub.SetPowerLimit,
        pb.LockClocksRequest: stub.LockClocks,
        pb.ApplyMigLayoutRequest: stub.ApplyMigLayout,
    }[type(request_)]
    if isinstance(request_, pb.ApplyMigLayoutRequest):  # layouts are checked on a MIG GPU
        stub.SetMigMode(pb.SetMigModeRequest(gpu_index=3, enabled=True), timeout=5)
    before, journal_before = settings(agent), journal(agent)
    details = refused(lambda: method(request_, timeout=5), getattr(grpc.StatusCode, code))
    for word in words:
        assert word in details
    assert settings(agent) == before
    assert journal(agent) == journal_before


def test_clock_lock_and_reset(agent: AgentProcess) -> None:
    stub = agent.stub()
    reply = stub.LockClocks(pb.LockClocksRequest(gpu_index=2, min_mhz=900, max_mhz=1200), timeout=5)
    assert reply.ok and reply.changed
    locked = poll(lambda: (g := gpu(agent, 2)).sm_clock_mhz <= 1200 and g)
    assert (locked.clock_lock.min_mhz, locked.clock_lock.max_mhz) == (900, 1200)
    assert stub.ResetClocks(pb.ResetClocksRequest(gpu_index=2), timeout=5).changed
    assert not gpu(agent, 2).HasField("clock_lock")
    poll(lambda: gpu(agent, 2).sm_clock_mhz > 1200)


def test_mig_mode_and_layout(agent: AgentProcess) -> None:
    stub = agent.stub()
    stub.SetMigMode(pb.SetMigModeRequest(gpu_index=4, enabled=True), timeout=5)
    layout = ["3g.40gb", "2g.20gb", "1g.10gb"]
    reply = stub.ApplyMigLayout(pb.ApplyMigLayoutRequest(gpu_index=4, profiles=layout), timeout=5)
    assert reply.ok and reply.changed
    g = gpu(agent, 4)
    assert g.mig_enabled and sorted(i.profile for i in g.mig_instances) == sorted(layout)
    assert all(i.uuid.startswith("MIG-") for i in g.mig_instances)
    same = stub.ApplyMigLayout(pb.ApplyMigLayoutRequest(gpu_index=4, profiles=layout), timeout=5)
    assert not same.changed


def test_mig_parted_file_changes_only_listed_gpus(agent: AgentProcess) -> None:
    text = (
        "version: v1\nmig-configs:\n  halves:\n"
        "    - devices: [5, 6]\n      mig-enabled: true\n      mig-devices: {3g.40gb: 2}\n"
    )
    before = settings(agent)
    reply = agent.stub().ApplyMigLayout(
        pb.ApplyMigLayoutRequest(mig_parted_yaml=text, mig_parted_config="halves"), timeout=5
    )
    assert reply.ok and reply.changed
    after = settings(agent)
    for index in (5, 6):
        assert after[index][2:] == (True, ("3g.40gb", "3g.40gb"))
    assert [after[i] for i in (0, 7)] == [before[i] for i in (0, 7)]
    details = refused(
        lambda: agent.stub().ApplyMigLayout(
            pb.ApplyMigLayoutRequest(mig_parted_yaml=text, mig_parted_config="nope"), timeout=5
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert "config_name" in details and "halves" in details


def test_plans_run_in_order_and_stale_epochs_are_refused(agent: AgentProcess) -> None:
    stub = agent.stub()
    plan = pb.Plan(plan_id="p1", epoch=5)
    plan.actions.add(
        action_id="a1", set_power_limit=pb.SetPowerLimitRequest(gpu_index=7, power_limit_w=450)
    )
    plan.actions.add(
        action_id="a2", lock_clocks=pb.LockClocksRequest(gpu_index=7, min_mhz=1, max_mhz=2)
    )
    plan.actions.add(action_id="a3", reset_clocks=pb.ResetClocksRequest(gpu_index=7))
    reply = stub.ApplyPlan(pb.ApplyPlanRequest(plan=plan), timeout=5)
    assert not reply.completed
    assert [(r.action_id, r.ok, r.code) for r in reply.results] == [
        ("a1", True, "OK"),
        ("a2", False, "INVALID_ARGUMENT"),
    ]
    assert "min_mhz" in reply.results[1].message
    assert gpu(agent, 7).power_limit_w == 450
    assert stub.GetNode(pb.GetNodeRequest(), timeout=5).epoch_seen == 5

    stale = pb.Plan(plan_id="p0", epoch=3)
    stale.actions.add(
        action_id="b1", set_power_limit=pb.SetPowerLimitRequest(gpu_index=7, power_limit_w=300)
    )
    details = refused(
        lambda: stub.ApplyPlan(pb.ApplyPlanRequest(plan=stale), timeout=5),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    assert details == "plan epoch 3 is older than the newest seen epoch 5"
    assert gpu(agent, 7).power_limit_w == 450

    same = pb.Plan(plan_id="p2", epoch=5)
    same.actions.add(
        action_id="c1", set_power_limit=pb.SetPowerLimitRequest(gpu_index=7, power_limit_w=700)
    )
    same.actions.add(action_id="c2", stop_instance=pb.StopInstanceRequest(instance_id="x"))
    reply = stub.ApplyPlan(pb.ApplyPlanRequest(plan=same), timeout=5)
    assert [r.ok for r in reply.results] == [True, False]
    assert reply.results[1].message == "no engine manager configured"
    assert '"epoch_seen": 5' in journal(agent)


def test_instance_rpcs_without_engine_manager(agent: AgentProcess) -> None:
    stub = agent.stub()
    for method, request in (
        (stub.StartInstance, pb.StartInstanceRequest()),
        (stub.StopInstance, pb.StopInstanceRequest(instance_id="x")),
        (stub.ReconfigureInstance, pb.ReconfigureInstanceRequest(instance_id="x")),
        (stub.ListInstances, pb.ListInstancesRequest()),
    ):
        details = refused(
            lambda m=method, r=request: m(r, timeout=5), grpc.StatusCode.FAILED_PRECONDITION
        )
        assert details == "no engine manager configured"


def test_reflection_lists_services(agent: AgentProcess) -> None:
    db = ProtoReflectionDescriptorDatabase(agent.channel())
    services = set(db.get_services())
    assert {"shapeshifter.nodeagent.v1.NodeAgent", "grpc.health.v1.Health"} <= services
    file = db.FindFileContainingSymbol("shapeshifter.nodeagent.v1.NodeAgent")
    assert "GetNode" in [m.name for m in file.service[0].method]


def test_health_is_serving(agent: AgentProcess) -> None:
    health = health_pb2_grpc.HealthStub(agent.channel())
    reply = health.Check(
        health_pb2.HealthCheckRequest(service="shapeshifter.nodeagent.v1.NodeAgent"), timeout=5
    )
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_prometheus_endpoint_has_both_name_families(agent: AgentProcess) -> None:
    url = f"http://127.0.0.1:{agent.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    power = families["DCGM_FI_DEV_POWER_USAGE"].samples
    assert len(power) == 8
    assert set(power[0].labels) == {"gpu", "UUID", "device", "modelName", "Hostname"}
    assert power[0].labels["device"] == "nvidia0"
    for name in (
        "DCGM_FI_DEV_GPU_TEMP",
        "DCGM_FI_DEV_SM_CLOCK",
        "DCGM_FI_DEV_FB_USED",
        "DCGM_FI_DEV_POWER_MGMT_LIMIT",
        "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION",
        "shapeshifter_gpu_power_draw_watts",
        "shapeshifter_gpu_thermal_headroom_celsius",
        "shapeshifter_node_power_watts",
        "shapeshifter_node_safety_state",
    ):
        assert name in families, name
    limits = {
        s.labels["gpu"]: s.value for s in families["shapeshifter_gpu_power_limit_watts"].samples
    }
    assert len(limits) == 8 and all(200 <= v <= 700 for v in limits.values())


def test_shapectl_node_json(agent: AgentProcess) -> None:
    result = run_cli("shapectl", "--agent", agent.address, "node", "--json")
    assert result.returncode == 0, result.stderr
    node = json.loads(result.stdout)
    assert len(node["gpus"]) == 8
    for key in (
        "index",
        "uuid",
        "name",
        "power_draw_w",
        "power_limit_w",
        "power_limit_min_w",
        "power_limit_max_w",
        "temperature_c",
        "sm_clock_mhz",
        "memory_used_mib",
        "memory_total_mib",
    ):
        assert key in node["gpus"][0], key
    assert isinstance(node["gpus"][0]["memory_total_mib"], int)


def test_shapectl_refusal_is_one_line_naming_field_and_range(agent: AgentProcess) -> None:
    result = run_cli("shapectl", "--agent", agent.address, "gpu", "set-power", "0", "900")
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "power_limit_w" in lines[0] and H100_RANGE in lines[0]


def test_shapectl_gpu_commands(agent: AgentProcess, capsys: pytest.CaptureFixture[str]) -> None:
    addr = ["--agent", agent.address]
    assert shapectl_main([*addr, "gpu", "set-power", "6", "400"]) == 0
    assert gpu(agent, 6).power_limit_w == 400
    assert shapectl_main([*addr, "gpu", "lock-clocks", "6", "1000", "1400"]) == 0
    assert gpu(agent, 6).clock_lock.max_mhz == 1400
    assert shapectl_main([*addr, "gpu", "reset-clocks", "6"]) == 0
    assert not gpu(agent, 6).HasField("clock_lock")
    assert shapectl_main([*addr, "gpu", "lock-clocks", "6", "1000", "99999"]) == 1
    assert "max_mhz=99999" in capsys.readouterr().err
    assert shapectl_main([*addr, "gpu", "mig-mode", "0", "on"]) == 0
    assert shapectl_main([*addr, "mig", "apply", "0", "4g.40gb", "3g.40gb"]) == 0
    assert sorted(i.profile for i in gpu(agent, 0).mig_instances) == ["3g.40gb", "4g.40gb"]
    assert shapectl_main([*addr, "mig", "apply", "0", "bogus.1gb"]) == 1
    assert "profiles" in capsys.readouterr().err
    assert shapectl_main([*addr, "mig", "apply", "0"]) == 0  # empty layout
    assert shapectl_main([*addr, "gpu", "mig-mode", "0", "off"]) == 0
    assert not gpu(agent, 0).mig_enabled
    assert shapectl_main([*addr, "node"]) == 0
    assert "H100" in capsys.readouterr().out


def test_shapectl_mig_file(agent: AgentProcess, tmp_path: Path) -> None:
    file = tmp_path / "mig.yaml"
    file.write_text(
        "version: v1\nmig-configs:\n  sevens:\n"
        "    - devices: [2]\n      mig-enabled: true\n      mig-devices: {1g.10gb: 7}\n"
    )
    result = run_cli(
        "shapectl",
        "--agent",
        agent.address,
        "mig",
        "apply",
        "--file",
        str(file),
        "--config",
        "sevens",
    )
    assert result.returncode == 0, result.stderr
    assert [i.profile for i in gpu(agent, 2).mig_instances] == ["1g.10gb"] * 7
