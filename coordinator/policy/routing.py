"""Routing weights for an endpoint's load balancer (TAPAS §4.5, DESIGN §5 "Route"). Pure.

    routing_weights(endpoint, snapshot, limits=Limits(), config=RoutingConfig())
        -> list[RouteWeight]       (one per instance of the endpoint; weights sum to 1 or all 0)

An instance gets weight 0 when it is at risk: not ready/routable, its GPU within the thermal
headroom of slowdown, its row at or over its power limit, or its measured P95 latency over the
endpoint's SLO (row limits are the effective ones: an emergency lowers them). The others share
the traffic: KV-cache affinity favours instances holding more cached context; mode "energy"
concentrates load on already busy instances (so idle ones can be scaled in or clocked down), mode
"latency" spreads it towards the least loaded. An instance on a GPU under an emergency power cap
(a constrained scope, DESIGN §5 Shed Phase 2) keeps only its relative throughput at the clock
the cap allows (coordinator.policy.capping.phase2; capped_weight_frac when that is not known).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from coordinator.policy.model import ClusterSnapshot, InstanceState, Limits
from coordinator.policy.packing.ledger import gpu_temp_limit_c
from shapeshifter.common.errors import InvalidArgument, NotFound, out_of_range

MODES = ("energy", "latency")


@dataclass(frozen=True)
class RoutingConfig:
    mode: str = "latency"
    kv_affinity: float = 0.5  # weight bonus per unit of KV-cache usage (cached prefixes)
    saturation_frac: float = 0.9  # energy mode stops concentrating on an instance above this
    capped_weight_frac: float = 0.5  # weight kept by an instance on an emergency-capped GPU

    def validate(self) -> RoutingConfig:
        if self.mode not in MODES:
            raise InvalidArgument(f"mode={self.mode!r} is unknown; allowed: {', '.join(MODES)}",
                                  field="mode")
        if not 0 <= self.kv_affinity <= 10:
            raise out_of_range("kv_affinity", self.kv_affinity, 0, 10)
        if not 0 < self.saturation_frac <= 1:
            raise out_of_range("saturation_frac", self.saturation_frac, 0, 1)
        if not 0 < self.capped_weight_frac <= 1:
            raise InvalidArgument(f"capped_weight_frac={self.capped_weight_frac:g} is outside "
                                  "the allowed range (0, 1]", field="capped_weight_frac")
        return self


@dataclass(frozen=True)
class RouteWeight:
    instance_id: str
    node_id: str
    weight: float
    reason: str


def routing_weights(endpoint: str, snapshot: ClusterSnapshot, limits: Limits | None = None,
                    config: RoutingConfig | None = None) -> list[RouteWeight]:
    """Per-instance weights of `endpoint` (NotFound when it has no instance and no spec)."""
    limits = limits or Limits()
    config = (config or RoutingConfig()).validate()
    spec = next((e for e in snapshot.endpoints if e.name == endpoint), None)
    instances = sorted((i for i in snapshot.instances if i.endpoint == endpoint),
                       key=lambda i: i.instance_id)
    if spec is None and not instances:
        raise NotFound(f"endpoint={endpoint!r} is not known", field="endpoint")
    row_w: dict[str, float] = defaultdict(float)
    for n in snapshot.nodes:
        row_w[n.row] += n.power_draw_w
    nodes = {n.node_id: n for n in snapshot.nodes}
    slo_s = spec.slo_p95_s if spec is not None else None
    raw: list[tuple[InstanceState, float, str]] = []
    for inst in instances:
        risk = _risk(inst, nodes, row_w, limits, slo_s)
        if risk:
            raw.append((inst, 0.0, f"at risk: {risk}"))
        else:
            w, why = _preference(inst, config)
            frac, capped = _capped(inst, nodes, config)
            raw.append((inst, w * frac, f"{why}; {capped}") if capped else (inst, w, why))
    total = sum(w for _, w, _ in raw)
    return [RouteWeight(i.instance_id, i.node_id, (w / total) if total > 0 else 0.0, why)
            for i, w, why in raw]


def _risk(inst: InstanceState, nodes: dict, row_w: dict[str, float], limits: Limits,
          slo_s: float | None) -> str:
    if not inst.ready or not inst.routable:
        return "not ready or not routable"
    node = nodes.get(inst.node_id)
    if node is not None:
        for g in node.gpus:
            if g.index in inst.gpu_indices and g.temperature_c >= gpu_temp_limit_c(
                    g.gpu_type, limits):
                return (f"GPU {g.index} at {g.temperature_c:.0f} C, within "
                        f"{limits.gpu_thermal_headroom_c:g} C of slowdown (thermal)")
        limit = limits.row_power_limit_w.get(node.row)
        if limit is not None and row_w[node.row] >= limit:
            return f"row {node.row} draws {row_w[node.row]:.0f} W >= {limit:.0f} W (power)"
    if slo_s is not None and inst.e2e_latency_p95_s > slo_s:
        return f"P95 latency {inst.e2e_latency_p95_s:.2f} s > SLO {slo_s:g} s"
    return ""


def _capped(inst: InstanceState, nodes: dict, config: RoutingConfig) -> tuple[float, str]:
    """(weight multiplier, why) when the instance is in a constrained scope (a GPU under an
    emergency cap): its relative throughput at the clock the cap allows when known (Phase 2),
    else capped_weight_frac; (1, "") when not."""
    node = nodes.get(inst.node_id)
    for g in node.gpus if node is not None else ():
        if g.index in inst.gpu_indices and g.emergency_cap_w > 0:
            frac = g.capped_throughput_frac or config.capped_weight_frac
            return frac, (f"GPU {g.index} under an emergency cap of {g.emergency_cap_w:.0f} W "
                          f"(weight x{frac:.2g})")
    return 1.0, ""


def _preference(inst: InstanceState, config: RoutingConfig) -> tuple[float, str]:
    load = min(max(inst.kv_cache_usage_frac, 0.0), 1.0)
    affinity = 1.0 + config.kv_affinity * load
    if config.mode == "latency":
        w = affinity * (1.0 - 0.9 * load)  # spread: less loaded instances get more
        return w, f"spread for latency (KV use {load:.0%}, affinity x{affinity:.2f})"
    if load >= config.saturation_frac:
        return affinity * 0.1, f"saturated ({load:.0%} KV use): little new load"
    w = affinity * (1.0 + 4.0 * load)  # concentrate: busier instances get more
    return w, f"concentrate for energy (KV use {load:.0%}, affinity x{affinity:.2f})"
