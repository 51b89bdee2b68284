"""Pure functions from a snapshot of node records to liveness, node summaries and rollups.

No I/O and no clock reads: callers pass ages computed from their own clock, so the admin API,
the metrics endpoint, tests and later policy code all share these functions.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from shapeshifter.api.v1 import agent_pb2
from shapeshifter.hw.models import GPU_MODELS
from shapeshifter.topology import Liveness, Placement, Topology

UP, SUSPECT, LOST = "up", "suspect", "lost"


@dataclass(frozen=True)
class NodeView:
    """What the coordinator knows of one node at one instant."""

    node_id: str
    labels: Mapping[str, str]
    placement: Placement | None  # None: labels do not match the topology
    report: agent_pb2.Node | None  # the latest report; None before the first one
    age_s: float  # since the last report (or the registration when there is none)
    load: NodeLoad | None = None  # node_load(report) when the caller has it already


@dataclass(frozen=True)
class NodeSummary:
    name: str
    state: str
    site: str
    row: str
    rack: str
    aisle: str
    topology_known: bool
    power_draw_w: float
    gpu_power_limit_w: float
    max_gpu_temp_c: float
    gpus: int
    last_seen_age_s: float
    safety_state: str
    airflow_cfm: float


@dataclass
class Rollup:
    name: str
    kind: str  # site | row | aisle | rack
    power_draw_w: float = 0.0
    power_limit_w: float = 0.0  # rows (and sites: the sum of their rows); 0 = none
    airflow_cfm: float = 0.0
    airflow_limit_cfm: float = 0.0  # aisles (and sites); 0 = none
    max_gpu_temp_c: float = 0.0
    nodes: int = 0
    nodes_up: int = 0
    nodes_suspect: int = 0
    nodes_lost: int = 0
    gpus: int = 0
    gpus_in_use: int = 0
    memory_used_mib: float = 0.0
    memory_total_mib: float = 0.0
    requests_in_flight: float = 0.0
    requests_capacity: float = 0.0
    inlet_temp_c: float = 0.0  # TAPAS eq. 1 estimate, mean over the entity's racks


@dataclass(frozen=True)
class ClusterRollups:
    rows: list[Rollup]
    aisles: list[Rollup]
    racks: list[Rollup]
    sites: list[Rollup]
    nodes: list[NodeSummary] = field(default_factory=list)


def liveness(age_s: float, cfg: Liveness) -> str:
    if age_s >= cfg.lost_after_s:
        return LOST
    if age_s >= cfg.suspect_after_s:
        return SUSPECT
    return UP


def gpu_in_use(gpu: agent_pb2.Gpu) -> bool:
    return (bool(gpu.process_pids) or gpu.utilization_gpu_pct > 0
            or gpu.budget.requests_in_flight > 0)


@dataclass(frozen=True)
class NodeLoad:
    """The numbers one report contributes to every rollup it is part of."""

    power_draw_w: float = 0.0
    airflow_cfm: float = 0.0
    max_gpu_temp_c: float = 0.0
    gpus: int = 0
    gpus_in_use: int = 0
    memory_used_mib: float = 0.0
    memory_total_mib: float = 0.0
    requests_in_flight: float = 0.0
    requests_capacity: float = 0.0
    # The least (slowdown temperature - temperature) over the node's GPUs; inf when unknown.
    slowdown_margin_c: float = float("inf")


def slowdown_margin_c(gpus: Iterable[agent_pb2.Gpu]) -> float:
    """The least distance to slowdown over the GPUs (reported slowdown, else its model's)."""
    margin_c = float("inf")
    for g in gpus:
        model = GPU_MODELS.get(g.gpu_type)
        slowdown_c = g.slowdown_temp_c or (model.thermal.slowdown_c if model else 0.0)
        if slowdown_c > 0:
            margin_c = min(margin_c, slowdown_c - g.temperature_c)
    return margin_c


def node_load(report: agent_pb2.Node | None) -> NodeLoad:
    if report is None:
        return NodeLoad()
    b = report.budget
    gpus = report.gpus
    return NodeLoad(
        power_draw_w=b.node_power_w,
        airflow_cfm=b.airflow_cfm,
        max_gpu_temp_c=max((g.temperature_c for g in gpus), default=0.0),
        gpus=len(gpus),
        gpus_in_use=sum(gpu_in_use(g) for g in gpus),
        memory_used_mib=b.totals.memory_used_mib,
        memory_total_mib=b.totals.memory_total_mib,
        requests_in_flight=b.totals.requests_in_flight,
        requests_capacity=b.totals.requests_capacity,
        slowdown_margin_c=slowdown_margin_c(gpus),
    )


@dataclass
class ScopeSums:
    """What automatic detection reads, per row and aisle: a few floats summed straight from the
    loads computed at ingest, without the full rollup's summaries, sorting and inlet model (the
    detector runs every tick; a full rollup of 1000 nodes there cost more than the ingest)."""

    row_power_w: dict[tuple[str, str], float] = field(default_factory=dict)  # (site, row)
    aisle_airflow_cfm: dict[tuple[str, str], float] = field(default_factory=dict)  # (site, aisle)
    aisle_nodes: dict[tuple[str, str], int] = field(default_factory=dict)
    aisle_hot_nodes: dict[tuple[str, str], int] = field(default_factory=dict)


def scope_sums(placed_loads: Iterable[tuple[Placement, NodeLoad]], hot_headroom_c: float
               ) -> ScopeSums:
    """Row draw, aisle airflow and, per aisle, nodes with a GPU within hot_headroom_c of
    slowdown. Counts every reported node, like the rollup (a silent node's draw still counts)."""
    out = ScopeSums()
    for p, load in placed_loads:
        row, aisle = (p.site, p.row), (p.site, p.aisle)
        out.row_power_w[row] = out.row_power_w.get(row, 0.0) + load.power_draw_w
        out.aisle_airflow_cfm[aisle] = out.aisle_airflow_cfm.get(aisle, 0.0) + load.airflow_cfm
        out.aisle_nodes[aisle] = out.aisle_nodes.get(aisle, 0) + 1
        hot = load.slowdown_margin_c <= hot_headroom_c
        out.aisle_hot_nodes[aisle] = out.aisle_hot_nodes.get(aisle, 0) + hot
    return out


def summarize(view: NodeView, cfg: Liveness, load: NodeLoad | None = None) -> NodeSummary:
    r = view.report
    load = load or node_load(r)
    labels = view.labels
    return NodeSummary(
        name=view.node_id,
        state=liveness(view.age_s, cfg),
        site=labels.get("site", ""),
        row=labels.get("row", ""),
        rack=labels.get("rack", ""),
        aisle=labels.get("aisle", ""),
        topology_known=view.placement is not None,
        power_draw_w=load.power_draw_w,
        gpu_power_limit_w=r.budget.gpu_power_limit_w if r else 0.0,
        max_gpu_temp_c=load.max_gpu_temp_c,
        gpus=load.gpus,
        last_seen_age_s=view.age_s,
        safety_state=r.safety_state if r else "",
        airflow_cfm=load.airflow_cfm,
    )


def rollup(topology: Topology, views: Iterable[NodeView]) -> ClusterRollups:
    """Rollups for every site, row, aisle and rack of the topology (empty ones included).

    A node's last reported draw keeps counting while it is suspect or lost: losing its link does
    not switch its power off. Nodes whose labels match no topology entity appear only in ``nodes``.
    """
    cfg = topology.liveness
    views = sorted(views, key=lambda v: v.node_id)
    sites, rows, aisles, racks = _empty_rollups(topology)
    summaries = []
    for v in views:
        load = v.load or node_load(v.report)
        summary = summarize(v, cfg, load)
        summaries.append(summary)
        if v.placement is None:
            continue
        p = v.placement
        for r in (sites[p.site], rows[(p.site, p.row)], aisles[(p.site, p.aisle)],
                  racks[(p.site, p.row, p.rack)]):
            _add(r, summary.state, load)
    _inlet_estimates(topology, sites, rows, aisles, racks)
    return ClusterRollups(
        rows=list(rows.values()),
        aisles=list(aisles.values()),
        racks=list(racks.values()),
        sites=list(sites.values()),
        nodes=summaries,
    )


def _empty_rollups(topology: Topology) -> tuple[dict, dict, dict, dict]:
    sites: dict[str, Rollup] = {}
    rows: dict[tuple[str, str], Rollup] = {}
    aisles: dict[tuple[str, str], Rollup] = {}
    racks: dict[tuple[str, str, str], Rollup] = {}
    for s in topology.sites:
        sites[s.name] = Rollup(
            s.name, "site",
            power_limit_w=sum(r.row_power_limit_w for r in s.rows),
            airflow_limit_cfm=sum(a.aisle_airflow_cfm for a in s.aisles),
        )
        for a in s.aisles:
            aisles[(s.name, a.name)] = Rollup(a.name, "aisle",
                                              airflow_limit_cfm=a.aisle_airflow_cfm)
        for r in s.rows:
            rows[(s.name, r.name)] = Rollup(r.name, "row", power_limit_w=r.row_power_limit_w)
            for k in r.racks:
                racks[(s.name, r.name, k.name)] = Rollup(f"{r.name}/{k.name}", "rack")
    return sites, rows, aisles, racks


def _add(r: Rollup, state: str, load: NodeLoad) -> None:
    r.nodes += 1
    r.nodes_up += state == UP
    r.nodes_suspect += state == SUSPECT
    r.nodes_lost += state == LOST
    r.power_draw_w += load.power_draw_w
    r.airflow_cfm += load.airflow_cfm
    r.memory_used_mib += load.memory_used_mib
    r.memory_total_mib += load.memory_total_mib
    r.requests_in_flight += load.requests_in_flight
    r.requests_capacity += load.requests_capacity
    r.gpus += load.gpus
    r.gpus_in_use += load.gpus_in_use
    r.max_gpu_temp_c = max(r.max_gpu_temp_c, load.max_gpu_temp_c)


def _inlet_estimates(topology: Topology, sites: dict, rows: dict, aisles: dict,
                     racks: dict) -> None:
    """Rack inlet from TAPAS eq. 1 at the site's load; rows, aisles, sites: their racks' mean."""
    for s in topology.sites:
        site_r = sites[s.name]
        load_frac = site_r.power_draw_w / site_r.power_limit_w if site_r.power_limit_w else 0.0
        by_row: dict[str, list[float]] = {}
        by_aisle: dict[str, list[float]] = {}
        for row in s.rows:
            for k in row.racks:
                where = Placement(s.name, row.name, k.name, k.aisle)
                t = topology.inlet_temp_c(where, "", load_frac)
                racks[(s.name, row.name, k.name)].inlet_temp_c = t
                by_row.setdefault(row.name, []).append(t)
                by_aisle.setdefault(k.aisle, []).append(t)
        for name, ts in by_row.items():
            rows[(s.name, name)].inlet_temp_c = sum(ts) / len(ts)
        for name, ts in by_aisle.items():
            aisles[(s.name, name)].inlet_temp_c = sum(ts) / len(ts)
        all_t = [t for ts in by_row.values() for t in ts]
        site_r.inlet_temp_c = sum(all_t) / len(all_t)
