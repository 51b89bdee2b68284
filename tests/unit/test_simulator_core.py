"""Simulator: conservation, physics parity with the sim backend, caps, determinism, baseline
effects, bad input."""

from __future__ import annotations

import numpy as np
import pytest

from nodeagent.device.sim import SimulatedBackend
from shapeshifter.common.clock import ManualClock
from shapeshifter.common.errors import InvalidArgument
from shapeshifter.hw.models import gpu_model
from simulator.control.policies import make_policy, water_fill_cap_w
from simulator.engine import Engine, simulate
from simulator.inputs.scenario import Scenario, parse_scenario, with_overrides
from simulator.inputs.trace import default_trace_path, load_trace
from simulator.model.gpus import GpuArrays

SMALL = {"name": "small", "duration_s": 120, "cluster": {"servers": 8, "rows": 2, "aisles": 2},
         "workload": {"endpoints": 2}, "opaque": {"tenants": 2, "period_s": 60}}


@pytest.fixture(scope="module")
def trace():
    return load_trace(default_trace_path())


def small(**update) -> Scenario:
    data = {**SMALL, **update}
    return Scenario.model_validate(data)


def test_requests_are_conserved(trace) -> None:
    m = simulate(small(), trace, "shapeshifter")
    s = m.summary()["requests"]
    assert s["arrived"] > 1000
    assert s["arrived"] == s["completed"] + s["dropped"] + s["in_flight"]
    assert s["completed"] > 0.9 * s["arrived"]


def test_energy_is_the_integral_of_power(trace) -> None:
    m = simulate(small(), trace, "baseline")
    assert m.cluster_energy_j == pytest.approx(m.cluster_power_w.sum() * m.step_s, rel=1e-9)
    assert m.llm_energy_j < m.gpu_energy_j_end  # LLM GPUs are a subset of all GPUs


def test_vectorized_gpus_match_the_sim_backend() -> None:
    """Same physics: GpuArrays and SimulatedBackend agree step by step under caps and locks."""
    clock = ManualClock()
    sim = SimulatedBackend("a100-80gb", 3, clock, seed=1, inlet_temp_c=25.0)
    arrays = GpuArrays.create(gpu_model("a100-80gb"), 3, np.full(3, 25.0),
                              np.random.default_rng(0))
    arrays.temp_offset_c = np.array([g.temp_offset_c for g in sim._gpus])
    arrays.temperature_c = np.array([g.temperature_c for g in sim._gpus])
    activity = np.array([0.9, 0.6, 0.0])
    for i, a in enumerate(activity):
        sim.set_load(i, float(a))
    sim.set_power_limit_w(0, 210.0)
    arrays.power_limit_w[0] = 210.0
    sim.lock_gpu_clocks_mhz(1, 210, 1035)
    arrays.locked_max_mhz[1] = 1035.0
    for _ in range(30):
        clock.advance(1.0)
        arrays.step(activity, np.full(3, 25.0), 1.0)
        tel = [sim.telemetry(i) for i in range(3)]
        assert arrays.clock_mhz == pytest.approx([t.sm_clock_mhz for t in tel])
        assert arrays.power_w == pytest.approx([t.power_draw_w for t in tel])
        assert arrays.temperature_c == pytest.approx([t.temperature_c for t in tel])
        assert arrays.energy_j == pytest.approx([t.energy_j for t in tel])
    assert arrays.power_w[0] <= 210.0


def test_row_power_is_under_the_reduced_limit_after_the_control_lag(trace) -> None:
    s = small(duration_s=240, failures=[{"kind": "ups", "at_s": 60, "target": 0,
                                         "capacity_frac": 0.75}])
    for policy in ("baseline", "shapeshifter"):
        eng = Engine(s, trace, make_policy(policy))
        m = eng.run()
        lag = int(2 * s.cadence.report_s / s.step_s)  # detect on one report, act by the next
        after = slice(60 + lag, None)
        # Every GPU is under its own cap at every step; the row can overshoot only by what the
        # load grows between two reports (caps are computed from the last report's draw).
        ratio = m.row_power_w[after, 0] / m.row_limit_w[after, 0]
        assert ratio.max() <= 1.05, policy
        assert (ratio <= 1.0).mean() >= 0.95, policy
        assert m.row_limit_w[100, 0] == pytest.approx(0.75 * eng.cluster.row_limit_w[0])
        # The caps set at the last report take effect on the next physics step.
        eng.gpus.step(eng.activity, eng.server_inlet_c[eng.gpu_server], s.step_s)
        assert (eng.gpus.power_w <= eng.gpus.power_limit_w + 1e-6).all()
        em = m.summary()["emergencies"][0]
        assert em["time_to_under_limit_s"] is not None and em["time_to_under_limit_s"] <= lag


def test_same_seed_same_results_other_seed_differs(trace) -> None:
    a = simulate(small(), trace, "shapeshifter").summary()
    b = simulate(small(), trace, "shapeshifter").summary()
    c = simulate(small(seed=7), trace, "shapeshifter").summary()
    assert a == b
    assert a["requests"] != c["requests"]


def test_uniform_caps_slow_everything_priority_caps_spare_opaque(trace) -> None:
    """TAPAS Table 2: blunt uniform capping slows opaque (IaaS) GPUs too; shedding by priority
    takes the free watts first (SaaS slack, opaque down to its performance floor). The SLO is
    held to the project's criterion (no more than 0.5 points below the baseline), not beaten:
    shapeshifter's clock controller spends the latency slack down to the SLO budget (0.5 % of
    requests late) before the failure, where the baseline runs at the maximum clock, and
    saves energy for it (measured: 98.22 % vs 98.30 %, 0.56 vs 0.65 J/token)."""
    s = small(duration_s=240, failures=[{"kind": "ups", "at_s": 30, "target": 0,
                                         "capacity_frac": 0.75}])
    # Same balanced placement (each row mixes opaque and SaaS servers); only the shedding differs.
    base = simulate(s, trace, "place").summary()
    shape = simulate(s, trace, "shapeshifter-no-rebalance").summary()
    assert base["opaque_relative_perf"] < 0.99
    assert shape["opaque_relative_perf"] > base["opaque_relative_perf"]
    assert shape["slo_attainment"] >= base["slo_attainment"] - 0.005
    assert shape["energy_j_per_token"] < 0.9 * base["energy_j_per_token"]
    assert base["capped_time_frac"] > 0.2


def test_deep_cut_is_shared_below_the_floors(trace) -> None:
    """At 60% of a row's feed the free watts are not enough: below the floors SaaS and opaque
    give the same share, which keeps more requests within the SLO than uniform caps at
    about the same opaque performance (SaaS at their minimum limit would miss the SLO)."""
    s = small(duration_s=240, failures=[{"kind": "ups", "at_s": 30, "target": 0,
                                         "capacity_frac": 0.6}])
    base = simulate(s, trace, "place").summary()
    shape = simulate(s, trace, "shapeshifter-no-rebalance").summary()
    assert shape["slo_attainment"] > base["slo_attainment"] + 0.02
    assert shape["opaque_relative_perf"] == pytest.approx(base["opaque_relative_perf"], abs=0.02)
    # The SLO over the failure window and over the capped steps say the same.
    during = [m["emergencies"][0]["slo_attainment_during"] for m in (base, shape)]
    assert 0 < during[0] < during[1] <= 1
    assert base["slo_attainment_capped"] < shape["slo_attainment_capped"]


def test_synchronous_loads_in_one_row_make_peaks_coincide(trace) -> None:
    """Contiguous placement puts one tenant's synchronous GPUs in one row: its row peaks higher
    than when placement mixes tenants and endpoints across rows."""
    s = small(duration_s=300, cluster={"servers": 16, "rows": 4, "aisles": 2,
                                       "row_provision_frac": 1.2},
              opaque={"tenants": 2, "period_s": 120, "amplitude": 0.45})
    contiguous = simulate(s, trace, "baseline").summary()["peak_row_power_w"]
    balanced = simulate(s, trace, "place").summary()["peak_row_power_w"]
    assert contiguous > 1.03 * balanced


def test_water_fill_caps() -> None:
    d = np.array([100.0, 200.0, 300.0, 400.0])
    c = water_fill_cap_w(d, 700.0, 50.0, 400.0)
    assert np.minimum(d, c).sum() == pytest.approx(700.0)
    assert water_fill_cap_w(d, 2000.0, 50.0, 400.0) == 400.0
    assert water_fill_cap_w(d, 10.0, 50.0, 400.0) == 50.0  # never below the minimum limit


def test_bad_scenario_fields_are_named() -> None:
    with pytest.raises(InvalidArgument, match=r"line 4.*cluster\.rows.*greater than or equal to 1"):
        parse_scenario("version: 1\nname: x\ncluster:\n  rows: 0\n", "f.yaml")
    with pytest.raises(InvalidArgument, match="policies"):
        parse_scenario("name: x\npolicies: [shapeshifter, magic]\n")
    with pytest.raises(InvalidArgument, match=r"failures\.0\.kind"):
        parse_scenario("name: x\nfailures: [{kind: meteor, at_s: 1}]\n")
    with pytest.raises(InvalidArgument, match=r"servers=1 is outside the allowed range \[4, 2"):
        with_overrides(small(), servers=1)
    with pytest.raises(InvalidArgument, match="hours"):
        with_overrides(small(), hours=100)
