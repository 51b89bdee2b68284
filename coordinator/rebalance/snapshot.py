"""From the nodes' reports to the policies' frozen inputs; demand measured and smoothed. Pure.

- `EndpointDecl`: a declared endpoint (the policy's EndpointSpec plus where its model lives on
  the nodes and an optional fixed demand), with its JSON document for the store.
- `measured_rps`: one instance's request rate from its token rates: the query class is the
  endpoint's, or the one whose representative prompt/output lengths (OASIS §4.1) are closest in
  ratio to the measured prompt/generation token rates; requests/s = generated tokens/s divided
  by that class's output length.
- `DemandEstimator`: an EWMA per endpoint over those measurements (time constant smoothing_s).
- `build_snapshot` / `limits_of`: NodeState, GpuState, MigSlice, InstanceState from the latest
  reports; row power and aisle airflow limits from the topology, each lowered by the active
  emergencies (`ScopeCut`: effective limit = min(topology limit, normal x capacity)). A GPU whose
  agent reports an emergency power ceiling below its maximum carries it as emergency_cap_w, and
  one with its clocks locked the lock's upper clock as sm_clock_locked_mhz (instances stay at
  sm_clock_mhz None: the rebalance policy sizes counts at the maximum clock).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from coordinator.policy.capping import phase2
from coordinator.policy.capping.shed import SAAS, ClockPoint
from coordinator.policy.model import (
    ClusterSnapshot,
    EndpointSpec,
    GpuState,
    InstanceState,
    Limits,
    MigSlice,
    NodeState,
    validate_endpoint,
)
from coordinator.profiles.classes import CLASSES, DEFAULT_TAU_TOKENS, class_tokens
from coordinator.profiles.schema import FULL_GPU, QueryClass
from coordinator.registry import NodeRecord
from shapeshifter.api.v1 import agent_pb2
from shapeshifter.common import errors
from shapeshifter.hw.models import GPU_MODELS
from shapeshifter.topology import Topology

LIVE_STATES = ("STARTING", "READY", "DRAINING")
MAX_DEMAND_RPS = 1e6
CAP_TOLERANCE_W = 1.0


@dataclass(frozen=True)
class EndpointDecl:
    spec: EndpointSpec
    model_path: str = ""  # on the nodes; "" = spec.model
    demand_rps: float = 0.0  # > 0: fixed demand instead of the measured one
    query_class: str = ""  # "" = inferred from the token rates (LISO for a fixed demand)
    updated_at_unix_s: float = 0.0

    @property
    def path(self) -> str:
        return self.model_path or self.spec.model

    def fixed_class(self) -> QueryClass:
        return QueryClass(self.query_class or QueryClass.LISO)

    def to_doc(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["spec"]["model_paths"] = dict(self.spec.model_paths)
        return doc

    @staticmethod
    def from_doc(doc: Mapping[str, Any]) -> EndpointDecl:
        s = dict(doc["spec"])
        for key in ("allowed_models", "allowed_quantizations"):
            s[key] = tuple(s.get(key, ()))
        return EndpointDecl(EndpointSpec(**s), doc.get("model_path", ""),
                            float(doc.get("demand_rps", 0.0)), doc.get("query_class", ""),
                            float(doc.get("updated_at_unix_s", 0.0)))


def validate_decl(decl: EndpointDecl) -> EndpointDecl:
    """Raise InvalidArgument naming the first bad field; return the declaration when valid."""
    validate_endpoint(decl.spec)
    if not 0 <= decl.demand_rps <= MAX_DEMAND_RPS:
        raise errors.out_of_range("demand_rps", decl.demand_rps, 0, MAX_DEMAND_RPS, "req/s")
    allowed = [str(c) for c in CLASSES]
    if decl.query_class and decl.query_class not in allowed:
        raise errors.InvalidArgument(f"query_class={decl.query_class!r} is unknown; allowed: "
                                     f"{', '.join(allowed)}", field="query_class")
    return decl


# ---------------------------------------------------------------------- demand


def infer_class(prompt_tok_s: float, gen_tok_s: float,
                tau_tokens: int = DEFAULT_TAU_TOKENS) -> QueryClass:
    """The class whose representative lengths are closest in prompt/output ratio (log scale).
    SISO and LILO have the same ratio: SISO, the shorter, gives the larger request rate."""
    ratio = math.log(max(prompt_tok_s, 1e-9) / max(gen_tok_s, 1e-9))

    def distance(qc: QueryClass) -> float:
        p, o = class_tokens(qc, tau_tokens)
        return abs(math.log(p / o) - ratio)

    return min(CLASSES, key=lambda qc: (distance(qc), qc != QueryClass.SISO))


def measured_rps(metrics: agent_pb2.InstanceMetrics, query_class: str = "",
                 tau_tokens: int = DEFAULT_TAU_TOKENS) -> tuple[QueryClass, float]:
    """(class, requests/s) of one instance from its token rates; 0 req/s when idle."""
    prompt, gen = metrics.prompt_tokens_per_s, metrics.generation_tokens_per_s
    if prompt + gen <= 0:
        return QueryClass(query_class or QueryClass.LISO), 0.0
    qc = QueryClass(query_class) if query_class else infer_class(prompt, gen, tau_tokens)
    _, output_tokens = class_tokens(qc, tau_tokens)
    return qc, gen / output_tokens if gen > 0 else prompt / class_tokens(qc, tau_tokens)[0]


@dataclass
class DemandEstimator:
    """EWMA of each endpoint's measured demand per class (time constant smoothing_s)."""

    smoothing_s: float = 300.0
    _rps: dict[str, dict[QueryClass, float]] = field(default_factory=dict)
    _last_s: dict[str, float] = field(default_factory=dict)

    def observe(self, endpoint: str, sample: Mapping[QueryClass, float], now_s: float) -> None:
        prev = self._rps.get(endpoint)
        last = self._last_s.get(endpoint)
        self._last_s[endpoint] = now_s
        if prev is None or last is None or self.smoothing_s <= 0:
            self._rps[endpoint] = dict(sample)
            return
        alpha = 1.0 - math.exp(-max(0.0, now_s - last) / self.smoothing_s)
        keys = set(prev) | set(sample)
        self._rps[endpoint] = {k: alpha * sample.get(k, 0.0) + (1 - alpha) * prev.get(k, 0.0)
                               for k in keys}

    def demand(self, endpoint: str) -> dict[QueryClass, float]:
        return dict(self._rps.get(endpoint, {}))


def sample_demand(records: Iterable[NodeRecord], decls: Mapping[str, EndpointDecl]
                  ) -> dict[str, dict[QueryClass, float]]:
    """The request rate each declared endpoint's live instances report now, per class."""
    out: dict[str, dict[QueryClass, float]] = {name: {} for name in decls}
    for rec in records:
        for inst in rec.report.instances if rec.report is not None else ():
            decl = decls.get(inst.spec.endpoint)
            if decl is None or inst.state not in LIVE_STATES:
                continue
            qc, rps = measured_rps(inst.metrics, decl.query_class)
            bucket = out[inst.spec.endpoint]
            bucket[qc] = bucket.get(qc, 0.0) + rps
    return out


def demand_of(decl: EndpointDecl, estimator: DemandEstimator) -> dict[QueryClass, float]:
    if decl.demand_rps > 0:
        return {decl.fixed_class(): decl.demand_rps}
    return estimator.demand(decl.spec.name)


# ---------------------------------------------------------------------- snapshot


@dataclass(frozen=True)
class ScopeCut:
    """An emergency in force: its scope (row | aisle | site) keeps capacity_frac of its normal
    row power (kind power) or aisle airflow (kind cooling)."""

    scope: str
    name: str
    kind: str
    capacity_frac: float


def limits_of(topology: Topology, gpu_thermal_headroom_c: float = 5.0,
              cuts: Iterable[ScopeCut] = ()) -> Limits:
    normal_rows_w, normal_aisles_cfm = _row_limits_w(topology), _aisle_limits_cfm(topology)
    rows, aisles = dict(normal_rows_w), dict(normal_aisles_cfm)
    for cut in cuts:
        power = cut.kind == "power"
        table, normal = (rows, normal_rows_w) if power else (aisles, normal_aisles_cfm)
        for name in _members(topology, cut, power):
            table[name] = min(table[name], normal[name] * cut.capacity_frac)
    return Limits(rows, aisles, gpu_thermal_headroom_c)


def _row_limits_w(topology: Topology) -> dict[str, float]:
    return {r.name: r.row_power_limit_w for s in topology.sites for r in s.rows}


def _aisle_limits_cfm(topology: Topology) -> dict[str, float]:
    return {a.name: a.aisle_airflow_cfm for s in topology.sites for a in s.aisles}


def _members(topology: Topology, cut: ScopeCut, power: bool) -> list[str]:
    """The rows (power) or aisles (cooling) a cut lowers; a site cut lowers each of them."""
    if cut.scope == "site":
        return [x.name for s in topology.sites if s.name == cut.name
                for x in (s.rows if power else s.aisles)]
    known = _row_limits_w(topology) if power else _aisle_limits_cfm(topology)
    return [cut.name] if cut.name in known else []


def build_snapshot(records: Iterable[NodeRecord], topology: Topology,
                   decls: Mapping[str, EndpointDecl],
                   demand: Mapping[str, Mapping[QueryClass, float]], now_s: float,
                   ) -> ClusterSnapshot:
    nodes, instances = [], []
    for rec in records:
        if rec.report is None or rec.session is None:  # disconnected: not a bin this round
            continue
        nodes.append(node_state(rec, topology))
        instances.extend(instance_states(rec.node_id, rec.report, decls))
    return ClusterSnapshot(tuple(nodes), tuple(instances),
                           tuple(d.spec for d in decls.values()),
                           {k: dict(v) for k, v in demand.items()}, now_s)


def node_state(rec: NodeRecord, topology: Topology) -> NodeState:
    node = rec.report
    assert node is not None
    placement = rec.placement
    row = placement.row if placement else node.labels.get("row", "")
    aisle = placement.aisle if placement else node.labels.get("aisle", "")
    inlet_c = topology.inlet_temp_c(placement, rec.node_id, 0.5) if placement else 25.0
    used = {d for i in node.instances if i.state in LIVE_STATES for d in i.spec.devices}
    caps = emergency_caps(node)
    mult = phase2.plan_phase2(capped_gpus(rec.node_id, node, caps)).weight_mult
    gpus = tuple(GpuState(
        g.index, g.gpu_type, g.power_draw_w, g.temperature_c, g.mig_enabled,
        tuple(MigSlice(m.profile, m.uuid, m.uuid in used) for m in g.mig_instances),
        g.healthy, emergency_cap_w=caps.get(g.index, 0.0), sm_clock_locked_mhz=locked_clock_mhz(g),
        capped_throughput_frac=mult.get((rec.node_id, g.index), 0.0))
        for g in node.gpus)
    return NodeState(rec.node_id, row, aisle, gpus, inlet_c, node.budget.node_power_w,
                     node.budget.airflow_cfm, placement.rack if placement else "")


def emergency_cap_w(gpu: agent_pb2.Gpu) -> float:
    """The emergency power ceiling the agent reports in force below the GPU's maximum; 0 =
    none (pre-armed fallback ceilings count: they are emergency caps too)."""
    capped = (gpu.power_ceiling_source.startswith("emergency") and gpu.power_ceiling_w > 0
              and gpu.power_ceiling_w < gpu.power_limit_max_w - CAP_TOLERANCE_W)
    return gpu.power_ceiling_w if capped else 0.0


def emergency_caps(node: agent_pb2.Node) -> dict[int, float]:
    """GPU index -> the emergency ceiling in force (emergency_cap_w), for the capped GPUs."""
    return {g.index: w for g in node.gpus if (w := emergency_cap_w(g)) > 0}


def locked_clock_mhz(gpu: agent_pb2.Gpu) -> int | None:
    """The upper SM clock of the lock the agent reports in force; None = unlocked."""
    return (gpu.clock_lock.max_mhz or None) if gpu.HasField("clock_lock") else None


def instance_states(node_id: str, node: agent_pb2.Node, decls: Mapping[str, EndpointDecl]
                    ) -> list[InstanceState]:
    slices = {m.uuid: (g.index, m.profile) for g in node.gpus for m in g.mig_instances}
    out = []
    for inst in node.instances:
        if inst.state not in LIVE_STATES:
            continue
        s = inst.spec
        on_mig = [slices[d] for d in s.devices if d in slices]
        gpus = tuple(int(d) for d in s.devices if d.isdigit()) or tuple(g for g, _ in on_mig)
        decl = decls.get(s.endpoint)
        model = decl.spec.model if decl is not None and s.model_path == decl.path else s.model_path
        m = inst.metrics
        out.append(InstanceState(
            s.instance_id, s.endpoint, node_id, gpus, model,
            s.tensor_parallel_size or max(1, len(s.devices)), s.quantization or "none",
            on_mig[0][1] if on_mig else FULL_GPU, None, inst.state == "READY", inst.routable,
            m.requests_running, m.requests_waiting, max(0.0, m.kv_cache_usage_frac),
            m.e2e_latency_p95_s, 0.0, inst.ready_at_unix_s or inst.started_at_unix_s,
            s.devices[0] if on_mig else ""))
    return out


# ---------------------------------------------------------------------- Phase 2 inputs


def decode_frac(instances: Iterable[agent_pb2.Instance]) -> float:
    """Share of generated tokens in the instances' token rates; 0.5 when unknown."""
    instances = list(instances)
    gen = sum(i.metrics.generation_tokens_per_s for i in instances)
    prompt = sum(i.metrics.prompt_tokens_per_s for i in instances)
    return gen / (gen + prompt) if gen + prompt > 0 else 0.5


def instances_by_gpu(node: agent_pb2.Node) -> dict[int, list[agent_pb2.Instance]]:
    """The node's instances per whole-GPU index they run on (MIG devices are not counted)."""
    by_gpu: dict[int, list[agent_pb2.Instance]] = {}
    for inst in node.instances:
        for dev in inst.spec.devices:
            if dev.isdigit():
                by_gpu.setdefault(int(dev), []).append(inst)
    return by_gpu


def capped_gpus(node_id: str, node: agent_pb2.Node, caps: Mapping[int, float]
                ) -> list[phase2.CappedGpu]:
    """The node's GPUs under a cap (`caps`: GPU index -> W) as coordinator.policy.capping.phase2
    sees
    them (the simulator fills the same fields: simulator.snapshot.phase2_gpus)."""
    by_gpu = instances_by_gpu(node)
    out = []
    for g in node.gpus:
        model = GPU_MODELS.get(g.gpu_type)
        cap_w = caps.get(g.index)
        if cap_w is None or model is None:
            continue
        clocks = tuple(g.supported_sm_clocks_mhz) or model.sm_clocks_mhz
        point = ClockPoint(g.utilization_gpu_pct / 100.0, clocks,
                           g.sm_clock_max_mhz or model.sm_max_clock_mhz, model.idle_power_w,
                           model.dynamic_power_max_w)
        insts = [i for i in by_gpu.get(g.index, []) if (i.spec.priority_class or SAAS) == SAAS]
        out.append(phase2.CappedGpu((node_id, g.index), cap_w, point,
                                    insts[0].spec.endpoint if insts else "",
                                    decode_frac(insts), bool(g.clock_lock.max_mhz)))
    return out


def with_phase2_demand(records: Iterable[NodeRecord],
                       demand: Mapping[str, Mapping[QueryClass, float]]
                       ) -> dict[str, dict[QueryClass, float]]:
    """Each endpoint's demand raised by what emergency caps took from its instances (Phase 2:
    the capacity they lost is planned elsewhere; phase2.demand_with_lost)."""
    gpus: list[phase2.CappedGpu] = []
    instances: dict[str, int] = {}
    for rec in records:
        node = rec.report
        if node is None:
            continue
        gpus += capped_gpus(rec.node_id, node, emergency_caps(node))
        for inst in node.instances:
            instances[inst.spec.endpoint] = instances.get(inst.spec.endpoint, 0) + 1
    lost = phase2.plan_phase2(gpus).lost_instances
    return {name: {q: phase2.demand_with_lost(v, lost.get(name, 0.0), instances.get(name, 0))
                   for q, v in d.items()} for name, d in demand.items()}
