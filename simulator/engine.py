"""The discrete-time loop: arrivals, routing, service, GPU physics, power and airflow limits,
and the policies called on the coordinator's cadence (report, route, rebalance intervals).

Everything random comes from the scenario's seed; the cluster, its inlet offsets, the opaque load
phases and the arrivals are drawn from streams that do not depend on the policy, so every policy
sees the same cluster and the same requests.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from coordinator.policy.model import Limits
from coordinator.profiles.schema import ProfileRow
from coordinator.profiles.store import default_rows
from shapeshifter.hw import physics
from simulator import shapes
from simulator.cluster import Cluster, build_cluster
from simulator.gpus import GpuArrays, operating_clock_mhz
from simulator.metrics import Metrics
from simulator.observe import Observer
from simulator.policies import (
    MIN_MOVES_PER_ROUND,
    MOVES_PER_ROUND_FRAC,
    SHED_MARGIN,
    InstancePlan,
    Policy,
    make_policy,
)
from simulator.scenario import Scenario
from simulator.service import RequestPool, fit_service, quant_speedup
from simulator.snapshot import PlacementInputs, class_mix
from simulator.state import DRAINING, NONE, READY, STARTING, Fleet, View, Workload
from simulator.trace import Trace

EWMA_TAU_S = 300.0  # demand smoothing for the rebalancer
RECENT_WINDOW_S = 60.0
RELEASE_FRAC = 0.95  # caps are lifted once the uncapped draw stays below this share of the limit
FP8_POWER = 0.9  # derived profile rule 'quantization none->fp8' (power x0.9)
PROFILE_POINTS = 48  # placement's predicted power profiles: points per opaque period
FAN_GRID = 1001  # server fan power/airflow tabulated from ServerModel on this many load points


@dataclass
class Scope:
    """A row (power) or an aisle (airflow) with the GPUs under it and its capping state."""

    kind: str  # "row" | "aisle"
    index: int
    gpus: np.ndarray
    servers: np.ndarray
    capping: bool = False
    below_since_s: float | None = None


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
        self.arrival_rng = np.random.default_rng(seeds[1])
        self.route_rng = np.random.default_rng(seeds[2])
        self.cluster: Cluster = build_cluster(s.cluster, layout_rng)
        c = self.cluster
        self.gpu_server = c.gpu_server
        self.gpu_row = c.server_row[self.gpu_server]
        self.gpu_aisle = c.server_aisle[self.gpu_server]
        self.gpus = GpuArrays.create(c.gpu, c.n_gpus, c.inlet_base_c[self.gpu_server], layout_rng)
        self.workload = self._workload()
        self._layout(layout_rng)
        self.fleet = Fleet.empty(c.n_gpus)
        # The profile may overstate what the engines really serve (workload.capacity_error_frac):
        # the policies size with the profile, the pool serves at the true speed.
        self.pool = RequestPool(c.n_gpus, self.workload.service.slowed(
            1.0 + s.workload.capacity_error_frac))
        self.observer = Observer(self.n_endpoints, s.cadence.route_s, s.workload.slo_s)
        self.fan_w, self.airflow_cfm = _server_tables(c)
        self.scopes = _scopes(c, self.gpu_server)
        self.row_limit_w = c.row_limit_w.copy()
        self.aisle_limit_cfm = c.aisle_limit_cfm.copy()
        self.activity = np.zeros(c.n_gpus)
        self.server_inlet_c = c.inlet_base_c.copy()
        self._rollup()
        self.weights = np.zeros(c.n_gpus)
        self.controller_mhz = np.full(c.n_gpus, np.nan)  # the clock controller's locks
        self.phase2_locked = np.zeros(c.n_gpus, bool)  # locked by Phase 2 now
        self.demand_ewma = self._rate_at(0.0)
        self.recent = np.zeros((max(1, int(RECENT_WINDOW_S / s.step_s)), self.n_endpoints))
        self.metrics = Metrics(s, c, self.n_endpoints)

    # ---------------- setup ----------------

    def _workload(self) -> Workload:
        s, c = self.scenario, self.cluster
        rows, model = self.profile_rows, s.workload.model
        params = fit_service(rows, c.gpu.key, model)
        mean_p, mean_g = float(self.trace.prompt_tokens.mean()), float(
            self.trace.output_tokens.mean())
        total_s = params.mean_request_s(mean_p, mean_g)
        decode_s = mean_g * (params.tau0_s / params.max_concurrency + params.kappa_s)
        clocks = sorted({r.sm_clock_mhz for r in rows if r.model == model
                         and r.gpu_type == c.gpu.key and r.sm_clock_mhz
                         and r.sm_clock_mhz < c.gpu.sm_max_clock_mhz})
        n_ep = s.workload.endpoints
        fp8_allowed = np.arange(n_ep) < round(n_ep * s.workload.fp8_endpoints_frac)
        try:
            fp8_speedup = quant_speedup(rows, c.gpu.key, model, "fp8")
        except Exception:  # no fp8 profile for this model: the variant is not offered
            fp8_speedup, fp8_allowed = 1.0, np.zeros(n_ep, bool)
        return Workload(n_endpoints=n_ep, fp8_allowed=fp8_allowed, fp8_speedup=fp8_speedup,
                        instance_rps=1.0 / total_s, decode_share=decode_s / total_s,
                        clock_candidates_mhz=(*clocks, c.gpu.sm_max_clock_mhz), service=params,
                        model=model, slo_s=s.workload.slo_s,
                        class_mix=class_mix(mean_p, mean_g), profiles=tuple(rows),
                        count_lead_s=s.cadence.instance_start_s + s.cadence.rebalance_s)

    @property
    def n_endpoints(self) -> int:
        return self.workload.n_endpoints

    def _layout(self, rng: np.random.Generator) -> None:
        """Server roles from the policy's placement; demand scaled to the static fleet."""
        s, c = self.scenario, self.cluster
        n_saas = round(c.n_servers * s.cluster.saas_fraction)
        n_ep = self.n_endpoints
        weights = 1.0 + (np.arange(n_ep) % 3)  # endpoints of different sizes
        ep_servers = _split(n_saas, weights)
        tenants = s.opaque.tenants
        op_servers = _split(c.n_servers - n_saas, np.ones(tenants))
        role_counts = [(e, int(n)) for e, n in enumerate(ep_servers) if n > 0]
        role_counts += [(-1 - t, int(n)) for t, n in enumerate(op_servers) if n > 0]
        phases = shapes.tenant_phases(tenants, rng)  # placement reads no random numbers
        roles = self.policy.roles(self._placement_inputs(role_counts, phases), role_counts,
                                  self._peak_gpu_w(role_counts))
        gpu_role = roles[self.gpu_server]
        self.opaque = gpu_role < 0
        self.home = np.where(gpu_role >= 0, gpu_role, -1)
        self.static_count = np.bincount(self.home[self.home >= 0], minlength=n_ep)
        self.opaque_phase = np.where(self.opaque, phases[np.maximum(-1 - gpu_role, 0)], 0.0)
        self.opaque_jitter = shapes.gpu_jitter(c.n_gpus, rng, s.opaque.gpu_jitter)
        # Each endpoint's peak demand = peak_load_frac x its static fleet's profiled capacity.
        peak_rps = s.workload.peak_load_frac * self.static_count * self.workload.instance_rps
        self.demand_scale = peak_rps / self.trace.peak_rate_rps
        self.demand_offset_s = np.arange(n_ep) * s.workload.endpoint_phase_s

    def _placement_inputs(self, role_counts: list[tuple[int, int]], phases: np.ndarray
                          ) -> PlacementInputs:
        c = self.cluster
        n, max_w = c.gpus_per_server, c.gpu.power.max_w
        idle_cfm = c.server.airflow_cfm(0.0, n)
        cfm_per_w = (c.server.airflow_cfm(1.0, n) - idle_cfm) / (n * max_w)
        limits = Limits(row_power_limit_w={f"row{r}": float(v)
                                           for r, v in enumerate(c.row_limit_w)},
                        aisle_airflow_cfm={f"aisle{a}": float(v)
                                           for a, v in enumerate(c.aisle_limit_cfm)})
        return PlacementInputs(c.n_servers, c.gpus_per_server, c.spec.gpu_type, c.server_row,
                               c.server_aisle, c.inlet_base_c, c.gpu.idle_power_w,
                               c.gpu.thermal_c_per_w, limits,
                               self._role_profiles_w(role_counts, phases),
                               float(c.server.idle_power_w(c.gpus_per_server)),
                               idle_server_cfm=idle_cfm, cfm_per_gpu_w=cfm_per_w)

    def _role_profiles_w(self, role_counts: list[tuple[int, int]], phases: np.ndarray
                         ) -> dict[int, np.ndarray]:
        """Predicted draw per GPU of each role over one opaque period (TAPAS Place: a VM's
        power profile from its history; the shapes are periodic, so one past period is it):
        an opaque tenant's at its phase, an endpoint's flat at the busy decode draw."""
        s, m = self.scenario, self.cluster.gpu
        t = np.linspace(0.0, s.opaque.period_s, PROFILE_POINTS, endpoint=False)
        def power(act: np.ndarray) -> np.ndarray:
            return np.asarray(physics.power_w(act, m.sm_max_clock_mhz, m.sm_max_clock_mhz,
                                              m.idle_power_w, m.dynamic_power_max_w))
        out = {}
        for role, _ in role_counts:
            if role < 0:
                act = np.array([shapes.opaque_activity(s.opaque, float(x),
                                                       np.array([phases[-1 - role]]),
                                                       np.zeros(1))[0] for x in t])
            else:
                act = np.full(PROFILE_POINTS, physics.OASIS_DECODE_ACTIVITY)
            out[role] = power(act)
        return out

    def _peak_gpu_w(self, role_counts: list[tuple[int, int]]) -> dict[int, float]:
        """Predicted peak draw per GPU of each role: opaque at the shape's highest activity, an
        LLM GPU at the profiled busy decode activity (OASIS Table 3's load)."""
        s, m = self.scenario, self.cluster.gpu
        o = s.opaque
        opaque_act = min(1.0, o.mean_activity + o.amplitude + o.gpu_jitter)
        def power(act: float) -> float:
            return float(physics.power_w(act, m.sm_max_clock_mhz, m.sm_max_clock_mhz,
                                         m.idle_power_w, m.dynamic_power_max_w))
        return {role: power(opaque_act if role < 0 else physics.OASIS_DECODE_ACTIVITY)
                for role, _ in role_counts}

    def _rate_at(self, t_s: float) -> np.ndarray:
        return np.array([self.trace.rate_at(t_s, float(self.demand_scale[e]),
                                            float(self.demand_offset_s[e]))
                         for e in range(self.n_endpoints)])

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
            self._failures(t)
            if k > 0 and k % every["rebalance"] == 0:
                self._apply_plan(self.policy.plan(self._view(t), self.static_count), t)
            self._transitions(t)
            if k % every["route"] == 0:
                self._route_tick(t, k)
            self._arrivals(t)
            self._serve_and_heat(t)
            if k % every["report"] == 0:
                self._enforce_limits(t)
            self.metrics.record_step(k, t, self)
            if on_step is not None:
                on_step(k + 1, n_steps)
        self.metrics.finish(self)
        return self.metrics

    def _route_tick(self, t_s: float, k: int) -> None:
        """Routing interval: close the observation, route, lock clocks; scale out at once when
        the policy sees queues building (between rebalance intervals)."""
        view = self._view(t_s)
        if k > 0:
            waiting, running = self.pool.waiting_running_per_gpu()
            obs = self.observer.close(waiting, running, self.pool.params.max_concurrency)
            self.policy.observe(view, obs)
            if self.policy.scale_out(view):
                self._apply_plan(self.policy.plan(view, self.static_count, grow_only=True), t_s)
                view = self._view(t_s)  # the plan changed the fleet
        self._phase2(view)
        self.weights = self.policy.route(view)
        clocks = self.policy.clocks(view)
        if clocks is not None:
            self._set_clocks(clocks)

    def _phase2(self, view: View) -> None:
        """Phase 2 on the caps in force: capped GPUs locked at their clock point (not above the
        clock controller's lock); a GPU whose cap was lifted drops its Phase 2 lock."""
        locks = self.policy.phase2(view, self.gpus.power_limit_w, self.activity)
        if locks is None:
            return
        g = self.gpus
        released = self.phase2_locked & np.isnan(locks)
        g.locked_max_mhz[released] = self.controller_mhz[released]
        new = ~np.isnan(locks)
        g.locked_max_mhz[new] = np.fmin(self.controller_mhz[new], locks[new])
        self.phase2_locked = new

    def _set_clocks(self, clocks: np.ndarray) -> None:
        old = self.gpus.locked_max_mhz
        # GPUs under an emergency cap keep their lock, as live (coordinator.policy.clocks): the
        # caps were planned from the draw at that lock, and raising it between two reports
        # would take the row over its limit before the next re-plan.
        capped = self.gpus.power_limit_w < self.cluster.gpu.power.max_w
        self.controller_mhz = clocks.copy()
        clocks = np.where(capped, old, clocks)
        changed = ~((np.isnan(old) & np.isnan(clocks)) | (old == clocks))
        self.metrics.clock_changes += int(changed.sum())
        self.gpus.locked_max_mhz = clocks.copy()

    def _view(self, t_s: float) -> View:
        return View(t_s=t_s, cluster=self.cluster, workload=self.workload, fleet=self.fleet,
                    opaque=self.opaque, gpu_row=self.gpu_row, gpu_aisle=self.gpu_aisle,
                    gpu_power_w=self.gpus.power_w, gpu_uncapped_w=self._uncapped_w(),
                    gpu_temp_c=self.gpus.temperature_c,
                    in_flight=self.pool.in_flight_per_gpu(), row_power_w=self.row_power_w,
                    row_limit_w=self.row_limit_w, aisle_limit_cfm=self.aisle_limit_cfm,
                    server_power_w=self.server_power_w, server_cfm=self.server_cfm,
                    server_inlet_c=self.server_inlet_c, demand_rps=self._demand_rps(t_s),
                    locked_mhz=self.gpus.locked_max_mhz, gpu_clock_mhz=self.gpus.clock_mhz)

    def _demand_rps(self, t_s: float) -> np.ndarray:
        if t_s <= 0:
            return self._rate_at(0.0)
        return np.maximum(self.demand_ewma, self.recent.mean(axis=0))

    def _failures(self, t_s: float) -> None:
        c = self.cluster
        self.row_limit_w = c.row_limit_w.copy()
        self.aisle_limit_cfm = c.aisle_limit_cfm.copy()
        for f in self.scenario.failures:
            end = math.inf if f.duration_s is None else f.at_s + f.duration_s
            if f.at_s <= t_s < end:
                if f.kind == "ups":
                    self.row_limit_w[f.target] = c.row_limit_w[f.target] * f.capacity
                else:
                    self.aisle_limit_cfm[f.target] = c.aisle_limit_cfm[f.target] * f.capacity

    # ---------------- instances ----------------

    def _apply_plan(self, plan: InstancePlan, t_s: float, initial: bool = False) -> None:
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
        start_s = 0.0 if initial else self.scenario.cadence.instance_start_s
        for gpu, e, fp8 in a.starts:
            if f.state[gpu] != NONE or self.opaque[gpu]:
                raise RuntimeError(f"rebalance started an instance on GPU {gpu}, which is taken")
            f.endpoint[gpu], f.fp8[gpu] = e, fp8
            f.state[gpu] = READY if initial else STARTING
            f.ready_at_s[gpu] = t_s + start_s
        stops = np.array(a.stops, np.int64)
        f.stop_at_s[stops] = t_s + (start_s if a.starts else 0.0)
        if not initial:
            self.metrics.reconfigurations += len(a.starts) + len(a.stops)

    def _apply_counts(self, plan: InstancePlan, t_s: float, initial: bool) -> None:
        f = self.fleet
        budget = math.inf if initial else max(
            MIN_MOVES_PER_ROUND, round(MOVES_PER_ROUND_FRAC * self.static_count.sum()))
        view = self._view(t_s)
        in_flight = view.in_flight
        for e in range(self.n_endpoints):
            live = np.flatnonzero((f.endpoint == e) & ((f.state == READY) | (f.state == STARTING)))
            delta = int(plan.count[e]) - len(live)
            if delta > 0 and budget > 0:
                free = np.flatnonzero((f.state == NONE) & (self.home >= 0))
                n = int(min(delta, budget, len(free)))
                chosen = self.policy.pick_gpus(view, free, n, self.home == e)
                f.endpoint[chosen] = e
                f.state[chosen] = READY if initial else STARTING
                f.ready_at_s[chosen] = t_s + (0.0 if initial else
                                              self.scenario.cadence.instance_start_s)
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

    def _transitions(self, t_s: float) -> None:
        f = self.fleet
        f.state[(f.state == STARTING) & (f.ready_at_s <= t_s)] = READY
        due = f.stop_at_s <= t_s
        f.state[due & f.hosting()] = DRAINING
        f.stop_at_s[due] = np.inf
        idle = (f.state == DRAINING) & (self.pool.in_flight_per_gpu() == 0)
        f.state[idle] = NONE
        f.endpoint[idle] = -1
        self.gpus.locked_max_mhz[idle] = np.nan

    # ---------------- requests ----------------

    def _arrivals(self, t_s: float) -> None:
        dt = self.scenario.step_s
        rate = self._rate_at(t_s)
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
            gpu[sel] = self._route(e, int(sel.sum()))
        self.metrics.arrived += n_total
        ok = gpu >= 0
        self.metrics.count_dropped(endpoint[~ok])
        self.pool.add(gpu[ok], endpoint[ok], arrival[ok], prompt[ok], output[ok])

    def _route(self, e: int, n: int) -> np.ndarray:
        """Systematic sampling over the weights: equal weights give exact round robin."""
        if n == 0:
            return np.zeros(0, np.int64)
        mask = (self.fleet.endpoint == e) & (self.fleet.state == READY)
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

    # ---------------- service and physics ----------------

    def _serve_and_heat(self, t_s: float) -> None:
        s, c, g = self.scenario, self.cluster, self.gpus
        m = c.gpu
        # The clock a busy GPU runs at now (an idle GPU ramps up as soon as work arrives).
        busy_activity = np.maximum(self.activity, 0.5)
        clock, _, _ = operating_clock_mhz(m, busy_activity, g.power_limit_w, g.locked_max_mhz,
                                          g.temperature_c)
        prefill_rel = physics.relative_throughput(clock, m.sm_max_clock_mhz, 0.0)
        decode_rel = physics.relative_throughput(clock, m.sm_max_clock_mhz, 1.0)
        speed = np.where(self.fleet.fp8, self.workload.fp8_speedup, 1.0)
        completed, dropped, llm_activity = self.pool.step(
            t_s, s.step_s, speed, prefill_rel, decode_rel, s.workload.queue_timeout_s)
        self.metrics.count_completed(completed)
        self.observer.on_completed(completed)
        self.metrics.count_dropped(dropped)
        llm_activity = llm_activity * np.where(self.fleet.fp8, FP8_POWER, 1.0)
        opaque_act = shapes.opaque_activity(s.opaque, t_s, self.opaque_phase, self.opaque_jitter)
        self.activity = np.where(self.opaque, opaque_act, llm_activity)
        site_load = self.row_power_w.sum() / (c.nameplate_server_w() * c.n_servers)
        inlet_c = c.inlet_base_c + c.inlet_per_load_c * min(max(site_load, 0.0), 1.0)
        self.server_inlet_c = inlet_c
        g.step(self.activity, inlet_c[self.gpu_server], s.step_s)
        self._rollup()

    def _rollup(self) -> None:
        c = self.cluster
        server_gpu_w = np.bincount(self.gpu_server, self.gpus.power_w, minlength=c.n_servers)
        load = server_gpu_w / (c.gpus_per_server * c.gpu.power.max_w)
        idx = np.clip(np.rint(load * (FAN_GRID - 1)).astype(np.int64), 0, FAN_GRID - 1)
        host_w = c.server.idle_power_w(c.gpus_per_server)
        self.server_power_w = host_w + server_gpu_w + self.fan_w[idx]
        self.server_cfm = self.airflow_cfm[idx]
        self.row_power_w = np.bincount(c.server_row, self.server_power_w, minlength=c.n_rows)
        self.aisle_cfm = np.bincount(c.server_aisle, self.server_cfm, minlength=c.n_aisles)

    def _uncapped_w(self) -> np.ndarray:
        """Each GPU's draw at its current activity without the emergency's measures: no power
        limit, and the clock controller's lock instead of a Phase 2 one (else the scope would
        look released while only the Phase 2 locks hold it under its limit)."""
        m, g = self.cluster.gpu, self.gpus
        locks = np.where(self.phase2_locked, self.controller_mhz, g.locked_max_mhz)
        clock, _, _ = operating_clock_mhz(m, self.activity, np.full_like(g.power_limit_w,
                                                                         m.power.max_w),
                                          locks, g.temperature_c)
        return physics.power_w(self.activity, clock, m.sm_max_clock_mhz, m.idle_power_w,
                               m.dynamic_power_max_w)

    # ---------------- limits: detection, shedding, release ----------------

    def _enforce_limits(self, t_s: float) -> None:
        view = None
        caps = np.full(self.cluster.n_gpus, self.cluster.gpu.power.max_w)
        for sc in self.scopes:
            budget_w, measured_over, uncapped_w = self._scope_budget(sc)
            if measured_over or sc.capping:
                if uncapped_w <= budget_w / (1.0 - SHED_MARGIN) * RELEASE_FRAC:
                    sc.below_since_s = t_s if sc.below_since_s is None else sc.below_since_s
                    if t_s - sc.below_since_s >= self.scenario.cadence.release_hold_s:
                        sc.capping, sc.below_since_s = False, None
                        continue
                else:
                    sc.below_since_s = None
                sc.capping = True
                view = view or self._view(t_s)
                caps[sc.gpus] = np.minimum(caps[sc.gpus], self.policy.shed(view, sc.gpus,
                                                                           budget_w))
        self.gpus.power_limit_w = caps

    def _scope_budget(self, sc: Scope) -> tuple[float, bool, float]:
        """(GPU power budget W, measured over the limit, uncapped GPU draw W) for a scope."""
        c = self.cluster
        uncapped_w = float(self._uncapped_w()[sc.gpus].sum())
        gpu_w = float(self.gpus.power_w[sc.gpus].sum())
        margin = 1.0 - SHED_MARGIN
        if sc.kind == "row":
            limit = float(self.row_limit_w[sc.index])
            other_w = float(self.row_power_w[sc.index]) - gpu_w  # hosts and fans
            return limit * margin - other_w, float(self.row_power_w[sc.index]) > limit, uncapped_w
        # Aisle: airflow is linear in each server's GPU load, so a CFM limit is a GPU power limit.
        limit_cfm = float(self.aisle_limit_cfm[sc.index])
        n_srv = len(sc.servers)
        base_cfm = self.airflow_cfm[0] * n_srv
        per_w = (self.airflow_cfm[-1] - self.airflow_cfm[0]) / (c.gpus_per_server
                                                               * c.gpu.power.max_w)
        budget_w = (limit_cfm * margin - base_cfm) / per_w
        return budget_w, float(self.aisle_cfm[sc.index]) > limit_cfm, uncapped_w


def _split(n: int, weights: np.ndarray) -> np.ndarray:
    """n split in proportion to weights, largest remainders, at least 1 each while n allows."""
    share = n * weights / weights.sum()
    out = np.floor(share).astype(np.int64)
    for i in np.argsort(-(share - out))[: n - int(out.sum())]:
        out[i] += 1
    return out


def _server_tables(c: Cluster) -> tuple[np.ndarray, np.ndarray]:
    """Fan power and airflow of one server over GPU load 0..1, from ServerModel itself."""
    n = c.gpus_per_server
    loads = np.linspace(0.0, 1.0, FAN_GRID)
    fan_w = np.array([c.server.fan_power_w(float(x), n) for x in loads])
    cfm = np.array([c.server.airflow_cfm(float(x), n) for x in loads])
    return fan_w, cfm


def _scopes(c: Cluster, gpu_server: np.ndarray) -> list[Scope]:
    out = []
    for kind, owner, n in (("row", c.server_row, c.n_rows), ("aisle", c.server_aisle,
                                                              c.n_aisles)):
        for i in range(n):
            servers = np.flatnonzero(owner == i)
            out.append(Scope(kind, i, np.flatnonzero(np.isin(gpu_server, servers)), servers))
    return out


def simulate(scenario: Scenario, trace: Trace, policy_name: str,
             on_step: Callable[[int, int], None] | None = None) -> Metrics:
    """Run one policy over one scenario and return its metrics."""
    return Engine(scenario, trace, make_policy(policy_name)).run(on_step)
