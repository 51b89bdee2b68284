"""The discrete-time loop: arrivals, routing, service, GPU physics, power and airflow limits,
and the policies called on the coordinator's cadence (report, route, rebalance intervals).

Everything random comes from the scenario's seed; the cluster, its inlet offsets, the opaque load
phases and the arrivals are drawn from streams that do not depend on the policy, so every policy
sees the same cluster and the same requests.

The engine owns the clock and the cadence; its collaborators own the state: `Plant` (GPUs,
servers, rows, aisles), `InstanceControl` (the fleet), `RequestFlow` (requests, demand, routing),
`LimitGuard` (capping scopes) and `Metrics`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from coordinator.profiles.schema import ProfileRow
from coordinator.profiles.store import default_rows
from simulator.control.policies import InstancePlan, Policy, make_policy
from simulator.control.snapshot import PlacementInputs
from simulator.engine import setup
from simulator.engine.instances import InstanceControl
from simulator.engine.limits import LimitGuard
from simulator.engine.requests import RequestFlow
from simulator.inputs.scenario import Scenario
from simulator.inputs.trace import Trace
from simulator.model import shapes
from simulator.model.cluster import Cluster, build_cluster
from simulator.model.gpus import GpuArrays
from simulator.model.plant import Plant
from simulator.model.state import Fleet, View
from simulator.reporting.metrics import Metrics


@dataclass
class Engine:
    scenario: Scenario
    trace: Trace
    policy: Policy
    profile_rows: list[ProfileRow] = field(default_factory=default_rows)

    def __post_init__(self) -> None:
        s = self.scenario
        seeds = np.random.SeedSequence(s.seed).spawn(3)
        layout_rng = np.random.default_rng(seeds[0])
        self.cluster: Cluster = build_cluster(s.cluster, layout_rng)
        self.plant = Plant(self.cluster, layout_rng)
        self.workload = setup.build_workload(s, self.cluster, self.trace, self.profile_rows)
        self.layout = setup.lay_out(s, self.cluster, self.workload, self.trace, self.policy,
                                    layout_rng)
        self.metrics = Metrics(s, self.cluster, self.n_endpoints)
        self.instances = InstanceControl(s.cadence, self.layout, self.plant.gpus, self.policy,
                                         self._view, self.metrics)
        self.requests = RequestFlow(s, self.trace, self.workload, self.layout, self.metrics,
                                    np.random.default_rng(seeds[1]),
                                    np.random.default_rng(seeds[2]))
        self.limits = LimitGuard(self.plant, s.cadence.release_hold_s)

    # ---------------- what tests, benches and scripts read ----------------

    @property
    def n_endpoints(self) -> int:
        return self.workload.n_endpoints

    @property
    def gpus(self) -> GpuArrays:
        return self.plant.gpus

    @property
    def gpu_server(self) -> np.ndarray:
        return self.plant.gpu_server

    @property
    def gpu_row(self) -> np.ndarray:
        return self.plant.gpu_row

    @property
    def activity(self) -> np.ndarray:
        return self.plant.activity

    @property
    def server_inlet_c(self) -> np.ndarray:
        return self.plant.server_inlet_c

    @property
    def phase2_locked(self) -> np.ndarray:
        return self.plant.phase2_locked

    @property
    def fan_w(self) -> np.ndarray:
        return self.plant.fan_w

    @property
    def airflow_cfm(self) -> np.ndarray:
        return self.plant.airflow_cfm

    @property
    def fleet(self) -> Fleet:
        return self.instances.fleet

    @property
    def opaque(self) -> np.ndarray:
        return self.layout.opaque

    @property
    def opaque_phase(self) -> np.ndarray:
        return self.layout.opaque_phase

    @property
    def opaque_jitter(self) -> np.ndarray:
        return self.layout.opaque_jitter

    @property
    def static_count(self) -> np.ndarray:
        return self.layout.static_count

    def _placement_inputs(self, role_counts: setup.RoleCounts, phases: np.ndarray
                          ) -> PlacementInputs:
        return setup.placement_inputs(self.scenario, self.cluster, role_counts, phases)

    def _peak_gpu_w(self, role_counts: setup.RoleCounts) -> dict[int, float]:
        return setup.peak_gpu_w(self.scenario, self.cluster, role_counts)

    # ---------------- the loop ----------------

    def run(self, on_step: Callable[[int, int], None] | None = None) -> Metrics:
        s = self.scenario
        n_steps = math.ceil(s.duration_s / s.step_s)
        cad = s.cadence
        every = {k: max(1, round(v / s.step_s)) for k, v in
                 (("report", cad.report_s), ("route", cad.route_s),
                  ("rebalance", cad.rebalance_s))}
        self._apply_plan(self.policy.plan(self._view(0.0), self.static_count), 0.0, initial=True)
        for k in range(n_steps):
            t = k * s.step_s
            self.plant.apply_failures(s.failures, t)
            if k > 0 and k % every["rebalance"] == 0:
                self._apply_plan(self.policy.plan(self._view(t), self.static_count), t)
            self._transitions(t)
            if k % every["route"] == 0:
                self._route_tick(t, k)
            self.requests.arrive(t, self.fleet)
            self._serve_and_heat(t)
            if k % every["report"] == 0:
                self.limits.enforce(t, self._view, self.policy.shed)
            self.metrics.record_step(k, self.plant, self.fleet, self.opaque,
                                     len(self.requests.pool))
            if on_step is not None:
                on_step(k + 1, n_steps)
        self.metrics.finish(self.plant, len(self.requests.pool), self.static_count)
        return self.metrics

    def _route_tick(self, t_s: float, k: int) -> None:
        """Routing interval: close the observation, route, lock clocks; scale out at once when
        the policy sees queues building (between rebalance intervals)."""
        view = self._view(t_s)
        if k > 0:
            self.policy.observe(view, self.requests.observation())
            if self.policy.scale_out(view):
                self._apply_plan(self.policy.plan(view, self.static_count, grow_only=True), t_s)
                view = self._view(t_s)  # the plan changed the fleet
        locks = self.policy.phase2(view, self.gpus.power_limit_w, self.activity)
        if locks is not None:
            self.plant.apply_phase2(locks)
        self.requests.weights = self.policy.route(view)
        clocks = self.policy.clocks(view)
        if clocks is not None:
            self.metrics.clock_changes += self.plant.set_controller_clocks(clocks)

    def _view(self, t_s: float) -> View:
        p, g = self.plant, self.plant.gpus
        return View(t_s=t_s, cluster=self.cluster, workload=self.workload, fleet=self.fleet,
                    opaque=self.opaque, gpu_row=p.gpu_row, gpu_aisle=p.gpu_aisle,
                    gpu_power_w=g.power_w, gpu_uncapped_w=p.uncapped_w(),
                    gpu_temp_c=g.temperature_c,
                    in_flight=self.requests.pool.in_flight_per_gpu(),
                    row_power_w=p.row_power_w, row_limit_w=p.row_limit_w,
                    aisle_limit_cfm=p.aisle_limit_cfm, server_power_w=p.server_power_w,
                    server_cfm=p.server_cfm, server_inlet_c=p.server_inlet_c,
                    demand_rps=self.requests.demand_rps(t_s), locked_mhz=g.locked_max_mhz,
                    gpu_clock_mhz=g.clock_mhz)

    def _apply_plan(self, plan: InstancePlan, t_s: float, initial: bool = False) -> None:
        self.instances.apply(plan, t_s, initial)

    def _transitions(self, t_s: float) -> None:
        self.instances.transitions(t_s, self.requests.pool.in_flight_per_gpu())

    def _serve_and_heat(self, t_s: float) -> None:
        s = self.scenario
        prefill_rel, decode_rel = self.plant.service_speeds()
        llm_activity = self.requests.serve(t_s, self.fleet, prefill_rel, decode_rel,
                                           s.workload.queue_timeout_s)
        opaque_act = shapes.opaque_activity(s.opaque, t_s, self.opaque_phase, self.opaque_jitter)
        self.plant.heat(np.where(self.opaque, opaque_act, llm_activity), s.step_s)


def simulate(scenario: Scenario, trace: Trace, policy_name: str,
             on_step: Callable[[int, int], None] | None = None) -> Metrics:
    """Run one policy over one scenario and return its metrics."""
    return Engine(scenario, trace, make_policy(policy_name)).run(on_step)
