"""The steady-state shaping loop's pure policies: configurator, forecast, capacity correction,
row/thermal shaping, peak-aware placement (issue 17)."""

from __future__ import annotations

import numpy as np
import pytest

from coordinator.policy import capacity, configure, shaping
from coordinator.policy.model import ClusterSnapshot, GpuState, InstanceState, Limits, NodeState
from coordinator.policy.placement import PlaceRequest, place
from coordinator.profiles.schema import QueryClass
from coordinator.profiles.store import default_rows
from shapeshifter.common.errors import InvalidArgument
from shapeshifter.hw.models import GPU_MODELS

A100 = GPU_MODELS["a100-80gb"]
LLAMA = "meta-llama/Meta-Llama-3-8B"
CFG = configure.ConfigureConfig()


# ---------------- configurator ----------------

def test_decode_share_follows_the_mix() -> None:
    rows = default_rows()
    decode_heavy = configure.decode_share(rows, "a100-80gb", LLAMA, {QueryClass.SILO: 1.0})
    prompt_heavy = configure.decode_share(rows, "a100-80gb", LLAMA, {QueryClass.LISO: 1.0})
    assert 0.0 < prompt_heavy < 0.5 < decode_heavy < 1.0


def test_lowest_clock_covers_the_need_and_no_lower_one_does() -> None:
    cap = 3.0
    clock = configure.lowest_clock_mhz(10, 27.0, cap, A100, 0.9, CFG)
    assert clock < A100.sm_max_clock_mhz
    assert 10 * configure.capacity_at_clock(cap, clock, A100, 0.9) >= 27.0
    lower = [c for c in configure.candidate_clocks_mhz(A100, CFG) if c < clock]
    assert all(10 * configure.capacity_at_clock(cap, c, A100, 0.9) < 27.0 for c in lower)
    # Nothing covers it: the maximum (unlocked).
    assert configure.lowest_clock_mhz(10, 31.0, cap, A100, 0.9, CFG) == A100.sm_max_clock_mhz


def test_choose_prefers_the_variant_that_costs_less_power() -> None:
    fp16 = configure.Variant("none", 3.0)
    fp8 = configure.Variant("fp8", 3.6, power_scale=0.9)
    best = configure.choose([fp16, fp8], need_rps=20.0, demand_rps=18.0, gpu=A100,
                            decode_frac=0.8, config=CFG, max_count=100)
    assert best.variant == fp8
    assert best.capacity_rps >= 20.0
    alone = configure.choose([fp16], 20.0, 18.0, A100, 0.8, CFG, 100)
    assert best.power_w < alone.power_w


def test_planning_clock_trades_at_most_the_allowed_extra_gpus() -> None:
    assert configure.planning_clock_mhz(A100, 0.7, CFG) == A100.sm_max_clock_mhz  # default 0
    cfg = configure.ConfigureConfig(max_extra_gpu_frac=0.15)
    for decode in (0.25, 0.7, 0.95):
        clock = configure.planning_clock_mhz(A100, decode, cfg)
        rel = configure.capacity_at_clock(1.0, clock, A100, decode)
        assert rel >= 1 / (1 + cfg.max_extra_gpu_frac) - 1e-9
    # Decode-bound work can run slower than prompt-bound work for the same loss.
    assert configure.planning_clock_mhz(A100, 0.95, cfg) < configure.planning_clock_mhz(
        A100, 0.25, cfg)


def test_variant_change_must_pay_for_its_restart() -> None:
    cur = configure.Choice(configure.Variant("none", 3.0), 10, 1410, 2500.0, 30.0)
    small = configure.Choice(configure.Variant("fp8", 3.6), 10, 1410, 2490.0, 36.0)
    big = configure.Choice(configure.Variant("fp8", 3.6), 9, 1410, 2000.0, 32.4)
    assert not configure.variant_change_pays(cur, small, CFG)
    assert configure.variant_change_pays(cur, big, CFG)


def test_configure_config_names_the_bad_field() -> None:
    with pytest.raises(InvalidArgument, match="min_clock_frac"):
        configure.ConfigureConfig(min_clock_frac=0.1).validate()


# ---------------- forecast and correction ----------------

def test_headroom_comes_from_the_observed_variability() -> None:
    rng = np.random.default_rng(0)
    smooth = 50 + rng.normal(0, 0.5, 60)
    bursty = 50 + rng.normal(0, 10.0, 60)
    fs = capacity.forecast(smooth, 5.0, 90.0)
    fb = capacity.forecast(bursty, 5.0, 90.0)
    assert fs.provision_rps - fs.level_rps < 3.0
    assert fb.provision_rps - fb.level_rps > 15.0


def test_a_rising_demand_is_projected_over_the_lead_time() -> None:
    rising = np.linspace(20.0, 80.0, 60)
    f = capacity.forecast(rising, 5.0, 90.0)
    assert f.trend_rps_per_s > 0
    assert f.provision_rps > rising[-1]


def _obs(**kw: float) -> capacity.CapacityObservation:
    base = dict(served_rps=20.0, arrival_rps=20.0, instances=10, saturated_frac=0.0,
                queued_frac=0.0, late_frac=0.0, profile_capacity_rps=3.0)
    base.update(kw)
    return capacity.CapacityObservation(**base)  # type: ignore[arg-type]


def test_saturation_measures_the_capacity() -> None:
    s = capacity.CorrectionState()
    for _ in range(20):
        s = capacity.update_correction(s, _obs(served_rps=23.0, saturated_frac=1.0,
                                               queued_frac=1.0, late_frac=0.0))
    assert s.factor == pytest.approx(23.0 / 30.0, abs=0.01)


def test_lateness_while_covered_cuts_once_per_window() -> None:
    s = capacity.CorrectionState()
    s = capacity.update_correction(s, _obs(late_frac=0.05, queued_frac=0.5))
    assert s.factor == pytest.approx(0.9)
    s2 = capacity.update_correction(s, _obs(late_frac=0.05, queued_frac=0.5))
    assert s2.factor == pytest.approx(0.9)  # held: the same lateness is still in the window


def test_lateness_from_underprovisioning_is_not_a_capacity_error() -> None:
    s = capacity.update_correction(capacity.CorrectionState(),
                                   _obs(arrival_rps=45.0, late_frac=0.2, queued_frac=1.0))
    assert s.factor == 1.0


def test_lateness_on_idle_instances_is_left_alone() -> None:
    s = capacity.update_correction(capacity.CorrectionState(),
                                   _obs(served_rps=3.0, arrival_rps=3.0, late_frac=0.2))
    assert s.factor == 1.0


def test_lateness_not_significantly_over_the_budget_does_not_cut() -> None:
    """At the budget's share a few late requests are chance, not a capacity error."""
    o = _obs(late_frac=0.01, queued_frac=0.5)
    chance = capacity.update_correction(capacity.CorrectionState(),
                                        capacity.CapacityObservation(**{**o.__dict__,
                                                                        "over_budget": False}))
    assert chance.factor == 1.0
    assert capacity.update_correction(capacity.CorrectionState(), o).factor < 1.0


def test_late_over_budget_is_a_significance_test_at_any_rate() -> None:
    alarm = 15 / 135
    # 100 completions at a 0.5 % budget: one late request is chance (a plain share test
    # fires on it), three are not.
    assert not capacity.late_over_budget(1, 100, 0.005, alarm)
    assert capacity.late_over_budget(3, 100, 0.005, alarm)
    # 10,000 completions: 55 late (0.55 %) is chance around the budget's 50, 65 is not.
    assert not capacity.late_over_budget(55, 10_000, 0.005, alarm)
    assert capacity.late_over_budget(65, 10_000, 0.005, alarm)
    assert not capacity.late_over_budget(0, 0, 0.005, alarm)
    with pytest.raises(InvalidArgument, match="alarm_share"):
        capacity.late_over_budget(1, 100, 0.005, 1.5)


def test_scale_in_stops_at_the_utilization_seen_within_budget() -> None:
    # Seen clean at 60 % of capacity, the busiest load now at 50 %: 100 -> 84 instances would
    # run it at 60 %, but one plan sheds at most 10.
    assert capacity.validated_min_count(100, 10, 0.5, 0.6) == 90
    assert capacity.validated_min_count(100, 30, 0.5, 0.6) == 84
    # The busiest interval was late (only lower ones clean): nothing to shed.
    assert capacity.validated_min_count(100, 10, 0.7, 0.6) == 100
    assert capacity.validated_min_count(100, 10, 0.5, 0.0) == 100  # nothing seen clean
    with pytest.raises(InvalidArgument, match="max_shed"):
        capacity.validated_min_count(100, -1, 0.5, 0.6)


# ---------------- shaping ----------------

def test_a_row_over_its_target_sheds_saas_load_to_a_row_with_headroom() -> None:
    cfg = shaping.ShapingConfig(row_target_frac=0.9)
    limits = np.array([100_000.0, 100_000.0])
    power = np.array([97_000.0, 70_000.0])
    excess = shaping.row_excess_w(power, limits, cfg)
    w = shaping.update_row_weights(np.ones(2), excess, np.array([20_000.0, 20_000.0]), cfg)
    assert w[0] < 1.0
    assert w[1] == 1.0
    # An endpoint with one instance in each row now sends most of its load to row 1.
    share_row0 = w[0] / w.sum()
    assert share_row0 < 0.5
    # Back under the target: the weight comes back in steps.
    back = shaping.update_row_weights(w, np.array([-30_000.0, -30_000.0]),
                                      np.array([20_000.0, 20_000.0]), cfg)
    assert w[0] < back[0] <= 1.0


def test_routing_first_then_clocks_take_the_rest() -> None:
    cfg = shaping.ShapingConfig()
    ceiling = shaping.row_clock_ceiling_mhz(np.array([5_000.0, -1.0]),
                                            np.array([20_000.0, 20_000.0]), 1410.0, cfg)
    assert np.isnan(ceiling[1])
    kept = (ceiling[0] / 1410.0) ** 1.65
    assert kept == pytest.approx(0.75, abs=0.01)  # 5 kW of 20 kW dynamic power removed


def test_a_hot_gpu_gets_less_load_and_a_clock_ceiling() -> None:
    cfg = shaping.ShapingConfig(thermal_guard_c=6.0, min_weight=0.1)
    slowdown = A100.thermal.slowdown_c
    temps = np.array([slowdown - 20.0, slowdown - 2.0])
    w = shaping.thermal_weights(temps, slowdown, cfg)
    assert w[0] == 1.0 and w[1] < 0.5
    c = shaping.thermal_clock_ceiling_mhz(temps, slowdown, 1410.0, A100.thermal_c_per_w,
                                          np.full(2, A100.dynamic_power_max_w), cfg)
    assert np.isnan(c[0]) and c[1] < 1410.0


# ---------------- placement ----------------

def _node(name: str, row: str, inlet_c: float, aisle: str = "a0",
          reserved: bool = False) -> NodeState:
    gpus = tuple(GpuState(index=i, gpu_type="a100-80gb", power_draw_w=60.0, reserved=reserved)
                 for i in range(8))
    return NodeState(node_id=name, row=row, aisle=aisle, gpus=gpus, inlet_temp_c=inlet_c,
                     power_draw_w=1600.0)


def test_coinciding_peaks_land_in_different_rows() -> None:
    snap = ClusterSnapshot(nodes=(_node("n0", "r0", 24.0), _node("n1", "r0", 24.5),
                                  _node("n2", "r1", 26.0), _node("n3", "r1", 26.5)))
    limits = Limits(row_power_limit_w={"r0": 20_000.0, "r1": 20_000.0})
    peak_early = (3000.0, 500.0, 500.0, 500.0)
    rows = {"r0": (4000.0, 1000.0, 1000.0, 1000.0), "r1": (1000.0, 1000.0, 4000.0, 1000.0)}
    req = PlaceRequest(gpus=8, predicted_peak_power_w=3000.0, predicted_profile_w=peak_early)
    ranked = place(req, snap, limits, rows)
    # r0 already peaks in the first interval: the coolest node loses to a warmer row.
    assert ranked[0].row == "r1"
    # Without profiles, the same request goes to the coolest node (r0).
    plain = place(PlaceRequest(gpus=8, predicted_peak_power_w=3000.0), snap, limits)
    assert plain[0].row == "r0"


def test_coinciding_peaks_land_in_different_aisles() -> None:
    """Same row, two aisles: the aisle whose airflow already peaks when the request does loses
    to the other one, although its node is cooler."""
    snap = ClusterSnapshot(nodes=(_node("n0", "r0", 24.0, "a0"), _node("n1", "r0", 26.0, "a1")))
    limits = Limits(row_power_limit_w={"r0": 40_000.0},
                    aisle_airflow_cfm={"a0": 3000.0, "a1": 3000.0})
    peak_early = (3000.0, 500.0, 500.0, 500.0)
    rows = {"r0": (5000.0, 2000.0, 2000.0, 2000.0)}
    aisles = {"a0": (2500.0, 900.0, 900.0, 900.0), "a1": (900.0, 900.0, 900.0, 900.0)}
    req = PlaceRequest(gpus=8, predicted_peak_power_w=3000.0, predicted_profile_w=peak_early)
    assert place(req, snap, limits, rows)[0].node_id == "n0"  # rows alone: the cooler node
    assert place(req, snap, limits, rows, aisles)[0].node_id == "n1"


def test_a_row_keeps_load_that_can_be_shed() -> None:
    """A row that already holds only opaque GPUs does not take another opaque load whose peak
    it would absorb best: its mix would drift past MIX_TOLERANCE from the cluster's."""
    snap = ClusterSnapshot(nodes=(_node("n0", "r0", 24.0, reserved=True),
                                  _node("n1", "r0", 24.0), _node("n2", "r1", 26.0),
                                  _node("n3", "r1", 26.0)),
                           instances=(InstanceState("i2", "chat", "n2", tuple(range(8)), "m"),))
    limits = Limits(row_power_limit_w={"r0": 40_000.0, "r1": 40_000.0})
    req = PlaceRequest(gpus=8, predicted_peak_power_w=3000.0,
                       predicted_profile_w=(3000.0, 500.0, 500.0, 500.0))
    rows = {"r0": (2000.0, 5000.0, 5000.0, 5000.0), "r1": (5000.0, 2000.0, 2000.0, 2000.0)}
    ranked = place(req, snap, limits, rows)
    assert ranked[0].row == "r1"  # r0 would have a lower peak, but would be all opaque
    assert ranked[-1].row == "r0"


def test_a_profile_of_the_wrong_length_is_refused() -> None:
    snap = ClusterSnapshot(nodes=(_node("n0", "r0", 24.0),))
    req = PlaceRequest(gpus=8, predicted_peak_power_w=3000.0, predicted_profile_w=(1.0, 2.0))
    with pytest.raises(InvalidArgument, match="predicted_profile_w"):
        place(req, snap, Limits(), {"r0": (1.0, 2.0, 3.0)})
    with pytest.raises(InvalidArgument, match="predicted_profile_w"):
        place(PlaceRequest(gpus=8, predicted_peak_power_w=1.0, predicted_profile_w=(-5.0,)),
              snap, Limits())
