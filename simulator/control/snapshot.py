"""The simulator's state as the coordinator policies' inputs, and their outputs back as arrays.

Pure builders: a `View` (numpy arrays) -> `coordinator.policy.model.ClusterSnapshot`/`Limits`
(rebalance, placement, routing) or `coordinator.policy.capping.shed.ShedSnapshot` (shedding); a
rebalance
`Plan` -> GPU indices to start and stop. Names: node "s<server>", row "row<r>", aisle
"aisle<a>", endpoint "ep<e>", a running instance "g<gpu>" (one instance per GPU, TP1).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from coordinator.policy.capping import shed as shed_policy
from coordinator.policy.capping.phase2 import CappedGpu, Phase2Plan
from coordinator.policy.model import (
    ClusterSnapshot,
    EndpointSpec,
    GpuState,
    InstanceState,
    Limits,
    NodeState,
    Plan,
)
from coordinator.policy.packing.ledger import node_power_w, shape_of
from coordinator.profiles.classes import class_tokens
from coordinator.profiles.schema import QueryClass
from simulator.model.state import NONE, READY, STARTING, View, Workload

STOPPING_ENDPOINT = "(stopping)"  # instances being replaced: pinned, not the endpoint's capacity
FP8 = "fp8"


def node_id(server: int) -> str:
    return f"s{server}"


def gpu_of(node: str, gpu_index: int, gpus_per_server: int) -> int:
    """The simulator's GPU number of (node_id(server), index on it)."""
    return int(node[1:]) * gpus_per_server + gpu_index


def endpoint_name(e: int) -> str:
    return f"ep{e}"


def endpoint_index(name: str) -> int:
    return int(name[2:]) if name.startswith("ep") and name[2:].isdigit() else -1


def class_mix(mean_prompt_tokens: float, mean_output_tokens: float
              ) -> tuple[tuple[QueryClass, float], ...]:
    """A mean request as LISO + SILO work (the profiled classes): solve
    a x tokens(LISO) + b x tokens(SILO) = (prompt, output), so Σ rps_c / MSRR_c is the instance
    time the trace's mix needs (the service model is fitted to the same two MSRRs)."""
    (p_l, g_l), (p_s, g_s) = class_tokens(QueryClass.LISO), class_tokens(QueryClass.SILO)
    a, b = np.linalg.solve(np.array([[p_l, p_s], [g_l, g_s]], float),
                           np.array([mean_prompt_tokens, mean_output_tokens], float))
    a, b = max(float(a), 0.0), max(float(b), 0.0)
    if a + b <= 0:
        a = 1.0
    return ((QueryClass.LISO, a), (QueryClass.SILO, b))


def sizing_slo_s(w: Workload) -> float:
    """The SLO the rebalancer sizes with: the endpoints' own, or, when no profile row is as
    strict, the strictest the profiles have (otherwise nothing would be sized at all); the
    capacity correction then measures lateness against the endpoints' real SLO."""
    slos = [r.slo_p95_s for r in w.profiles if r.model == w.model and r.msrr_rps
            and r.slo_p95_s is not None]
    if not slos or any(s <= w.slo_s + 1e-9 for s in slos):
        return w.slo_s
    return min(slos)


def endpoint_specs(w: Workload, max_instances: int, min_counts: np.ndarray | None = None
                   ) -> tuple[EndpointSpec, ...]:
    """min_counts: per endpoint, the fewest instances a plan may leave (default 1)."""
    slo_s = sizing_slo_s(w)
    top = max(1, min(max_instances, 10_000))
    low = [1 if min_counts is None else int(min(max(min_counts[e], 1), top))
           for e in range(w.n_endpoints)]
    return tuple(EndpointSpec(
        name=endpoint_name(e), model=w.model, slo_p95_s=slo_s,
        allowed_quantizations=("none", FP8) if w.fp8_allowed[e] else ("none",),
        min_instances=low[e], max_instances=top)
        for e in range(w.n_endpoints))


def demand_by_class(w: Workload, demand_rps: np.ndarray) -> dict[str, dict[QueryClass, float]]:
    return {endpoint_name(e): {qc: float(demand_rps[e]) * share for qc, share in w.class_mix}
            for e in range(w.n_endpoints)}


def limits_of(view: View, thermal_headroom_c: float = 5.0) -> Limits:
    return Limits(row_power_limit_w={f"row{r}": float(v) for r, v in enumerate(view.row_limit_w)},
                  aisle_airflow_cfm={f"aisle{a}": float(v)
                                     for a, v in enumerate(view.aisle_limit_cfm)},
                  gpu_thermal_headroom_c=thermal_headroom_c)


def _nodes(view: View) -> tuple[NodeState, ...]:
    c = view.cluster
    n_per = c.gpus_per_server
    gpu_type = c.spec.gpu_type
    power = view.gpu_power_w.tolist()
    temp = view.gpu_temp_c.tolist()
    reserved = view.opaque.tolist()
    out = []
    for s in range(c.n_servers):
        base = s * n_per
        gpus = tuple(GpuState(index=i, gpu_type=gpu_type, power_draw_w=power[base + i],
                              temperature_c=temp[base + i], reserved=reserved[base + i])
                     for i in range(n_per))
        out.append(NodeState(node_id=node_id(s), row=f"row{c.server_row[s]}",
                             aisle=f"aisle{c.server_aisle[s]}", gpus=gpus,
                             inlet_temp_c=float(view.server_inlet_c[s]),
                             power_draw_w=float(view.server_power_w[s]),
                             airflow_cfm=float(view.server_cfm[s]),
                             rack=f"rack{c.server_rack[s]}"))
    return tuple(out)


def _instances(view: View, stopping_pinned: bool) -> tuple[InstanceState, ...]:
    """One InstanceState per GPU hosting a serving or starting instance. A draining instance,
    or (with stopping_pinned) one due to stop, is listed under STOPPING_ENDPOINT: its GPU is
    taken but it is not capacity the rebalancer may count on."""
    f, w = view.fleet, view.workload
    n_per = view.cluster.gpus_per_server
    maxc = w.service.max_concurrency
    out = []
    for g in np.flatnonzero(f.state != NONE).tolist():
        stopping = f.state[g] not in (READY, STARTING) or (
            stopping_pinned and np.isfinite(f.stop_at_s[g]))
        if stopping and not stopping_pinned:
            continue  # draining: not routable, not the endpoint's
        load = float(view.in_flight[g])
        out.append(InstanceState(
            instance_id=f"g{g}",
            endpoint=STOPPING_ENDPOINT if stopping else endpoint_name(int(f.endpoint[g])),
            node_id=node_id(g // n_per), gpu_indices=(g % n_per,), model=w.model,
            quantization=FP8 if f.fp8[g] else "none",
            ready=bool(f.state[g] == READY), requests_running=min(load, maxc),
            requests_waiting=max(0.0, load - maxc),
            kv_cache_usage_frac=min(1.0, load / maxc),  # proxy: batch occupancy
            power_draw_w=float(view.gpu_power_w[g]), changed_at_s=float(f.ready_at_s[g])))
    return tuple(out)


def cluster_snapshot(view: View, max_instances: int, stopping_pinned: bool,
                     min_counts: np.ndarray | None = None) -> ClusterSnapshot:
    """What the coordinator knows now. `stopping_pinned`: list instances that are draining or
    due to stop (rebalance needs their GPUs taken); routing leaves draining ones out."""
    w = view.workload
    return ClusterSnapshot(nodes=_nodes(view), instances=_instances(view, stopping_pinned),
                           endpoints=endpoint_specs(w, max_instances, min_counts),
                           demand_rps=demand_by_class(w, view.demand_rps), now_s=view.t_s)


@dataclass(frozen=True)
class PlanArrays:
    """A rebalance plan as GPU indices: start (gpu, endpoint, fp8) and stop (gpu)."""

    starts: tuple[tuple[int, int, bool], ...]
    stops: tuple[int, ...]


def plan_arrays(plan: Plan, gpus_per_server: int) -> PlanArrays:
    starts, stops = [], []
    for a in plan.actions:
        server = int(a.node_id[1:])
        if a.kind == "start_instance" and a.config is not None:
            for i in a.gpu_indices:
                starts.append((server * gpus_per_server + i, endpoint_index(a.endpoint),
                               a.config.quantization == FP8))
        elif a.kind == "stop_instance" and a.instance_id.startswith("g"):
            stops.append(int(a.instance_id[1:]))
    return PlanArrays(tuple(starts), tuple(stops))


def route_weights_array(weights: Mapping[str, float], n_gpus: int) -> np.ndarray:
    out = np.zeros(n_gpus)
    for instance_id, wt in weights.items():
        out[int(instance_id[1:])] = wt
    return out


# ---------------- shedding ----------------

def shed_snapshot(view: View, gpus: np.ndarray, draw_w: np.ndarray,
                  min_clock_mhz: np.ndarray | None = None) -> shed_policy.ShedSnapshot:
    """The scope's GPUs with their priority class (opaque -> iaas, an LLM instance -> saas,
    nothing -> best_effort) and their floors: an opaque GPU's at the contract's performance
    floor, a SaaS GPU's at the clock that still covers its batch (shed_floors).
    `draw_w`: per GPU of `gpus` (the uncapped demand, see policies); `min_clock_mhz`: per GPU
    of the cluster, the clock its endpoint's latency needs (NaN or None: none known)."""
    c = view.cluster
    n_per = c.gpus_per_server
    p = c.gpu.power
    hosting = view.fleet.hosting()
    decode = view.workload.decode_share
    floors = shed_floors(view, gpus, draw_w, min_clock_mhz)
    out = []
    for g, d, fl in zip(gpus.tolist(), draw_w.tolist(), floors.tolist(), strict=True):
        cls = (shed_policy.IAAS if view.opaque[g] else
               shed_policy.SAAS if hosting[g] else shed_policy.BEST_EFFORT)
        out.append(shed_policy.SheddableGpu(
            node_id=node_id(g // n_per), gpu_index=g % n_per, power_draw_w=d,
            power_limit_min_w=p.min_w, power_limit_max_w=p.max_w, priority_class=cls,
            decode_frac=decode, row=f"row{view.gpu_row[g]}", aisle=f"aisle{view.gpu_aisle[g]}",
            floor_w=fl))
    return shed_policy.ShedSnapshot(tuple(out))


def shed_floors(view: View, gpus: np.ndarray, draw_w: np.ndarray,
                min_clock_mhz: np.ndarray | None = None) -> np.ndarray:
    """Per GPU of `gpus`, the draw below which a cut costs (coordinator.policy.capping.shed):
    opaque at
    the contract's performance floor, SaaS at the clock covering its batch (in flight / max
    concurrency: the share of its capacity at its clock it uses now)."""
    m, w = view.cluster.gpu, view.workload
    locked = view.locked_mhz[gpus]
    clock_frac = np.where(np.isnan(locked), 1.0, locked / m.sm_max_clock_mhz).tolist()
    occupancy = (view.in_flight[gpus] / w.service.max_concurrency).tolist()
    min_frac = (np.zeros(len(gpus)) if min_clock_mhz is None else
                np.nan_to_num(min_clock_mhz[gpus] / m.sm_max_clock_mhz)).tolist()
    out = np.empty(len(gpus))
    for k, g in enumerate(gpus.tolist()):
        d = float(draw_w[k])
        out[k] = (shed_policy.opaque_floor_w(d, m.idle_power_w, clock_frac[k]) if view.opaque[g]
                  else shed_policy.saas_floor_from_occupancy(d, m.idle_power_w, occupancy[k],
                                                             w.decode_share, clock_frac[k],
                                                             min_frac[k]))
    return out


def phase2_gpus(view: View, caps_w: np.ndarray, activity: np.ndarray) -> list[CappedGpu]:
    """The GPUs under a cap (caps_w below the maximum limit) as Phase 2 sees them: the same
    fields the live controller fills from agent reports
    (coordinator.emergency.controller._capped_gpus)."""
    c, w = view.cluster, view.workload
    m = c.gpu
    capped = np.flatnonzero(caps_w < m.power.max_w)
    hosting = view.fleet.hosting()
    out = []
    for g in capped.tolist():
        point = shed_policy.ClockPoint(float(activity[g]), m.sm_clocks_mhz, m.sm_max_clock_mhz,
                                       m.idle_power_w, m.dynamic_power_max_w)
        endpoint = endpoint_name(int(view.fleet.endpoint[g])) if hosting[g] else ""
        out.append(CappedGpu((node_id(g // c.gpus_per_server), g % c.gpus_per_server),
                             float(caps_w[g]), point, endpoint, w.decode_share))
    return out


def phase2_arrays(plan: Phase2Plan, view: View) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(lock per GPU, NaN = none; routing multiplier per GPU; lost instances per endpoint)."""
    c = view.cluster
    n_per = c.gpus_per_server
    locks = np.full(c.n_gpus, np.nan)
    mult = np.ones(c.n_gpus)
    for (node, index), mhz in plan.clock_mhz.items():
        locks[gpu_of(node, index, n_per)] = mhz
    for (node, index), m in plan.weight_mult.items():
        mult[gpu_of(node, index, n_per)] = m
    lost = np.zeros(view.workload.n_endpoints)
    for name, n in plan.lost_instances.items():
        lost[int(name[2:])] = n
    return locks, mult, lost


def caps_array(plan: shed_policy.ShedPlan, gpus: np.ndarray, gpus_per_server: int,
               max_w: float) -> np.ndarray:
    """Per GPU of `gpus`: its cap, max_w where the plan leaves it uncapped."""
    pos = {int(g): k for k, g in enumerate(gpus.tolist())}
    out = np.full(len(gpus), max_w)
    for cap in plan.caps:
        out[pos[gpu_of(cap.node_id, cap.gpu_index, gpus_per_server)]] = cap.power_cap_w
    return out


# ---------------- placement (server roles) ----------------

def empty_nodes(c: PlacementInputs) -> list[NodeState]:
    """Every server idle: its GPUs at idle power, at their steady idle temperature."""
    out = []
    for s in range(c.n_servers):
        gpus = tuple(GpuState(index=i, gpu_type=c.gpu_type, power_draw_w=c.idle_gpu_w,
                              temperature_c=float(c.inlet_c[s]) + c.idle_gpu_w * c.c_per_w)
                     for i in range(c.gpus_per_server))
        out.append(_with_gpu_power(NodeState(
            node_id=node_id(s), row=f"row{c.server_row[s]}", aisle=f"aisle{c.server_aisle[s]}",
            gpus=gpus, inlet_temp_c=float(c.inlet_c[s])), gpus))
    return out


def _with_gpu_power(node: NodeState, gpus: tuple[GpuState, ...]) -> NodeState:
    total_w = sum(g.power_draw_w for g in gpus)
    p, cfm = node_power_w(shape_of(node), total_w)
    return NodeState(node.node_id, node.row, node.aisle, gpus, node.inlet_temp_c, p, cfm,
                     node.rack)


@dataclass(frozen=True)
class PlacementInputs:
    """What placing the servers' roles needs: the layout and the predicted peaks."""

    n_servers: int
    gpus_per_server: int
    gpu_type: str
    server_row: np.ndarray
    server_aisle: np.ndarray
    inlet_c: np.ndarray
    idle_gpu_w: float
    c_per_w: float
    limits: Limits
    role_profiles_w: Mapping[int, np.ndarray]  # predicted draw per GPU over one period, by role
    host_w: float  # a server's draw besides its GPUs (host idle)
    idle_server_cfm: float = 0.0  # a server's airflow with its GPUs idle
    cfm_per_gpu_w: float = 0.0  # airflow added per watt of GPU power (linear, TAPAS eq. 3)


def assign_server(nodes: list[NodeState], instances: list[InstanceState], server: int,
                  role: int, peak_gpu_w: float) -> None:
    """Record a placed role on its server (in place): opaque GPUs reserved at their peak,
    flexible ones as instances of the endpoint, so later placements see the load and the mix."""
    node = nodes[server]
    gpus = tuple(GpuState(g.index, g.gpu_type, power_draw_w=peak_gpu_w,
                          temperature_c=g.temperature_c, reserved=role < 0) for g in node.gpus)
    nodes[server] = _with_gpu_power(node, gpus)
    if role >= 0:
        instances.extend(InstanceState(f"p{server}-{g.index}", endpoint_name(role),
                                       node.node_id, (g.index,), "")
                         for g in gpus)


def interleaved(role_counts: Sequence[tuple[int, int]]) -> list[int]:
    """Roles in arrival order: each role's servers spread evenly over the sequence (the order a
    cluster manager would see tenants and endpoints grow together)."""
    keyed = [((k + 0.5) / n, i, role) for i, (role, n) in enumerate(role_counts)
             for k in range(n)]
    return [role for _, _, role in sorted(keyed)]
