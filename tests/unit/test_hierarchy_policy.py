"""The hierarchy's pure policy: a site limit split into row limits; a leaf's step per row."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator.hierarchy.policy import (
    ADJUST,
    BLOCKED_LOCAL,
    CLEAR,
    DECLARE,
    KEEP,
    KEEP_LOCAL,
    NONE,
    PENDING,
    InForce,
    RowDemand,
    node_floor_w,
    row_step,
    split_site_limit,
)
from shapeshifter.api.v1 import agent_pb2 as pb

ROWS = {"r1": RowDemand(normal_w=4000, floor_w=1800, draw_w=3600),
        "r2": RowDemand(normal_w=4000, floor_w=1800, draw_w=2600)}


def test_a_limit_covering_every_normal_keeps_the_normal_limits() -> None:
    split = split_site_limit(8000, ROWS)
    assert split.limits_w == {"r1": 4000, "r2": 4000} and not split.infeasible
    assert split_site_limit(9000, ROWS).limits_w == {"r1": 4000, "r2": 4000}


def test_floors_first_then_the_rest_in_proportion_to_demand_above_floor() -> None:
    # Above the floors: r1 wants 1800 W, r2 800 W; 1300 W to share -> 900 and 400.
    split = split_site_limit(4900, ROWS)
    assert split.limits_w["r1"] == pytest.approx(1800 + 1300 * 1800 / 2600)
    assert split.limits_w["r2"] == pytest.approx(1800 + 1300 * 800 / 2600)
    assert sum(split.limits_w.values()) == pytest.approx(4900) and not split.infeasible


def test_surplus_over_demand_goes_by_remaining_headroom() -> None:
    # Demand above floors is 2600 W; 7000 - 3600 = 3400 W leaves 800 W of surplus, shared by
    # headroom: r1 has 400 W left (4000 - 3600), r2 1400 W.
    split = split_site_limit(7000, ROWS)
    assert split.limits_w["r1"] == pytest.approx(3600 + 800 * 400 / 1800)
    assert split.limits_w["r2"] == pytest.approx(2600 + 800 * 1400 / 1800)
    assert sum(split.limits_w.values()) == pytest.approx(7000)


def test_floors_above_the_limit_split_in_proportion_to_floors_and_flag_it() -> None:
    rows = {"r1": RowDemand(4000, 3000, 3500), "r2": RowDemand(4000, 1000, 3500)}
    split = split_site_limit(2000, rows)
    assert split.infeasible
    assert split.limits_w == {"r1": pytest.approx(1500), "r2": pytest.approx(500)}


def test_demand_and_floor_are_capped_at_the_normal_limit() -> None:
    rows = {"r1": RowDemand(1000, 1500, 9000), "r2": RowDemand(3000, 500, 9000)}
    split = split_site_limit(3000, rows)
    assert split.limits_w["r1"] == pytest.approx(1000)  # its floor, capped at its normal
    assert split.limits_w["r2"] == pytest.approx(2000)


def test_a_row_with_no_demand_keeps_its_floor_when_others_need_the_rest() -> None:
    rows = {"idle": RowDemand(4000, 500, 300), "busy": RowDemand(4000, 1500, 4000)}
    split = split_site_limit(4500, rows)  # 2500 W above the floors: all of busy's demand
    assert split.limits_w["idle"] == pytest.approx(500)
    assert split.limits_w["busy"] == pytest.approx(4000)
    split = split_site_limit(5000, rows)  # 500 W more: by headroom, all of it to idle
    assert split.limits_w == {"idle": pytest.approx(1000), "busy": pytest.approx(4000)}
    assert split_site_limit(1000, {}).limits_w == {}


_row = st.builds(
    lambda normal, floor_frac, draw_frac: RowDemand(normal, normal * floor_frac,
                                                    normal * draw_frac),
    st.floats(1.0, 1e6), st.floats(0.0, 1.5), st.floats(0.0, 2.0))


@settings(max_examples=300, deadline=None)
@given(rows=st.dictionaries(st.sampled_from([f"r{i}" for i in range(8)]), _row, min_size=1),
       frac=st.floats(0.0, 1.2))
def test_split_properties(rows: dict[str, RowDemand], frac: float) -> None:
    normal_w = sum(r.normal_w for r in rows.values())
    site_limit_w = frac * normal_w
    split = split_site_limit(site_limit_w, rows)
    assert set(split.limits_w) == set(rows)
    for name, limit_w in split.limits_w.items():
        assert -1e-9 <= limit_w <= rows[name].normal_w * (1 + 1e-9)
    total_w = sum(split.limits_w.values())
    assert total_w <= max(site_limit_w, 0.0) * (1 + 1e-9) + 1e-6
    floors_w = sum(min(r.floor_w, r.normal_w) for r in rows.values())
    assert split.infeasible == (site_limit_w < normal_w and floors_w > site_limit_w)
    if not split.infeasible:
        for name, limit_w in split.limits_w.items():  # nobody below its (capped) floor
            r = rows[name]
            assert limit_w >= min(r.floor_w, r.normal_w) * (1 - 1e-9) - 1e-9
        if site_limit_w < normal_w:  # a cut uses the whole limit
            assert total_w == pytest.approx(site_limit_w, rel=1e-9, abs=1e-6)


def test_node_floor_is_min_limits_plus_non_gpu_draw() -> None:
    node = pb.Node(gpus=[pb.Gpu(index=0, power_limit_min_w=200),
                         pb.Gpu(index=1, power_limit_min_w=200)],
                   budget=pb.NodeBudget(node_power_w=1900, gpu_power_w=1400))
    assert node_floor_w(node) == pytest.approx(400 + 500)


# ---------------------------------------------------------------- the leaf's step


def ours(limit_w: float, state: str = "active", resuming: bool = False) -> InForce:
    return InForce("p1", limit_w, state, True, resuming)


def local(limit_w: float) -> InForce:
    return InForce("op1", limit_w, "active", False)


def auto(state: str = "active", resuming: bool = False) -> InForce:
    """The leaf's own detection: at the row's normal limit (4000 W here)."""
    return InForce("a1", 4000, state, False, resuming, auto=True)


@pytest.mark.parametrize(("limit_w", "in_force", "action", "eid"), [
    (3000, [], DECLARE, ""),
    (3000, [ours(3000.2)], KEEP, "p1"),
    (2500, [ours(3000)], ADJUST, "p1"),
    (3500, [ours(3000)], ADJUST, "p1"),
    (3000, [ours(3500, "clearing")], PENDING, "p1"),
    (3000, [ours(3500, resuming=True)], PENDING, "p1"),
    (4000, [ours(3000)], CLEAR, "p1"),
    (4000, [ours(3000, "clearing")], NONE, "p1"),
    (4000, [], NONE, ""),
    (4000, [local(2000)], NONE, ""),  # the operator's emergency is not the parent's business
    (3000, [local(2000)], KEEP_LOCAL, "op1"),
    (3000, [local(3500)], BLOCKED_LOCAL, "op1"),
    (3000, [auto()], DECLARE, "a1"),  # taken over in place by the declaration
    (3000, [auto("clearing")], PENDING, "a1"),
    (3000, [auto(resuming=True)], PENDING, "a1"),
    (4000, [auto()], NONE, ""),  # the row's own business at its normal limit
])
def test_row_step(limit_w: float, in_force: list[InForce], action: str, eid: str) -> None:
    step = row_step(limit_w, 4000, in_force)
    assert (step.action, step.emergency_id) == (action, eid)
    if action in (BLOCKED_LOCAL, PENDING):
        assert step.why
