"""An emergency's scope (a row, an aisle, a site) as the coordinator sees it now: its nodes, its
normal capacity in the topology, its measured power, and the shedding policy's snapshot of its
GPUs (coordinator.policy.capping.shed) built from the nodes' latest reports."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from coordinator.core import CoordinatorCore
from coordinator.emergency.records import ACTIVE, CLEARED, Live
from coordinator.emergency.settings import KINDS, SCOPES, EmergencySettings
from coordinator.policy.capping import shed as policy
from coordinator.rebalance.snapshot import decode_frac, instances_by_gpu
from coordinator.registry import NodeRecord
from shapeshifter.api.v1 import agent_pb2
from shapeshifter.common import errors
from shapeshifter.hw import physics
from shapeshifter.hw.models import GPU_MODELS

OPAQUE_SAMPLE_S = 10.0  # how often the opaque GPUs' relative performance is sampled


class Scopes:
    """Scope lookups over the registry and the topology, and the cut (policy.shed) of a
    snapshot at a limit with the settings' margin and the measured opaque performance."""

    def __init__(self, core: CoordinatorCore, settings: EmergencySettings,
                 opaque_perf: OpaquePerf) -> None:
        self._core = core
        self._s = settings
        self._opaque_perf = opaque_perf

    def nodes(self, scope: str, name: str) -> list[NodeRecord]:
        return [r for r in self._core.registry.records()
                if r.placement is not None and getattr(r.placement, scope) == name]

    def snapshot(self, nodes: Iterable[NodeRecord]) -> policy.ShedSnapshot:
        gpus: list[policy.SheddableGpu] = []
        other_w = 0.0
        for rec in nodes:
            node = rec.report
            if node is None:
                continue
            other_w += max(0.0, node.budget.node_power_w - node.budget.gpu_power_w)
            gpus.extend(gpu_states(rec.node_id, node))
        return policy.ShedSnapshot(tuple(gpus), other_w)

    def shed(self, snapshot: policy.ShedSnapshot, limit_w: float) -> policy.ShedPlan:
        return policy.shed(snapshot, limit_w, self._s.margin_frac,
                           self._opaque_perf.deep_weight())

    def power_w(self, live: Live) -> float:
        """The scope's measured power (a cooling emergency no longer active: its airflow)."""
        nodes = self.nodes(live.rec.scope, live.rec.name)
        key = "airflow_cfm" if live.rec.kind == "cooling" and live.rec.state != ACTIVE else ""
        return sum(getattr(r.report.budget, key or "node_power_w") for r in nodes
                   if r.report is not None)

    def validate(self, scope: str, name: str, kind: str, frac: float, cap_w: float,
                 cap_cfm: float, lives: Iterable[Live]) -> float:
        """The scope's normal capacity (W or CFM); raises with the bad field named."""
        if scope not in SCOPES:
            raise errors.InvalidArgument(f"scope={scope!r} is not one of {', '.join(SCOPES)}",
                                         field="scope")
        if kind not in KINDS:
            raise errors.InvalidArgument(f"kind={kind!r} is not one of {', '.join(KINDS)}",
                                         field="kind")
        normal = self.normal_capacity(scope, name, kind)
        given = [v for v in (frac, cap_w, cap_cfm) if v]
        if len(given) > 1:
            raise errors.InvalidArgument(
                "give exactly one of capacity_frac, capacity_w, capacity_cfm", field="capacity")
        if not given or (frac and not 0.0 < frac <= 1.0):
            raise errors.InvalidArgument(
                f"capacity_frac={frac:g} is outside the allowed range (0, 1] "
                "(or give capacity_w / capacity_cfm)", field="capacity_frac")
        if (cap_w and kind != "power") or (cap_cfm and kind != "cooling"):
            raise errors.InvalidArgument(
                f"kind={kind} takes {'capacity_w' if kind == 'power' else 'capacity_cfm'}",
                field="capacity_w" if cap_w else "capacity_cfm")
        for fld, v, unit in (("capacity_w", cap_w, "W"), ("capacity_cfm", cap_cfm, "CFM")):
            if v and not 0.0 < v <= normal:
                raise errors.out_of_range(fld, v, 0.0, normal, unit)
        for live in lives:
            r = live.rec
            if r.state != CLEARED and (r.scope, r.name, r.kind) == (scope, name, kind):
                raise errors.FailedPrecondition(
                    f"{scope} {name!r} already has active {kind} emergency {r.emergency_id}; "
                    "clear it first", field="name")
        return normal

    def normal_capacity(self, scope: str, name: str, kind: str) -> float:
        sites = self._core.topology.sites
        rows = [(s.name, r) for s in sites for r in s.rows]
        aisles = [(s.name, a) for s in sites for a in s.aisles]
        if (kind == "power" and scope == "aisle") or (kind == "cooling" and scope == "row"):
            raise errors.InvalidArgument(
                f"kind={kind} needs scope {'row or site' if kind == 'power' else 'aisle or site'}"
                " (rows have a power limit, aisles an airflow limit)", field="kind")
        if scope == "site":
            if name not in {s.name for s in sites}:
                raise errors.NotFound(f"name={name!r} is not a site of the topology",
                                      field="name")
            if kind == "power":
                return sum(r.row_power_limit_w for s, r in rows if s == name)
            return sum(a.aisle_airflow_cfm for s, a in aisles if s == name)
        table = ({r.name: r.row_power_limit_w for _, r in rows} if scope == "row"
                 else {a.name: a.aisle_airflow_cfm for _, a in aisles})
        if name not in table:
            known = ", ".join(sorted(table))
            raise errors.NotFound(f"name={name!r} is not a {scope} of the topology "
                                  f"(known: {known})", field="name")
        return table[name]

    def cooling_power_w(self, scope: str, name: str, frac: float) -> float:
        """Airflow is about linear in load (DESIGN §4): the power that keeps the scope's airflow
        under frac of its limit, scaled from the current power/airflow ratio."""
        nodes = self.nodes(scope, name)
        power_w = sum(r.report.budget.node_power_w for r in nodes if r.report is not None)
        cfm = sum(r.report.budget.airflow_cfm for r in nodes if r.report is not None)
        limit_cfm = self.normal_capacity(scope, name, "cooling") * frac
        return power_w * min(1.0, limit_cfm / cfm) if cfm > 0 else power_w


def gpu_states(node_id: str, node: agent_pb2.Node) -> list[policy.SheddableGpu]:
    """A node's GPUs as the shedding policy sees them: draw, limits, class, floor."""
    by_gpu = instances_by_gpu(node)
    out = []
    for g in node.gpus:
        insts = by_gpu.get(g.index, [])
        cls = max((i.spec.priority_class or policy.SAAS for i in insts),
                  key=policy.PRIORITY_CLASSES.index, default=policy.BEST_EFFORT)
        cls = cls if cls in policy.PRIORITY_CLASSES else policy.SAAS
        out.append(policy.SheddableGpu(
            node_id, g.index, g.power_draw_w, g.power_limit_min_w, g.power_limit_max_w,
            cls, decode_frac(insts), tuple(i.spec.instance_id for i in insts),
            node.labels.get("row", ""), node.labels.get("aisle", ""),
            floor_w(g, cls, insts)))
    return out


@dataclass
class OpaquePerf:
    """The opaque (IaaS) GPUs' relative performance since this coordinator started, sampled
    from the reports every OPAQUE_SAMPLE_S: the shedding's deep weight closes on it
    (policy.deep_weight_for), as the simulator's loop does over its run."""

    total: float = 0.0
    samples: int = 0
    next_mono_s: float = 0.0

    def sample(self, records: Iterable[NodeRecord], now_mono_s: float) -> None:
        if now_mono_s < self.next_mono_s:
            return
        self.next_mono_s = now_mono_s + OPAQUE_SAMPLE_S
        for rec in records:
            node = rec.report
            if node is None:
                continue
            for g, state in zip(node.gpus, gpu_states(rec.node_id, node), strict=True):
                model = GPU_MODELS.get(g.gpu_type)
                top = g.sm_clock_max_mhz or (model.sm_max_clock_mhz if model else 0)
                if state.priority_class != policy.IAAS or g.utilization_gpu_pct < 1 or not top:
                    continue
                self.total += physics.relative_throughput(g.sm_clock_mhz, top,
                                                          policy.OPAQUE_DECODE_FRAC)
                self.samples += 1

    def deep_weight(self) -> float:
        return policy.deep_weight_for(self.total / self.samples if self.samples else None)


def floor_w(g: agent_pb2.Gpu, cls: str, insts: list[agent_pb2.Instance]) -> float:
    """The draw below which cutting the GPU costs its class (policy.shed's floors): an opaque
    GPU's at the contract's performance floor, a SaaS GPU's at the clock covering its batch
    (KV-cache usage as the occupancy, full while requests wait); 0 when unknown."""
    model = GPU_MODELS.get(g.gpu_type)
    if model is None or cls == policy.BEST_EFFORT:
        return 0.0
    top = g.sm_clock_max_mhz or model.sm_max_clock_mhz
    clock_frac = min(1.0, g.sm_clock_mhz / top) if g.sm_clock_mhz and top else 1.0
    if cls == policy.IAAS:
        return policy.opaque_floor_w(g.power_draw_w, model.idle_power_w, clock_frac)
    waiting = any(i.metrics.requests_waiting > 0 for i in insts)
    occupancy = 1.0 if waiting else max((i.metrics.kv_cache_usage_frac for i in insts),
                                        default=1.0)
    return policy.saas_floor_from_occupancy(g.power_draw_w, model.idle_power_w, occupancy,
                                            decode_frac(insts), clock_frac)
