"""Candidate configurations per endpoint and the mix that covers its demand (OASIS eq. 5).

A candidate is one instance configuration (model variant, TP, quantization, MIG profile or full
GPUs, clock) on one GPU type, with its MSRR per query class at the endpoint's SLO, its power and
memory. An endpoint's demand in "instances" under a candidate is Σ_class rps x (1 + headroom) /
MSRR (OASIS eq. 5 summed over the classes, each class taking its share of the instance).

Candidates are kept when they are on the Pareto front of (GPU share per req/s, power per req/s,
GPU share): `lookup.pareto_front` compares absolute MSRR, which would always prefer more GPUs.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from coordinator.policy.model import EndpointSpec, InstanceConfig, RebalanceConfig
from coordinator.profiles.schema import FULL_GPU, ProfileRow, QueryClass
from nodeagent.gpu.models import GPU_MODELS, GpuModel

MIG_COMPUTE_SLICES = 7
MIG_MEMORY_SLOTS = 8
_EPS = 1e-9


@dataclass(frozen=True, eq=False)  # identity: built once per endpoint, used as a dict key
class Candidate:
    config: InstanceConfig
    msrr_rps: Mapping[QueryClass, float]  # per class, at an SLO no looser than the endpoint's
    power_w: float  # the instance's GPU power at its MSRR (its share of the GPU for MIG)
    memory_gb: float  # the instance's memory need (the slot's memory when unknown)
    gpus: int  # whole GPUs it takes (its TP), 0 for a MIG slice
    slices: int  # MIG compute slices (0 for whole GPUs)
    mem_slots: int  # MIG memory slots (0 for whole GPUs)
    gpu_equiv: float  # GPUs it takes in its bottleneck dimension: TP, or max(slices/7, mem/8)
    power_estimated: bool  # no profile row stated the power: estimated from the GPU model

    def load_units(self, demand: Mapping[QueryClass, float], headroom_frac: float) -> float:
        """Instances of this candidate needed for `demand` with headroom (fractional)."""
        return sum(rps * (1 + headroom_frac) / self.msrr_rps[qc]
                   for qc, rps in demand.items() if rps > 0)

    def capacity_rps(self, demand: Mapping[QueryClass, float]) -> float:
        """Requests/s one instance serves at the SLO with the demand's class mix."""
        total = sum(v for v in demand.values() if v > 0)
        if total <= 0:
            return max(self.msrr_rps.values(), default=0.0)
        per_instance = sum(rps / self.msrr_rps[qc] for qc, rps in demand.items() if rps > 0)
        return total / per_instance if per_instance > 0 else max(self.msrr_rps.values())


@dataclass(frozen=True)
class Mix:
    """Instances per candidate covering one endpoint's demand."""

    counts: tuple[tuple[Candidate, int], ...]
    gpu_equiv: float
    power_w: float

    @property
    def instances(self) -> int:
        return sum(n for _, n in self.counts)

    def capacity_rps(self, demand: Mapping[QueryClass, float]) -> float:
        return sum(c.capacity_rps(demand) * n for c, n in self.counts)

    def describe(self) -> str:
        return " + ".join(f"{n}x {c.config.describe()}" for c, n in self.counts)


def gpu_memory_gb(model: GpuModel) -> float:
    return model.memory_total_mib / 1024


def _slot(model: GpuModel, row: ProfileRow) -> tuple[int, int, float] | None:
    """(slices, memory slots, memory GB) of a MIG profile; None when the GPU lacks it."""
    prof = model.mig_profile(row.mig_profile)
    if prof is None:
        return None
    return prof.slices, prof.placement_size, prof.memory_mib / 1024


def estimated_power_w(model: GpuModel, gpu_share: float, busy_power_frac: float) -> float:
    """Idle share + busy fraction of the dynamic range; used when no row states the power."""
    return gpu_share * (model.idle_power_w + busy_power_frac * model.dynamic_power_max_w)


def _group_rows(rows: Iterable[ProfileRow], endpoint: EndpointSpec, gpu_types: set[str]
                ) -> dict[InstanceConfig, list[ProfileRow]]:
    groups: dict[InstanceConfig, list[ProfileRow]] = defaultdict(list)
    models, quants = set(endpoint.models), set(endpoint.allowed_quantizations)
    for r in rows:
        if (r.gpu_type not in gpu_types or r.model not in models or r.quantization not in quants
                or r.power_limit_w is not None):
            continue  # power-capped rows are the shed policy's business, not a reshape target
        cfg = InstanceConfig(r.gpu_type, r.model, r.tensor_parallel, r.quantization,
                             r.mig_profile, r.sm_clock_mhz)
        groups[cfg].append(r)
    return groups


def _msrr_by_class(rows: Sequence[ProfileRow], slo_p95_s: float) -> dict[QueryClass, float]:
    """Best MSRR per class among rows whose SLO is at least as strict as the endpoint's."""
    out: dict[QueryClass, float] = {}
    for r in rows:
        if (r.query_class is QueryClass.MIXED or r.msrr_rps is None or r.msrr_rps <= 0
                or r.slo_p95_s is None or r.slo_p95_s > slo_p95_s + _EPS):
            continue
        out[r.query_class] = max(out.get(r.query_class, 0.0), r.msrr_rps)
    return out


def _candidate(cfg: InstanceConfig, rows: Sequence[ProfileRow], endpoint: EndpointSpec,
               demand: Mapping[QueryClass, float], config: RebalanceConfig) -> Candidate | None:
    model = GPU_MODELS.get(cfg.gpu_type)
    if model is None:
        return None
    msrr = _msrr_by_class(rows, endpoint.slo_p95_s)
    needed = {qc for qc, rps in demand.items() if rps > 0}
    if not msrr or not needed <= set(msrr):
        return None
    if cfg.mig_profile == FULL_GPU:
        gpus, slices, slots = cfg.tensor_parallel, 0, 0
        slot_gb, equiv = gpu_memory_gb(model) * cfg.tensor_parallel, float(cfg.tensor_parallel)
    else:
        slot = _slot(model, rows[0])
        if slot is None or not config.allow_mig or cfg.tensor_parallel != 1 or cfg.sm_clock_mhz:
            return None  # MIG: one slice per instance; clocks are per GPU, shared by tenants
        slices, slots, slot_gb = slot
        gpus, equiv = 0, max(slices / MIG_COMPUTE_SLICES, slots / MIG_MEMORY_SLOTS)
    memories = [r.memory_gb for r in rows if r.memory_gb is not None]
    memory_gb = max(memories) if memories else slot_gb
    if memory_gb > slot_gb + _EPS:
        return None  # does not fit its slot (e.g. an unquantized model too big for one GPU)
    # MIG rows' published power is the whole GPU with every tenant, not the slice's share.
    powers = [r.avg_power_w for r in rows
              if r.avg_power_w is not None and r.mig_profile == FULL_GPU]
    power_w = max(powers) if powers else estimated_power_w(model, equiv, config.busy_power_frac)
    return Candidate(cfg, msrr, power_w, memory_gb, gpus, slices, slots, equiv, not powers)


def _dominated(a: Candidate, b: Candidate, demand: Mapping[QueryClass, float]) -> bool:
    """b dominates a: no worse in GPU share per req/s, power per req/s and granularity."""
    ca, cb = a.capacity_rps(demand), b.capacity_rps(demand)
    oa = (a.gpu_equiv / ca, a.power_w / ca, a.gpu_equiv)
    ob = (b.gpu_equiv / cb, b.power_w / cb, b.gpu_equiv)
    return all(y <= x + _EPS for x, y in zip(oa, ob, strict=True)) and oa != ob


def candidates(endpoint: EndpointSpec, demand: Mapping[QueryClass, float],
               rows: Iterable[ProfileRow], gpu_types: Iterable[str], config: RebalanceConfig
               ) -> dict[str, list[Candidate]]:
    """Pareto-efficient candidates per GPU type (types without any are left out)."""
    groups = _group_rows(rows, endpoint, set(gpu_types))
    built = [c for cfg, rs in groups.items()
             if (c := _candidate(cfg, rs, endpoint, demand, config)) is not None]
    by_type: dict[str, list[Candidate]] = defaultdict(list)
    for c in built:
        by_type[c.config.gpu_type].append(c)
    return {t: sorted((c for c in cs if not any(_dominated(c, o, demand) for o in cs)),
                      key=lambda c: (-c.gpu_equiv, c.config.describe()))
            for t, cs in by_type.items()}


def all_candidates(endpoint: EndpointSpec, demand: Mapping[QueryClass, float],
                   rows: Iterable[ProfileRow], gpu_types: Iterable[str], config: RebalanceConfig
                   ) -> dict[InstanceConfig, Candidate]:
    """Every buildable candidate (front or not): to value the instances running now."""
    groups = _group_rows(rows, endpoint, set(gpu_types))
    return {cfg: c for cfg, rs in groups.items()
            if (c := _candidate(cfg, rs, endpoint, demand, config)) is not None}


def _mix(parts: dict[Candidate, int]) -> Mix:
    counts = tuple(sorted(((c, n) for c, n in parts.items() if n > 0),
                          key=lambda cn: (-cn[0].gpu_equiv, cn[0].config.describe())))
    return Mix(counts, sum(c.gpu_equiv * n for c, n in counts),
               sum(c.power_w * n for c, n in counts))


def size_endpoint(endpoint: EndpointSpec, demand: Mapping[QueryClass, float],
                  cands: Sequence[Candidate], config: RebalanceConfig, limit: int = 3
                  ) -> list[Mix]:
    """The best mixes on one GPU type, fewest GPU-equivalents first, then least power.

    A mix is ⌊units⌋ instances of a primary candidate plus the fewest instances of a tail
    candidate covering the remainder (a MIG slice for sub-GPU demand, OASIS Algorithm 1), so
    each mix covers demand x (1 + headroom) and respects min/max instances.
    """
    mixes: dict[tuple, Mix] = {}
    total = sum(v for v in demand.values() if v > 0)
    for p in cands:
        if total <= 0:
            parts = {p: endpoint.min_instances}
            m = _mix(parts)
            mixes[tuple((c.config, n) for c, n in m.counts)] = m
            continue
        units = p.load_units(demand, config.headroom_frac)
        whole = math.floor(units + _EPS)
        rest = max(0.0, (units - whole) / units)
        tails = cands if rest > _EPS else (p,)
        for t in tails:
            n_tail = math.ceil(rest * t.load_units(demand, config.headroom_frac) - _EPS)
            parts: dict[Candidate, int] = defaultdict(int)
            parts[p] += whole
            parts[t] += n_tail
            m = _with_min_instances(_mix(parts), endpoint)
            if m.instances <= endpoint.max_instances:
                mixes[tuple((c.config, n) for c, n in m.counts)] = m
    ranked = sorted(mixes.values(), key=lambda m: (round(m.gpu_equiv, 6), m.power_w,
                                                   m.instances))
    return ranked[:limit]


def _with_min_instances(m: Mix, endpoint: EndpointSpec) -> Mix:
    missing = endpoint.min_instances - m.instances
    if missing <= 0 or not m.counts:
        return m
    smallest = min((c for c, _ in m.counts), key=lambda c: c.gpu_equiv)
    parts = dict(m.counts)
    parts[smallest] += missing
    return _mix(parts)
