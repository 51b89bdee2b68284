from __future__ import annotations

from dataclasses import replace

import pytest

from nodeagent.engines.types import EngineLoad
from nodeagent.telemetry.budgets import Budget, gpu_budget, node_budget
from shapeshifter.hw.server_model import server_model_for
from shapeshifter.hw.types import GpuTelemetry, ThermalThresholds

THRESHOLDS = ThermalThresholds(slowdown_c=87.0, shutdown_c=92.0)


def telemetry(
    power_w: float = 300, limit_w: float = 700, temp_c: float = 60, used: int = 1000
) -> GpuTelemetry:
    return GpuTelemetry(
        index=0, power_draw_w=power_w, power_draw_avg_w=power_w, power_limit_w=limit_w,
        energy_j=0.0, temperature_c=temp_c, memory_temperature_c=None, sm_clock_mhz=1980,
        memory_clock_mhz=2619, utilization_gpu_pct=50.0, utilization_memory_pct=20.0,
        memory_used_mib=used, memory_total_mib=81559, throttle_reasons=(),
    )  # fmt: skip


def test_gpu_budget_four_dimensions() -> None:
    load = EngineLoad(
        requests_running=30, requests_waiting=10, max_num_seqs=100, kv_cache_usage_frac=0.4
    )
    b = gpu_budget(telemetry(), THRESHOLDS, load)
    assert (b.memory_headroom_mib, b.kv_cache_usage_frac) == (80559, 0.4)
    assert (b.requests_in_flight, b.compute_headroom_requests) == (40, 60)
    assert b.power_headroom_w == 400
    assert b.thermal_headroom_c == 27


def test_headrooms_never_negative() -> None:
    load = EngineLoad(requests_running=150, max_num_seqs=100)
    b = gpu_budget(telemetry(power_w=720, temp_c=95, used=90000), THRESHOLDS, load)
    assert (b.memory_headroom_mib, b.compute_headroom_requests) == (0, 0)
    assert (b.power_headroom_w, b.thermal_headroom_c) == (0, 0)


def test_no_engine_means_no_kv_and_no_capacity() -> None:
    b = gpu_budget(telemetry(), THRESHOLDS)
    assert b.kv_cache_usage_frac == -1 and b.requests_capacity == 0


def test_node_budget_adds_idle_and_fans() -> None:
    cool = gpu_budget(telemetry(power_w=350, temp_c=50), THRESHOLDS)
    hot = gpu_budget(telemetry(power_w=350, temp_c=80), THRESHOLDS)
    nb = node_budget([cool, hot], [700, 700], "h100-80gb")
    model = server_model_for("h100-80gb")
    assert nb.gpu_power_w == 700
    assert nb.idle_power_w == pytest.approx(model.idle_power_w(2))
    assert nb.fan_power_w == pytest.approx(model.fan_power_w(0.5, 2))
    assert nb.node_power_w == pytest.approx(nb.idle_power_w + 700 + nb.fan_power_w)
    assert nb.airflow_cfm == pytest.approx(model.airflow_cfm(0.5, 2))
    assert nb.gpu_power_limit_w == 1400
    assert nb.totals.thermal_headroom_c == 7  # the hottest GPU
    assert nb.totals.memory_used_mib == 2000


def test_more_load_more_fan_power() -> None:
    low = node_budget([gpu_budget(telemetry(power_w=100), THRESHOLDS)], [700], "a100-40gb")
    high = node_budget([gpu_budget(telemetry(power_w=600), THRESHOLDS)], [700], "a100-40gb")
    assert high.fan_power_w > low.fan_power_w and high.airflow_cfm > low.airflow_cfm


def test_empty_node() -> None:
    nb = node_budget([], [], "")
    assert nb.gpu_power_w == 0 and isinstance(nb.totals, Budget)


def test_unreported_utilization_is_left_out_of_the_average() -> None:
    mig = replace(telemetry(), utilization_gpu_pct=-1.0)  # NVML on a MIG-enabled GPU
    budgets = [gpu_budget(t, THRESHOLDS) for t in (telemetry(), mig)]
    assert node_budget(budgets, [700, 700], "h100-80gb").totals.utilization_pct == 50.0
    only_mig = [gpu_budget(mig, THRESHOLDS)]
    assert node_budget(only_mig, [700], "h100-80gb").totals.utilization_pct == -1.0


def test_an_external_power_cap_shrinks_the_budget() -> None:
    capped = replace(telemetry(power_w=250, limit_w=700), enforced_power_limit_w=300.0)
    b = gpu_budget(capped, THRESHOLDS)
    assert (b.power_limit_w, b.power_headroom_w) == (300.0, 50.0)
    assert gpu_budget(telemetry(limit_w=700), THRESHOLDS).power_limit_w == 700
