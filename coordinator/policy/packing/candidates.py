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

import numpy as np

from coordinator.policy.model import EndpointSpec, InstanceConfig, RebalanceConfig
from coordinator.profiles.schema import FULL_GPU, ProfileRow, QueryClass
from shapeshifter.hw.models import GPU_MODELS, GpuModel

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


def capacities_rps(cands: Iterable[Candidate], demand: Mapping[QueryClass, float]
                   ) -> list[float]:
    """[c.capacity_rps(demand) for c in cands], the same floats, with the demand read once."""
    items = [(qc, rps) for qc, rps in demand.items() if rps > 0]
    total = sum(rps for _, rps in items)
    out = []
    for c in cands:
        if total <= 0:
            out.append(max(c.msrr_rps.values(), default=0.0))
            continue
        per_instance = sum(rps / c.msrr_rps[qc] for qc, rps in items)
        out.append(total / per_instance if per_instance > 0 else max(c.msrr_rps.values()))
    return out


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


def msrr_by_class(rows: Sequence[ProfileRow], slo_p95_s: float) -> dict[QueryClass, float]:
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
    msrr = msrr_by_class(rows, endpoint.slo_p95_s)
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


def _dominated_mask(objectives: Sequence[np.ndarray]) -> np.ndarray:
    """Per point (last axis): another point is no worse in every objective (within _EPS) and
    not equal. All pairs at once; leading axes are independent sets of points."""
    shape = (*objectives[0].shape, objectives[0].shape[-1])
    no_worse = np.ones(shape, dtype=bool)  # [..., i, j]: point j no worse than point i
    differs = np.zeros(shape, dtype=bool)
    for x in objectives:
        no_worse &= x[..., None, :] <= x[..., :, None] + _EPS
        differs |= x[..., None, :] != x[..., :, None]
    return (no_worse & differs).any(axis=-1)


def pareto_fronts(built: Iterable[Candidate], demand: Mapping[QueryClass, float]
                  ) -> dict[str, list[Candidate]]:
    """The Pareto-efficient candidates per GPU type, largest GPU share first: none is beaten
    in GPU share per req/s, power per req/s and GPU share by another of its type."""
    return pareto_fronts_many([(built, demand)])[0]


def pareto_fronts_many(jobs: Sequence[tuple[Iterable[Candidate], Mapping[QueryClass, float]]]
                       ) -> list[dict[str, list[Candidate]]]:
    """`pareto_fronts` of each (candidates, demand): sets of equal size are compared in one
    numpy call (per-endpoint calls on ~16 points are all overhead)."""
    sets: list[tuple[int, str, list[Candidate], list[float]]] = []  # job, type, cands, caps
    for k, (built, demand) in enumerate(jobs):
        by_type: dict[str, list[Candidate]] = defaultdict(list)
        for c in built:
            by_type[c.config.gpu_type].append(c)
        sets += [(k, t, cs, capacities_rps(cs, demand)) for t, cs in by_type.items()]
    by_size: dict[int, list[int]] = defaultdict(list)
    for i, (_, _, cs, _) in enumerate(sets):
        by_size[len(cs)].append(i)
    dominated: dict[int, list[bool]] = {}
    for members in by_size.values():
        cap = np.array([sets[i][3] for i in members])
        equiv = np.array([[c.gpu_equiv for c in sets[i][2]] for i in members])
        power = np.array([[c.power_w for c in sets[i][2]] for i in members])
        mask = _dominated_mask([equiv / cap, power / cap, equiv]).tolist()
        dominated.update(zip(members, mask, strict=True))
    fronts: list[dict[str, list[Candidate]]] = [{} for _ in jobs]
    for i, (k, t, cs, _) in enumerate(sets):
        fronts[k][t] = sorted((c for c, out in zip(cs, dominated[i], strict=True) if not out),
                              key=_order)
    return fronts


def candidates(endpoint: EndpointSpec, demand: Mapping[QueryClass, float],
               rows: Iterable[ProfileRow], gpu_types: Iterable[str], config: RebalanceConfig
               ) -> dict[str, list[Candidate]]:
    """Pareto-efficient candidates per GPU type (types without any are left out)."""
    return pareto_fronts(all_candidates(endpoint, demand, rows, gpu_types, config).values(),
                         demand)


def all_candidates(endpoint: EndpointSpec, demand: Mapping[QueryClass, float],
                   rows: Iterable[ProfileRow], gpu_types: Iterable[str], config: RebalanceConfig
                   ) -> dict[InstanceConfig, Candidate]:
    """Every buildable candidate (front or not): to value the instances running now."""
    groups = _group_rows(rows, endpoint, set(gpu_types))
    return {cfg: c for cfg, rs in groups.items()
            if (c := _candidate(cfg, rs, endpoint, demand, config)) is not None}


class CandidateCache:
    """`all_candidates` memoized for one rebalance: a candidate depends on the endpoint only
    through its allowed models and quantizations, its SLO and which classes have demand, so
    endpoints sharing those share the (identity-keyed, read-only) candidates."""

    def __init__(self, rows: Iterable[ProfileRow], gpu_types: Iterable[str],
                 config: RebalanceConfig) -> None:
        self._rows, self._gpu_types, self._config = list(rows), set(gpu_types), config
        self._groups: dict[tuple, dict[InstanceConfig, list[ProfileRow]]] = {}
        self._built: dict[tuple, dict[InstanceConfig, Candidate]] = {}

    def all_candidates(self, endpoint: EndpointSpec, demand: Mapping[QueryClass, float]
                       ) -> dict[InstanceConfig, Candidate]:
        floor = (frozenset(endpoint.models), frozenset(endpoint.allowed_quantizations))
        needed = frozenset(qc for qc, rps in demand.items() if rps > 0)
        key = (*floor, endpoint.slo_p95_s, needed)
        if key not in self._built:
            if floor not in self._groups:
                self._groups[floor] = _group_rows(self._rows, endpoint, self._gpu_types)
            self._built[key] = {
                cfg: c for cfg, rs in self._groups[floor].items()
                if (c := _candidate(cfg, rs, endpoint, demand, self._config)) is not None}
        return dict(self._built[key])


def _order(c: Candidate) -> tuple[float, str]:
    """How a Mix lists its candidates: largest GPU share first, then by name."""
    return (-c.gpu_equiv, c.config.describe())


def _mix(parts: dict[Candidate, int]) -> Mix:
    counts = tuple(sorted(((c, n) for c, n in parts.items() if n > 0),
                          key=lambda cn: _order(cn[0])))
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
    total = sum(v for v in demand.values() if v > 0)
    if total <= 0:
        return _idle_mixes(endpoint, cands, limit)
    units_of = {c: c.load_units(demand, config.headroom_frac) for c in cands}
    order = {c: _order(c) for c in cands}
    pairs = []  # (rank, primary, its count, tail, its count), in enumeration order
    for p in cands:
        units = units_of[p]
        whole = math.floor(units + _EPS)
        rest = max(0.0, (units - whole) / units)
        for t in cands if rest > _EPS else (p,):
            n_tail = math.ceil(rest * units_of[t] - _EPS)
            rank = _pair_rank(p, whole, t, n_tail, order, endpoint.min_instances)
            if rank[2] <= endpoint.max_instances:
                pairs.append((rank, p, whole, t, n_tail))
    # Rank the pairs first and build Mixes only for the best: a stable sort keeps the first
    # of equal ranks first, as ranking the distinct mixes in enumeration order would.
    pairs.sort(key=lambda pair: pair[0])
    mixes: dict[tuple, Mix] = {}
    for _, p, whole, t, n_tail in pairs:
        if len(mixes) >= limit:
            break
        counts = _pair_counts(p, whole, t, n_tail, order, endpoint.min_instances)
        key = tuple((c.config, n) for c, n in counts)
        if key not in mixes:  # a repeat has the same rank, so it ranks right after
            mixes[key] = Mix(counts, sum(c.gpu_equiv * n for c, n in counts),
                             sum(c.power_w * n for c, n in counts))
    return list(mixes.values())


def _idle_mixes(endpoint: EndpointSpec, cands: Sequence[Candidate], limit: int) -> list[Mix]:
    """No demand: min_instances of each candidate."""
    mixes: dict[tuple, Mix] = {}
    for p in cands:
        m = _mix({p: endpoint.min_instances})
        mixes[tuple((c.config, n) for c, n in m.counts)] = m
    ranked = sorted(mixes.values(), key=lambda m: (round(m.gpu_equiv, 6), m.power_w,
                                                   m.instances))
    return ranked[:limit]


def _pair_rank(p: Candidate, n_p: int, t: Candidate, n_t: int,
               order: Mapping[Candidate, tuple[float, str]], min_instances: int
               ) -> tuple[float, float, int]:
    """(GPU-equivalents rounded, power, instances) of the pair's Mix, without building it:
    with one or two terms the sums equal the Mix's whatever their order."""
    n = n_p + n_t
    if n < max(min_instances, 1):  # rare: topped up to min_instances
        counts = _pair_counts(p, n_p, t, n_t, order, min_instances)
        return (round(sum(c.gpu_equiv * k for c, k in counts), 6),
                sum(c.power_w * k for c, k in counts), sum(k for _, k in counts))
    if t is p:
        return round(p.gpu_equiv * n, 6), p.power_w * n, n
    return (round(p.gpu_equiv * n_p + t.gpu_equiv * n_t, 6), p.power_w * n_p + t.power_w * n_t,
            n)


def _pair_counts(p: Candidate, n_p: int, t: Candidate, n_t: int,
                 order: Mapping[Candidate, tuple[float, str]], min_instances: int
                 ) -> tuple[tuple[Candidate, int], ...]:
    """The counts of the Mix of n_p x p plus n_t x t, ordered as `_mix` orders them, the
    smallest candidate topped up to min_instances."""
    if t is p:
        items = [(p, n_p + n_t)]
    else:
        items = [(p, n_p), (t, n_t)] if order[p] <= order[t] else [(t, n_t), (p, n_p)]
    counts = [(c, n) for c, n in items if n > 0]
    missing = min_instances - sum(n for _, n in counts)
    if missing <= 0 or not counts:
        return tuple(counts)
    smallest = min((c for c, _ in counts), key=lambda c: c.gpu_equiv)
    parts = dict(counts)
    parts[smallest] += missing
    return tuple(sorted(parts.items(), key=lambda cn: order[cn[0]]))
