"""Sizing for the rebalance policy: each endpoint's demand, its candidate configurations, the
mixes that cover its demand x (1 + headroom) and what its running instances are (candidates and
capacity); and the predicted power ledger of the snapshot. Pure."""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from coordinator.policy.model import (
    ClusterSnapshot,
    EndpointSpec,
    InstanceConfig,
    InstanceState,
    Limits,
    RebalanceConfig,
)
from coordinator.policy.packing.candidates import (
    Candidate,
    CandidateCache,
    Mix,
    estimated_power_w,
    pareto_fronts_many,
    size_endpoint,
)
from coordinator.policy.packing.ledger import Ledger, shape_of
from coordinator.profiles.schema import FULL_GPU, QueryClass
from shapeshifter.hw.models import GPU_MODELS

EPS = 1e-9
MIN_DEMAND_RPS = 1e-6  # below this a class counts as no demand


@dataclass
class SizedEndpoint:
    spec: EndpointSpec
    demand: Mapping[QueryClass, float]
    total_rps: float
    current: list[InstanceState]
    known: dict[InstanceConfig, Candidate]
    mixes: list[Mix]
    cap_before_rps: float
    equiv_before: float
    covered: bool
    recent: bool
    cfg_of: dict[str, InstanceConfig]  # running instance id -> its configuration
    cand_of: dict[str, Candidate]  # running instance id -> its candidate (or a stand-in)


def analyse_all(snapshot: ClusterSnapshot, cache: CandidateCache,
                gpu_type_of: Mapping[tuple[str, int], str], config: RebalanceConfig
                ) -> list[SizedEndpoint]:
    """_analyse per endpoint, the Pareto fronts of all endpoints computed together."""
    specs = snapshot.endpoints
    demands = [{QueryClass(k): float(v) for k, v in snapshot.demand_rps.get(s.name, {}).items()
                if v >= MIN_DEMAND_RPS} for s in specs]
    knowns = [cache.all_candidates(s, d) for s, d in zip(specs, demands, strict=True)]
    fronts = pareto_fronts_many([(k.values(), d) for k, d in zip(knowns, demands, strict=True)])
    by_endpoint: dict[str, list[InstanceState]] = {}
    for inst in snapshot.instances:
        by_endpoint.setdefault(inst.endpoint, []).append(inst)
    return [_analyse(s, d, k, f, by_endpoint.get(s.name, []), snapshot.now_s, gpu_type_of,
                     config) for s, d, k, f in zip(specs, demands, knowns, fronts, strict=True)]


def _analyse(spec: EndpointSpec, demand: Mapping[QueryClass, float],
             known: dict[InstanceConfig, Candidate], fronts: Mapping[str, list[Candidate]],
             instances: Iterable[InstanceState], now_s: float,
             gpu_type_of: Mapping[tuple[str, int], str], config: RebalanceConfig) -> SizedEndpoint:
    """known: every candidate of the endpoint; fronts: the Pareto-efficient ones per GPU type;
    instances: the snapshot's instances of this endpoint."""
    total = sum(demand.values())
    current = sorted(instances, key=lambda i: i.instance_id)
    mixes = sorted((m for cs in fronts.values() for m in size_endpoint(spec, demand, cs, config)),
                   key=lambda m: (round(m.gpu_equiv, 6), m.power_w, m.instances))
    cfg_of = {i.instance_id: config_of(i, gpu_type_of) for i in current}
    cand_of = {i.instance_id: instance_candidate(i, known, gpu_type_of, config,
                                                 cfg_of[i.instance_id]) for i in current}
    cap_of = {c: c.capacity_rps(demand) for c in {known[cfg] for cfg in cfg_of.values()
                                                   if cfg in known}}  # once per configuration
    cap = sum(cap_of[cand_of[i.instance_id]] for i in current if cfg_of[i.instance_id] in known)
    equiv = sum(cand_of[i.instance_id].gpu_equiv for i in current)
    need = total * (1 + config.headroom_frac)
    covered = cap + EPS >= need and len(current) >= spec.min_instances
    last_change = max((i.changed_at_s for i in current), default=-math.inf)
    recent = now_s - last_change < config.hysteresis_s
    return SizedEndpoint(spec, demand, total, current, known, mixes, cap, equiv, covered,
                         recent, cfg_of, cand_of)


def config_of(inst: InstanceState, gpu_type_of: Mapping[tuple[str, int], str]
              ) -> InstanceConfig:
    gpu_type = gpu_type_of.get((inst.node_id, inst.gpu_indices[0]), "") if inst.gpu_indices \
        else ""
    return _instance_config(gpu_type, inst.model, inst.tensor_parallel, inst.quantization,
                            inst.mig_profile, inst.sm_clock_mhz)


# Thousands of instances share a few configurations; a frozen dataclass is slow to build.
_instance_config = functools.lru_cache(maxsize=4096, typed=True)(InstanceConfig)


def instance_candidate(inst: InstanceState, known: Mapping[InstanceConfig, Candidate],
                       gpu_type_of: Mapping[tuple[str, int], str],
                       config: RebalanceConfig, cfg: InstanceConfig | None = None
                       ) -> Candidate:
    """The candidate a running instance is; a zero-capacity stand-in when no profile has it.
    `cfg`: the instance's configuration when already known."""
    cfg = config_of(inst, gpu_type_of) if cfg is None else cfg
    if cfg in known:
        return known[cfg]
    model = GPU_MODELS.get(cfg.gpu_type)
    if cfg.mig_profile != FULL_GPU and model is not None and model.mig_profile(cfg.mig_profile):
        prof = model.mig_profile(cfg.mig_profile)
        assert prof is not None
        equiv = max(prof.slices / 7, prof.placement_size / 8)
        power = estimated_power_w(model, equiv, config.busy_power_frac)
        return Candidate(cfg, {}, power, prof.memory_mib / 1024, 0, prof.slices,
                         prof.placement_size, equiv, True)
    n = max(1, len(inst.gpu_indices))
    power = estimated_power_w(model, n, config.busy_power_frac) if model else 0.0
    return Candidate(cfg, {}, power, 0.0, n, 0, 0, float(n), True)


def predicted_ledger(snapshot: ClusterSnapshot, limits: Limits,
                     cands_of: Mapping[str, Candidate], with_instances: bool = True) -> Ledger:
    """Predicted GPU power per node: idle GPUs, reserved GPUs as measured, instances modeled."""
    gpu_w: dict[str, float] = {}
    for n in snapshot.nodes:
        total = 0.0
        for g in n.gpus:
            model = GPU_MODELS.get(g.gpu_type)
            reserved = g.reserved or not g.healthy
            total += g.power_draw_w if reserved or model is None else model.idle_power_w
        gpu_w[n.node_id] = total
    for inst in snapshot.instances if with_instances else ():
        c = cands_of[inst.instance_id]
        model = GPU_MODELS.get(c.config.gpu_type)
        idle = model.idle_power_w if model else 0.0
        gpu_w[inst.node_id] = gpu_w.get(inst.node_id, 0.0) + c.power_w - c.gpu_equiv * idle
    shapes = {n.node_id: shape_of(n) for n in snapshot.nodes}
    return Ledger(shapes, gpu_w, limits)
