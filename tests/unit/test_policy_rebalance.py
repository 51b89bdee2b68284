"""rebalance(): known optimal answers on small clusters, limits never exceeded, safe staging."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator.policy.model import (
    ClusterSnapshot,
    EndpointSpec,
    GpuState,
    InstanceState,
    Limits,
    MigSlice,
    NodeState,
    Plan,
    RebalanceConfig,
)
from coordinator.policy.packing.ledger import Ledger, node_power_w, shape_of
from coordinator.policy.rebalance import rebalance
from coordinator.profiles.schema import ProfileRow, QueryClass, Source
from shapeshifter.common.errors import InvalidArgument
from shapeshifter.hw.mig import place_mig_layout
from shapeshifter.hw.models import GPU_MODELS

A100 = "a100-80gb"
LISO = QueryClass.LISO


def row(model: str, tp: int, quant: str, msrr: float, *, mem: float | None = None,
        power: float | None = None, mig: str = "full", clock: int | None = None,
        qc: QueryClass = LISO) -> ProfileRow:
    return ProfileRow(A100, model, tp, quant, mig, clock, None, qc, msrr_rps=msrr, slo_p95_s=20,
                      memory_gb=mem, avg_power_w=power, source=Source.MEASURED)


# Fig. 6: the fp16 model needs 120 GB (two GPUs); FP8 halves it to fit one GPU.
FIG6 = [row("big", 2, "none", 4.0, mem=120, power=600),
        row("big", 1, "none", 2.5, mem=120, power=350),
        row("big", 1, "fp8", 3.5, mem=60, power=300)]
SMALL = [row("small", 1, "none", 4.5, mem=20, power=300),
         row("small", 1, "none", 2.0, mig="3g.40gb", power=170),
         row("small", 1, "none", 0.5, mig="1g.10gb", power=70)]


def node(node_id: str, n: int = 4, row_name: str = "r1", aisle: str = "a1",
         inlet_c: float = 25.0, **gpu_kw: object) -> NodeState:
    return NodeState(node_id, row_name, aisle,
                     tuple(GpuState(i, A100, **gpu_kw) for i in range(n)),  # type: ignore[arg-type]
                     inlet_temp_c=inlet_c)


def snap(nodes: tuple[NodeState, ...], endpoints: tuple[EndpointSpec, ...],
         demand: dict[str, float], instances: tuple[InstanceState, ...] = ()) -> ClusterSnapshot:
    return ClusterSnapshot(nodes, instances, endpoints,
                           {k: {LISO: v} for k, v in demand.items()}, now_s=1e6)


def final_placement(s: ClusterSnapshot, plan: Plan) -> dict[str, tuple[str, tuple[int, ...], str]]:
    """instance -> (node, GPUs, MIG profile) after every action ran."""
    out = {i.instance_id: (i.node_id, i.gpu_indices, i.mig_profile) for i in s.instances}
    for a in plan.actions:
        if a.kind == "stop_instance":
            del out[a.instance_id]
        elif a.kind == "start_instance":
            assert a.config is not None
            out[a.instance_id] = (a.node_id, a.gpu_indices, a.config.mig_profile)
    return out


def check_placement_valid(placement: dict[str, tuple[str, tuple[int, ...], str]]) -> int:
    """No GPU shared by a whole-GPU instance; MIG slices of a GPU form a valid layout."""
    full, mig = Counter(), {}
    for node_id, gpus, profile in placement.values():
        for g in gpus:
            if profile == "full":
                full[(node_id, g)] += 1
            else:
                mig.setdefault((node_id, g), []).append(profile)
    assert all(n == 1 for n in full.values()), full
    assert not set(full) & set(mig)
    for layout in mig.values():
        place_mig_layout(GPU_MODELS[A100].mig_profiles, layout)
    return len(full) + len(mig)


FIG6_INSTANCE = InstanceState("big-1", "big", "n1", (0, 1), "big", tensor_parallel=2)


@pytest.mark.parametrize(
    ("quants", "demand_rps", "gpus_after", "decision"),
    [
        (("none", "fp8"), 2.0, 1, "reshaped"),  # Fig. 6: 2 GPUs unreshaped, 1 after reshaping
        (("none",), 2.0, 2, "kept"),  # quality floor forbids FP8: stays on 2 GPUs
        (("none", "fp8"), 4.0, 2, "reshaped"),  # 4.8 req/s: 2 x FP8 (2 GPUs) < TP2 x 2 (4)
    ],
)
def test_fig6_memory_heavy_reshape(quants: tuple[str, ...], demand_rps: float, gpus_after: int,
                                   decision: str) -> None:
    ep = EndpointSpec("big", "big", allowed_quantizations=quants)
    s = snap((node("n1"),), (ep,), {"big": demand_rps}, (FIG6_INSTANCE,))
    plan = rebalance(s, FIG6, Limits(), RebalanceConfig())
    assert plan.gpus_used_before == 2
    assert plan.outcomes[0].decision == decision
    assert plan.gpus_used_after == gpus_after
    assert check_placement_valid(final_placement(s, plan)) == gpus_after
    assert not plan.warnings
    assert all(a.reason for a in plan.actions)


def test_fig6_stages_make_before_break() -> None:
    ep = EndpointSpec("big", "big", allowed_quantizations=("none", "fp8"))
    s = snap((node("n1"),), (ep,), {"big": 2.0}, (FIG6_INSTANCE,))
    plan = rebalance(s, FIG6, Limits(), RebalanceConfig())
    kinds = [[a.kind for a in st.actions] for st in plan.stages]
    assert kinds == [["start_instance"], ["stop_instance"]]
    start = plan.stages[0].actions[0]
    assert start.config is not None and start.config.quantization == "fp8"
    assert set(start.gpu_indices).isdisjoint({0, 1})  # on a free GPU: old one serves meanwhile


def test_sub_gpu_demand_packs_two_endpoints_onto_one_mig_gpu() -> None:
    eps = (EndpointSpec("e1", "small"), EndpointSpec("e2", "small"))
    s = snap((node("n1"),), eps, {"e1": 0.3, "e2": 0.3})
    plan = rebalance(s, SMALL, Limits(), RebalanceConfig())
    assert plan.gpus_used_after == 1
    layouts = [a for a in plan.actions if a.kind == "apply_mig_layout"]
    assert len(layouts) == 1 and layouts[0].mig_profiles == ("1g.10gb", "1g.10gb")
    placement = final_placement(s, plan)
    assert check_placement_valid(placement) == 1
    # the layout action precedes the starts on that GPU
    first = plan.stages[0].actions
    assert [a.kind for a in first][:2] == ["set_mig_mode", "apply_mig_layout"]


@pytest.mark.parametrize(("demand_rps", "gpu_equiv"), [(3.0, 1.0), (10.0, 2 + 6 / 7), (0.0, 1 / 7)])
def test_sizing_known_optimum(demand_rps: float, gpu_equiv: float) -> None:
    # 3 req/s x 1.2 = 3.6 <= 4.5: one GPU; 10 x 1.2 = 12: 2 full (9 req/s) + 3 req/s on six
    # 1g.10gb slices (0.5 req/s, 1/7 GPU each) = 2 6/7, better than 3 full GPUs or 2 x 3g.40gb;
    # no demand: min_instances=1 on the smallest slice.
    ep = EndpointSpec("e", "small")
    plan = rebalance(snap((node("n1"),), (ep,), {"e": demand_rps}), SMALL, Limits(),
                     RebalanceConfig())
    out = plan.outcomes[0]
    assert out.gpus_after == pytest.approx(gpu_equiv)
    assert out.capacity_after_rps >= demand_rps * 1.2 - 1e-9


def test_row_power_limit_moves_placement_to_other_row() -> None:
    nodes = (node("hot", row_name="r1"), node("ok", row_name="r2"))
    idle = Ledger({n.node_id: shape_of(n) for n in nodes},
                  {n.node_id: 4 * GPU_MODELS[A100].idle_power_w for n in nodes}, Limits())
    limits = Limits(row_power_limit_w={"r1": idle.row_w["r1"] + 10, "r2": 1e6})
    ep = EndpointSpec("e", "small")
    plan = rebalance(snap(nodes, (ep,), {"e": 3.0}), SMALL, limits, RebalanceConfig())
    starts = [a for a in plan.actions if a.kind == "start_instance"]
    assert starts and all(a.node_id == "ok" for a in starts)
    for stage in plan.stages:
        assert stage.row_power_after_w["r1"] <= limits.row_power_limit_w["r1"]


def test_nothing_fits_under_limits_changes_nothing() -> None:
    nodes = (node("n1"),)
    limits = Limits(row_power_limit_w={"r1": 1.0})  # below even the idle power
    plan = rebalance(snap(nodes, (EndpointSpec("e", "small"),), {"e": 3.0}), SMALL, limits,
                     RebalanceConfig())
    assert plan.actions == ()
    assert plan.outcomes[0].decision == "unplaceable"


def test_thermal_headroom_excludes_hot_node() -> None:
    nodes = (node("hot", inlet_c=70.0), node("cool", inlet_c=20.0))
    plan = rebalance(snap(nodes, (EndpointSpec("e", "small"),), {"e": 3.0}), SMALL,
                     Limits(gpu_thermal_headroom_c=5.0), RebalanceConfig())
    # 70 C + 0.1 C/W x (>= 149 W for the smallest GPU in any mix) > 89 - 5: only the cool node
    # can take it
    assert {a.node_id for a in plan.actions if a.kind == "start_instance"} == {"cool"}


def test_hysteresis_and_min_saving_keep_recent_change() -> None:
    ep = EndpointSpec("big", "big", allowed_quantizations=("none", "fp8"))
    recent = InstanceState("big-1", "big", "n1", (0, 1), "big", tensor_parallel=2,
                           changed_at_s=1e6 - 10)
    s = snap((node("n1"),), (ep,), {"big": 2.0}, (recent,))
    plan = rebalance(s, FIG6, Limits(), RebalanceConfig(hysteresis_s=600))
    assert plan.actions == () and "hysteresis" in plan.outcomes[0].reason
    plan = rebalance(s, FIG6, Limits(), RebalanceConfig(hysteresis_s=0, min_gpu_saving=1.5))
    assert plan.actions == () and plan.outcomes[0].decision == "kept"


def test_restart_budget_bounds_the_round() -> None:
    eps = tuple(EndpointSpec(f"e{i}", "small") for i in range(4))
    s = snap((node("n1", n=8),), eps, {f"e{i}": 3.0 for i in range(4)})
    plan = rebalance(s, SMALL, Limits(), RebalanceConfig(max_restarts_per_round=2))
    assert plan.restarts <= 2
    decisions = Counter(o.decision for o in plan.outcomes)
    assert decisions["reshaped"] >= 1 and decisions["reshaped"] + decisions["deferred"] == 4
    plan = rebalance(s, SMALL, Limits(), RebalanceConfig(max_restarts_per_round=100))
    assert Counter(o.decision for o in plan.outcomes)["reshaped"] == 4


def test_under_covered_endpoint_scales_out_before_stopping() -> None:
    ep = EndpointSpec("e", "small")
    old = InstanceState("e-1", "e", "n1", (0,), "small")
    s = snap((node("n1"),), (ep,), {"e": 7.0}, (old,))
    plan = rebalance(s, SMALL, Limits(), RebalanceConfig())
    out = plan.outcomes[0]
    assert out.capacity_before_rps == pytest.approx(4.5)
    assert out.capacity_after_rps >= 7.0 * 1.2
    assert not any(a.kind == "stop_instance" for a in plan.actions)


def test_bad_config_is_refused() -> None:
    with pytest.raises(InvalidArgument) as err:
        rebalance(snap((node("n1"),), (), {}), SMALL, Limits(), RebalanceConfig(fit="worst"))
    assert err.value.field == "fit"
    with pytest.raises(InvalidArgument, match="headroom_frac"):
        rebalance(snap((node("n1"),), (), {}), SMALL, Limits(),
                  RebalanceConfig(headroom_frac=-1))


def test_reuses_existing_free_mig_slice_without_relayout() -> None:
    slices = (MigSlice("1g.10gb", "MIG-a", True), MigSlice("1g.10gb", "MIG-b", False))
    n1 = NodeState("n1", "r1", "a1", (GpuState(0, A100, mig_enabled=True, mig_slices=slices),))
    kept = InstanceState("e1-1", "e1", "n1", (0,), "small", mig_profile="1g.10gb",
                         mig_uuid="MIG-a")
    eps = (EndpointSpec("e1", "small"), EndpointSpec("e2", "small"))
    s = snap((n1,), eps, {"e1": 0.3, "e2": 0.3}, (kept,))
    plan = rebalance(s, SMALL, Limits(), RebalanceConfig())
    assert [a.kind for a in plan.actions] == ["start_instance"]
    assert plan.actions[0].mig_uuid == "MIG-b"


# ---------------------------------------------------------------------- properties


def _replay(s: ClusterSnapshot, plan: Plan, limits: Limits) -> None:
    """Capacity never below demand at any point; no stage takes a row or aisle over its limit
    (or, for one already over it, higher than it was)."""
    row_w, aisle_cfm = dict(plan.row_power_before_w), dict(plan.aisle_airflow_before_cfm)
    demand = {o.endpoint: o.demand_rps for o in plan.outcomes}
    cap = {o.endpoint: o.capacity_before_rps for o in plan.outcomes}
    for stage in plan.stages:
        for a in stage.actions:
            if a.kind == "stop_instance":
                cap[a.endpoint] -= a.capacity_rps
                assert cap[a.endpoint] >= demand[a.endpoint] - 1e-6, a
        for a in stage.actions:
            if a.kind == "start_instance":
                cap[a.endpoint] += a.capacity_rps
        for r, w in stage.row_power_after_w.items():
            assert w <= max(limits.row_power_limit_w.get(r, float("inf")), row_w[r]) + 1e-6
        for a_name, cfm in stage.aisle_airflow_after_cfm.items():
            assert cfm <= max(limits.aisle_airflow_cfm.get(a_name, float("inf")),
                              aisle_cfm[a_name]) + 1e-6
        row_w, aisle_cfm = dict(stage.row_power_after_w), dict(stage.aisle_airflow_after_cfm)


@settings(max_examples=60, deadline=None)
@given(
    n_nodes=st.integers(1, 4),
    demands=st.lists(st.floats(0.0, 12.0), min_size=1, max_size=5),
    row_limit_frac=st.floats(0.3, 1.2),
    fit=st.sampled_from(["dot", "l2"]),
    old_tp2=st.booleans(),
)
def test_property_limits_and_capacity(n_nodes: int, demands: list[float], row_limit_frac: float,
                                      fit: str, old_tp2: bool) -> None:
    nodes = tuple(node(f"n{i}", row_name=f"r{i % 2}", aisle=f"a{i % 2}") for i in range(n_nodes))
    full_w = {f"r{i % 2}": 0.0 for i in range(n_nodes)}
    for n in nodes:
        full_w[n.row] += node_power_w(shape_of(n), 4 * 400.0)[0]
    limits = Limits(row_power_limit_w={r: w * row_limit_frac for r, w in full_w.items()},
                    aisle_airflow_cfm={"a0": 900.0 * row_limit_frac, "a1": 900.0})
    eps = tuple(EndpointSpec(f"e{i}", "small") for i in range(len(demands)))
    eps += (EndpointSpec("big", "big", allowed_quantizations=("none", "fp8")),)
    instances = (InstanceState("big-1", "big", "n0", (0, 1), "big", tensor_parallel=2),) \
        if old_tp2 else ()
    d = {f"e{i}": v for i, v in enumerate(demands)} | {"big": 2.0}
    s = snap(nodes, eps, d, instances)
    plan = rebalance(s, SMALL + FIG6, limits, RebalanceConfig(fit=fit))
    _replay(s, plan, limits)
    used = check_placement_valid(final_placement(s, plan))
    if not plan.warnings:
        assert used == plan.gpus_used_after
    assert plan == rebalance(s, SMALL + FIG6, limits, RebalanceConfig(fit=fit))  # deterministic


def test_demand_beyond_max_instances_grows_to_the_cap_and_says_why() -> None:
    """4.5 req/s per GPU; 12 req/s (+20 %) needs 4 instances but the endpoint allows 2: it
    gets the 2 (closer to its demand than none), and no more."""
    ep = EndpointSpec("small", "small", max_instances=2)
    s = snap((node("n1"),), (ep,), {"small": 12.0})
    plan = rebalance(s, SMALL, Limits(), RebalanceConfig())
    starts = [a for a in plan.actions if a.kind == "start_instance"]
    assert len(starts) == 2
    (outcome,) = plan.outcomes
    assert "max_instances=2" in outcome.reason
