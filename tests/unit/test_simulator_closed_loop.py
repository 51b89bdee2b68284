"""The simulator's closed loop (issue 17): the capacity correction recovers the SLO when the
profile overstates capacity, a burst scales out within one routing interval, and the live
clock plan locks clocks below the maximum at low demand."""

from __future__ import annotations

from pathlib import Path

import numpy as np

import simulator.control.shaping as control
from coordinator.policy import configure
from coordinator.policy.model import (
    ClusterSnapshot,
    EndpointSpec,
    GpuState,
    InstanceState,
    NodeState,
)
from coordinator.profiles.schema import QueryClass
from coordinator.profiles.store import default_rows
from shapeshifter.hw.models import GPU_MODELS
from simulator.control.observe import Observation
from simulator.control.policies import make_policy
from simulator.engine import Engine
from simulator.inputs.scenario import parse_scenario
from simulator.inputs.trace import load_trace

SAMPLE = (Path(__file__).resolve().parents[2]
          / "simulator/data/AzureLLMInferenceTrace_conv_sample.csv")
SCENARIO = """version: 1
name: overstated
duration_s: 1500
cluster: {servers: 16, rows: 2, aisles: 1, saas_fraction: 1.0, row_provision_frac: 1.2}
workload: {endpoints: 1, peak_load_frac: 0.4, capacity_error_frac: 0.3}
policies: [baseline, shapeshifter]
"""


def test_the_loop_learns_an_overstated_profile_and_keeps_the_slo() -> None:
    """The profile says 30% more than the engines serve: the correction measures it (factor
    below 1/1.3) and the loop stays within the SLO target. Measured (seed 0): factor 0.75,
    99.07% within SLO (99.08% with the correction switched off: since scale-in waits for a
    clean late window and sheds at most 10% per plan, that guard and the lateness-driven clock
    floor carry this recovery; the factor sizes the scale-out)."""
    eng = Engine(parse_scenario(SCENARIO), load_trace(SAMPLE), make_policy("shapeshifter"))
    slo = eng.run().summary()["slo_attainment"]
    assert eng.policy.loop is not None
    assert eng.policy.loop.factor(0) < 1 / 1.3
    assert slo > 0.985


def _loop_view(saturated: bool) -> tuple[control.ShapingLoop, object]:
    eng = Engine(parse_scenario(SCENARIO.replace("capacity_error_frac: 0.3",
                                                 "capacity_error_frac: 0.0")),
                 load_trace(SAMPLE), make_policy("shapeshifter"))
    eng._apply_plan(eng.policy.plan(eng._view(0.0), eng.static_count), 0.0, initial=True)
    view = eng._view(0.0)
    n = eng.cluster.n_gpus
    ready = view.fleet.state == 2
    running = np.where(ready, 87 if saturated else 10, 0)
    waiting = np.where(ready, 5 if saturated else 0, 0)
    rates = np.full((60, 1), 50.0)
    if saturated:
        rates[-3:] = 200.0  # a burst in the last 15 s
    obs = Observation(5.0, rates, np.array([250]), np.array([0]), waiting, running, 87)
    loop = control.ShapingLoop(1, eng.cluster.n_rows)
    loop.observe(view, obs)
    assert n == len(running)
    return loop, view


def test_a_burst_scales_out_within_one_interval() -> None:
    calm, view = _loop_view(saturated=False)
    burst, _ = _loop_view(saturated=True)
    assert not calm.scale_out(view)  # type: ignore[arg-type]
    assert burst.scale_out(view)  # type: ignore[arg-type]
    # The plan it asks for only grows: no endpoint below what it has.
    have = burst.provision_rps(view, 90.0, grow_only=True)  # type: ignore[arg-type]
    assert have[0] >= calm.provision_rps(view, 90.0)[0]  # type: ignore[arg-type]


def _live_snapshot(demand_rps: float) -> ClusterSnapshot:
    gpus = tuple(GpuState(index=i, gpu_type="a100-80gb") for i in range(4))
    node = NodeState(node_id="n1", row="r1", aisle="a1", gpus=gpus)
    insts = tuple(InstanceState(instance_id=f"i{i}", endpoint="chat", node_id="n1",
                                gpu_indices=(i,), model="meta-llama/Meta-Llama-3-8B")
                  for i in range(4))
    ep = EndpointSpec("chat", "meta-llama/Meta-Llama-3-8B")
    mix = {QueryClass.LISO: demand_rps * 0.3, QueryClass.SILO: demand_rps * 0.7}
    return ClusterSnapshot(nodes=(node,), instances=insts, endpoints=(ep,),
                           demand_rps={"chat": mix})


def test_the_live_clock_plan_locks_low_at_low_demand_and_not_at_high() -> None:
    cfg = configure.ConfigureConfig()
    low = configure.clock_plan(_live_snapshot(2.0), default_rows(), GPU_MODELS, 0.2, cfg)
    assert len(low) == 4
    assert all(a.sm_clock_mhz is not None and a.sm_clock_mhz < 1410 for a in low)
    high = configure.clock_plan(_live_snapshot(10.0), default_rows(), GPU_MODELS, 0.2, cfg)
    assert high == ()  # only the maximum covers it, and nothing is locked now
