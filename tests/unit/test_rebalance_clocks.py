"""The rebalancer's clock stage: configure.clock_plan's locks as plan actions (pure), and their
conversion to the agent's LockClocks / ResetClocks, verification from reports and diff lines."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from coordinator.core import CoordinatorCore
from coordinator.leases import LeasePolicy
from coordinator.policy.clocks import clock_stage, with_clock_stage
from coordinator.policy.configure import ConfigureConfig
from coordinator.policy.model import (
    ClusterSnapshot,
    EndpointSpec,
    GpuState,
    InstanceState,
    NodeState,
    Plan,
    PlanAction,
    Stage,
)
from coordinator.profiles.schema import ProfileRow, QueryClass
from coordinator.rebalance.effects import effect_shown
from coordinator.rebalance.loop import Rebalancer, RebalanceSettings, diff_lines
from coordinator.rebalance.snapshot import EndpointDecl
from coordinator.rpc.rebalance import plan_pb
from coordinator.session import AgentSession
from coordinator.store.plans import PlanStore
from coordinator.store.sqlite import Store
from shapeshifter.api.v1 import agent_pb2
from shapeshifter.api.v1 import link_pb2 as lpb
from shapeshifter.common.clock import ManualClock
from shapeshifter.hw.models import GPU_MODELS
from shapeshifter.topology import parse_topology

H100 = "h100-80gb"
MAX_MHZ = GPU_MODELS[H100].sm_max_clock_mhz
PROFILES = [  # at the maximum clock, at the SLO: TP1 serves 10 req/s LISO, TP2 12 req/s
    ProfileRow(H100, "tiny", 1, "none", "full", None, None, QueryClass.LISO, msrr_rps=10.0,
               slo_p95_s=20.0, memory_gb=10.0, avg_power_w=400.0),
    ProfileRow(H100, "tiny", 2, "none", "full", None, None, QueryClass.LISO, msrr_rps=12.0,
               slo_p95_s=20.0, memory_gb=10.0, avg_power_w=800.0),
]
EMPTY_PLAN = Plan((), (), 0, 0, 0.0, 0.0, "no change: 1 GPUs in use")


def _snapshot(demand_rps: float, locked_mhz: int | None = None, cap_w: float = 0.0,
              gpus: tuple[int, ...] = (0,)) -> ClusterSnapshot:
    node = NodeState("n1", "r1", "a1", tuple(
        GpuState(i, H100, emergency_cap_w=cap_w if i == 0 else 0.0,
                 sm_clock_locked_mhz=locked_mhz if i in gpus else None) for i in range(2)))
    inst = InstanceState("tiny-a", "tiny", "n1", gpus, "tiny", tensor_parallel=len(gpus))
    spec = EndpointSpec("tiny", "tiny", slo_p95_s=20.0)
    return ClusterSnapshot((node,), (inst,), (spec,), {"tiny": {QueryClass.LISO: demand_rps}})


def _stage(snapshot: ClusterSnapshot, plan: Plan = EMPTY_PLAN) -> Stage | None:
    return clock_stage(snapshot, plan, PROFILES, GPU_MODELS, 0.2, ConfigureConfig())


# ---------------------------------------------------------------------- pure: the clock stage


def test_low_demand_locks_the_instances_gpu_below_the_maximum_clock() -> None:
    stage = _stage(_snapshot(demand_rps=2.0))
    assert stage is not None
    (a,) = stage.actions
    assert (a.kind, a.node_id, a.gpu_indices, a.instance_id, a.endpoint) == (
        "lock_clocks", "n1", (0,), "tiny-a", "tiny")
    assert a.sm_clock_mhz is not None and a.sm_clock_mhz < MAX_MHZ
    assert a.sm_clock_mhz >= ConfigureConfig().min_clock_frac * MAX_MHZ - 1e-9
    assert "tiny" in a.reason and "MHz" in a.reason
    assert "1 GPU(s) locked" in stage.reason


def test_high_demand_locks_nothing_and_resets_a_lock_in_force() -> None:
    assert _stage(_snapshot(demand_rps=9.0)) is None  # 9 x 1.2 > 10 req/s: only the max covers
    stage = _stage(_snapshot(demand_rps=9.0, locked_mhz=1200))
    assert stage is not None
    assert [(a.kind, a.gpu_indices, a.sm_clock_mhz) for a in stage.actions] == [
        ("reset_clocks", (0,), None)]


def test_a_tp2_instance_gets_one_action_per_gpu() -> None:
    stage = _stage(_snapshot(demand_rps=2.0, gpus=(0, 1)))
    assert stage is not None
    assert [(a.kind, a.gpu_indices) for a in stage.actions] == [
        ("lock_clocks", (0,)), ("lock_clocks", (1,))]
    assert len({a.sm_clock_mhz for a in stage.actions}) == 1


def test_a_lock_already_in_force_is_not_sent_again() -> None:
    first = _stage(_snapshot(demand_rps=2.0))
    assert first is not None
    mhz = first.actions[0].sm_clock_mhz
    assert _stage(_snapshot(demand_rps=2.0, locked_mhz=mhz)) is None


def test_gpus_under_an_emergency_cap_are_left_to_the_emergency() -> None:
    assert _stage(_snapshot(demand_rps=2.0, cap_w=350.0)) is None
    assert _stage(_snapshot(demand_rps=9.0, locked_mhz=900, cap_w=350.0)) is None  # no reset
    assert _stage(_snapshot(demand_rps=2.0, cap_w=350.0, gpus=(0, 1))) is None  # one of two


def test_an_endpoint_the_plan_reshapes_waits_for_the_next_round() -> None:
    stop = PlanAction("stop_instance", "n1", "reshape", endpoint="tiny", instance_id="tiny-a")
    plan = Plan((Stage((stop,), "reshape"),), (), 1, 1, 0.0, 0.0, "reshape 1 endpoint(s)")
    assert _stage(_snapshot(demand_rps=2.0), plan) is None
    same = with_clock_stage(plan, _snapshot(demand_rps=2.0), PROFILES, GPU_MODELS, 0.2,
                            ConfigureConfig())
    assert same == plan


def test_the_clock_stage_comes_last_and_the_reason_says_so() -> None:
    stop = PlanAction("stop_instance", "n1", "other", endpoint="other", instance_id="o-1")
    plan = Plan((Stage((stop,), "reshape"),), (), 1, 1, 0.0, 0.0, "reshape 1 endpoint(s)")
    out = with_clock_stage(plan, _snapshot(demand_rps=2.0), PROFILES, GPU_MODELS, 0.2,
                           ConfigureConfig())
    assert [a.kind for s in out.stages for a in s.actions] == ["stop_instance", "lock_clocks"]
    assert out.reason.startswith("reshape 1 endpoint(s); clocks: 1 GPU(s) locked")


def test_a_gpu_a_start_lands_on_is_unlocked_unless_capped_or_mig() -> None:
    def start(**kw: object) -> Plan:
        a = PlanAction("start_instance", "n1", "scale out", endpoint="tiny", instance_id="tiny-b",
                       gpu_indices=(1,), **kw)  # type: ignore[arg-type]
        return Plan((Stage((a,), "start"),), (), 1, 2, 0.0, 0.0, "reshape 1 endpoint(s)")

    locked = _snapshot(demand_rps=2.0, locked_mhz=1200, gpus=(1,))  # GPU 1: locked, no instance
    locked = replace(locked, instances=())
    stage = _stage(locked, start())
    assert stage is not None
    assert [(a.kind, a.gpu_indices, a.instance_id) for a in stage.actions] == [
        ("reset_clocks", (1,), "tiny-b")]
    assert "1200 MHz" in stage.actions[0].reason
    assert _stage(replace(locked, instances=()), start(mig_profiles=("3g.40gb",))) is None
    assert _stage(_snapshot(demand_rps=2.0), start()) is None  # GPU 1 unlocked: nothing to do


# ---------------------------------------------------------------------- the live rebalancer

TOPOLOGY = """
version: 1
sites:
- name: s1
  aisles: [{name: a1, aisle_airflow_cfm: 100000}]
  rows: [{name: r1, row_power_limit_w: 100000, racks: [{name: k1, aisle: a1}]}]
"""


def _report(lock: tuple[int, int] | None = None) -> agent_pb2.Node:
    model = GPU_MODELS[H100]
    gpus = []
    for i in range(2):
        g = agent_pb2.Gpu(index=i, gpu_type=H100, power_limit_w=700.0, power_limit_min_w=200.0,
                          power_limit_max_w=700.0, sm_clock_max_mhz=model.sm_max_clock_mhz,
                          supported_sm_clocks_mhz=model.sm_clocks_mhz, healthy=True)
        if lock is not None and i == 0:
            g.clock_lock.CopyFrom(agent_pb2.ClockLock(min_mhz=lock[0], max_mhz=lock[1]))
        gpus.append(g)
    inst = agent_pb2.Instance(state="READY", spec=agent_pb2.InstanceSpec(
        instance_id="tiny-a", endpoint="tiny", model_path="tiny", devices=["0"],
        tensor_parallel_size=1))
    return agent_pb2.Node(node_id="n1", gpus=gpus, instances=[inst],
                          labels={"site": "s1", "row": "r1", "rack": "k1", "aisle": "a1"})


def _rebalancer(tmp_path: Path, demand_rps: float) -> tuple[Rebalancer, Any]:
    core = CoordinatorCore(parse_topology(TOPOLOGY), Store(tmp_path / "c.db"), ManualClock(),
                           epoch=1, lease_policy=LeasePolicy(5.0))
    rec, _ = core.register(lpb.Register(node_id="n1", labels=dict(_report().labels)),
                           AgentSession("n1"))
    core.registry.ingest(rec, lpb.NodeReport(node=_report(), seq=1))
    r = Rebalancer(core, PlanStore(tmp_path / "p.db"), PROFILES, RebalanceSettings())
    r.set_endpoint(EndpointDecl(EndpointSpec("tiny", "tiny", slo_p95_s=20.0),
                                demand_rps=demand_rps, query_class="LISO"), "test")
    return r, rec


def test_a_proposed_plan_carries_the_lock_to_the_agent(tmp_path: Path) -> None:
    r, rec = _rebalancer(tmp_path, demand_rps=2.0)
    doc = r.propose("test", "test")
    (stage,) = doc["stages"]
    (a,) = stage["actions"]
    assert (a["kind"], a["gpu_indices"], a["state"]) == ("lock_clocks", [0], "pending")
    mhz = a["sm_clock_mhz"]
    assert 0 < mhz < MAX_MHZ and a["config"] == f"SM clock locked at <= {mhz} MHz"
    assert doc["state"] == "proposed" and "clocks: 1 GPU(s) locked" in doc["reason"]

    pb = r.executor.agent_action(rec, a)
    assert pb.WhichOneof("kind") == "lock_clocks"
    assert (pb.lock_clocks.gpu_index, pb.lock_clocks.max_mhz) == (0, mhz)
    assert pb.lock_clocks.min_mhz == GPU_MODELS[H100].sm_min_clock_mhz
    assert plan_pb(doc).stages[0].actions[0].sm_clock_mhz == mhz  # shown by `plan show --json`
    (line,) = diff_lines(doc)
    assert line.startswith(f"~ [stage 1] n1/tiny-a SM clock locked at <= {mhz} MHz (GPUs 0): ")


def test_a_reset_converts_to_reset_clocks(tmp_path: Path) -> None:
    r, rec = _rebalancer(tmp_path, demand_rps=8.33)  # x 1.2 = 9.996 of 10 req/s: the max only
    rec.report.gpus[0].clock_lock.CopyFrom(agent_pb2.ClockLock(min_mhz=345, max_mhz=1200))
    (a,) = r.propose("test", "test")["stages"][0]["actions"]
    assert (a["kind"], a["sm_clock_mhz"], a["config"]) == ("reset_clocks", 0, "SM clock unlocked")
    pb = r.executor.agent_action(rec, a)
    assert pb.WhichOneof("kind") == "reset_clocks" and pb.reset_clocks.gpu_index == 0


def test_no_clock_change_no_plan_kept_by_the_loop(tmp_path: Path) -> None:
    r, _ = _rebalancer(tmp_path, demand_rps=8.33)  # unlocked, and only the max covers
    assert r.propose("loop", "coordinator", keep_empty=False)["stages"] == []


def test_a_gpu_an_emergency_caps_gets_no_lock_from_the_rebalancer(tmp_path: Path) -> None:
    r, rec = _rebalancer(tmp_path, demand_rps=2.0)
    gpu = rec.report.gpus[0]  # as the agent reports an emergency ceiling (or its fallback)
    gpu.power_ceiling_w, gpu.power_ceiling_source = 350.0, "emergency_fallback"
    assert r.propose("loop", "coordinator", keep_empty=False)["stages"] == []


@pytest.mark.parametrize(("kind", "mhz", "lock", "shown"), [
    ("lock_clocks", 1200, (345, 1200), True),
    ("lock_clocks", 1200, (345, 1400), False),
    ("lock_clocks", 1200, None, False),
    ("reset_clocks", 0, None, True),
    ("reset_clocks", 0, (345, 1200), False),
])
def test_clock_actions_are_verified_from_the_reported_lock(
        kind: str, mhz: int, lock: tuple[int, int] | None, shown: bool) -> None:
    rec = SimpleNamespace(report=_report(lock))
    action = {"kind": kind, "gpu_indices": [0], "sm_clock_mhz": mhz, "instance_id": "tiny-a"}
    assert effect_shown(rec, action) is shown
