"""Rebalance: reshape each endpoint's instances and pack them onto fewer GPUs (DESIGN §5).

    rebalance(snapshot, profiles, limits, config) -> Plan        (pure, deterministic)

1. Size (packing/sizing.py): candidates per endpoint from the profiles (candidates.py) and the
   mixes covering its demand x (1 + headroom), fewest GPU-equivalents then least power (OASIS
   eq. 5; MIG for sub-GPU).
2. Choose per endpoint (packing/choice.py): keep what runs when it covers demand and
   reshaping would save less than `min_gpu_saving` GPUs or the endpoint changed within
   `hysteresis_s`; change it otherwise (under-covered endpoints first, then the largest
   saving), within `max_restarts_per_round`.
   Instances whose configuration the new mix keeps stay where they are.
3. Pack: running instances are pinned where they are; each changing endpoint releases the
   instances it replaces and places its new ones (packing/packer.py) in a transaction,
   falling back to its next mix, and keeping what runs when none fits within the limits
   (here).
4. Stage make-before-break (packing/actions.py, staging.py): capacity never below demand,
   limits never exceeded.
"""

from __future__ import annotations

import contextlib
import gc
import re
from collections.abc import Iterator, Mapping, Sequence

from coordinator.policy.model import ClusterSnapshot, Limits, Plan, RebalanceConfig
from coordinator.policy.packing.actions import plan_stages
from coordinator.policy.packing.candidates import Candidate, CandidateCache
from coordinator.policy.packing.choice import Change, change_for, decide, outcome
from coordinator.policy.packing.packer import Packer, Placed
from coordinator.policy.packing.sizing import (
    MIN_DEMAND_RPS,
    analyse_all,
    instance_candidate,
    predicted_ledger,
)
from coordinator.profiles.schema import ProfileRow

__all__ = ["MIN_DEMAND_RPS", "rebalance"]

_ID_BAD = re.compile(r"[^a-z0-9._-]+")


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
    endpoints = analyse_all(snapshot, CandidateCache(profiles, gpu_types, config), gpu_type_of,
                            config)
    cands_of = {iid: c for e in endpoints for iid, c in e.cand_of.items()}
    managed = {e.spec.name for e in endpoints}
    for inst in snapshot.instances:  # instances of undeclared endpoints stay as they are
        if inst.endpoint not in managed:
            cands_of[inst.instance_id] = instance_candidate(inst, {}, gpu_type_of, config)

    ledger = predicted_ledger(snapshot, limits, cands_of, with_instances=False)  # pins add them
    packer = Packer(snapshot.nodes, ledger, limits, config.fit)
    slices_by_gpu = {(n.node_id, g.index): [(s.profile, s.uuid, s.in_use) for s in g.mig_slices]
                     for n in snapshot.nodes for g in n.gpus if g.mig_slices}
    for inst in snapshot.instances:
        packer.pin(inst.instance_id, cands_of[inst.instance_id], inst.node_id, inst.gpu_indices,
                   inst.mig_uuid, slices_by_gpu.get((inst.node_id, inst.gpu_indices[0]), [])
                   if inst.gpu_indices else [])
    power_before_w = sum(c.power_w for c in cands_of.values())
    gpus_before = packer.used_gpus()

    changes, outcomes = decide(endpoints, config)
    taken_ids = {i.instance_id for i in snapshot.instances}
    placed: list[tuple[Change, list[tuple[Candidate, Placed]]]] = []
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
            outcomes[ch.ep.spec.name] = outcome(ch.ep, None, "unplaceable",
                                                "no mix fits the free GPUs within the row, "
                                                "aisle and thermal limits; kept as is")
            continue
        ch_done, items = result
        placed.append((ch_done, items))
        outcomes[ch.ep.spec.name] = outcome(ch.ep, ch_done, "reshaped", ch_done.reason)

    ledger_now = predicted_ledger(snapshot, limits, cands_of)
    row_before, aisle_before = dict(ledger_now.row_w), dict(ledger_now.aisle_cfm)
    stages, warnings = plan_stages(placed, packer, ledger_now, cands_of, endpoints, over_ids)
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


# ---------------------------------------------------------------------- placement


def _place_change(ch: Change, packer: Packer, taken_ids: set[str],
                  slices_by_gpu: Mapping[tuple[str, int], list[tuple[str, str, bool]]]
                  ) -> tuple[Change, list[tuple[Candidate, Placed]]] | None:
    mixes = [ch.mix] + [m for m in ch.ep.mixes if m is not ch.mix]
    for i, mix in enumerate(mixes):
        attempt = ch if i == 0 else change_for(ch.ep, mix, ch.reason.split(";")[0] +
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


def _try_place(ch: Change, packer: Packer, taken_ids: set[str], release_first: bool
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


def _release(ch: Change, packer: Packer) -> None:
    for inst in ch.stop:
        packer.unpin(inst.instance_id, inst.node_id, inst.gpu_indices, inst.mig_profile,
                     inst.mig_uuid)


def _new_id(endpoint: str, taken: set[str]) -> str:
    base = _ID_BAD.sub("-", endpoint.lower()).strip("-._")[:48] or "endpoint"
    n = 1
    while f"{base}-r{n}" in taken:
        n += 1
    return f"{base}-r{n}"


def _plan_reason(placed: Sequence[tuple[Change, list]], before: int, after: int) -> str:
    if not placed:
        return f"no change: {before} GPUs in use"
    names = ", ".join(ch.ep.spec.name for ch, _ in placed)
    return f"reshape {len(placed)} endpoint(s) ({names}): {before} -> {after} GPUs in use"
