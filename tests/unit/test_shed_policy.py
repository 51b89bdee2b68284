"""The pure shed policy: the order of the cut, minimum limits, infeasible cuts, pre-armed caps."""

from __future__ import annotations

import pytest

from coordinator.policy.capping.shed import (
    BEST_EFFORT,
    IAAS,
    SAAS,
    ClockPoint,
    SheddableGpu,
    ShedSnapshot,
    level_for,
    locked_clock_mhz,
    prearm,
    relaxed_cap_w,
    shed,
)
from shapeshifter.hw import physics


def gpu(node: str, index: int, cls: str, draw_w: float = 600.0, decode_frac: float = 0.5,
        instances: tuple[str, ...] = ()) -> SheddableGpu:
    return SheddableGpu(node, index, draw_w, 200.0, 700.0, cls, decode_frac, instances)


def mixed() -> ShedSnapshot:
    return ShedSnapshot((
        gpu("n1", 0, IAAS),
        gpu("n1", 1, SAAS, decode_frac=0.1),  # prefill-heavy: compute-bound
        gpu("n2", 0, SAAS, decode_frac=0.95),  # decode-heavy: memory-bound
        gpu("n2", 1, BEST_EFFORT, instances=("batch-1",)),
    ), other_power_w=400.0)  # draw 2800 W


def caps(plan) -> dict[tuple[str, int], float]:
    return {(c.node_id, c.gpu_index): c.power_cap_w for c in plan.caps}


@pytest.mark.parametrize(("limit_w", "capped"), [
    (2800.0 / 0.95 + 1, set()),  # already under the target: nothing capped
    (2600.0, {("n2", 1)}),  # best-effort alone covers it
    (2200.0, {("n2", 1), ("n2", 0)}),  # then the memory-bound SaaS GPU
    (1900.0, {("n2", 1), ("n2", 0), ("n1", 1)}),  # then the compute-bound SaaS GPU
    (1500.0, {("n2", 1), ("n2", 0), ("n1", 1), ("n1", 0)}),  # opaque only when all else is not
])
def test_cut_order_by_tier(limit_w: float, capped: set[tuple[str, int]]) -> None:
    plan = shed(mixed(), limit_w, margin_frac=0.05)
    assert set(caps(plan)) == capped
    assert plan.feasible
    assert plan.expected_w == pytest.approx(min(plan.power_draw_w, limit_w * 0.95))


def test_opaque_gpus_untouched_when_flexible_capacity_suffices() -> None:
    plan = shed(mixed(), 1700.0, margin_frac=0.0)  # needs 1100 W; non-IaaS can give 1200 W
    assert ("n1", 0) not in caps(plan)
    assert plan.feasible and plan.expected_w == pytest.approx(1700.0)


def test_minimum_limits_respected_and_shortfall_reported() -> None:
    plan = shed(mixed(), 1000.0, margin_frac=0.0)
    assert all(c.power_cap_w >= 200.0 for c in plan.caps)
    assert caps(plan) == {k: 200.0 for k in caps(plan)} and len(plan.caps) == 4
    # everything at 200 W: 400 + 4 * 200 = 1200 W, 200 W above the limit
    assert plan.shortfall_w == pytest.approx(200.0)
    assert not plan.feasible
    assert [(s.node_id, s.instance_id) for s in plan.stop_instances] == [("n2", "batch-1")]


def test_feasible_plan_escalates_nothing() -> None:
    plan = shed(mixed(), 2500.0)
    assert plan.stop_instances == () and plan.shortfall_w == 0.0


def test_equal_gpus_in_a_tier_share_the_cut() -> None:
    snap = ShedSnapshot((gpu("a", 0, SAAS, 600.0, 0.9), gpu("b", 0, SAAS, 400.0, 0.9)))
    plan = shed(snap, 800.0, margin_frac=0.0)  # need 200 of 400 + 200 reducible: 1/3 each
    assert caps(plan)[("a", 0)] == pytest.approx(600 - 400 / 3)
    assert caps(plan)[("b", 0)] == pytest.approx(400 - 200 / 3)


def test_gpu_below_its_minimum_gives_nothing() -> None:
    snap = ShedSnapshot((gpu("a", 0, BEST_EFFORT, 150.0), gpu("a", 1, SAAS, 500.0)))
    plan = shed(snap, 500.0, margin_frac=0.0)
    assert set(caps(plan)) == {("a", 1)}


def test_prearmed_caps_per_severity_get_harsher() -> None:
    p = prearm(mixed(), 2800.0, severities=(0.9, 0.75, 0.5))
    assert set(p.by_node) == {"n1", "n2"}
    total = {s: sum(sum(n[s].values()) + (700 * (2 - len(n[s]))) for n in p.by_node.values())
             for s in (0.9, 0.75, 0.5)}
    assert total[0.9] > total[0.75] > total[0.5]
    assert p.by_node["n1"][0.9] == {}  # a mild cut never reaches n1 (IaaS + compute-bound)


@pytest.mark.parametrize(("declared", "level"), [(0.75, 0.75), (0.8, 0.75), (0.95, 0.9),
                                                 (0.3, 0.5), (1.0, 0.9)])
def test_level_for_declared_capacity(declared: float, level: float) -> None:
    assert level_for([0.5, 0.75, 0.9], declared) == level
    assert level_for([], declared) is None


def test_relaxed_caps_step_back_and_lift() -> None:
    assert relaxed_cap_w(300.0, 700.0, 1, 4) == pytest.approx(400.0)
    assert relaxed_cap_w(300.0, 700.0, 3, 4) == pytest.approx(600.0)
    assert relaxed_cap_w(300.0, 700.0, 4, 4) is None


def test_locked_clock_is_the_highest_that_fits_the_cap() -> None:
    point = ClockPoint(1.0, (1980, 1600, 1200, 800), 1980, 75.0, 625.0)
    assert locked_clock_mhz(700.0, point) == 1980
    chosen = locked_clock_mhz(400.0, point)
    fits = [c for c in point.supported_clocks_mhz
            if physics.power_w(1.0, c, 1980, 75.0, 625.0) <= 400.0]
    assert chosen == max(fits) and chosen < 1980
    assert locked_clock_mhz(50.0, point) is None


def test_prearmed_caps_hold_for_the_worst_case_not_todays_light_load() -> None:
    idle = ShedSnapshot(tuple(gpu(f"n{i}", 0, SAAS, draw_w=150.0) for i in range(4)), 0.0)
    assert shed(idle, 0.75 * 2800.0).caps == ()  # today nothing would need a cap
    p = prearm(idle, 2800.0, severities=(0.75,), margin_frac=0.0)
    caps = [c for n in p.by_node.values() for c in n[0.75].values()]
    assert len(caps) == 4 and sum(caps) == pytest.approx(0.75 * 2800.0)
