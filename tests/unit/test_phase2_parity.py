"""The simulator's emergency path and the live emergency controller produce the same Phase 2
actions for the same snapshot (issue 18): a simulated UPS failure's caps, the simulator's
Phase 2 locks, and the live controller's lock actions from agent reports built from the same
GPUs (power, activity as utilization, clocks, the instances on them)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from coordinator.emergency.phase2 import clock_lock_actions
from coordinator.policy.capping import phase2
from coordinator.rebalance.snapshot import capped_gpus
from shapeshifter.api.v1 import agent_pb2
from simulator.control import snapshot as snap
from simulator.control.policies import make_policy
from simulator.engine import Engine
from simulator.inputs.scenario import Scenario
from simulator.inputs.trace import default_trace_path, load_trace


@pytest.fixture(scope="module")
def capped_engine() -> Engine:
    s = Scenario.model_validate({
        "name": "parity", "duration_s": 60, "cluster": {"servers": 8, "rows": 2, "aisles": 2},
        "workload": {"endpoints": 2}, "opaque": {"tenants": 2, "period_s": 60},
        "failures": [{"kind": "ups", "at_s": 20, "target": 0, "capacity_frac": 0.6}]})
    e = Engine(s, load_trace(default_trace_path()), make_policy("shapeshifter"))
    e.run()
    assert (e.gpus.power_limit_w < e.cluster.gpu.power.max_w).sum() > 4  # still capped
    return e


def live_record(e: Engine, server: int, decode_share: float) -> SimpleNamespace:
    """What an agent on this simulated server would report."""
    m, n_per = e.cluster.gpu, e.cluster.gpus_per_server
    gpus, instances = [], []
    for i in range(n_per):
        g = server * n_per + i
        gpus.append(agent_pb2.Gpu(
            index=i, gpu_type=e.cluster.spec.gpu_type, power_draw_w=float(e.gpus.power_w[g]),
            utilization_gpu_pct=float(e.activity[g]) * 100.0,
            sm_clock_max_mhz=m.sm_max_clock_mhz, supported_sm_clocks_mhz=m.sm_clocks_mhz))
        if e.fleet.hosting()[g]:
            # Token rates whose generated share is the simulator's decode share.
            instances.append(agent_pb2.Instance(
                spec=agent_pb2.InstanceSpec(instance_id=f"i{g}",
                                            endpoint=snap.endpoint_name(int(e.fleet.endpoint[g])),
                                            devices=[str(i)], priority_class="saas"),
                metrics=agent_pb2.InstanceMetrics(generation_tokens_per_s=decode_share,
                                                  prompt_tokens_per_s=1.0 - decode_share)))
    node = agent_pb2.Node(gpus=gpus, instances=instances)
    return SimpleNamespace(node_id=snap.node_id(server), report=node)


def test_simulator_and_live_controller_lock_the_same_clocks(capped_engine: Engine) -> None:
    e = capped_engine
    view = e._view(e.scenario.duration_s)
    caps = e.gpus.power_limit_w
    sim_locks, _, _ = snap.phase2_arrays(
        phase2.plan_phase2(snap.phase2_gpus(view, caps, e.activity)), view)
    n_per = e.cluster.gpus_per_server
    live_locks = np.full(e.cluster.n_gpus, np.nan)
    for server in range(e.cluster.n_servers):
        rec = live_record(e, server, e.workload.decode_share)
        node_caps = {i: float(caps[server * n_per + i]) for i in range(n_per)
                     if caps[server * n_per + i] < e.cluster.gpu.power.max_w}
        for action in clock_lock_actions(rec, node_caps):
            live_locks[server * n_per + action.lock_clocks.gpu_index] = action.lock_clocks.max_mhz
    assert np.isfinite(sim_locks).sum() > 4
    np.testing.assert_array_equal(sim_locks, live_locks)


def test_simulator_and_live_agree_on_what_the_capped_endpoints_lost(capped_engine) -> None:
    e = capped_engine
    view = e._view(e.scenario.duration_s)
    caps = e.gpus.power_limit_w
    sim_plan = phase2.plan_phase2(snap.phase2_gpus(view, caps, e.activity))
    n_per = e.cluster.gpus_per_server
    live_gpus = []
    for server in range(e.cluster.n_servers):
        node_caps = {i: float(caps[server * n_per + i]) for i in range(n_per)
                     if caps[server * n_per + i] < e.cluster.gpu.power.max_w}
        rec = live_record(e, server, e.workload.decode_share)
        live_gpus += capped_gpus(rec.node_id, rec.report, node_caps)
    live_plan = phase2.plan_phase2(live_gpus)
    assert sim_plan.lost_instances, "a capped SaaS GPU lost capacity"
    assert live_plan.lost_instances.keys() == sim_plan.lost_instances.keys()
    for name, lost in sim_plan.lost_instances.items():
        assert live_plan.lost_instances[name] == pytest.approx(lost)
    assert live_plan.weight_mult == pytest.approx(sim_plan.weight_mult)
