"""The clock stage of a rebalance plan: the configurator's live clock locks
(coordinator.policy.configure.clock_plan) as plan actions, one per GPU. Pure: no clock reads,
no I/O.

- Endpoints the plan reshapes (starts or stops one of their instances) are left to the next
  round: their clocks are chosen for the instances that will serve, once the new ones are READY.
  A full GPU the plan starts an instance on is unlocked if it reports a lock (one left by an
  earlier instance would slow the new one until then).
- Instances on a GPU under an emergency cap are left out, neither locked nor counted as capacity
  (the endpoint's other instances cover its demand). See `clock_view` for why.
- The clock an instance runs at now is the lock on its GPUs (the same on each of them, else
  none); the snapshot the rebalance policy itself sees keeps instances at the maximum clock,
  which is what instance counts are sized for (ConfigureConfig.max_extra_gpu_frac = 0).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace

from coordinator.policy.configure import ClockAction, ConfigureConfig, clock_plan
from coordinator.policy.model import ClusterSnapshot, GpuState, Plan, PlanAction, Stage
from coordinator.profiles.schema import ProfileRow
from shapeshifter.hw.models import GpuModel

LOCK, RESET = "lock_clocks", "reset_clocks"
CLOCK_KINDS = (LOCK, RESET)
RESHAPE_KINDS = ("start_instance", "stop_instance")


def with_clock_stage(plan: Plan, snapshot: ClusterSnapshot, profiles: Sequence[ProfileRow],
                     gpu_models: Mapping[str, GpuModel], headroom_frac: float,
                     config: ConfigureConfig) -> Plan:
    """`plan` with a final stage of clock locks and resets appended (unchanged when none)."""
    stage = clock_stage(snapshot, plan, profiles, gpu_models, headroom_frac, config)
    if stage is None:
        return plan
    return replace(plan, stages=(*plan.stages, stage), reason=f"{plan.reason}; {stage.reason}")


def clock_stage(snapshot: ClusterSnapshot, plan: Plan, profiles: Sequence[ProfileRow],
                gpu_models: Mapping[str, GpuModel], headroom_frac: float,
                config: ConfigureConfig) -> Stage | None:
    """The clock actions for the endpoints `plan` leaves as they are; None when there are none."""
    chosen = clock_plan(clock_view(snapshot, plan), profiles, gpu_models, headroom_frac, config)
    actions = (*(pa for a in chosen for pa in plan_actions(a)), *unlock_for_starts(snapshot, plan))
    if not actions:
        return None
    locks = sum(a.kind == LOCK for a in actions)
    return Stage(actions, f"clocks: {locks} GPU(s) locked at the lowest clock covering demand "
                          f"x (1 + {headroom_frac:g}), {len(actions) - locks} unlocked")


def clock_view(snapshot: ClusterSnapshot, plan: Plan) -> ClusterSnapshot:
    """What clock_plan decides on: the endpoints `plan` does not reshape, their instances with
    the clock locked on their GPUs now, less those on a GPU under an emergency cap.

    Why the capped ones are left out: an emergency's Phase 2 locks the clocks of the GPUs it
    caps at the highest clock that fits the cap, and resets those locks when it clears (or
    moves its limit). A lock from the rebalancer on such a GPU would fight it: a higher one
    would undo the emergency's steady point (the cap would throttle again), a lower one would be
    reset by the emergency's clearing without the rebalancer knowing. Once the cap is lifted the
    GPU is the rebalancer's again (next round)."""
    reshaped = {a.endpoint for a in plan.actions if a.kind in RESHAPE_KINDS}
    gpus = {(n.node_id, g.index): g for n in snapshot.nodes for g in n.gpus}
    instances = []
    for inst in snapshot.instances:
        on = [gpus[(inst.node_id, i)] for i in inst.gpu_indices if (inst.node_id, i) in gpus]
        unknown = len(on) < len(inst.gpu_indices)
        if inst.endpoint in reshaped or unknown or any(g.emergency_cap_w > 0 for g in on):
            continue
        instances.append(replace(inst, sm_clock_mhz=_locked_mhz(on)))
    return replace(snapshot, instances=tuple(instances),
                   endpoints=tuple(e for e in snapshot.endpoints if e.name not in reshaped))


def unlock_for_starts(snapshot: ClusterSnapshot, plan: Plan) -> tuple[PlanAction, ...]:
    """reset_clocks for each full GPU a start of `plan` uses that reports a lock, unless an
    emergency caps it (see clock_view). MIG starts are left alone: their GPU's clock is shared
    with the other slices."""
    gpus = {(n.node_id, g.index): g for n in snapshot.nodes for g in n.gpus}
    out = []
    for a in plan.actions:
        if a.kind != "start_instance" or a.mig_profiles:
            continue
        for index in a.gpu_indices:
            g = gpus.get((a.node_id, index))
            if g is not None and g.sm_clock_locked_mhz is not None and g.emergency_cap_w <= 0:
                out.append(PlanAction(RESET, a.node_id, f"{a.instance_id} starts on this GPU: "
                                      f"the lock at {g.sm_clock_locked_mhz} MHz left on it is "
                                      "lifted (its clock is chosen next round)",
                                      endpoint=a.endpoint, instance_id=a.instance_id,
                                      gpu_indices=(index,)))
    return tuple(out)


def _locked_mhz(gpus: Sequence[GpuState]) -> int | None:
    """The lock the instance's GPUs share; None when unlocked or when they differ."""
    locks = {g.sm_clock_locked_mhz for g in gpus}
    return locks.pop() if len(locks) == 1 else None


def plan_actions(action: ClockAction) -> tuple[PlanAction, ...]:
    """One lock_clocks (or reset_clocks, for sm_clock_mhz None) plan action per GPU."""
    kind = RESET if action.sm_clock_mhz is None else LOCK
    return tuple(PlanAction(kind, action.node_id, action.reason, endpoint=action.endpoint,
                            instance_id=action.instance_id, gpu_indices=(index,),
                            sm_clock_mhz=action.sm_clock_mhz)
                 for index in action.gpu_indices)
