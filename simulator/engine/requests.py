"""The requests: arrivals from the trace (rate-scaled per endpoint), the demand the policies see,
routing over the policy's weights, and the service of what is in flight."""

from __future__ import annotations

import math

import numpy as np

from simulator.control.observe import Observation, Observer
from simulator.engine.setup import Layout
from simulator.inputs.scenario import Scenario
from simulator.inputs.trace import Trace
from simulator.model.service import RequestPool
from simulator.model.state import READY, Fleet, Workload
from simulator.reporting.metrics import Metrics

EWMA_TAU_S = 300.0  # demand smoothing for the rebalancer
RECENT_WINDOW_S = 60.0
FP8_POWER = 0.9  # derived profile rule 'quantization none->fp8' (power x0.9)


class RequestFlow:
    def __init__(self, s: Scenario, trace: Trace, workload: Workload, layout: Layout,
                 metrics: Metrics, arrival_rng: np.random.Generator,
                 route_rng: np.random.Generator) -> None:
        self.step_s = s.step_s
        self.trace = trace
        self.workload = workload
        self.layout = layout
        self.metrics = metrics
        self.arrival_rng = arrival_rng
        self.route_rng = route_rng
        n_ep, n_gpus = workload.n_endpoints, len(layout.opaque)
        self.n_endpoints = n_ep
        # The profile may overstate what the engines really serve (workload.capacity_error_frac):
        # the policies size with the profile, the pool serves at the true speed.
        self.pool = RequestPool(n_gpus, workload.service.slowed(
            1.0 + s.workload.capacity_error_frac))
        self.observer = Observer(n_ep, s.cadence.route_s, s.workload.slo_s)
        self.weights = np.zeros(n_gpus)  # the policy's routing weights per GPU
        self.demand_ewma = self.rate_at(0.0)
        self.recent = np.zeros((max(1, int(RECENT_WINDOW_S / s.step_s)), n_ep))

    def rate_at(self, t_s: float) -> np.ndarray:
        lay = self.layout
        return np.array([self.trace.rate_at(t_s, float(lay.demand_scale[e]),
                                            float(lay.demand_offset_s[e]))
                         for e in range(self.n_endpoints)])

    def demand_rps(self, t_s: float) -> np.ndarray:
        """Per endpoint, the smoothed arrivals (the higher of the EWMA and the last minute)."""
        if t_s <= 0:
            return self.rate_at(0.0)
        return np.maximum(self.demand_ewma, self.recent.mean(axis=0))

    def observation(self) -> Observation:
        """Close the routing interval's observation."""
        waiting, running = self.pool.waiting_running_per_gpu()
        return self.observer.close(waiting, running, self.pool.params.max_concurrency)

    def arrive(self, t_s: float, fleet: Fleet) -> None:
        dt = self.step_s
        rate = self.rate_at(t_s)
        counts = self.arrival_rng.poisson(rate * dt)
        self.observer.on_arrivals(counts)
        alpha = 1.0 - math.exp(-dt / EWMA_TAU_S)
        self.demand_ewma += alpha * (counts / dt - self.demand_ewma)
        self.recent = np.roll(self.recent, 1, axis=0)
        self.recent[0] = counts / dt
        n_total = int(counts.sum())
        if n_total == 0:
            return
        endpoint = np.repeat(np.arange(self.n_endpoints), counts)
        arrival = t_s + np.sort(self.arrival_rng.random(n_total)) * dt
        pick = self.arrival_rng.integers(0, len(self.trace.prompt_tokens), n_total)
        prompt, output = self.trace.prompt_tokens[pick], self.trace.output_tokens[pick]
        gpu = np.full(n_total, -1)
        for e in range(self.n_endpoints):
            sel = endpoint == e
            gpu[sel] = self._route(fleet, e, int(sel.sum()))
        self.metrics.arrived += n_total
        ok = gpu >= 0
        self.metrics.count_dropped(endpoint[~ok])
        self.pool.add(gpu[ok], endpoint[ok], arrival[ok], prompt[ok], output[ok])

    def _route(self, fleet: Fleet, e: int, n: int) -> np.ndarray:
        """Systematic sampling over the weights: equal weights give exact round robin."""
        if n == 0:
            return np.zeros(0, np.int64)
        mask = (fleet.endpoint == e) & (fleet.state == READY)
        gpus = np.flatnonzero(mask & (self.weights > 0))
        if len(gpus) == 0:
            gpus = np.flatnonzero(mask)
            if len(gpus) == 0:
                return np.full(n, -1)
            w = np.ones(len(gpus))
        else:
            w = self.weights[gpus]
        cum = np.cumsum(w)
        pos = (np.arange(n) + self.route_rng.random()) / n * cum[-1]
        return gpus[np.minimum(np.searchsorted(cum, pos, side="right"), len(gpus) - 1)]

    def serve(self, t_s: float, fleet: Fleet, prefill_rel: np.ndarray, decode_rel: np.ndarray,
              queue_timeout_s: float) -> np.ndarray:
        """One step of service at these relative speeds; returns the LLM GPUs' activity."""
        speed = np.where(fleet.fp8, self.workload.fp8_speedup, 1.0)
        completed, dropped, llm_activity = self.pool.step(
            t_s, self.step_s, speed, prefill_rel, decode_rel, queue_timeout_s)
        self.metrics.count_completed(completed)
        self.observer.on_completed(completed)
        self.metrics.count_dropped(dropped)
        return llm_activity * np.where(fleet.fp8, FP8_POWER, 1.0)
