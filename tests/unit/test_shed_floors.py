"""Shedding that weighs SLO (issue 18): per-GPU floors split each GPU's range into a free part
and a costly one, and the cut takes every free part (SaaS slack, opaque down to its
performance floor) before any costly one."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import pytest

from coordinator.emergency.scope import OPAQUE_SAMPLE_S, OpaquePerf
from coordinator.policy.capping.shed import (
    IAAS,
    OPAQUE_DECODE_FRAC,
    OPAQUE_MIN_REL_PERF,
    SAAS,
    SheddableGpu,
    ShedSnapshot,
    clock_frac_for_rel,
    deep_weight_for,
    opaque_floor_w,
    saas_floor_from_occupancy,
    saas_floor_w,
    segments,
    shed,
)
from shapeshifter.api.v1 import agent_pb2
from shapeshifter.hw import physics


def gpu(node: str, cls: str, draw_w: float, floor_w: float, decode_frac: float = 0.9
        ) -> SheddableGpu:
    return SheddableGpu(node, 0, draw_w, 100.0, 400.0, cls, decode_frac, floor_w=floor_w)


def caps(plan) -> dict[str, float]:
    return {c.node_id: c.power_cap_w for c in plan.caps}


def test_clock_frac_for_rel_inverts_relative_throughput() -> None:
    for decode in (0.0, 0.5, 1.0):
        for rel in (0.6, 0.9, 0.97):
            f = clock_frac_for_rel(rel, decode)
            assert physics.relative_throughput(f * 1410, 1410, decode) == pytest.approx(
                rel, rel=1e-3)
    assert clock_frac_for_rel(1.0, 0.5) == 1.0


def test_opaque_floor_keeps_the_contracts_performance() -> None:
    draw = 360.0
    floor = opaque_floor_w(draw, 55.0)
    assert 55.0 < floor < draw
    # The floor is the draw at the clock where the opaque work keeps 97 % of its performance.
    f = clock_frac_for_rel(OPAQUE_MIN_REL_PERF, OPAQUE_DECODE_FRAC)
    assert floor == pytest.approx(55.0 + (draw - 55.0) * f ** physics.POWER_CLOCK_EXPONENT)


def test_saas_floor_follows_the_load() -> None:
    idle_batch = saas_floor_w(250.0, 55.0, 0.3, 0.9)
    full_batch = saas_floor_w(250.0, 55.0, 1.0, 0.9)
    assert idle_batch < full_batch == pytest.approx(250.0)
    assert saas_floor_from_occupancy(250.0, 55.0, 1.0, 0.9) == pytest.approx(250.0)
    assert saas_floor_from_occupancy(250.0, 55.0, 0.2, 0.9) < 250.0


def test_segments_without_floor_is_the_plain_tier() -> None:
    assert segments(gpu("a", SAAS, 300.0, 0.0)) == [(1, 200.0)]
    assert segments(gpu("a", IAAS, 300.0, 0.0)) == [(3, 200.0)]
    assert segments(gpu("a", IAAS, 300.0, 250.0)) == [(3, 50.0), (4, 150.0)]


def test_opaque_gives_down_to_its_floor_before_a_saturated_saas_gpu() -> None:
    snap = ShedSnapshot((gpu("op", IAAS, 360.0, 330.0), gpu("llm", SAAS, 300.0, 300.0)))
    plan = shed(snap, 640.0, margin_frac=0.0)  # 20 W: the opaque GPU's free 30 W covers it
    assert caps(plan) == {"op": pytest.approx(340.0)}
    # 60 W: opaque's free 30 W, then 30 W shared below the floors (230 W + 200 W left).
    plan = shed(snap, 600.0, margin_frac=0.0)
    assert caps(plan) == {"op": pytest.approx(330.0 - 30.0 * 230 / 430),
                          "llm": pytest.approx(300.0 - 30.0 * 200 / 430)}


def test_saas_slack_goes_before_opaque() -> None:
    snap = ShedSnapshot((gpu("op", IAAS, 360.0, 330.0), gpu("llm", SAAS, 300.0, 200.0)))
    plan = shed(snap, 600.0, margin_frac=0.0)  # 60 W of the SaaS GPU's 100 W slack
    assert caps(plan) == {"llm": pytest.approx(240.0)}


def test_below_the_floors_every_class_gives_the_same_share() -> None:
    snap = ShedSnapshot((gpu("op", IAAS, 360.0, 330.0), gpu("llm", SAAS, 300.0, 300.0)))
    # 260 W: 30 W free from opaque, then 230 W of the 230 + 200 W left below the floors.
    plan = shed(snap, 400.0, margin_frac=0.0)
    share = 230.0 / 430.0
    assert caps(plan)["op"] == pytest.approx(330.0 - share * 230.0)
    assert caps(plan)["llm"] == pytest.approx(300.0 - share * 200.0)
    assert plan.feasible and plan.expected_w == pytest.approx(400.0)


def test_floor_above_draw_or_below_minimum_is_clamped() -> None:
    high = gpu("a", SAAS, 300.0, 999.0)
    assert segments(high) == [(4, 200.0)]  # all of it is below its floor
    low = replace(high, floor_w=10.0)
    assert segments(low) == [(1, 200.0)]


def test_deep_weight_follows_the_measured_opaque_performance() -> None:
    assert deep_weight_for(None) == 1.0  # nothing measured: shared
    assert deep_weight_for(0.999) == 0.0  # well above the contract: opaque goes first
    assert deep_weight_for(OPAQUE_MIN_REL_PERF) == 1.0
    assert deep_weight_for(0.90) == 1.0
    assert deep_weight_for(OPAQUE_MIN_REL_PERF + 0.005) == pytest.approx(0.5)


def test_spared_saas_gives_below_its_floor_only_after_the_opaque_gpus() -> None:
    snap = ShedSnapshot((gpu("op", IAAS, 360.0, 330.0), gpu("llm", SAAS, 300.0, 300.0)))
    # 160 W: 30 W free from opaque, then 130 W below the floors, all from opaque (weight 0).
    plan = shed(snap, 500.0, margin_frac=0.0, saas_deep_weight=0.0)
    assert caps(plan) == {"op": pytest.approx(200.0)}
    # Half weight: the SaaS GPU offers half of its 200 W deep range in the shared tier.
    plan = shed(snap, 500.0, margin_frac=0.0, saas_deep_weight=0.5)
    assert caps(plan)["llm"] == pytest.approx(300.0 - 130.0 * 100 / 330)
    # Past everything the opaque GPU has, the SaaS GPU gives the rest.
    plan = shed(snap, 250.0, margin_frac=0.0, saas_deep_weight=0.0)
    assert caps(plan) == {"op": pytest.approx(100.0), "llm": pytest.approx(150.0)}


def _opaque_record(clock_mhz: int) -> SimpleNamespace:
    gpu_pb = agent_pb2.Gpu(index=0, gpu_type="a100-80gb", sm_clock_mhz=clock_mhz,
                           sm_clock_max_mhz=1410, utilization_gpu_pct=80.0)
    inst = agent_pb2.Instance(spec=agent_pb2.InstanceSpec(instance_id="vm", devices=["0"],
                                                          priority_class="iaas"))
    return SimpleNamespace(node_id="n0", report=agent_pb2.Node(gpus=[gpu_pb], instances=[inst]))


def test_live_controller_measures_opaque_performance_for_the_deep_weight() -> None:
    perf = OpaquePerf()
    assert perf.deep_weight() == 1.0  # nothing measured yet: shared
    perf.sample([_opaque_record(1410)], 0.0)
    assert perf.deep_weight() == 0.0  # at full clock: the opaque GPUs go first
    perf.sample([_opaque_record(600)], 1.0)  # within the sampling interval: ignored
    assert perf.samples == 1
    for k in range(1, 4):
        perf.sample([_opaque_record(600)], k * OPAQUE_SAMPLE_S)
    assert perf.total / perf.samples < OPAQUE_MIN_REL_PERF
    assert perf.deep_weight() == 1.0  # below the contract's floor: shared again
