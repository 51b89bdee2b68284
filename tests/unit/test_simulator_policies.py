"""The simulator's adapter really calls the coordinator policies (shed, rebalance, routing,
placement) on snapshots built from its arrays, and uses what they return."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

import simulator.control.policies as policies
from simulator.control.policies import (
    coordinator_caps,
    coordinator_weights,
    make_policy,
    placed_roles,
    policy_sources,
    rebalanced_plan,
)
from simulator.engine import Engine
from simulator.inputs.scenario import Scenario
from simulator.inputs.trace import default_trace_path, load_trace
from simulator.model.state import READY, View

SMALL = {"name": "small", "duration_s": 60, "cluster": {"servers": 8, "rows": 2, "aisles": 2},
         "workload": {"endpoints": 2}, "opaque": {"tenants": 2, "period_s": 60}}


@pytest.fixture(scope="module")
def trace():
    return load_trace(default_trace_path())


def engine(trace, policy: str = "shapeshifter", **update) -> Engine:
    return Engine(Scenario.model_validate({**SMALL, **update}), trace, make_policy(policy))


def started(eng: Engine, demand_x: float = 1.0) -> View:
    """The engine after its initial plan (sized for demand x demand_x), as a view."""
    view = eng._view(0.0)
    view = replace(view, demand_rps=view.demand_rps * demand_x)
    if eng.policy.components.rebalance:  # sized from the demand, not the deployed fleet
        plan = rebalanced_plan(view, view.demand_rps * 1.5)
    else:
        plan = eng.policy.plan(view, eng.static_count)
    eng._apply_plan(plan, 0.0, initial=True)
    return eng._view(0.0)


def test_shed_spares_opaque_gpus_while_flexible_capacity_suffices(trace) -> None:
    eng = engine(trace)
    view = started(eng)
    view = replace(view, gpu_uncapped_w=np.full(eng.cluster.n_gpus, 300.0))
    row0 = np.flatnonzero(eng.gpu_row == 0)
    opaque, saas = view.opaque[row0], view.fleet.hosting()[row0]
    assert opaque.any() and saas.any()
    p = eng.cluster.gpu.power
    demand_w = 300.0 * len(row0)
    # A cut the LLM GPUs can absorb alone (each can give 300 - 100 W).
    budget_w = demand_w - 0.5 * (300.0 - p.min_w) * saas.sum()
    caps = coordinator_caps(view, row0, budget_w)
    assert (caps[opaque] == p.max_w).all()  # opaque (IaaS) GPUs keep performance
    assert (caps[saas] < 300.0).all()
    assert np.minimum(300.0, caps).sum() == pytest.approx(budget_w, rel=1e-6)
    # A cut larger than all the flexible GPUs can give reaches the opaque ones too.
    budget_w = demand_w - 1.2 * (300.0 - p.min_w) * (~opaque).sum()
    caps = coordinator_caps(view, row0, budget_w)
    assert (caps[~opaque] == p.min_w).all() and (caps[opaque] < 300.0).all()


def test_engine_sheds_through_the_coordinator_function(trace, monkeypatch) -> None:
    calls = []
    real = policies.shed

    def spy(snapshot, limit_w, margin_frac, saas_deep_weight=1.0):
        calls.append((len(snapshot.gpus), limit_w))
        assert 0.0 <= saas_deep_weight <= 1.0
        return real(snapshot, limit_w, margin_frac, saas_deep_weight)

    monkeypatch.setattr(policies, "shed", spy)
    eng = engine(trace, duration_s=90, failures=[{"kind": "ups", "at_s": 30, "target": 0,
                                                  "capacity_frac": 0.6}])
    eng.run()
    assert calls, "the UPS failure never reached coordinator.policy.capping.shed.shed"
    assert all(n == len(np.flatnonzero(eng.gpu_row == 0)) for n, _ in calls[:1])


def test_rebalance_stops_instances_of_a_low_demand_endpoint(trace) -> None:
    eng = engine(trace)
    view = started(eng)
    before = np.bincount(view.fleet.endpoint[view.fleet.hosting()], minlength=2)
    assert before[0] > 1
    low = view.demand_rps.copy()
    low[0] = 1e-3  # endpoint 0's demand all but vanishes
    plan = rebalanced_plan(replace(view, t_s=3600.0), low * 1.5)  # endpoint 1 keeps headroom
    assert plan.actions is not None and plan.actions.stops
    assert all(view.fleet.endpoint[g] == 0 for g in plan.actions.stops)
    assert plan.count[0] < before[0]
    assert not any(e == 0 for _, e, _ in plan.actions.starts)


def test_rebalance_starts_land_on_free_gpus_and_stops_wait_for_them(trace) -> None:
    eng = engine(trace)
    view = started(eng, demand_x=0.2)
    hosting_before = int(view.fleet.hosting().sum())
    # demand x5 of what it was sized for
    plan = rebalanced_plan(replace(view, t_s=60.0), view.demand_rps * 5)
    assert plan.actions is not None and plan.actions.starts
    free = ~view.fleet.hosting() & ~view.opaque
    assert all(free[g] for g, _, _ in plan.actions.starts)
    eng._apply_plan(plan, 60.0)
    assert int(eng.fleet.hosting().sum()) == hosting_before + len(plan.actions.starts)


def test_routing_weights_zero_instances_in_a_row_over_its_limit(trace) -> None:
    eng = engine(trace, policy="route")
    view = started(eng)
    server_w = view.server_power_w.copy()
    row0 = eng.cluster.server_row == 0
    server_w[row0] = view.row_limit_w[0] / row0.sum() * 1.01  # row 0 over its limit
    w = coordinator_weights(replace(view, server_power_w=server_w))
    ready = view.fleet.state == READY
    in_row0 = eng.gpu_row == 0
    assert (w[ready & in_row0] == 0).all()
    for e in range(2):
        mine = ready & (view.fleet.endpoint == e) & ~in_row0
        if mine.any():
            assert w[mine].sum() == pytest.approx(1.0)


def test_placement_mixes_every_row_and_places_within_limits(trace) -> None:
    eng = engine(trace, policy="place", cluster={"servers": 16, "rows": 4, "aisles": 2,
                                                 "row_provision_frac": 1.2})
    role_counts = [(0, 4), (1, 4), (-1, 4), (-2, 4)]
    phases = np.zeros(2)
    roles, fallbacks = placed_roles(eng._placement_inputs(role_counts, phases), role_counts,
                                    eng._peak_gpu_w(role_counts))
    assert fallbacks == 0
    assert sorted(np.bincount(roles - roles.min()).tolist()) == [4, 4, 4, 4]
    for r in range(4):
        row_roles = roles[eng.cluster.server_row == r]
        assert (row_roles < 0).any() and (row_roles >= 0).any(), r
    # Feeds provisioned below the predicted peaks: place() finds no node for some servers.
    tight = engine(trace, policy="place", cluster={"servers": 16, "rows": 4, "aisles": 2,
                                                   "row_provision_frac": 0.6})
    _, fallbacks = placed_roles(tight._placement_inputs(role_counts, phases), role_counts,
                                tight._peak_gpu_w(role_counts))
    assert fallbacks > 0


def test_policy_sources_name_the_coordinator_functions() -> None:
    src = policy_sources("shapeshifter")
    assert src["shed"] == "coordinator.policy.capping.shed.shed"
    assert src["rebalance"].startswith("coordinator.policy.rebalance.rebalance sized by "
                                       "coordinator.policy.capacity")
    assert src["route"].startswith("coordinator.policy.routing.routing_weights")
    assert "coordinator.policy.shaping" in src["route"]
    assert src["place"].startswith("coordinator.policy.placement.place")
    assert "stand-in" not in src["config"]  # the configurator chooses the clock
    assert src["config"].startswith("coordinator.policy.configure")
    assert policy_sources("baseline")["shed"] == "baseline (uniform caps)"
