"""Cap arithmetic of an emergency (node id -> GPU index -> cap in W): tightening only ever
lowers, an adjusted limit never lifts a cap in between, clearing relaxes in steps, and a
restarted coordinator takes over the caps its nodes report."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import replace

from coordinator.emergency.records import Caps, Live, Track
from coordinator.policy.capping import shed as policy
from coordinator.registry import NodeRecord

CAP_TOLERANCE_W = 1.0


def lower_caps(current: Caps, proposed: Caps) -> Caps:
    """The proposed caps that are lower than the ones in force (a GPU without a cap has none)."""
    out: Caps = {}
    for node_id, caps in proposed.items():
        for index, cap_w in caps.items():
            if cap_w < current.get(node_id, {}).get(index, float("inf")) - CAP_TOLERANCE_W:
                out.setdefault(node_id, {})[index] = cap_w
    return out


def adjusted_caps(snapshot: policy.ShedSnapshot, current: Caps, raising: bool,
                  shed: Callable[[policy.ShedSnapshot], policy.ShedPlan]
                  ) -> tuple[policy.ShedPlan, Caps]:
    """The caps at a moved limit (shed cuts at it). Raising: a plan that counts every capped
    GPU at its maximum (the cap hides what it would draw), so a raise cannot overshoot.
    Lowering: every GPU gets the lower of its cap now and the plan's (none is raised)."""
    if raising:
        capped = {(n, i) for n, caps in current.items() for i in caps}
        snapshot = replace(snapshot, gpus=tuple(
            replace(g, power_draw_w=g.power_limit_max_w)
            if (g.node_id, g.gpu_index) in capped else g for g in snapshot.gpus))
        plan = shed(snapshot)
        return plan, plan.caps_by_node()
    plan = shed(snapshot)
    caps = {n: dict(c) for n, c in current.items() if c}
    for node_id, new in plan.caps_by_node().items():
        mine = caps.setdefault(node_id, {})
        for index, cap_w in new.items():
            mine[index] = min(cap_w, mine.get(index, cap_w))
    return plan, caps


def relaxed_caps(base_caps: Caps, max_w: dict[tuple[str, int], float], step: int,
                 steps: int) -> Caps:
    """Clearing step `step` of `steps`: each Phase 1 cap part way back to its GPU's maximum."""
    out: Caps = {}
    for node_id, caps in base_caps.items():
        for index, cap_w in caps.items():
            relaxed = policy.relaxed_cap_w(cap_w, max_w.get((node_id, index), cap_w), step, steps)
            if relaxed is not None:
                out.setdefault(node_id, {})[index] = relaxed
    return out


def caps_from_reports(live: Live, nodes: Iterable[NodeRecord]) -> Caps:
    """After a restart: the emergency caps the agents report in force. Records each reported
    GPU's maximum and gives each reporting node a track on the way."""
    out: Caps = {}
    for rec in nodes:
        for g in rec.report.gpus if rec.report is not None else ():
            live.max_w[(rec.node_id, g.index)] = g.power_limit_max_w
            live.tracks.setdefault(rec.node_id, Track())
            if g.power_ceiling_source.startswith("emergency"):
                out.setdefault(rec.node_id, {})[g.index] = g.power_ceiling_w
    return out
