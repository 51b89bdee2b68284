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
called through the adapters in simulator/snapshot.py:
  place      coordinator.policy.placement.place, once per server at layout (opaque tenants'
             and endpoints' servers arrive interleaved; each goes to the best-ranked node);
  route      coordinator.policy.routing.routing_weights per endpoint, every routing interval;
  rebalance  coordinator.policy.rebalance.rebalance every rebalance interval: instance count,
             variant (fp16/fp8) and which GPUs start and stop (make-before-break);
  shed       coordinator.policy.shed.shed on every report while a row or aisle is over its
             (possibly reduced) limit (priority tiers: best-effort, SaaS, opaque last);
  config     the clock lock per endpoint (and, without the rebalancer, the variant): no
             coordinator function chooses a steady clock for a covered endpoint, so the
             stand-in `choose_config` here does (lowest profiled clock covering the demand).
`policy_sources` names the implementation of every decision in summary.json.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from coordinator.policy.model import ClusterSnapshot, InstanceState, RebalanceConfig
from coordinator.policy.placement import PlaceRequest, place
from coordinator.policy.rebalance import rebalance
from coordinator.policy.routing import routing_weights
from coordinator.policy.shed import shed
from nodeagent.gpu import physics
from simulator import snapshot as snap
from simulator.state import READY, STARTING, View, Workload

# Provision demand x this: MSRR is the rate at which the P95 reaches the SLO, and the target is
# 99% within it, so instances run at <= 1/HEADROOM of MSRR (the baseline's peak is at 0.6).
HEADROOM = 1.8
SHED_MARGIN = 0.03  # caps aim this far below the limit
# Rebalance settings (RebalanceConfig): a headroom that keeps >= 99% within SLO, the engine's
# restart budget; MIG off (the simulator models whole-GPU instances only); else the defaults.
REBALANCE_HEADROOM_FRAC = 0.5  # 0.4 gave 99.0% within SLO on the ablation, 0.2 (default) 93%
MOVES_PER_ROUND_FRAC = 0.1  # at most this share of the SaaS GPUs restarted per rebalance
MIN_MOVES_PER_ROUND = 4


@dataclass(frozen=True)
class Components:
    place: bool = False
    route: bool = False
    config: bool = False
    rebalance: bool = False
    priority_shed: bool = False


POLICY_COMPONENTS: dict[str, Components] = {
    "baseline": Components(),
    "place": Components(place=True),
    "route": Components(route=True),
    "config": Components(config=True),
    "shapeshifter-no-rebalance": Components(True, True, True, False, True),
    "shapeshifter": Components(True, True, True, True, True),
}


@dataclass(frozen=True)
class InstancePlan:
    count: np.ndarray  # instances per endpoint
    fp8: np.ndarray  # bool per endpoint
    clock_mhz: np.ndarray  # locked clock per endpoint, NaN = not locked
    # From the rebalancer: exactly which GPUs start (gpu, endpoint, fp8) and stop; None = the
    # engine sizes each endpoint to `count` itself (pick_gpus).
    actions: snap.PlanArrays | None = None


class Policy(Protocol):
    name: str
    components: Components

    def roles(self, inputs: snap.PlacementInputs, role_counts: list[tuple[int, int]],
              peak_gpu_w: dict[int, float]) -> np.ndarray: ...

    def plan(self, view: View, static_count: np.ndarray) -> InstancePlan: ...

    def route(self, view: View) -> np.ndarray: ...

    def pick_gpus(self, view: View, free: np.ndarray, n: int, home: np.ndarray
                  ) -> np.ndarray: ...

    def shed(self, view: View, gpus: np.ndarray, budget_w: float) -> np.ndarray: ...


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
    for role in snap.interleaved(role_counts)[:n]:
        request = PlaceRequest(gpus=inputs.gpus_per_server,
                               predicted_peak_power_w=inputs.gpus_per_server * peak_gpu_w[role],
                               workload="opaque" if role < 0 else "flexible",
                               gpu_type=inputs.gpu_type)
        ranked = place(request, ClusterSnapshot(tuple(nodes), tuple(instances)), inputs.limits)
        if ranked:
            server = int(ranked[0].node_id[1:])
        else:
            server = int(np.flatnonzero(roles == np.iinfo(np.int64).min)[0])
            fallbacks += 1
        roles[server] = role
        snap.assign_server(nodes, instances, server, role, peak_gpu_w[role])
    unset = roles == np.iinfo(np.int64).min
    roles[unset] = role_counts[-1][0]
    return roles, fallbacks


def _fit(roles: np.ndarray, n: int) -> np.ndarray:
    if len(roles) >= n:
        return roles[:n]
    return np.concatenate([roles, np.full(n - len(roles), roles[-1])])


# ---------------- instance plans (config, rebalance) ----------------

def static_plan(static_count: np.ndarray) -> InstancePlan:
    n = len(static_count)
    return InstancePlan(count=static_count.copy(), fp8=np.zeros(n, bool),
                        clock_mhz=np.full(n, np.nan))


def clock_rel_throughput(w: Workload, clock_mhz: float, max_mhz: float) -> float:
    return physics.relative_throughput(clock_mhz, max_mhz, w.decode_share)


def choose_config(w: Workload, demand_rps: float, fp8_ok: bool, max_mhz: float,
                  count: int | None, idle_w: float, dyn_w: float,
                  max_count: int) -> tuple[int, bool, float]:
    """(instances, fp8, clock) covering demand x HEADROOM at the least predicted power.

    With `count` fixed (no rebalancer) only the variant and clock are chosen: the lowest profiled
    clock that still covers the demand; never more than `max_count` instances. Power per
    instance: idle + utilisation x dynamic power at the clock (physics.power_w with the decode
    activity of a busy instance).
    """
    need_rps = max(demand_rps, 1e-9) * HEADROOM
    speed = w.fp8_speedup if fp8_ok else 1.0
    best: tuple[float, int, float] | None = None
    for clock in w.clock_candidates_mhz:
        cap_rps = w.instance_rps * speed * clock_rel_throughput(w, clock, max_mhz)
        n = max(1, math.ceil(need_rps / cap_rps)) if count is None else count
        n = min(n, max_count)
        if n * cap_rps < need_rps and clock != max_mhz:
            continue
        util = min(demand_rps / (n * cap_rps), 1.0)
        power = n * physics.power_w(util * physics.OASIS_DECODE_ACTIVITY, clock, max_mhz,
                                    idle_w, dyn_w)
        if best is None or power < best[0] - 1e-9:
            best = (power, n, float(clock))
    assert best is not None
    _, n, clock = best
    return n, fp8_ok, (math.nan if clock >= max_mhz else clock)


def rebalance_config(view: View, initial: bool) -> RebalanceConfig:
    saas_gpus = int((~view.opaque).sum())
    moves = max(MIN_MOVES_PER_ROUND, round(MOVES_PER_ROUND_FRAC * saas_gpus))
    return RebalanceConfig(headroom_frac=REBALANCE_HEADROOM_FRAC,
                           max_restarts_per_round=saas_gpus if initial else moves,
                           allow_mig=False)


def rebalanced_plan(view: View) -> InstancePlan:
    """coordinator.policy.rebalance.rebalance on the simulator's snapshot, then the stand-in
    clock per endpoint for the instance count and variant the plan leaves."""
    w, f = view.workload, view.fleet
    saas_gpus = int((~view.opaque).sum())
    initial = not f.hosting().any()
    snapshot = snap.cluster_snapshot(view, max_instances=saas_gpus, stopping_pinned=True)
    plan = rebalance(snapshot, w.profiles, snap.limits_of(view), rebalance_config(view, initial))
    actions = snap.plan_arrays(plan, view.cluster.gpus_per_server)
    count, fp8 = _after_plan(view, actions)
    m = view.cluster.gpu
    clock = np.full(w.n_endpoints, np.nan)
    for e in range(w.n_endpoints):
        if count[e] > 0:
            _, _, clock[e] = choose_config(w, float(view.demand_rps[e]), bool(fp8[e]),
                                           m.sm_max_clock_mhz, int(count[e]), m.idle_power_w,
                                           m.dynamic_power_max_w, int(count[e]))
    return InstancePlan(count=count, fp8=fp8, clock_mhz=clock, actions=actions)


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


def coordinator_caps(view: View, gpus: np.ndarray, budget_w: float) -> np.ndarray:
    """coordinator.policy.shed.shed over the scope's GPUs. The draw it is given is each GPU's
    uncapped demand at its current activity: the live controller computes its caps once from
    the draw before capping and holds them, while the simulator re-plans on every report, and
    re-planning from the capped draw would ratchet the caps down."""
    shot = snap.shed_snapshot(view, gpus, view.gpu_uncapped_w[gpus])
    plan = shed(shot, budget_w / (1.0 - SHED_MARGIN), SHED_MARGIN)  # target = budget_w
    p = view.cluster.gpu.power
    return snap.caps_array(plan, gpus, view.cluster.gpus_per_server, p.max_w)


# ---------------- the policy objects ----------------

@dataclass(frozen=True)
class ComposedPolicy:
    """A policy built from components (baseline = none of them)."""

    name: str
    components: Components

    def roles(self, inputs: snap.PlacementInputs, role_counts: list[tuple[int, int]],
              peak_gpu_w: dict[int, float]) -> np.ndarray:
        if self.components.place:
            return placed_roles(inputs, role_counts, peak_gpu_w)[0]
        return contiguous_roles(role_counts, inputs.n_servers)

    def plan(self, view: View, static_count: np.ndarray) -> InstancePlan:
        c = self.components
        if c.rebalance:
            return rebalanced_plan(view)
        if not c.config:
            return static_plan(static_count)
        w = view.workload
        m = view.cluster.gpu
        n_ep = w.n_endpoints
        count, fp8, clock = static_count.copy(), np.zeros(n_ep, bool), np.full(n_ep, np.nan)
        for e in range(n_ep):  # config without the rebalancer: the count stays static
            count[e], fp8[e], clock[e] = choose_config(
                w, float(view.demand_rps[e]), bool(w.fp8_allowed[e]), m.sm_max_clock_mhz,
                int(static_count[e]), m.idle_power_w, m.dynamic_power_max_w,
                int(static_count[e]))
        return InstancePlan(count=count, fp8=fp8, clock_mhz=clock)

    def route(self, view: View) -> np.ndarray:
        return coordinator_weights(view) if self.components.route else round_robin_weights(view)

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
            return coordinator_caps(view, gpus, budget_w)
        return uniform_caps(view, gpus, budget_w)


def make_policy(name: str) -> Policy:
    return ComposedPolicy(name=name, components=POLICY_COMPONENTS[name])


def policy_sources(name: str) -> dict[str, str]:
    """Which implementation each decision uses: 'baseline' (written here), 'stand-in' (written
    here because no coordinator function covers it) or the coordinator function called."""
    c = POLICY_COMPONENTS[name]
    if c.rebalance:
        config = ("variant: coordinator.policy.rebalance.rebalance; clock: stand-in "
                  "(simulator.policies.choose_config)")
    elif c.config:
        config = "stand-in (simulator.policies.choose_config: variant and clock)"
    else:
        config = "baseline"
    return {
        "place": "coordinator.policy.placement.place (server roles); new instances' GPUs: "
                 + ("coordinator.policy.rebalance.rebalance (packing)" if c.rebalance
                    else "stand-in (simulator.policies.ComposedPolicy.pick_gpus)")
        if c.place else "baseline",
        "route": "coordinator.policy.routing.routing_weights" if c.route else "baseline",
        "config": config,
        "rebalance": "coordinator.policy.rebalance.rebalance" if c.rebalance else "off",
        "shed": "coordinator.policy.shed.shed" if c.priority_shed else "baseline (uniform caps)",
    }
