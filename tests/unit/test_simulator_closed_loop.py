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


def _run(scenario: str, policy: str) -> tuple[dict, Engine]:
    eng = Engine(parse_scenario(scenario), load_trace(SAMPLE), make_policy(policy))
    return eng.run().summary(), eng


def test_an_overstated_profile_keeps_the_slo() -> None:
    """The profile says 30% more than the engines serve. The loop shrinks the fleet only as far
    as the load per instance it has seen within the SLO budget, and grows it when lateness
    persists at the maximum clock, so the SLO holds before the correction has learned much.
    Measured (seed 0): 99.16 % within SLO (baseline 99.74 %), factor 0.92."""
    base, _ = _run(SCENARIO, "baseline")
    ours, eng = _run(SCENARIO, "shapeshifter")
    assert eng.policy.loop is not None
    assert ours["slo_attainment"] > 0.985
    assert ours["slo_attainment"] >= base["slo_attainment"] - 0.01


def test_the_correction_learns_an_overstated_profile_under_load() -> None:
    """The same engines at a load the static fleet cannot serve within the SLO: the
    correction measures the shortfall (factor below 1/1.3) and sizes the fleet from it, which
    keeps at least as many requests within the SLO as the static fleet (measured: factor 0.40,
    92.5 % vs 91.8 %)."""
    loaded = SCENARIO.replace("peak_load_frac: 0.4", "peak_load_frac: 0.6")
    base, _ = _run(loaded, "baseline")
    ours, eng = _run(loaded, "shapeshifter")
    assert eng.policy.loop is not None
    assert eng.policy.loop.factor(0) < 1 / 1.3
    assert ours["slo_attainment"] >= base["slo_attainment"]


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
    # The plan it asks for only grows: no endpoint below what it has, held as a count.
    live = int(((view.fleet.state == 2) | (view.fleet.state == 1)).sum())  # type: ignore[attr-defined]
    assert burst.min_counts(view, grow_only=True)[0] == live  # type: ignore[arg-type]
    have = burst.provision_rps(view, 90.0, grow_only=True)  # type: ignore[arg-type]
    assert have[0] >= calm.provision_rps(view, 90.0)[0]  # type: ignore[arg-type]


def test_a_window_late_at_the_maximum_clock_grows_the_count() -> None:
    """Lateness significantly over the budget with the clock floor already at the maximum:
    clocks cannot help any more, so the next plan may not leave fewer than 10 % more
    instances; a clean window may shed at most 10 %, a late one none."""
    loop, view = _loop_view(saturated=False)
    live = int((view.fleet.state == 2).sum())  # type: ignore[attr-defined]
    top = float(view.cluster.gpu.sm_max_clock_mhz)  # type: ignore[attr-defined]
    late = (np.array([1000]), np.array([30]))  # 3 % late
    loop.completions = [late] * 12
    loop.clock_floor_mhz = np.array([top])
    assert loop.min_counts(view)[0] == live + int(np.ceil(0.1 * live))  # type: ignore[arg-type]
    loop.clock_floor_mhz = np.array([top - 200.0])  # the clock floor can still rise: hold
    assert loop.min_counts(view)[0] == live  # type: ignore[arg-type]


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
