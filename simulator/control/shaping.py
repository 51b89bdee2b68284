"""The shaping loop's state in the simulator, around the coordinator's pure policies.

Each routing interval the engine closes an `Observation` and calls, in order:
  observe   capacity correction per endpoint (coordinator.policy.capacity.update_correction)
            and the row weight multipliers (coordinator.policy.shaping.update_row_weights);
  weights   routing weights x row and thermal multipliers (shaping);
  clocks    per GPU locked clock: the endpoint's lowest covering clock
            (coordinator.policy.configure.lowest_clock_mhz) under the row and thermal ceilings;
  scale_out whether queues build: the engine then asks for a plan at once (one interval).
Each rebalance interval (or on scale_out) `provision_rps` gives the rebalancer each endpoint's
rate to cover: the forecast's provision (coordinator.policy.capacity.forecast, lead = instance
start + rebalance interval) over the corrected capacity at the planning clock
(coordinator.policy.configure.planning_clock_mhz).
The live coordinator keeps the same state per endpoint and row between its ticks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from coordinator.policy import capacity, configure, shaping
from coordinator.policy.capping import shed as shed_policy
from shapeshifter.hw import physics
from simulator.control.observe import Observation
from simulator.model.state import READY, STARTING, View

COUNT_WINDOW_S = 600.0  # arrivals the count forecast fits (rises are counted over all of it)
LEVEL_WINDOW_S = 75.0  # the recent arrivals its level averages
CLOCK_WINDOW_S = 60.0  # arrivals the clock forecast fits
LATE_WINDOW_S = 60.0  # lateness is judged over this many seconds of completions
SATURATED_SCALE_OUT = 0.25  # this share of an endpoint's instances saturated: scale out now
# Scale in slowly (DynamoLLM): at most this share of an endpoint's instances per rebalance.
MAX_SCALE_IN_FRAC = 0.1
# Per endpoint clock floor, closed on measured lateness: a lower clock stretches every request
# (prefill is compute-bound), which no instance count cures. Up fast on lateness, down slowly.
FLOOR_UP_MHZ = 120.0
FLOOR_DOWN_MHZ = 15.0
# An interval counts as late when its late count is improbable (this share) at the budget: with
# steps in this ratio the floor settles where the late share is the budget, at any rate.
ALARM_SHARE = FLOOR_DOWN_MHZ / (FLOOR_UP_MHZ + FLOOR_DOWN_MHZ)


@dataclass
class ShapingLoop:
    n_endpoints: int
    n_rows: int
    configure_config: configure.ConfigureConfig = field(default_factory=configure.ConfigureConfig)
    shaping_config: shaping.ShapingConfig = field(default_factory=shaping.ShapingConfig)
    correction_config: capacity.CorrectionConfig = field(
        default_factory=capacity.CorrectionConfig)
    corrections: list[capacity.CorrectionState] = field(default_factory=list)
    row_weight: np.ndarray = field(default_factory=lambda: np.zeros(0))
    obs: Observation | None = None
    saturated_frac: np.ndarray = field(default_factory=lambda: np.zeros(0))
    completions: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)
    # Per routing interval of the late window: each endpoint's utilization (arrivals over its
    # corrected capacity at the maximum clock), and whether the interval kept within budget.
    utilization: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)
    clock_floor_mhz: np.ndarray = field(default_factory=lambda: np.zeros(0))
    # The opaque tenants' relative performance measured so far (sum, samples): the contract's
    # accounting period is the run.
    opaque_perf_sum: float = 0.0
    opaque_perf_n: int = 0

    def __post_init__(self) -> None:
        self.corrections = [capacity.CorrectionState() for _ in range(self.n_endpoints)]
        self.row_weight = np.ones(self.n_rows)
        self.saturated_frac = np.zeros(self.n_endpoints)
        self.clock_floor_mhz = np.full(self.n_endpoints, np.inf)  # set from the GPU at first

    def factor(self, e: int) -> float:
        return self.corrections[e].factor

    # ---------------- observation ----------------

    def observe(self, view: View, obs: Observation) -> None:
        self.obs = obs
        ready = view.fleet.state == READY
        saturated = ready & (obs.running >= obs.max_concurrency) & (obs.waiting > 0)
        keep = max(1, round(LATE_WINDOW_S / obs.interval_s))
        self.completions = [*self.completions, (obs.served, obs.late)][-keep:]
        self.utilization = [*self.utilization, self._interval_utilization(view, obs)][-keep:]
        served, late = self._window_totals()
        window_over = self._beyond_chance(late, served)
        for e in range(self.n_endpoints):
            mine = ready & (view.fleet.endpoint == e)
            n = int(mine.sum())
            self.saturated_frac[e] = float(saturated[mine].mean()) if n else 0.0
            per_inst = float(_instance_capacity_rps(view, mine).mean()) if n else 0.0
            o = capacity.CapacityObservation(
                served_rps=float(obs.served[e]) / obs.interval_s,
                arrival_rps=float(obs.arrival_rates_rps[-1, e]), instances=n,
                saturated_frac=self.saturated_frac[e],
                queued_frac=float((obs.waiting[mine] > 0).mean()) if n else 0.0,
                late_frac=float(late[e] / served[e]) if served[e] else None,
                profile_capacity_rps=per_inst,
                over_budget=bool(window_over[e]))
            self.corrections[e] = capacity.update_correction(self.corrections[e], o,
                                                             self.correction_config)
        self._update_clock_floor(view, obs)
        self._measure_opaque(view)
        excess, movable = self._row_excess(view)
        self.row_weight = shaping.update_row_weights(self.row_weight, excess, movable,
                                                     self.shaping_config)

    def _measure_opaque(self, view: View) -> None:
        """Relative performance of the busy opaque GPUs at their clocks now (what the agents
        report), accumulated for the shedding's deep weight."""
        if view.gpu_clock_mhz is None:
            return
        m = view.cluster.gpu
        busy = view.opaque & (view.gpu_power_w > m.idle_power_w + 1.0)
        if not busy.any():
            return
        rel = physics.relative_throughput(view.gpu_clock_mhz[busy], m.sm_max_clock_mhz,
                                          shed_policy.OPAQUE_DECODE_FRAC)
        self.opaque_perf_sum += float(np.sum(rel))
        self.opaque_perf_n += int(busy.sum())

    def saas_deep_weight(self) -> float:
        """coordinator.policy.capping.shed.deep_weight_for on the opaque performance measured so
        far."""
        perf = self.opaque_perf_sum / self.opaque_perf_n if self.opaque_perf_n else None
        return shed_policy.deep_weight_for(perf)

    def _capped_endpoints(self, view: View) -> np.ndarray:
        """Per endpoint: a GPU of it drawing less than it would uncapped (a cap in force)."""
        capped = view.gpu_uncapped_w > view.gpu_power_w + 1.0
        hosting = view.fleet.hosting() & capped
        return np.bincount(view.fleet.endpoint[hosting], minlength=self.n_endpoints) > 0

    def _update_clock_floor(self, view: View, obs: Observation) -> None:
        m = view.cluster.gpu
        top, low = float(m.sm_max_clock_mhz), self.configure_config.min_clock_frac * float(
            m.sm_max_clock_mhz)
        floor = np.minimum(self.clock_floor_mhz, top)
        budget = self.correction_config.late_budget
        # Significance settles the floor at the budget; while caps hold an endpoint's GPUs
        # below their draw its slack is already spent, so any lateness over the budget counts.
        capped = self._capped_endpoints(view)
        late = np.where(capped, obs.late > budget * np.maximum(obs.served, 1),
                        self._beyond_chance(obs.late, obs.served))
        floor = np.where(late, floor + FLOOR_UP_MHZ, floor - FLOOR_DOWN_MHZ)
        self.clock_floor_mhz = np.clip(floor, low, top)

    def _row_excess(self, view: View) -> tuple[np.ndarray, np.ndarray]:
        m = view.cluster.gpu
        saas = ~view.opaque & view.fleet.hosting()
        dyn = np.maximum(view.gpu_power_w - m.idle_power_w, 0.0) * saas
        movable = np.bincount(view.gpu_row, dyn, minlength=self.n_rows)
        return shaping.row_excess_w(view.row_power_w, view.row_limit_w,
                                    self.shaping_config), movable

    # ---------------- decisions ----------------

    def provision_rps(self, view: View, lead_s: float, grow_only: bool = False
                      ) -> np.ndarray:
        """Per endpoint, the rate (in profiled capacity at the maximum clock) to provision:
        the forecast over the correction. `grow_only` (a scale-out between rebalance
        intervals): the rate arriving now when it is higher. What the endpoint already has is
        held as a count (min_counts), not as a rate here."""
        out = np.zeros(self.n_endpoints)
        if self.obs is None:
            return view.demand_rps  # before the first observation (the caller adds headroom)
        rel = self._planning_rel(view)
        for e in range(self.n_endpoints):
            need = self._forecast(e, COUNT_WINDOW_S, lead_s, LEVEL_WINDOW_S).provision_rps
            if grow_only:
                need = capacity.scale_out_rps(need, float(self.obs.arrival_rates_rps[-1, e]))
            out[e] = need / max(self.factor(e), 1e-6) / rel
        return out

    def min_counts(self, view: View, grow_only: bool = False) -> np.ndarray:
        """Per endpoint, the fewest instances the next plan may leave. Scale-in needs evidence:
        an endpoint whose last late window is not clean (or not yet full), or any endpoint in
        a scale-out, keeps every instance it has; a clean one sheds at most MAX_SCALE_IN_FRAC
        of them per plan, and no more than runs its busiest recent load at the utilization
        validated within budget plus that step (capacity.validated_min_count). A window late
        beyond chance with the clock floor at the maximum grows it by that step: the clock
        controller has nothing left to give. A count, because the rebalancer rates instances
        from the profile (MSRR per query class) and the loop from the service model: holding
        "the capacity we have" as a rate re-rated by the other side grew the fleet by a few
        percent at every held plan."""
        f = view.fleet
        keep = ((f.state == READY) | (f.state == STARTING)) & ~np.isfinite(f.stop_at_s)
        count = np.bincount(f.endpoint[keep], minlength=self.n_endpoints)
        if self.obs is None or grow_only:
            return count
        out = count.copy()
        late_at_max = self._late_at_max_clock(view)
        out[late_at_max] += np.ceil(np.maximum(count[late_at_max], 1) * MAX_SCALE_IN_FRAC
                                    ).astype(count.dtype)
        util = np.array([u for u, _ in self.utilization])
        util_now = util.max(axis=0)  # the busiest interval of the window
        util_ok = np.where([c for _, c in self.utilization], util, 0.0).max(axis=0)
        for e in np.flatnonzero(self._clean() & ~late_at_max):
            # A probe: a plan may run the fleet a step (the scale-in share) above the
            # utilization validated so far, and the next clean window validates that. The
            # forecast's headroom stays on top through the rebalancer's sizing.
            out[e] = capacity.validated_min_count(
                int(count[e]), int(count[e] * MAX_SCALE_IN_FRAC), float(util_now[e]),
                float(util_ok[e]) / (1 - MAX_SCALE_IN_FRAC))
        return out

    def _interval_utilization(self, view: View, obs: Observation
                              ) -> tuple[np.ndarray, np.ndarray]:
        """Per endpoint: arrivals over the corrected capacity at the maximum clock, and
        whether the interval's lateness was within the budget (not significantly over it)."""
        have = self._live_capacity_rps(view) * np.array(
            [self.factor(e) for e in range(self.n_endpoints)])
        clean = ~self._beyond_chance(obs.late, obs.served)
        util = np.where(have > 0, obs.arrival_rates_rps[-1] / np.maximum(have, 1e-9), 0.0)
        return util, clean

    def _clean(self) -> np.ndarray:
        """Per endpoint: a full late window with lateness within the budget."""
        assert self.obs is not None
        if len(self.completions) * self.obs.interval_s < LATE_WINDOW_S:
            return np.zeros(self.n_endpoints, bool)
        served, late = self._window_totals()
        budget = self.correction_config.late_budget
        return late <= budget * np.maximum(served, 1)

    def _late_at_max_clock(self, view: View) -> np.ndarray:
        """Per endpoint: its clock floor at the maximum and the late window significantly over
        the budget. The clock controller, the fast remedy, is spent; more instances are the
        one left, whatever the correction still believes of their capacity."""
        if self.obs is None or len(self.completions) * self.obs.interval_s < LATE_WINDOW_S:
            return np.zeros(self.n_endpoints, bool)
        served, late = self._window_totals()
        top = self.clock_floor_mhz >= float(view.cluster.gpu.sm_max_clock_mhz)
        over = self._beyond_chance(late, served)
        return top & over

    def _beyond_chance(self, late: np.ndarray, served: np.ndarray) -> np.ndarray:
        """Per endpoint: capacity.late_over_budget of late out of served (ALARM_SHARE)."""
        budget = self.correction_config.late_budget
        return np.array([capacity.late_over_budget(int(x), int(n), budget, ALARM_SHARE)
                         for x, n in zip(late, served, strict=True)], dtype=bool)

    def _window_totals(self) -> tuple[np.ndarray, np.ndarray]:
        """(completed, completed over the SLO) per endpoint over the late window."""
        return (np.sum([c for c, _ in self.completions], axis=0),
                np.sum([x for _, x in self.completions], axis=0))

    def _live_capacity_rps(self, view: View) -> np.ndarray:
        """Per endpoint, the profiled capacity at the maximum clock of its ready and starting
        instances."""
        live = (view.fleet.state == READY) | (view.fleet.state == STARTING)
        return np.array([_instance_capacity_rps(view, live & (view.fleet.endpoint == e),
                                                at_max=True).sum()
                         for e in range(self.n_endpoints)])

    def scale_out(self, view: View) -> bool:
        """Queues build somewhere and nothing is already starting for that endpoint, or the
        last interval's arrivals outrun what its ready and starting instances serve."""
        assert self.obs is not None
        starting = np.bincount(view.fleet.endpoint[view.fleet.state == STARTING],
                               minlength=self.n_endpoints)
        have = self._live_capacity_rps(view)
        burst = [capacity.outruns_capacity(float(self.obs.arrival_rates_rps[-1, e]), have[e],
                                           self.factor(e)) for e in range(self.n_endpoints)]
        return bool(np.any(((self.saturated_frac >= SATURATED_SCALE_OUT) & (starting == 0))
                           | np.array(burst)))

    def weights(self, view: View, base: np.ndarray) -> np.ndarray:
        m = view.cluster.gpu
        mult = np.where(view.opaque, 1.0, self.row_weight[view.gpu_row])
        mult *= shaping.thermal_weights(view.gpu_temp_c, m.thermal.slowdown_c,
                                        self.shaping_config)
        return base * mult

    def clocks(self, view: View) -> np.ndarray:
        """Per GPU locked maximum clock (NaN = unlocked) for every hosting GPU. Until one late
        window has been observed the correction knows nothing, so nothing is locked."""
        m, w, f = view.cluster.gpu, view.workload, view.fleet
        out = np.full(view.cluster.n_gpus, np.nan)
        assert self.obs is not None
        if len(self.completions) * self.obs.interval_s < LATE_WINDOW_S:
            return out
        ready = f.state == READY
        for e in range(self.n_endpoints):
            mine = f.hosting() & (f.endpoint == e)
            cap_max = float(_instance_capacity_rps(view, ready & (f.endpoint == e),
                                                   at_max=True).sum())
            need = self._forecast(e, CLOCK_WINDOW_S, 0.0).provision_rps / max(self.factor(e),
                                                                             1e-6)
            clock = configure.lowest_clock_mhz(1, need, cap_max, m, w.decode_share,
                                               self.configure_config) if cap_max > 0 else \
                m.sm_max_clock_mhz
            out[mine] = max(clock, float(self.clock_floor_mhz[e]))
        out = np.fmin(out, self._ceilings(view))
        hosting = f.hosting()
        out[~hosting] = np.nan
        out[hosting & (out >= m.sm_max_clock_mhz)] = np.nan
        return out

    def latency_clock_mhz(self, view: View) -> np.ndarray:
        """Per GPU, the clock its endpoint's measured lateness asks for (the clock floor); NaN
        for GPUs serving nothing and before a late window has been seen."""
        out = np.full(view.cluster.n_gpus, np.nan)
        if self.obs is None or len(self.completions) * self.obs.interval_s < LATE_WINDOW_S:
            return out
        f = view.fleet
        hosting = f.hosting()
        out[hosting] = np.minimum(self.clock_floor_mhz[f.endpoint[hosting]],
                                  view.cluster.gpu.sm_max_clock_mhz)
        return out

    def _ceilings(self, view: View) -> np.ndarray:
        m = view.cluster.gpu
        excess, saas_dyn = self._row_excess(view)
        # Routing first: a row's clocks are only lowered once its weights are at the floor.
        at_floor = self.row_weight <= self.shaping_config.min_weight + 1e-9
        row_ceiling = shaping.row_clock_ceiling_mhz(np.where(at_floor, excess, 0.0), saas_dyn,
                                                    m.sm_max_clock_mhz, self.shaping_config)
        thermal = shaping.thermal_clock_ceiling_mhz(
            view.gpu_temp_c, m.thermal.slowdown_c, m.sm_max_clock_mhz, m.thermal_c_per_w,
            np.full(view.cluster.n_gpus, m.dynamic_power_max_w), self.shaping_config)
        return np.where(view.opaque, np.nan, np.fmin(row_ceiling[view.gpu_row], thermal))

    # ---------------- helpers ----------------

    def _forecast(self, e: int, window_s: float, lead_s: float, level_s: float = 0.0
                  ) -> capacity.Forecast:
        assert self.obs is not None
        bins = max(3, round(window_s / self.obs.interval_s))
        rates = self.obs.arrival_rates_rps[-bins:, e]
        return capacity.forecast(rates, self.obs.interval_s, lead_s,
                                 level_bins=round(level_s / self.obs.interval_s))

    def _planning_rel(self, view: View) -> float:
        m, w = view.cluster.gpu, view.workload
        clock = configure.planning_clock_mhz(m, w.decode_share, self.configure_config)
        return configure.capacity_at_clock(1.0, clock, m, w.decode_share)


def _instance_capacity_rps(view: View, mask: np.ndarray, at_max: bool = False) -> np.ndarray:
    """Profiled capacity of each instance in `mask` at its locked clock (or the maximum)."""
    w, m = view.workload, view.cluster.gpu
    speed = np.where(view.fleet.fp8[mask], w.fp8_speedup, 1.0)
    if at_max:
        return w.instance_rps * speed
    clock = np.where(np.isnan(view.locked_mhz[mask]), m.sm_max_clock_mhz, view.locked_mhz[mask])
    rel = physics.relative_throughput(clock, m.sm_max_clock_mhz, w.decode_share)
    return w.instance_rps * speed * rel
