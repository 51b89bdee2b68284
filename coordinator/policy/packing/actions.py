"""The actions of a rebalance plan's placed changes: MIG mode and layout preparation per GPU,
one start per new instance and one stop per replaced one, handed to staging for the
make-before-break order. Pure."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace

from coordinator.policy.model import InstanceState, PlanAction, Stage
from coordinator.policy.packing.candidates import Candidate
from coordinator.policy.packing.choice import Change
from coordinator.policy.packing.ledger import Ledger
from coordinator.policy.packing.packer import Packer, Placed
from coordinator.policy.packing.sizing import SizedEndpoint
from coordinator.policy.packing.staging import StartOp, StopOp, stage_plan
from coordinator.profiles.schema import QueryClass
from shapeshifter.hw.models import GPU_MODELS


def plan_stages(placed: Sequence[tuple[Change, list[tuple[Candidate, Placed]]]],
                packer: Packer, ledger_now: Ledger, cands_of: Mapping[str, Candidate],
                endpoints: Sequence[SizedEndpoint], over_ids: set[str]
                ) -> tuple[list[Stage], list[str]]:
    """The start and stop actions of the placed changes (with the MIG preparation their GPUs
    need), in make-before-break stages; the staging's warnings."""
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


def _stop_op(ch: Change, inst: InstanceState, c: Candidate, cap_rps: float, mix_desc: str
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


def _start_op(ch: Change, cand: Candidate, p: Placed, cap: float,
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
