"""The LLM instances: a policy's plan carried out on the fleet (starts after the start delay,
stops make-before-break, counts within a restart budget, clock locks per endpoint) and the state
transitions on every step."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from simulator.control.policies import (
    MIN_MOVES_PER_ROUND,
    MOVES_PER_ROUND_FRAC,
    InstancePlan,
    Policy,
)
from simulator.engine.setup import Layout
from simulator.inputs.scenario import CadenceSpec
from simulator.model.gpus import GpuArrays
from simulator.model.state import DRAINING, NONE, READY, STARTING, Fleet, View
from simulator.reporting.metrics import Metrics


class InstanceControl:
    def __init__(self, cadence: CadenceSpec, layout: Layout, gpus: GpuArrays, policy: Policy,
                 view: Callable[[float], View], metrics: Metrics) -> None:
        self.cadence = cadence
        self.layout = layout
        self.gpus = gpus
        self.policy = policy
        self.view = view  # the coordinator's view at a time (the GPUs a plan may pick)
        self.metrics = metrics
        self.fleet = Fleet.empty(len(layout.opaque))
        self.n_endpoints = len(layout.static_count)

    def apply(self, plan: InstancePlan, t_s: float, initial: bool = False) -> None:
        if plan.actions is not None:
            self._apply_actions(plan, t_s, initial)
        else:
            self._apply_counts(plan, t_s, initial)
        if plan.clock_mhz is not None:  # None: the clock controller locks them per interval
            self._lock_clocks(plan, initial)

    def _apply_actions(self, plan: InstancePlan, t_s: float, initial: bool) -> None:
        """The rebalancer's starts on its GPUs; its stops once the starts serve (make before
        break: stage 2 runs after stage 1 is verified)."""
        f, a = self.fleet, plan.actions
        assert a is not None
        start_s = 0.0 if initial else self.cadence.instance_start_s
        for gpu, e, fp8 in a.starts:
            if f.state[gpu] != NONE or self.layout.opaque[gpu]:
                raise RuntimeError(f"rebalance started an instance on GPU {gpu}, which is taken")
            f.endpoint[gpu], f.fp8[gpu] = e, fp8
            f.state[gpu] = READY if initial else STARTING
            f.ready_at_s[gpu] = t_s + start_s
        stops = np.array(a.stops, np.int64)
        f.stop_at_s[stops] = t_s + (start_s if a.starts else 0.0)
        if not initial:
            self.metrics.reconfigurations += len(a.starts) + len(a.stops)

    def _apply_counts(self, plan: InstancePlan, t_s: float, initial: bool) -> None:
        f, home = self.fleet, self.layout.home
        budget = math.inf if initial else max(
            MIN_MOVES_PER_ROUND, round(MOVES_PER_ROUND_FRAC * self.layout.static_count.sum()))
        view = self.view(t_s)
        in_flight = view.in_flight
        for e in range(self.n_endpoints):
            live = np.flatnonzero((f.endpoint == e) & ((f.state == READY) | (f.state == STARTING)))
            delta = int(plan.count[e]) - len(live)
            if delta > 0 and budget > 0:
                free = np.flatnonzero((f.state == NONE) & (home >= 0))
                n = int(min(delta, budget, len(free)))
                chosen = self.policy.pick_gpus(view, free, n, home == e)
                f.endpoint[chosen] = e
                f.state[chosen] = READY if initial else STARTING
                f.ready_at_s[chosen] = t_s + (0.0 if initial else self.cadence.instance_start_s)
                f.fp8[chosen] = plan.fp8[e]
                budget -= n
                if not initial:
                    self.metrics.reconfigurations += n
            elif delta < 0 and budget > 0:
                n = int(min(-delta, budget))
                # Cancel starting instances first, then drain the least loaded.
                order = np.lexsort((in_flight[live], f.state[live] == READY))
                stop = live[order[:n]]
                f.state[stop] = DRAINING
                budget -= n
                self.metrics.reconfigurations += n

    def _lock_clocks(self, plan: InstancePlan, initial: bool) -> None:
        f = self.fleet
        assert plan.clock_mhz is not None
        for e in range(self.n_endpoints):
            hosting = np.flatnonzero((f.endpoint == e) & f.hosting())
            old = self.gpus.locked_max_mhz[hosting]
            new = np.full(len(hosting), plan.clock_mhz[e])
            changed = ~((np.isnan(old) & np.isnan(new)) | (old == new))
            if not initial:
                self.metrics.clock_changes += int(changed.sum())
            self.gpus.locked_max_mhz[hosting] = new

    def transitions(self, t_s: float, in_flight: np.ndarray) -> None:
        """Started instances serve once ready; due stops drain; drained GPUs are freed."""
        f = self.fleet
        f.state[(f.state == STARTING) & (f.ready_at_s <= t_s)] = READY
        due = f.stop_at_s <= t_s
        f.state[due & f.hosting()] = DRAINING
        f.stop_at_s[due] = np.inf
        idle = (f.state == DRAINING) & (in_flight == 0)
        f.state[idle] = NONE
        f.endpoint[idle] = -1
        self.gpus.locked_max_mhz[idle] = np.nan
