"""Rebalance: reshape each endpoint's instances and pack them onto fewer GPUs (DESIGN §5).

    rebalance(snapshot, profiles, limits, config) -> Plan        (pure, deterministic)

1. Candidates per endpoint from the profiles (candidates.py) and the mixes covering its demand
   x (1 + headroom), fewest GPU-equivalents then least power (OASIS eq. 5; MIG for sub-GPU).
2. Decide per endpoint: keep what runs when it covers demand and reshaping would save less than
   `min_gpu_saving` GPUs or the endpoint changed within `hysteresis_s`; change it otherwise
   (under-covered endpoints first, then the largest saving), within `max_restarts_per_round`.
   Instances whose configuration the new mix keeps stay where they are.
3. Pack: running instances are pinned where they are; each changing endpoint releases the
   instances it replaces and places its new ones (packing.py) in a transaction, falling back to
   its next mix, and keeping what runs when none fits within the limits.
4. Stage make-before-break (staging.py): capacity never below demand, limits never exceeded.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import math
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace

from coordinator.policy.model import (
    ClusterSnapshot,
    EndpointOutcome,
    EndpointSpec,
    InstanceConfig,
    InstanceState,
    Limits,
    Plan,
    PlanAction,
    RebalanceConfig,
    Stage,
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
from coordinator.policy.packing.packer import Packer, Placed
from coordinator.policy.packing.staging import StartOp, StopOp, stage_plan
from coordinator.profiles.schema import FULL_GPU, ProfileRow, QueryClass
from shapeshifter.hw.models import GPU_MODELS

_EPS = 1e-9
MIN_DEMAND_RPS = 1e-6  # below this a class counts as no demand
_ID_BAD = re.compile(r"[^a-z0-9._-]+")


@dataclass
class _Endpoint:
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


@dataclass
class _Change:
    ep: _Endpoint
    mix: Mix
    keep: list[InstanceState]
    stop: list[InstanceState]
    start: list[Candidate]
    reason: str

    @property
    def cost(self) -> int:
        return len(self.stop) + len(self.start)


def rebalance(snapshot: ClusterSnapshot, profiles: Sequence[ProfileRow], limits: Limits,
              config: RebalanceConfig) -> Plan:
    """A staged plan that reshapes and packs the endpoints' instances. Pure.

    snapshot: nodes (GPUs, MIG slices, inlet temperatures), the running instances, the
    endpoints and their demand (req/s per query class); profiles: the cost table rows;
    limits: row power / aisle airflow budgets and GPU thermal headroom; config: headroom,
    restart budget, hysteresis, fit metric. Every action carries a human-readable reason.
    """
    config.validate()
    with _gc_paused():
        return _rebalance(snapshot, profiles, limits, config)


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector for one solve. At 10k GPUs a solve builds ~10^5
    long-lived objects (bins, candidates, actions), which set off full collections that walk
    the caller's whole heap: 10-30% of the solve time, freeing nothing (the policy makes no
    reference cycles). Reference counting still frees; the caller's setting is restored."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _rebalance(snapshot: ClusterSnapshot, profiles: Sequence[ProfileRow], limits: Limits,
               config: RebalanceConfig) -> Plan:
    gpu_types = sorted({g.gpu_type for n in snapshot.nodes for g in n.gpus})
    gpu_type_of = {(n.node_id, g.index): g.gpu_type for n in snapshot.nodes for g in n.gpus}
    endpoints = _analyse_all(snapshot, CandidateCache(profiles, gpu_types, config), gpu_type_of,
                             config)
    cands_of = {iid: c for e in endpoints for iid, c in e.cand_of.items()}
    managed = {e.spec.name for e in endpoints}
    for inst in snapshot.instances:  # instances of undeclared endpoints stay as they are
        if inst.endpoint not in managed:
            cands_of[inst.instance_id] = _instance_candidate(inst, {}, gpu_type_of, config)

    ledger = _ledger(snapshot, limits, cands_of, with_instances=False)  # pins add them
    packer = Packer(snapshot.nodes, ledger, limits, config.fit)
    slices_by_gpu = {(n.node_id, g.index): [(s.profile, s.uuid, s.in_use) for s in g.mig_slices]
                     for n in snapshot.nodes for g in n.gpus if g.mig_slices}
    for inst in snapshot.instances:
        packer.pin(inst.instance_id, cands_of[inst.instance_id], inst.node_id, inst.gpu_indices,
                   inst.mig_uuid, slices_by_gpu.get((inst.node_id, inst.gpu_indices[0]), [])
                   if inst.gpu_indices else [])
    power_before_w = sum(c.power_w for c in cands_of.values())
    gpus_before = packer.used_gpus()

    changes, outcomes = _decide(endpoints, config)
    taken_ids = {i.instance_id for i in snapshot.instances}
    placed: list[tuple[_Change, list[tuple[Candidate, Placed]]]] = []
    over_ids: set[str] = set()
    over_warnings: list[str] = []
    for ch in changes:
        result = _place_change(ch, packer, taken_ids, slices_by_gpu)
        if result is None and config.place_over_limits and not ch.ep.covered:
            with ledger.unlimited():
                result = _place_change(ch, packer, taken_ids, slices_by_gpu)
            if result is not None:
                over_ids.update(p.key for _, p in result[1])
                over_warnings.append(f"{ch.ep.spec.name}: placed over the row/aisle limits "
                                     "(under-covered; power caps hold the scopes)")
        if result is None:
            outcomes[ch.ep.spec.name] = _outcome(ch.ep, None, "unplaceable",
                                                 "no mix fits the free GPUs within the row, "
                                                 "aisle and thermal limits; kept as is")
            continue
        ch_done, items = result
        placed.append((ch_done, items))
        outcomes[ch.ep.spec.name] = _outcome(ch.ep, ch_done, "reshaped", ch_done.reason)

    ledger_now = _ledger(snapshot, limits, cands_of)
    row_before, aisle_before = dict(ledger_now.row_w), dict(ledger_now.aisle_cfm)
    stages, warnings = _stages(placed, packer, ledger_now, cands_of, endpoints, over_ids)
    warnings = over_warnings + warnings
    kept_power = sum(cands_of[i.instance_id].power_w for i in snapshot.instances)
    removed = sum(cands_of[i.instance_id].power_w for ch, _ in placed for i in ch.stop)
    added = sum(c.power_w for _, items in placed for c, _ in items)
    warnings += ledger.over_limits()
    return Plan(
        stages=tuple(stages),
        outcomes=tuple(outcomes[e.spec.name] for e in endpoints),
        gpus_used_before=gpus_before, gpus_used_after=packer.used_gpus(),
        power_before_w=power_before_w, power_after_w=kept_power - removed + added,
        reason=_plan_reason(placed, gpus_before, packer.used_gpus()),
        warnings=tuple(warnings), row_power_before_w=row_before,
        aisle_airflow_before_cfm=aisle_before,
    )


# ---------------------------------------------------------------------- analysis


def _analyse_all(snapshot: ClusterSnapshot, cache: CandidateCache,
                 gpu_type_of: Mapping[tuple[str, int], str], config: RebalanceConfig
                 ) -> list[_Endpoint]:
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
             gpu_type_of: Mapping[tuple[str, int], str], config: RebalanceConfig) -> _Endpoint:
    """known: every candidate of the endpoint; fronts: the Pareto-efficient ones per GPU type;
    instances: the snapshot's instances of this endpoint."""
    total = sum(demand.values())
    current = sorted(instances, key=lambda i: i.instance_id)
    mixes = sorted((m for cs in fronts.values() for m in size_endpoint(spec, demand, cs, config)),
                   key=lambda m: (round(m.gpu_equiv, 6), m.power_w, m.instances))
    cfg_of = {i.instance_id: _config_of(i, gpu_type_of) for i in current}
    cand_of = {i.instance_id: _instance_candidate(i, known, gpu_type_of, config,
                                                  cfg_of[i.instance_id]) for i in current}
    cap_of = {c: c.capacity_rps(demand) for c in {known[cfg] for cfg in cfg_of.values()
                                                   if cfg in known}}  # once per configuration
    cap = sum(cap_of[cand_of[i.instance_id]] for i in current if cfg_of[i.instance_id] in known)
    equiv = sum(cand_of[i.instance_id].gpu_equiv for i in current)
    need = total * (1 + config.headroom_frac)
    covered = cap + _EPS >= need and len(current) >= spec.min_instances
    last_change = max((i.changed_at_s for i in current), default=-math.inf)
    recent = now_s - last_change < config.hysteresis_s
    return _Endpoint(spec, demand, total, current, known, mixes, cap, equiv, covered, recent,
                     cfg_of, cand_of)


def _config_of(inst: InstanceState, gpu_type_of: Mapping[tuple[str, int], str]
               ) -> InstanceConfig:
    gpu_type = gpu_type_of.get((inst.node_id, inst.gpu_indices[0]), "") if inst.gpu_indices \
        else ""
    return _instance_config(gpu_type, inst.model, inst.tensor_parallel, inst.quantization,
                            inst.mig_profile, inst.sm_clock_mhz)


# Thousands of instances share a few configurations; a frozen dataclass is slow to build.
_instance_config = functools.lru_cache(maxsize=4096, typed=True)(InstanceConfig)


def _instance_candidate(inst: InstanceState, known: Mapping[InstanceConfig, Candidate],
                        gpu_type_of: Mapping[tuple[str, int], str],
                        config: RebalanceConfig, cfg: InstanceConfig | None = None
                        ) -> Candidate:
    """The candidate a running instance is; a zero-capacity stand-in when no profile has it.
    `cfg`: the instance's configuration when already known."""
    cfg = _config_of(inst, gpu_type_of) if cfg is None else cfg
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


def _ledger(snapshot: ClusterSnapshot, limits: Limits, cands_of: Mapping[str, Candidate],
            with_instances: bool = True) -> Ledger:
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


# ---------------------------------------------------------------------- decisions


def _decide(endpoints: Sequence[_Endpoint], config: RebalanceConfig
            ) -> tuple[list[_Change], dict[str, EndpointOutcome]]:
    outcomes: dict[str, EndpointOutcome] = {}
    wanted: list[_Change] = []
    for ep in endpoints:
        change, why = _want_change(ep, config)
        if change is None:
            outcomes[ep.spec.name] = _outcome(ep, None, "kept", why)
        else:
            wanted.append(change)
    wanted.sort(key=lambda c: (c.ep.covered, -(c.ep.equiv_before - c.mix.gpu_equiv),
                               c.ep.spec.name))
    budget = config.max_restarts_per_round
    chosen: list[_Change] = []
    for ch in wanted:
        if ch.cost > budget and not ch.ep.covered:
            ch = _scale_out(ch, budget)
        elif ch.cost > budget and not ch.start and budget > 0:
            ch = _scale_in(ch, budget)
        if ch.cost > budget or ch.cost == 0:
            outcomes[ch.ep.spec.name] = _outcome(
                ch.ep, None, "deferred",
                f"{ch.reason}; needs {ch.cost} restarts, {budget} left this round "
                f"(max_restarts_per_round={config.max_restarts_per_round})")
            continue
        budget -= ch.cost
        chosen.append(ch)
    return chosen, outcomes


def _want_change(ep: _Endpoint, config: RebalanceConfig) -> tuple[_Change | None, str]:
    if not ep.mixes:
        if ep.known and not ep.covered and (grow := _grow_to_cap(ep)) is not None:
            return grow, ""
        if ep.known:  # configurations exist, but none covers the demand within the cap
            return None, (f"covering {ep.total_rps * (1 + config.headroom_frac):.2f} req/s "
                          f"needs more than max_instances={ep.spec.max_instances} instances of "
                          "any profiled configuration; kept as is")
        return None, ("no profiled configuration meets its SLO and quality floor on these GPUs; "
                      "kept as is")
    best = ep.mixes[0]
    saving = ep.equiv_before - best.gpu_equiv
    need = ep.total_rps * (1 + config.headroom_frac)
    if ep.covered:
        if saving < config.min_gpu_saving - _EPS:
            return None, (f"covers {need:.2f} req/s with {ep.cap_before_rps:.2f}; reshaping "
                          f"would save {saving:.2f} GPUs (< {config.min_gpu_saving:g})")
        if ep.recent:
            return None, f"changed within the last {config.hysteresis_s:g} s (hysteresis)"
        reason = (f"reshape to {best.describe()}: {best.gpu_equiv:.2f} GPUs instead of "
                  f"{ep.equiv_before:.2f} for {ep.total_rps:.2f} req/s (+{config.headroom_frac:.0%}"
                  " headroom)")
    else:
        reason = (f"capacity {ep.cap_before_rps:.2f} req/s < demand {ep.total_rps:.2f} x "
                  f"{1 + config.headroom_frac:g} = {need:.2f}; size to {best.describe()}")
    return _change_for(ep, best, reason), ""


def _change_for(ep: _Endpoint, mix: Mix, reason: str) -> _Change:
    """Keep running instances whose configuration the mix has; stop the rest; start the gap."""
    by_cfg: dict[InstanceConfig, list[InstanceState]] = {}
    for inst in ep.current:
        by_cfg.setdefault(ep.cfg_of[inst.instance_id], []).append(inst)
    keep: list[InstanceState] = []
    start: list[Candidate] = []
    for cand, n in mix.counts:
        running = sorted(by_cfg.get(cand.config, []), key=lambda i: (not i.ready, i.instance_id))
        keep += running[:n]
        start += [cand] * max(0, n - len(running))
    kept_ids = {i.instance_id for i in keep}
    stop = [i for i in ep.current if i.instance_id not in kept_ids]
    return _Change(ep, mix, keep, stop, start, reason)


def _scale_out(ch: _Change, budget: int) -> _Change:
    """Under budget pressure an under-covered endpoint only adds instances (no stops)."""
    primary = ch.mix.counts[0][0]
    missing = ch.ep.total_rps * 1.0 - ch.ep.cap_before_rps  # at least the demand itself
    missing = max(missing, 0.0)
    cap = primary.capacity_rps(ch.ep.demand)
    n = min(budget, max(1, math.ceil(missing / cap - _EPS))) if cap > 0 else 0
    return _Change(ch.ep, ch.mix, list(ch.ep.current), [], [primary] * n,
                   f"{ch.reason}; restart budget short: scale out by {n} only")


def _grow_to_cap(ep: _Endpoint) -> _Change | None:
    """No mix covers the demand within max_instances: add instances of the configuration with
    the most capacity per GPU up to the cap (short of demand, closer to it than keeping)."""
    room = ep.spec.max_instances - len(ep.current)
    if room <= 0:
        return None
    best = max(ep.known.values(),
               key=lambda c: (c.capacity_rps(ep.demand) / max(c.gpu_equiv, _EPS),
                              c.config.describe()))
    mix = Mix(((best, room),), best.gpu_equiv * room, best.power_w * room)
    return _Change(ep, mix, list(ep.current), [], [best] * room,
                   f"no configuration covers {ep.total_rps:.2f} req/s within max_instances="
                   f"{ep.spec.max_instances}: add {room}x {best.config.describe()}")


def _scale_in(ch: _Change, budget: int) -> _Change:
    """Under budget pressure a covered endpoint that only sheds instances sheds `budget` of
    them now and the rest in later rounds (capacity only falls towards the mix's)."""
    stop = ch.stop[:budget]
    keep = ch.keep + ch.stop[budget:]
    return _Change(ch.ep, ch.mix, keep, stop, [],
                   f"{ch.reason}; restart budget short: scale in by {len(stop)} now")


# ---------------------------------------------------------------------- placement


def _place_change(ch: _Change, packer: Packer, taken_ids: set[str],
                  slices_by_gpu: Mapping[tuple[str, int], list[tuple[str, str, bool]]]
                  ) -> tuple[_Change, list[tuple[Candidate, Placed]]] | None:
    mixes = [ch.mix] + [m for m in ch.ep.mixes if m is not ch.mix]
    for i, mix in enumerate(mixes):
        attempt = ch if i == 0 else _change_for(ch.ep, mix, ch.reason.split(";")[0] +
                                                f"; fallback mix {mix.describe()}")
        if i > 0 and not ch.ep.covered and attempt.cost == 0:
            continue
        # Make-before-break wants the new instances on GPUs that are free now; only when they
        # do not fit does the endpoint reuse the GPUs of the instances it replaces.
        for release_first in (False, True):
            items = _try_place(attempt, packer, taken_ids, release_first)
            if items is not None:
                return attempt, items
    return None


def _try_place(ch: _Change, packer: Packer, taken_ids: set[str], release_first: bool
               ) -> list[tuple[Candidate, Placed]] | None:
    packer.begin()
    if release_first:
        _release(ch, packer)
    items: list[tuple[Candidate, Placed]] = []
    for cand in sorted(ch.start, key=lambda c: (-c.gpu_equiv, -c.power_w)):
        new_id = _new_id(ch.ep.spec.name, taken_ids)
        p = packer.place(new_id, cand)
        if p is None:
            packer.rollback()
            for _, q in items:
                taken_ids.discard(q.key)
            return None
        taken_ids.add(new_id)
        items.append((cand, p))
    if not release_first:
        _release(ch, packer)
    packer.commit()
    return items


def _release(ch: _Change, packer: Packer) -> None:
    for inst in ch.stop:
        packer.unpin(inst.instance_id, inst.node_id, inst.gpu_indices, inst.mig_profile,
                     inst.mig_uuid)


def _new_id(endpoint: str, taken: set[str]) -> str:
    base = _ID_BAD.sub("-", endpoint.lower()).strip("-._")[:48] or "endpoint"
    n = 1
    while f"{base}-r{n}" in taken:
        n += 1
    return f"{base}-r{n}"


# ---------------------------------------------------------------------- actions and stages


def _stages(placed: Sequence[tuple[_Change, list[tuple[Candidate, Placed]]]], packer: Packer,
            ledger_now: Ledger, cands_of: Mapping[str, Candidate],
            endpoints: Sequence[_Endpoint], over_ids: set[str]
            ) -> tuple[list[Stage], list[str]]:
    prep = _gpu_prep(packer)
    starts, stops = [], []
    prepared: set[tuple[str, int]] = set()
    for ch, items in placed:
        cap_of = _capacities(ch.ep.demand, [c for c, _ in items]
                             + [cands_of[i.instance_id] for i in ch.stop])
        for cand, p in items:
            op = _start_op(ch, cand, p, cap_of[cand], prep, prepared)
            starts.append(replace(op, over_limits=True) if p.key in over_ids else op)
        mix_desc = ch.mix.describe() if ch.stop else ""
        for inst in ch.stop:
            c = cands_of[inst.instance_id]
            stops.append(_stop_op(ch, inst, c, cap_of[c], mix_desc))
    capacity = {e.spec.name: e.cap_before_rps for e in endpoints}
    demand = {e.spec.name: e.total_rps for e in endpoints}
    return stage_plan(starts, stops, capacity, demand, ledger_now)


def _capacities(demand: Mapping[QueryClass, float], cands: Iterable[Candidate]
                ) -> dict[Candidate, float]:
    """Capacity at the demand's mix per distinct candidate (0 for a stand-in without MSRRs)."""
    return {c: c.capacity_rps(demand) if c.msrr_rps else 0.0 for c in set(cands)}


def _stop_op(ch: _Change, inst: InstanceState, c: Candidate, cap_rps: float, mix_desc: str
             ) -> StopOp:
    action = PlanAction("stop_instance", inst.node_id,
                        f"{ch.ep.spec.name}: replaced ({c.config.describe()} is not in "
                        f"the new mix {mix_desc})", endpoint=ch.ep.spec.name,
                        instance_id=inst.instance_id, config=c.config,
                        gpu_indices=inst.gpu_indices, capacity_rps=cap_rps)
    return StopOp(action, tuple((inst.node_id, g) for g in inst.gpu_indices), inst.mig_uuid,
                  _extra_w(c), cap_rps)


def _extra_w(c: Candidate) -> float:
    model = GPU_MODELS.get(c.config.gpu_type)
    return c.power_w - c.gpu_equiv * (model.idle_power_w if model else 0.0)


def _gpu_prep(packer: Packer) -> dict[tuple[str, int], tuple[PlanAction, ...]]:
    """MIG mode and layout actions per GPU that the new placement needs."""
    prep: dict[tuple[str, int], tuple[PlanAction, ...]] = {}
    for b in packer.mig_changes():
        acts = []
        if not b.mig_enabled_now:
            acts.append(PlanAction("set_mig_mode", b.node_id, f"GPU {b.index}: enable MIG for "
                                   "sub-GPU instances", gpu_indices=(b.index,), mig_enabled=True))
        layout = tuple(sorted(b.fresh_layout))
        acts.append(PlanAction("apply_mig_layout", b.node_id,
                               f"GPU {b.index}: lay out {', '.join(layout)} for the instances "
                               "packed onto it", gpu_indices=(b.index,), mig_profiles=layout))
        prep[(b.node_id, b.index)] = tuple(acts)
    for b in packer.full_on_mig():
        prep[(b.node_id, b.index)] = (PlanAction(
            "set_mig_mode", b.node_id, f"GPU {b.index}: disable MIG for a whole-GPU instance",
            gpu_indices=(b.index,), mig_enabled=False),)
    return prep


def _start_op(ch: _Change, cand: Candidate, p: Placed, cap: float,
              prep: Mapping[tuple[str, int], tuple[PlanAction, ...]],
              prepared: set[tuple[str, int]]) -> StartOp:
    """`cap`: the candidate's capacity at the endpoint's demand mix."""
    gpus = tuple((p.node_id, g) for g in p.gpu_indices)
    pre = tuple(a for g in gpus if g not in prepared for a in prep.get(g, ()))
    prepared.update(g for g in gpus if g in prep)
    fresh = not p.mig_uuid
    action = PlanAction(
        "start_instance", p.node_id,
        f"{ch.ep.spec.name}: {ch.reason}; +{cap:.2f} req/s on GPU(s) "
        f"{', '.join(map(str, p.gpu_indices))}", endpoint=ch.ep.spec.name, instance_id=p.key,
        config=cand.config, gpu_indices=p.gpu_indices,
        mig_profiles=(cand.config.mig_profile,) if cand.gpus == 0 else (),
        mig_uuid=p.mig_uuid, capacity_rps=cap)
    # A fresh layout or a whole GPU needs every old instance off the GPU; a free existing
    # slice only needs that slice.
    needs_empty = gpus if fresh else ()
    return StartOp(action, pre, needs_empty, p.mig_uuid, _extra_w(cand), cap)


def _outcome(ep: _Endpoint, ch: _Change | None, decision: str, reason: str) -> EndpointOutcome:
    if ch is None:
        return EndpointOutcome(ep.spec.name, ep.total_rps, ep.cap_before_rps, ep.cap_before_rps,
                               ep.equiv_before, ep.equiv_before, decision, reason)
    after = [*_kept_cands(ch), *ch.start]
    return EndpointOutcome(ep.spec.name, ep.total_rps, ep.cap_before_rps,
                           sum(c.capacity_rps(ep.demand) for c in after),
                           ep.equiv_before, sum(c.gpu_equiv for c in after), decision, reason)


def _kept_cands(ch: _Change) -> Iterable[Candidate]:
    for inst in ch.keep:
        cand = ch.ep.known.get(ch.ep.cfg_of[inst.instance_id])
        if cand is not None:
            yield cand


def _plan_reason(placed: Sequence[tuple[_Change, list]], before: int, after: int) -> str:
    if not placed:
        return f"no change: {before} GPUs in use"
    names = ", ".join(ch.ep.spec.name for ch, _ in placed)
    return f"reshape {len(placed)} endpoint(s) ({names}): {before} -> {after} GPUs in use"
