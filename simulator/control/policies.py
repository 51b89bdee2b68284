"""The policies the simulator compares: the baseline and the shapeshifter components.

Interface (`Policy`): the engine calls, on the live coordinator's cadence,
  roles(...)     once: which servers serve which endpoint or opaque tenant (placement),
  plan(view)     every rebalance interval: instances, variant and locked clock per endpoint,
  route(view)    every routing interval: per-instance routing weights,
  shed(...)      on every report while a row or aisle is over its (possibly reduced) limit.
All are pure functions of their arguments.

Baseline: contiguous first-fit placement, round-robin routing, static allocation sized for the
peak with every instance at fp16 and max clock, uniform caps on overload or emergency.

Components, each the coordinator's own pure function where one exists (coordinator.policy),
called through the adapters in simulator/control/snapshot.py:
  place      coordinator.policy.placement.place, once per server at layout (opaque tenants'
             and endpoints' servers arrive interleaved; each goes to the best-ranked node);
  route      coordinator.policy.routing.routing_weights per endpoint, every routing interval;
  rebalance  coordinator.policy.rebalance.rebalance every rebalance interval: instance count,
             variant (fp16/fp8) and which GPUs start and stop (make-before-break);
  shed       coordinator.policy.capping.shed.shed on every report while a row or aisle is over its
             (possibly reduced) limit (tiers weighed by what a watt costs: SaaS slack and
             opaque down to its performance floor first, below the floors a shared cut);
  phase2     coordinator.policy.capping.phase2.plan_phase2 every routing interval while caps are in
             force: capped GPUs locked at the clock that fits, their routing weight x their
             relative throughput, the capacity they lost added to the rebalancer's provision;
  config     the configurator (coordinator.policy.configure): every routing interval each
             endpoint's lowest clock covering its forecast over the corrected capacity, under
             the row and thermal ceilings (coordinator.policy.shaping); without the
             rebalancer the count stays static and the variant is fp8 where allowed;
  closed loop (route, config, rebalance): forecast + correction (coordinator.policy.capacity)
             in simulator/control/shaping.py; a rebalance is also asked for within one routing
             interval when queues build.
`policy_sources` names the implementation of every decision in summary.json.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Protocol

import numpy as np

from coordinator.policy.capping.phase2 import demand_with_lost, plan_phase2
from coordinator.policy.capping.shed import shed
from coordinator.policy.model import ClusterSnapshot, InstanceState, RebalanceConfig
from coordinator.policy.placement import PlaceRequest, place
from coordinator.policy.rebalance import rebalance
from coordinator.policy.routing import routing_weights
from simulator.control import snapshot as snap
from simulator.control.observe import Observation
from simulator.control.shaping import ShapingLoop
from simulator.model.state import READY, STARTING, View

SHED_MARGIN = 0.03  # caps aim this far below the limit
# Rebalance settings (RebalanceConfig): no headroom of its own (the closed loop's provision
# carries the one measured from the demand), the engine's restart budget; MIG off (the simulator
# models whole-GPU instances only); else the defaults.
HYSTERESIS_S = 120.0
MOVES_PER_ROUND_FRAC = 0.1  # at most this share of the SaaS GPUs restarted per rebalance
MIN_MOVES_PER_ROUND = 4


@dataclass(frozen=True)
class Components:
    place: bool = False
    route: bool = False
    config: bool = False
    rebalance: bool = False
    priority_shed: bool = False
    phase2: bool = False  # clock points, routing and added capacity while caps are in force


POLICY_COMPONENTS: dict[str, Components] = {
    "baseline": Components(),
    "place": Components(place=True),
    "route": Components(route=True),
    "config": Components(config=True),
    "shapeshifter-no-rebalance": Components(True, True, True, False, True, True),
    "shapeshifter": Components(True, True, True, True, True, True),
}


@dataclass(frozen=True)
class InstancePlan:
    count: np.ndarray  # instances per endpoint
    fp8: np.ndarray  # bool per endpoint
    clock_mhz: np.ndarray | None  # locked clock per endpoint, NaN = not locked; None = the
    # clock controller locks them every routing interval
    # From the rebalancer: exactly which GPUs start (gpu, endpoint, fp8) and stop; None = the
    # engine sizes each endpoint to `count` itself (pick_gpus).
    actions: snap.PlanArrays | None = None


class Policy(Protocol):
    name: str
    components: Components

    def roles(self, inputs: snap.PlacementInputs, role_counts: list[tuple[int, int]],
              peak_gpu_w: dict[int, float]) -> np.ndarray: ...

    def plan(self, view: View, static_count: np.ndarray, grow_only: bool = False
             ) -> InstancePlan: ...

    def route(self, view: View) -> np.ndarray: ...

    def pick_gpus(self, view: View, free: np.ndarray, n: int, home: np.ndarray
                  ) -> np.ndarray: ...

    def shed(self, view: View, gpus: np.ndarray, budget_w: float) -> np.ndarray: ...

    def observe(self, view: View, obs: Observation) -> None: ...

    def scale_out(self, view: View) -> bool: ...

    def clocks(self, view: View) -> np.ndarray | None: ...

    def phase2(self, view: View, caps_w: np.ndarray, activity: np.ndarray
               ) -> np.ndarray | None: ...


# ---------------- placement (server roles) ----------------

def contiguous_roles(role_counts: list[tuple[int, int]], n_servers: int) -> np.ndarray:
    """First fit in server order: each role's servers are consecutive (rows end up homogeneous)."""
    roles = np.concatenate([np.full(n, role) for role, n in role_counts])
    return _fit(roles, n_servers)


def placed_roles(inputs: snap.PlacementInputs, role_counts: list[tuple[int, int]],
                 peak_gpu_w: dict[int, float]) -> tuple[np.ndarray, int]:
    """Server roles from coordinator.policy.placement.place: the roles' servers arrive
    interleaved, each asks for a whole server at its predicted peak (opaque tenants: role < 0,
    endpoints: flexible) and takes the best-ranked node; the placed load counts for the next
    request. Returns (role per server, requests no node could take within the limits: those go
    to the first free server)."""
    n = inputs.n_servers
    nodes = snap.empty_nodes(inputs)
    instances: list[InstanceState] = []
    roles = np.full(n, np.iinfo(np.int64).min)
    fallbacks = 0
    row_profiles = _idle_row_profiles(inputs)
    aisle_profiles = _idle_aisle_profiles(inputs)
    for role in snap.interleaved(role_counts)[:n]:
        profile = inputs.gpus_per_server * inputs.role_profiles_w[role]
        request = PlaceRequest(gpus=inputs.gpus_per_server,
                               predicted_peak_power_w=float(profile.max()),
                               workload="opaque" if role < 0 else "flexible",
                               gpu_type=inputs.gpu_type,
                               predicted_profile_w=tuple(profile.tolist()))
        ranked = place(request, ClusterSnapshot(tuple(nodes), tuple(instances)), inputs.limits,
                       {r: tuple(p.tolist()) for r, p in row_profiles.items()},
                       {a: tuple(p.tolist()) for a, p in aisle_profiles.items()})
        if ranked:
            server = int(ranked[0].node_id[1:])
        else:
            server = int(np.flatnonzero(roles == np.iinfo(np.int64).min)[0])
            fallbacks += 1
        roles[server] = role
        row = f"row{inputs.server_row[server]}"
        above_idle_w = profile - inputs.gpus_per_server * inputs.idle_gpu_w
        row_profiles[row] = row_profiles[row] + above_idle_w
        aisle = f"aisle{inputs.server_aisle[server]}"
        aisle_profiles[aisle] = aisle_profiles[aisle] + inputs.cfm_per_gpu_w * above_idle_w
        snap.assign_server(nodes, instances, server, role, peak_gpu_w[role])
    unset = roles == np.iinfo(np.int64).min
    roles[unset] = role_counts[-1][0]
    return roles, fallbacks


def _idle_row_profiles(inputs: snap.PlacementInputs) -> dict[str, np.ndarray]:
    """Each row's predicted draw with every server idle: hosts and idle GPUs."""
    points = len(next(iter(inputs.role_profiles_w.values())))
    per_server = inputs.host_w + inputs.gpus_per_server * inputs.idle_gpu_w
    counts = np.bincount(inputs.server_row)
    return {f"row{r}": np.full(points, per_server * int(k)) for r, k in enumerate(counts)}


def _idle_aisle_profiles(inputs: snap.PlacementInputs) -> dict[str, np.ndarray]:
    """Each aisle's predicted airflow with every server idle."""
    points = len(next(iter(inputs.role_profiles_w.values())))
    counts = np.bincount(inputs.server_aisle)
    return {f"aisle{a}": np.full(points, inputs.idle_server_cfm * int(k))
            for a, k in enumerate(counts)}


def _fit(roles: np.ndarray, n: int) -> np.ndarray:
    if len(roles) >= n:
        return roles[:n]
    return np.concatenate([roles, np.full(n - len(roles), roles[-1])])


# ---------------- instance plans (config, rebalance) ----------------

def static_plan(static_count: np.ndarray) -> InstancePlan:
    n = len(static_count)
    return InstancePlan(count=static_count.copy(), fp8=np.zeros(n, bool),
                        clock_mhz=np.full(n, np.nan))


def rebalance_config(view: View, initial: bool) -> RebalanceConfig:
    saas_gpus = int((~view.opaque).sum())
    moves = max(MIN_MOVES_PER_ROUND, round(MOVES_PER_ROUND_FRAC * saas_gpus))
    # Hysteresis: the closed loop only lets an endpoint shrink after a clean late window
    # (simulator/control/shaping.py), so the rebalancer's own brake is short: four rebalance
    # intervals.
    # Caps enforce the limits here (the engine sheds on every report), so an endpoint that
    # cannot be covered within them still gets its instances (Phase 2, place_over_limits).
    return RebalanceConfig(headroom_frac=0.0,
                           max_restarts_per_round=saas_gpus if initial else moves,
                           allow_mig=False, hysteresis_s=HYSTERESIS_S, place_over_limits=True)


def rebalanced_plan(view: View, provision_rps: np.ndarray,
                    min_counts: np.ndarray | None = None) -> InstancePlan:
    """coordinator.policy.rebalance.rebalance on the simulator's snapshot, each endpoint's
    demand being the closed loop's provision and its min_instances the loop's min_counts;
    clocks are left to the clock controller."""
    w, f = view.workload, view.fleet
    saas_gpus = int((~view.opaque).sum())
    initial = not f.hosting().any()
    sized = replace(view, demand_rps=provision_rps)
    snapshot = snap.cluster_snapshot(sized, max_instances=saas_gpus, stopping_pinned=True,
                                     min_counts=min_counts)
    plan = rebalance(snapshot, w.profiles, snap.limits_of(view), rebalance_config(view, initial))
    actions = snap.plan_arrays(plan, view.cluster.gpus_per_server)
    count, fp8 = _after_plan(view, actions)
    return InstancePlan(count=count, fp8=fp8, clock_mhz=None, actions=actions)


def _after_plan(view: View, actions: snap.PlanArrays) -> tuple[np.ndarray, np.ndarray]:
    """Instances per endpoint once the plan has run, and whether all of them serve fp8."""
    f, n_ep = view.fleet, view.workload.n_endpoints
    live = ((f.state == READY) | (f.state == STARTING)) & ~np.isfinite(f.stop_at_s)
    live[list(actions.stops)] = False
    ep = np.concatenate([f.endpoint[live], [e for _, e, _ in actions.starts]]).astype(np.int64)
    fp8 = np.concatenate([f.fp8[live], [q for _, _, q in actions.starts]]).astype(bool)
    count = np.bincount(ep, minlength=n_ep)
    fp16 = np.bincount(ep[~fp8], minlength=n_ep)
    return count, (count > 0) & (fp16 == 0)


def with_lost(provision_rps: np.ndarray, lost: np.ndarray, view: View) -> np.ndarray:
    """coordinator.policy.capping.phase2.demand_with_lost per endpoint (the live rebalancer's
    too)."""
    f = view.fleet
    live = (f.state == READY) | (f.state == STARTING)
    n = np.bincount(f.endpoint[live], minlength=view.workload.n_endpoints)
    return np.array([demand_with_lost(float(p), float(x), int(k))
                     for p, x, k in zip(provision_rps, lost, n, strict=True)])


# ---------------- routing ----------------

def coordinator_weights(view: View) -> np.ndarray:
    """coordinator.policy.routing.routing_weights per endpoint, as a weight per GPU."""
    snapshot = snap.cluster_snapshot(view, max_instances=1, stopping_pinned=False)
    limits = snap.limits_of(view)
    weights: dict[str, float] = {}
    for e in range(view.workload.n_endpoints):
        for rw in routing_weights(snap.endpoint_name(e), snapshot, limits):
            weights[rw.instance_id] = rw.weight
    return snap.route_weights_array(weights, view.cluster.n_gpus)


def round_robin_weights(view: View) -> np.ndarray:
    return (view.fleet.state == READY).astype(float)


# ---------------- shedding (caps on overload / emergency) ----------------

def water_fill_cap_w(demand_w: np.ndarray, budget_w: float, min_w: float, max_w: float) -> float:
    """The one cap c with sum(min(demand, c)) = budget (clamped to [min_w, max_w])."""
    if demand_w.sum() <= budget_w or len(demand_w) == 0:
        return max_w
    d = np.sort(demand_w)
    n = len(d)
    below = np.cumsum(d) - d  # sum of those smaller than d[i]
    caps = (budget_w - below) / (n - np.arange(n))  # cap if all from i on are capped
    ok = caps <= d
    c = float(caps[np.argmax(ok)]) if ok.any() else max_w
    return float(np.clip(c, min_w, max_w))


def uniform_caps(view: View, gpus: np.ndarray, budget_w: float) -> np.ndarray:
    """Baseline: the same cap on every GPU in the scope."""
    p = view.cluster.gpu.power
    cap = water_fill_cap_w(view.gpu_uncapped_w[gpus], budget_w, p.min_w, p.max_w)
    return np.full(len(gpus), cap)


def coordinator_caps(view: View, gpus: np.ndarray, budget_w: float,
                     min_clock_mhz: np.ndarray | None = None,
                     saas_deep_weight: float = 1.0) -> np.ndarray:
    """coordinator.policy.capping.shed.shed over the scope's GPUs. The draw it is given is each
    GPU's
    uncapped demand at its current activity: the live controller computes its caps once from
    the draw before capping and holds them, while the simulator re-plans on every report, and
    re-planning from the capped draw would ratchet the caps down. `min_clock_mhz`: per GPU, the
    clock its endpoint's latency needs (the closed loop's clock floor), part of SaaS floors;
    `saas_deep_weight`: coordinator.policy.capping.shed's, from the opaque performance measured."""
    shot = snap.shed_snapshot(view, gpus, view.gpu_uncapped_w[gpus], min_clock_mhz)
    plan = shed(shot, budget_w / (1.0 - SHED_MARGIN), SHED_MARGIN,  # target = budget_w
                saas_deep_weight)
    p = view.cluster.gpu.power
    return snap.caps_array(plan, gpus, view.cluster.gpus_per_server, p.max_w)


# ---------------- the policy objects ----------------

@dataclass
class ComposedPolicy:
    """A policy built from components (baseline = none of them). `loop` holds the closed
    loop's state (corrections, row weights) once the first observation arrives."""

    name: str
    components: Components
    loop: ShapingLoop | None = None
    # The latest Phase 2 plan, as arrays: routing multiplier per GPU, instances lost per
    # endpoint (None: no cap in force).
    phase2_mult: np.ndarray | None = None
    phase2_lost: np.ndarray | None = None

    @property
    def closed_loop(self) -> bool:
        c = self.components
        return c.route or c.config or c.rebalance

    def roles(self, inputs: snap.PlacementInputs, role_counts: list[tuple[int, int]],
              peak_gpu_w: dict[int, float]) -> np.ndarray:
        if self.components.place:
            return placed_roles(inputs, role_counts, peak_gpu_w)[0]
        return contiguous_roles(role_counts, inputs.n_servers)

    def plan(self, view: View, static_count: np.ndarray, grow_only: bool = False
             ) -> InstancePlan:
        c = self.components
        if c.rebalance:
            # Before anything was observed the loop takes over the fleet as deployed (the
            # static one): no variability or correction is known yet to shrink it by.
            if self.loop is not None:
                provision = self.loop.provision_rps(view, view.workload.count_lead_s, grow_only)
                keep = self.loop.min_counts(view, grow_only)
            else:
                provision = static_count * view.workload.instance_rps * 0.999
                keep = np.zeros(view.workload.n_endpoints, np.int64)
            if self.phase2_lost is not None:  # Phase 2: what the caps took, asked elsewhere
                provision = with_lost(provision, self.phase2_lost, view)
                keep = keep + np.ceil(self.phase2_lost).astype(keep.dtype)
            return rebalanced_plan(view, provision, keep)
        if not c.config:
            return static_plan(static_count)
        # config without the rebalancer: the count stays static, fp8 where the floor allows.
        return InstancePlan(count=static_count.copy(), fp8=view.workload.fp8_allowed.copy(),
                            clock_mhz=None)

    def observe(self, view: View, obs: Observation) -> None:
        if not self.closed_loop:
            return
        if self.loop is None:
            self.loop = ShapingLoop(view.workload.n_endpoints, view.cluster.n_rows)
        self.loop.observe(view, obs)

    def scale_out(self, view: View) -> bool:
        return self.components.rebalance and self.loop is not None and self.loop.scale_out(view)

    def clocks(self, view: View) -> np.ndarray | None:
        if not self.components.config or self.loop is None or self.loop.obs is None:
            return None
        return self.loop.clocks(view)

    def route(self, view: View) -> np.ndarray:
        if not self.components.route:
            return round_robin_weights(view)
        base = coordinator_weights(view)
        if self.phase2_mult is not None:
            base = base * self.phase2_mult
        return base if self.loop is None else self.loop.weights(view, base)

    def phase2(self, view: View, caps_w: np.ndarray, activity: np.ndarray
               ) -> np.ndarray | None:
        """Phase 2 on the caps in force: the clock lock per GPU (NaN = none); keeps the routing
        multipliers and the lost capacity for route and plan."""
        if not self.components.phase2:
            return None
        gpus = snap.phase2_gpus(view, caps_w, activity)
        if not gpus:
            self.phase2_mult = self.phase2_lost = None
            return np.full(view.cluster.n_gpus, np.nan)
        locks, self.phase2_mult, self.phase2_lost = snap.phase2_arrays(plan_phase2(gpus), view)
        return locks

    def pick_gpus(self, view: View, free: np.ndarray, n: int, home: np.ndarray) -> np.ndarray:
        """Where to start n new instances among the free GPUs `free` (`home`: the endpoint's own
        servers' GPUs, bool per GPU). Baseline: its own servers first, in index order. With
        `place`: rows with the most power headroom, then servers already serving (packing)."""
        if self.components.place:
            row_frac = view.row_power_w / view.row_limit_w
            gpus_per_server = view.cluster.gpus_per_server
            busy = np.bincount(np.flatnonzero(view.fleet.hosting()) // gpus_per_server,
                               minlength=view.cluster.n_servers)
            key = np.lexsort((free, -busy[free // gpus_per_server], row_frac[view.gpu_row[free]]))
        else:
            key = np.lexsort((free, ~home[free]))
        return free[key[:n]]

    def shed(self, view: View, gpus: np.ndarray, budget_w: float) -> np.ndarray:
        if self.components.priority_shed:
            if self.loop is None:
                return coordinator_caps(view, gpus, budget_w)
            return coordinator_caps(view, gpus, budget_w, self.loop.latency_clock_mhz(view),
                                    self.loop.saas_deep_weight())
        return uniform_caps(view, gpus, budget_w)


def make_policy(name: str) -> Policy:
    return ComposedPolicy(name=name, components=POLICY_COMPONENTS[name])


def policy_sources(name: str) -> dict[str, str]:
    """Which implementation each decision uses: 'baseline' (written here), 'stand-in' (written
    here because no coordinator function covers it) or the coordinator function called."""
    c = POLICY_COMPONENTS[name]
    if c.config:
        config = ("coordinator.policy.configure (clock per routing interval; variant: "
                  + ("coordinator.policy.rebalance.rebalance)" if c.rebalance
                     else "fp8 where allowed, count static)"))
    else:
        config = "baseline"
    return {
        "place": "coordinator.policy.placement.place (server roles); new instances' GPUs: "
                 + ("coordinator.policy.rebalance.rebalance (packing)" if c.rebalance
                    else "stand-in (simulator.control.policies.ComposedPolicy.pick_gpus)")
        if c.place else "baseline",
        "route": ("coordinator.policy.routing.routing_weights x coordinator.policy.shaping "
                  "(row and thermal)") if c.route else "baseline",
        "config": config,
        "rebalance": ("coordinator.policy.rebalance.rebalance sized by "
                      "coordinator.policy.capacity (forecast + correction)") if c.rebalance
        else "off",
        "shed": ("coordinator.policy.capping.shed.shed" if c.priority_shed
                 else "baseline (uniform caps)"),
        "phase2": "coordinator.policy.capping.phase2.plan_phase2" if c.phase2 else "off",
    }
