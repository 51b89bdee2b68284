"""Phase 2 (issue 18): clock points, routing multipliers and the capacity capped endpoints lost;
the simulator and the live controller call the same function."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from coordinator.policy.capping.phase2 import CappedGpu, demand_with_lost, plan_phase2
from coordinator.policy.capping.shed import ClockPoint, locked_clock_mhz
from coordinator.profiles.schema import QueryClass
from coordinator.rebalance.snapshot import capped_gpus, node_state, with_phase2_demand
from shapeshifter.api.v1 import agent_pb2
from shapeshifter.hw import physics
from shapeshifter.hw.models import GPU_MODELS

A100 = GPU_MODELS["a100-80gb"]


def point(activity: float) -> ClockPoint:
    return ClockPoint(activity, A100.sm_clocks_mhz, A100.sm_max_clock_mhz, A100.idle_power_w,
                      A100.dynamic_power_max_w)


def test_capped_saas_gpu_gets_its_clock_point_and_a_lower_weight() -> None:
    g = CappedGpu(("n0", 0), 180.0, point(0.6), "chat", decode_frac=0.7)
    plan = plan_phase2([g])
    mhz = plan.clock_mhz[("n0", 0)]
    assert mhz == locked_clock_mhz(180.0, point(0.6)) < A100.sm_max_clock_mhz
    rel = physics.relative_throughput(mhz, A100.sm_max_clock_mhz, 0.7)
    assert plan.weight_mult[("n0", 0)] == pytest.approx(rel)
    assert plan.lost_instances == {"chat": pytest.approx(1.0 - rel)}


def test_loose_cap_changes_nothing() -> None:
    plan = plan_phase2([CappedGpu(("n0", 0), 400.0, point(0.6), "chat")])
    assert plan.empty and plan.lost_instances == {}


def test_opaque_gpu_is_locked_but_adds_no_capacity() -> None:
    plan = plan_phase2([CappedGpu(("n0", 1), 200.0, point(0.9))])
    assert ("n0", 1) in plan.clock_mhz
    assert plan.weight_mult == {} and plan.lost_instances == {}


def test_operator_lock_stays_but_capacity_still_counts() -> None:
    g = CappedGpu(("n0", 0), 150.0, point(0.6), "chat", operator_locked=True)
    plan = plan_phase2([g])
    assert plan.clock_mhz == {}
    assert plan.lost_instances["chat"] > 0


def test_lost_capacity_sums_per_endpoint_and_deeper_caps_lose_more() -> None:
    gpus = [CappedGpu(("n0", i), cap, point(0.6), "chat") for i, cap in enumerate((250, 150))]
    gpus.append(CappedGpu(("n1", 0), 150.0, point(0.6), "code"))
    plan = plan_phase2(gpus)
    assert plan.weight_mult[("n0", 1)] < plan.weight_mult[("n0", 0)] < 1.0
    assert plan.lost_instances["chat"] == pytest.approx(
        2.0 - plan.weight_mult[("n0", 0)] - plan.weight_mult[("n0", 1)])
    assert set(plan.lost_instances) == {"chat", "code"}


def test_demand_with_lost_asks_new_instances_for_what_the_caps_took() -> None:
    assert demand_with_lost(100.0, 0.0, 10) == 100.0
    assert demand_with_lost(100.0, 2.0, 10) == pytest.approx(125.0)  # 80% left must cover it
    assert demand_with_lost(100.0, 50.0, 10) == pytest.approx(1000.0)  # at most 90% lost
    assert demand_with_lost(100.0, 1.0, 0) == 100.0


def _record(node_id: str, ceiling_w: float) -> SimpleNamespace:
    gpus = [agent_pb2.Gpu(index=i, gpu_type="a100-80gb", power_draw_w=250.0,
                          power_limit_max_w=400.0, utilization_gpu_pct=60.0,
                          power_ceiling_w=ceiling_w, power_ceiling_source="emergency")
            for i in range(2)]
    insts = [agent_pb2.Instance(spec=agent_pb2.InstanceSpec(
        instance_id=f"{node_id}-{i}", endpoint="chat", devices=[str(i)], priority_class="saas"))
        for i in range(2)]
    return SimpleNamespace(node_id=node_id, report=agent_pb2.Node(gpus=gpus, instances=insts))


def test_live_rebalancer_demand_grows_by_what_the_caps_took() -> None:
    demand = {"chat": {QueryClass.LISO: 8.0}, "code": {QueryClass.LISO: 3.0}}
    free = with_phase2_demand([_record("n0", 400.0), _record("n1", 400.0)], demand)
    assert free == demand  # ceilings at the maximum: nothing capped
    capped = with_phase2_demand([_record("n0", 150.0), _record("n1", 400.0)], demand)
    gpus = capped_gpus("n0", _record("n0", 150.0).report, {0: 150.0, 1: 150.0})
    lost = plan_phase2(gpus).lost_instances["chat"]
    assert 0 < lost < 2
    assert capped["chat"][QueryClass.LISO] == pytest.approx(8.0 / (1 - lost / 4))
    assert capped["code"] == demand["code"]


def test_live_snapshot_carries_phase2_throughput_for_routing() -> None:
    rec = _record("n0", 150.0)
    rec.placement, rec.labels = None, {}
    state = node_state(rec, SimpleNamespace())  # no placement: the topology is not read
    gpus = capped_gpus("n0", rec.report, {0: 150.0, 1: 150.0})
    mult = plan_phase2(gpus).weight_mult
    assert state.gpus[0].capped_throughput_frac == pytest.approx(mult[("n0", 0)])
    assert 0 < mult[("n0", 0)] < 1
