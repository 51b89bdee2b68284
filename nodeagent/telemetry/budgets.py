"""Budgets in four dimensions (memory, compute, power, thermal), per GPU and per node. Pure.

Shapeshifter §4.1: a GPU is a bin with memory, compute (concurrent requests) and power; the node
adds idle and fan power and an airflow estimate (DESIGN §4, shapeshifter.hw.server_model).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from nodeagent.engines.types import EngineLoad
from shapeshifter.hw.server_model import server_model_for
from shapeshifter.hw.types import GpuTelemetry, ThermalThresholds


@dataclass(frozen=True)
class Budget:
    memory_used_mib: float
    memory_total_mib: float
    kv_cache_usage_frac: float  # -1 when no engine reports it
    requests_in_flight: float
    requests_capacity: float
    utilization_pct: float
    power_draw_w: float
    power_limit_w: float
    temperature_c: float
    slowdown_temp_c: float

    @property
    def memory_headroom_mib(self) -> float:
        return max(0.0, self.memory_total_mib - self.memory_used_mib)

    @property
    def compute_headroom_requests(self) -> float:
        return max(0.0, self.requests_capacity - self.requests_in_flight)

    @property
    def power_headroom_w(self) -> float:
        return max(0.0, self.power_limit_w - self.power_draw_w)

    @property
    def thermal_headroom_c(self) -> float:
        return max(0.0, self.slowdown_temp_c - self.temperature_c)


@dataclass(frozen=True)
class NodeBudget:
    node_power_w: float  # idle + sum(GPU) + fans
    gpu_power_w: float
    idle_power_w: float
    fan_power_w: float
    gpu_power_limit_w: float
    airflow_cfm: float
    totals: Budget  # sums per dimension; thermal is the GPU with the least headroom


def gpu_budget(
    telemetry: GpuTelemetry, thresholds: ThermalThresholds, load: EngineLoad | None = None
) -> Budget:
    load = load or EngineLoad()
    return Budget(
        memory_used_mib=float(telemetry.memory_used_mib),
        memory_total_mib=float(telemetry.memory_total_mib),
        kv_cache_usage_frac=load.kv_cache_usage_frac,
        requests_in_flight=load.requests_running + load.requests_waiting,
        requests_capacity=load.max_num_seqs,
        utilization_pct=telemetry.utilization_gpu_pct,
        power_draw_w=telemetry.power_draw_w,
        # What the GPU may draw: a lower enforced limit (a BMC or another tool's cap) counts.
        power_limit_w=telemetry.effective_power_limit_w,
        temperature_c=telemetry.temperature_c,
        slowdown_temp_c=thresholds.slowdown_c,
    )


def node_budget(
    budgets: Sequence[Budget], max_power_w: Sequence[float], gpu_type: str
) -> NodeBudget:
    """Node budget from its GPUs' budgets; ``max_power_w`` (each GPU's max limit, i.e. TDP) sets
    the load fraction that drives the fan curve."""
    n = len(budgets)
    model = server_model_for(gpu_type)
    gpu_power_w = sum(b.power_draw_w for b in budgets)
    load_frac = gpu_power_w / sum(max_power_w) if n and sum(max_power_w) > 0 else 0.0
    fan_power_w = model.fan_power_w(load_frac, n)
    idle_power_w = model.idle_power_w(n)
    return NodeBudget(
        node_power_w=idle_power_w + gpu_power_w + fan_power_w,
        gpu_power_w=gpu_power_w,
        idle_power_w=idle_power_w,
        fan_power_w=fan_power_w,
        gpu_power_limit_w=sum(b.power_limit_w for b in budgets),
        airflow_cfm=model.airflow_cfm(load_frac, n),
        totals=_totals(budgets),
    )


def _totals(budgets: Sequence[Budget]) -> Budget:
    if not budgets:
        return Budget(0, 0, -1, 0, 0, 0, 0, 0, 0, 0)
    hottest = min(budgets, key=lambda b: b.slowdown_temp_c - b.temperature_c)
    kv = [b.kv_cache_usage_frac for b in budgets if b.kv_cache_usage_frac >= 0]
    # -1 = not reported (NVML on MIG-enabled GPUs): average only the GPUs that report.
    util = [b.utilization_pct for b in budgets if b.utilization_pct >= 0]
    return Budget(
        memory_used_mib=sum(b.memory_used_mib for b in budgets),
        memory_total_mib=sum(b.memory_total_mib for b in budgets),
        kv_cache_usage_frac=sum(kv) / len(kv) if kv else -1.0,
        requests_in_flight=sum(b.requests_in_flight for b in budgets),
        requests_capacity=sum(b.requests_capacity for b in budgets),
        utilization_pct=sum(util) / len(util) if util else -1.0,
        power_draw_w=sum(b.power_draw_w for b in budgets),
        power_limit_w=sum(b.power_limit_w for b in budgets),
        temperature_c=hottest.temperature_c,
        slowdown_temp_c=hottest.slowdown_temp_c,
    )
