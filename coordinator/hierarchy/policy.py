"""Pure policy of the coordinator hierarchy: a site limit -> per-row limits (the parent), and
what a leaf does on one of its rows when a row limit arrives. No I/O, no clock.

Split (Dynamo's upper controller): every row first gets what it cannot go below (its floor),
then the rest of the site limit goes where the demand is, never above a row's normal limit.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from shapeshifter.api.v1 import agent_pb2

LIMIT_TOLERANCE_W = 0.5  # row limits this close are the same limit (floats over the wire)


@dataclass(frozen=True)
class RowDemand:
    normal_w: float  # the row's normal power limit (topology)
    floor_w: float  # what the row cannot go below (node_floor_w summed)
    draw_w: float  # measured; a row with no report counts at its normal limit (worst case)


@dataclass(frozen=True)
class SiteSplit:
    limits_w: dict[str, float]
    infeasible: bool = False  # the floors exceed the site limit: split in proportion to floors


def node_floor_w(node: agent_pb2.Node) -> float:
    """What a node draws at the least: every GPU at its minimum power limit plus its measured
    non-GPU draw (host and fans). An estimate: fans slow down as the GPUs are capped, so the real
    floor is somewhat lower (the split errs on giving a row too much floor, not too little)."""
    gpus_w = sum(g.power_limit_min_w for g in node.gpus)
    other_w = max(0.0, node.budget.node_power_w - node.budget.gpu_power_w)
    return gpus_w + other_w


def row_floor_w(nodes: Iterable[agent_pb2.Node]) -> float:
    return sum(node_floor_w(n) for n in nodes)


def split_site_limit(site_limit_w: float, rows: Mapping[str, RowDemand]) -> SiteSplit:
    """Per-row limits whose sum is at most site_limit_w, each within [0, the row's normal].

    - The limit covers every row's normal limit: rows keep their normal limits.
    - Else each row gets its floor (capped at its normal), the remainder is shared in proportion
      to demand above the floor (draw - floor, capped at normal - floor), and what demand leaves
      over in proportion to the rows' remaining headroom.
    - The floors alone exceed the limit: the limit is split in proportion to the floors
      (infeasible: the rows cannot get under it by capping GPUs)."""
    site_limit_w = max(0.0, site_limit_w)
    normal = {name: max(0.0, r.normal_w) for name, r in rows.items()}
    if site_limit_w >= sum(normal.values()):
        return SiteSplit(normal)
    floor = {name: min(max(0.0, r.floor_w), normal[name]) for name, r in rows.items()}
    floors_w = sum(floor.values())
    if floors_w > site_limit_w:
        return SiteSplit({n: site_limit_w * f / floors_w for n, f in floor.items()}, True)
    above = {n: min(max(0.0, r.draw_w - floor[n]), normal[n] - floor[n])
             for n, r in rows.items()}
    give = _shares(site_limit_w - floors_w, above)
    left_w = site_limit_w - floors_w - sum(give.values())
    if left_w > 0:
        headroom = {n: normal[n] - floor[n] - give[n] for n in rows}
        extra = _shares(left_w, headroom)
        give = {n: give[n] + extra[n] for n in rows}
    return SiteSplit({n: min(normal[n], floor[n] + give[n]) for n in rows})


def _shares(amount_w: float, weights: Mapping[str, float]) -> dict[str, float]:
    """amount_w in proportion to weights, no share above its weight (all of it when the weights
    sum to at most amount_w)."""
    total = sum(weights.values())
    if total <= amount_w:
        return dict(weights)
    return {n: amount_w * w / total for n, w in weights.items()}


# ---------------------------------------------------------------- the leaf, per row

DECLARE, ADJUST, KEEP, CLEAR, NONE = "declare", "adjust", "keep", "clear", "none"
KEEP_LOCAL, BLOCKED_LOCAL, PENDING = "kept_local", "blocked_local", "pending"


@dataclass(frozen=True)
class InForce:
    """An emergency not yet cleared on the row (power, row scope)."""

    emergency_id: str
    power_limit_w: float
    state: str  # active | clearing
    ours: bool  # declared by this leaf for the parent (source "parent")
    resuming: bool = False  # found at start, waiting for the row's reports (not adjustable yet)
    auto: bool = False  # declared by the leaf's own detection (source "auto")


@dataclass(frozen=True)
class RowStep:
    action: str  # declare | adjust | keep | clear | none | kept_local | blocked_local | pending
    emergency_id: str = ""  # the emergency acted on or enforcing the row
    why: str = ""


def row_step(limit_w: float, normal_w: float, in_force: Sequence[InForce]) -> RowStep:
    """What a leaf does on a row for the parent's limit, given the emergencies in force there.
    An operator's emergency is never touched: a stricter one enforces the parent's limit as
    well; a milder one blocks it (the controller allows one power emergency per row) and is
    reported as such. An automatic one (detection, at the row's normal limit) is taken over by
    declaring: the controller moves it to the parent's limit in place (its caps never lift)."""
    ours = next((e for e in in_force if e.ours), None)
    local = next((e for e in in_force if not e.ours and not e.auto), None)
    auto = next((e for e in in_force if e.auto), None)
    if limit_w >= normal_w - LIMIT_TOLERANCE_W:
        if ours is not None and ours.state == "active":
            return RowStep(CLEAR, ours.emergency_id)
        return RowStep(NONE, ours.emergency_id if ours else "")
    if local is not None:
        if local.power_limit_w <= limit_w + LIMIT_TOLERANCE_W:
            return RowStep(KEEP_LOCAL, local.emergency_id)
        return RowStep(BLOCKED_LOCAL, local.emergency_id,
                       f"local emergency {local.emergency_id} at {local.power_limit_w:.0f} W is "
                       f"milder than the parent's {limit_w:.0f} W and is not changed by the leaf")
    if ours is None and auto is not None and (auto.state != "active" or auto.resuming):
        why = "clearing" if auto.state != "active" else "resuming after a restart"
        return RowStep(PENDING, auto.emergency_id,
                       f"automatic emergency {auto.emergency_id} is {why}")
    if ours is None:
        return RowStep(DECLARE, auto.emergency_id if auto is not None else "")
    if ours.state != "active" or ours.resuming:
        why = "clearing" if ours.state != "active" else "resuming after a restart"
        return RowStep(PENDING, ours.emergency_id, f"emergency {ours.emergency_id} is {why}")
    if abs(ours.power_limit_w - limit_w) <= LIMIT_TOLERANCE_W:
        return RowStep(KEEP, ours.emergency_id)
    return RowStep(ADJUST, ours.emergency_id)
