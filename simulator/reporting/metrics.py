"""What a run measures: time series per step and totals, and the per-policy summary."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from shapeshifter.hw import physics
from simulator.inputs.scenario import Scenario
from simulator.model.cluster import Cluster
from simulator.model.plant import Plant
from simulator.model.service import Completed
from simulator.model.state import Fleet

LATENCY_BINS_S = np.logspace(-2, 3.5, 1101)  # 10 ms .. ~53 min, 0.5% apart
OPAQUE_DECODE_FRAC = 0.5  # opaque work is neither decode nor prefill: half-memory-bound


class Metrics:
    def __init__(self, scenario: Scenario, cluster: Cluster, n_endpoints: int) -> None:
        n_steps = math.ceil(scenario.duration_s / scenario.step_s)
        self.scenario = scenario
        self.cluster = cluster
        self.step_s = scenario.step_s
        self.t_s = np.arange(n_steps) * scenario.step_s
        self.row_power_w = np.zeros((n_steps, cluster.n_rows))
        self.row_limit_w = np.zeros((n_steps, cluster.n_rows))
        self.aisle_cfm = np.zeros((n_steps, cluster.n_aisles))
        self.aisle_limit_cfm = np.zeros((n_steps, cluster.n_aisles))
        self.max_temp_c = np.zeros(n_steps)
        self.row_constrained = np.zeros((n_steps, cluster.n_rows), bool)
        # Requests completed per step, and of them within the SLO (SLO over capped windows).
        self.completed_by_step = np.zeros(n_steps, np.int64)
        self.within_by_step = np.zeros(n_steps, np.int64)
        self._step_completed = 0
        self._step_within = 0
        self.gpus_hosting = np.zeros(n_steps, np.int64)
        self.in_flight = np.zeros(n_steps, np.int64)
        self.cluster_power_w = np.zeros(n_steps)
        self.llm_energy_j = 0.0
        self.cluster_energy_j = 0.0
        self.output_tokens = 0
        self.prompt_tokens = 0
        self.arrived = 0
        self.completed = 0
        self.dropped = 0
        self.within_slo = 0
        self.e2e_hist = np.zeros(len(LATENCY_BINS_S) + 1, np.int64)
        self.ttft_hist = np.zeros(len(LATENCY_BINS_S) + 1, np.int64)
        self.reconfigurations = 0
        self.clock_changes = 0
        self.opaque_rel_sum = 0.0
        self.opaque_rel_n = 0
        self.in_flight_end = 0
        self.gpus_static = 0
        self.gpu_energy_j_end = 0.0

    # ---------------- accumulation ----------------

    def count_completed(self, c: Completed) -> None:
        n = len(c.e2e_s)
        if n == 0:
            return
        within = int((c.e2e_s <= self.scenario.workload.slo_s).sum())
        self.completed += n
        self.within_slo += within
        self._step_completed += n
        self._step_within += within
        self.output_tokens += int(c.output_tokens.sum())
        self.prompt_tokens += int(c.prompt_tokens.sum())
        self.e2e_hist += np.bincount(np.searchsorted(LATENCY_BINS_S, c.e2e_s),
                                     minlength=len(self.e2e_hist))
        self.ttft_hist += np.bincount(np.searchsorted(LATENCY_BINS_S, c.ttft_s),
                                      minlength=len(self.ttft_hist))

    def count_dropped(self, endpoints: np.ndarray) -> None:
        self.dropped += len(endpoints)

    def record_step(self, k: int, plant: Plant, fleet: Fleet, opaque: np.ndarray,
                    in_flight: int) -> None:
        g, c = plant.gpus, self.cluster
        dt = self.step_s
        self.row_power_w[k] = plant.row_power_w
        self.row_limit_w[k] = plant.row_limit_w
        self.aisle_cfm[k] = plant.aisle_cfm
        self.aisle_limit_cfm[k] = plant.aisle_limit_cfm
        self.max_temp_c[k] = g.temperature_c.max()
        # Caps, Phase 2 clock locks and thermal throttling all count as capping in force.
        constrained = ((g.power_limit_w < c.gpu.power.max_w) | g.thermal_throttled
                       | plant.phase2_locked)
        self.row_constrained[k] = np.bincount(plant.gpu_row[constrained],
                                              minlength=c.n_rows) > 0
        self.completed_by_step[k], self.within_by_step[k] = self._step_completed, self._step_within
        self._step_completed = self._step_within = 0
        hosting = fleet.hosting()
        self.gpus_hosting[k] = int(hosting.sum())
        self.in_flight[k] = in_flight
        self.llm_energy_j += float(g.power_w[hosting].sum()) * dt
        self.cluster_power_w[k] = float(plant.server_power_w.sum())
        self.cluster_energy_j += float(self.cluster_power_w[k]) * dt
        busy = opaque & (plant.activity >= physics.IDLE_ACTIVITY)
        if busy.any():
            rel = physics.relative_throughput(g.clock_mhz[busy], c.gpu.sm_max_clock_mhz,
                                              OPAQUE_DECODE_FRAC)
            self.opaque_rel_sum += float(rel.sum())
            self.opaque_rel_n += int(busy.sum())

    def finish(self, plant: Plant, in_flight: int, static_count: np.ndarray) -> None:
        self.in_flight_end = in_flight
        self.gpus_static = int(static_count.sum())
        self.gpu_energy_j_end = float(plant.gpus.energy_j.sum())

    # ---------------- results ----------------

    def summary(self) -> dict[str, Any]:
        served = self.completed + self.dropped
        limit0 = self.cluster.row_limit_w
        peak_w = float(self.row_power_w.max())
        return {
            "peak_row_power_w": round(peak_w, 1),
            "peak_row_power_frac_of_limit": round(peak_w / float(limit0.max()), 4),
            "peak_row_power_1min_w": round(self._peak_minute_w(), 1),
            "max_gpu_temp_c": round(float(self.max_temp_c.max()), 2),
            # TAPAS Fig. 21: the share of time any row or aisle has caps or throttling in force
            # (an aisle's GPUs are all in rows, so a constrained GPU marks its row).
            "capped_time_frac": round(float(self.row_constrained.any(axis=1).mean()), 5),
            "capped_row_time_frac": round(float(self.row_constrained.mean()), 5),
            "slo_attainment_capped": self._slo_while_capped(),
            "slo_attainment": round(self.within_slo / served, 5) if served else 1.0,
            "p95_latency_s": _percentile(self.e2e_hist, 0.95),
            "p99_latency_s": _percentile(self.e2e_hist, 0.99),
            "p99_ttft_s": _percentile(self.ttft_hist, 0.99),
            "energy_j_per_token": (round(self.llm_energy_j / self.output_tokens, 4)
                                   if self.output_tokens else None),
            "llm_energy_kwh": round(self.llm_energy_j / 3.6e6, 3),
            "cluster_energy_kwh": round(self.cluster_energy_j / 3.6e6, 3),
            "gpus_used": int(self.gpus_hosting.max()),
            "gpus_used_mean": round(float(self.gpus_hosting.mean()), 1),
            "gpus_static": self.gpus_static,
            "gpus_total": self.cluster.n_gpus,
            "servers": self.cluster.n_servers,
            "reconfigurations": self.reconfigurations,
            "clock_changes": self.clock_changes,
            "opaque_relative_perf": (round(self.opaque_rel_sum / self.opaque_rel_n, 4)
                                     if self.opaque_rel_n else None),
            "requests": {"arrived": self.arrived, "completed": self.completed,
                         "dropped": self.dropped, "in_flight": self.in_flight_end},
            "output_tokens": self.output_tokens,
            "emergencies": self._emergencies(),
        }

    def _slo_while_capped(self) -> float | None:
        """Time-weighted SLO attainment over the capped steps: each capped step's share of its
        completions within the SLO, averaged over the capped steps that completed any."""
        capped = self.row_constrained.any(axis=1) & (self.completed_by_step > 0)
        if not capped.any():
            return None
        share = self.within_by_step[capped] / self.completed_by_step[capped]
        return round(float(share.mean()), 5)

    def _peak_minute_w(self) -> float:
        n = max(1, round(60.0 / self.step_s))
        p = self.row_power_w
        if len(p) < n:
            return float(p.mean(axis=0).max())
        c = np.cumsum(np.vstack([np.zeros((1, p.shape[1])), p]), axis=0)
        return float(((c[n:] - c[:-n]) / n).max())

    def _emergencies(self) -> list[dict[str, Any]]:
        out = []
        for f in self.scenario.failures:
            k0 = math.ceil(f.at_s / self.step_s)
            if f.kind == "ups":
                over = self.row_power_w[k0:, f.target] > self.row_limit_w[k0:, f.target]
            else:
                over = self.aisle_cfm[k0:, f.target] > self.aisle_limit_cfm[k0:, f.target]
            under = np.flatnonzero(~over)
            took = float(under[0] * self.step_s) if len(under) else None
            k1 = len(self.t_s) if f.duration_s is None else math.ceil(
                (f.at_s + f.duration_s) / self.step_s)
            done = int(self.completed_by_step[k0:k1].sum())
            within = int(self.within_by_step[k0:k1].sum())
            out.append({"kind": f.kind, "target": f.target, "at_s": f.at_s,
                        "capacity_frac": f.capacity, "time_to_under_limit_s": took,
                        "over_limit_s_after": float(over.sum() * self.step_s),
                        # requests completed during the failure, share within the SLO
                        "slo_attainment_during": round(within / done, 5) if done else None})
        return out


def _percentile(hist: np.ndarray, q: float) -> float | None:
    total = int(hist.sum())
    if total == 0:
        return None
    idx = int(np.searchsorted(np.cumsum(hist), q * total))
    # Bin idx holds values in (BINS[idx-1], BINS[idx]]: report its upper edge.
    return round(float(LATENCY_BINS_S[min(idx, len(LATENCY_BINS_S) - 1)]), 3)
