"""Make-before-break staging: order starts and stops so capacity never drops below demand.

Each stage holds starts whose GPUs are already empty (with the MIG preparation they need) and
whose power keeps every row and aisle within its limits, then stops that leave the endpoint's
verified capacity (instances started in earlier stages count, those of this stage do not) at or
above its demand. A start that needs a GPU an old instance holds waits until that instance is
stopped. Whatever cannot be ordered safely is left out of the plan, with a warning.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from coordinator.policy.model import PlanAction, Stage
from coordinator.policy.packing.ledger import Ledger

_EPS = 1e-9


@dataclass(frozen=True)
class StartOp:
    action: PlanAction
    prep: tuple[PlanAction, ...]  # MIG mode / layout on its GPU, run right before it
    needs_empty: tuple[tuple[str, int], ...]  # GPUs that must host no old instance
    needs_slice: str  # an existing MIG slice (uuid) that must be free, or ""
    extra_gpu_w: float  # node GPU power it adds
    capacity_rps: float
    over_limits: bool = False  # placed over row/aisle limits (RebalanceConfig.place_over_limits)


@dataclass(frozen=True)
class StopOp:
    action: PlanAction
    gpus: tuple[tuple[str, int], ...]
    mig_uuid: str
    extra_gpu_w: float  # node GPU power it frees
    capacity_rps: float


@dataclass
class _State:
    capacity_rps: dict[str, float]  # endpoint -> verified serving capacity
    on_gpu: dict[tuple[str, int], set[str]]  # old instances still holding a GPU
    slice_holder: dict[str, str]  # MIG uuid -> old instance holding it


def stage_plan(starts: Sequence[StartOp], stops: Sequence[StopOp],
               capacity_rps: Mapping[str, float], demand_rps: Mapping[str, float],
               ledger: Ledger) -> tuple[list[Stage], list[str]]:
    """(stages, warnings). `ledger` holds the power of the instances running now; it is
    updated as the stages would change it."""
    state = _State(dict(capacity_rps), defaultdict(set), {})
    for op in stops:
        for g in op.gpus:
            state.on_gpu[g].add(op.action.instance_id)
        if op.mig_uuid:
            state.slice_holder[op.mig_uuid] = op.action.instance_id
    pending_starts, pending_stops = list(starts), list(stops)
    stages: list[Stage] = []
    while pending_starts or pending_stops:
        started = _take_starts(pending_starts, state, ledger)
        stopped = _take_stops(pending_stops, state, demand_rps, ledger)
        if not started and not stopped:
            break
        for op in started:
            ep = op.action.endpoint
            state.capacity_rps[ep] = state.capacity_rps.get(ep, 0.0) + op.capacity_rps
        actions = [a for op in started for a in (*op.prep, op.action)]
        actions += [op.action for op in stopped]
        stages.append(Stage(tuple(actions), _stage_reason(len(stages) + 1, started, stopped),
                            dict(ledger.row_w), dict(ledger.aisle_cfm)))
    warnings = [f"deferred {op.action.kind} {op.action.instance_id} on {op.action.node_id}: "
                f"no safe order (capacity would fall below demand or a limit would be exceeded)"
                for op in (*pending_starts, *pending_stops)]
    return stages, warnings


def _take_starts(pending: list[StartOp], state: _State, ledger: Ledger) -> list[StartOp]:
    taken, left = [], []
    for op in pending:
        if (any(state.on_gpu.get(g) for g in op.needs_empty)
                or (op.needs_slice and op.needs_slice in state.slice_holder)
                or (not op.over_limits and ledger.violation(op.action.node_id,
                                                            op.extra_gpu_w))):
            left.append(op)
            continue
        ledger.apply(op.action.node_id, op.extra_gpu_w)
        taken.append(op)
    pending[:] = left  # not list.remove: comparing frozen dataclasses field by field is O(n²)
    return taken


def _take_stops(pending: list[StopOp], state: _State, demand_rps: Mapping[str, float],
                ledger: Ledger) -> list[StopOp]:
    taken, waiting = [], []
    for op in pending:
        ep = op.action.endpoint
        left = state.capacity_rps.get(ep, 0.0) - op.capacity_rps
        if left + _EPS < demand_rps.get(ep, 0.0):
            waiting.append(op)
            continue
        state.capacity_rps[ep] = left
        for g in op.gpus:
            state.on_gpu[g].discard(op.action.instance_id)
        state.slice_holder.pop(op.mig_uuid, None)
        ledger.apply(op.action.node_id, -op.extra_gpu_w)
        taken.append(op)
    pending[:] = waiting
    return taken


def _stage_reason(n: int, started: list[StartOp], stopped: list[StopOp]) -> str:
    parts = []
    if started:
        parts.append(f"start {len(started)} instance(s)")
    if stopped:
        parts.append(f"stop {len(stopped)} replaced instance(s) once the earlier stages are "
                     "verified ready")
    return f"stage {n}: " + " and ".join(parts)
