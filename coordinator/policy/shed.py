"""Emergency load shedding (DESIGN §5 Shed, TAPAS §4.4): snapshot + new limit -> per-GPU caps.

Pure: no I/O, no clock. The coordinator's emergency controller, the tests and the bench call the
same functions.

Phase 1 takes the cut in tiers, cheapest to slow first:
  0. best-effort instances (and GPUs serving nothing),
  1. flexible (SaaS) instances that are memory-bound / decode-heavy (a lower clock costs them
     least: OASIS Table 3, -39% power for -7% tokens/s),
  2. flexible compute-bound (prefill-heavy) instances,
  3. opaque (IaaS) GPUs, last (TAPAS keeps their performance whole).
Within a tier every GPU gives up the same fraction of what it can give (draw - minimum limit), so
equals are treated alike; a tier is only touched when the ones before it are not enough. GPUs
outside the cut are left uncapped. When even every GPU at its minimum limit is not enough, the
plan says how much is missing and escalates: stop the best-effort instances.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace

from nodeagent.gpu import physics

BEST_EFFORT, SAAS, IAAS = "best_effort", "saas", "iaas"
PRIORITY_CLASSES = (BEST_EFFORT, SAAS, IAAS)
MEMORY_BOUND_SHARE = 0.5  # compute share below this: the step time barely follows the clock
DEFAULT_SEVERITIES = (0.9, 0.75, 0.5)
TIER_NAMES = ("best-effort", "flexible memory-bound", "flexible compute-bound", "opaque")


@dataclass(frozen=True)
class GpuState:
    node_id: str
    gpu_index: int
    power_draw_w: float
    power_limit_min_w: float
    power_limit_max_w: float
    priority_class: str = BEST_EFFORT  # of the instance on the GPU; best_effort when none
    decode_frac: float = 0.5  # share of decode work (1 = all decode, memory-bound)
    instance_ids: tuple[str, ...] = ()
    row: str = ""
    aisle: str = ""


@dataclass(frozen=True)
class ShedSnapshot:
    gpus: tuple[GpuState, ...]
    other_power_w: float = 0.0  # hosts' idle and fan draw in the scope (not cappable here)

    @property
    def power_draw_w(self) -> float:
        return self.other_power_w + sum(g.power_draw_w for g in self.gpus)


@dataclass(frozen=True)
class GpuCap:
    node_id: str
    gpu_index: int
    power_cap_w: float
    cut_w: float
    reason: str


@dataclass(frozen=True)
class InstanceStop:
    node_id: str
    instance_id: str
    frees_w: float  # estimated: its GPUs' draw above their minimum limit


@dataclass(frozen=True)
class ShedPlan:
    limit_w: float
    target_w: float  # limit less the margin
    power_draw_w: float
    expected_w: float  # draw once the caps hold (before any escalation)
    caps: tuple[GpuCap, ...]
    shortfall_w: float  # > 0: the caps cannot reach the target by this much
    stop_instances: tuple[InstanceStop, ...] = ()

    @property
    def feasible(self) -> bool:
        return self.shortfall_w <= 0.0

    def caps_by_node(self) -> dict[str, dict[int, float]]:
        out: dict[str, dict[int, float]] = {}
        for c in self.caps:
            out.setdefault(c.node_id, {})[c.gpu_index] = c.power_cap_w
        return out


def tier(g: GpuState) -> int:
    if g.priority_class == IAAS:
        return 3
    if g.priority_class == SAAS:
        share = physics.compute_share(min(1.0, max(0.0, g.decode_frac)))
        return 1 if share < MEMORY_BOUND_SHARE else 2
    return 0


def reducible_w(g: GpuState) -> float:
    return max(0.0, g.power_draw_w - g.power_limit_min_w)


def shed(snapshot: ShedSnapshot, limit_w: float, margin_frac: float = 0.05) -> ShedPlan:
    """Caps that bring the scope's draw to limit_w * (1 - margin_frac), cheapest tier first."""
    target_w = limit_w * (1.0 - margin_frac)
    draw_w = snapshot.power_draw_w
    need_w = draw_w - target_w
    caps: list[GpuCap] = []
    for t, members in _tiers(snapshot.gpus):
        if need_w <= 0:
            break
        tier_caps, taken_w = _cut_tier(members, need_w, TIER_NAMES[t])
        caps.extend(tier_caps)
        need_w -= taken_w
    shortfall_w = max(0.0, need_w)
    stops = _escalation(snapshot.gpus) if shortfall_w > 0 else ()
    cut_w = sum(c.cut_w for c in caps)
    return ShedPlan(limit_w, target_w, draw_w, draw_w - cut_w, tuple(caps), shortfall_w, stops)


def _tiers(gpus: Iterable[GpuState]) -> list[tuple[int, list[GpuState]]]:
    by_tier: dict[int, list[GpuState]] = {}
    for g in gpus:
        by_tier.setdefault(tier(g), []).append(g)
    return sorted(by_tier.items())


def _cut_tier(members: Sequence[GpuState], need_w: float,
              tier_name: str) -> tuple[list[GpuCap], float]:
    """The same fraction of every member's reducible draw, just enough to cover need_w."""
    available_w = sum(reducible_w(g) for g in members)
    if available_w <= 0:
        return [], 0.0
    frac = min(1.0, need_w / available_w)
    caps = []
    for g in sorted(members, key=lambda g: (g.node_id, g.gpu_index)):
        cut_w = frac * reducible_w(g)
        if cut_w <= 0:
            continue
        cap_w = max(g.power_limit_min_w, g.power_draw_w - cut_w)
        at_min = " (at its minimum limit)" if math.isclose(cap_w, g.power_limit_min_w) else ""
        caps.append(GpuCap(g.node_id, g.gpu_index, cap_w, cut_w,
                           f"{tier_name}: {g.power_draw_w:.0f} -> {cap_w:.0f} W{at_min}"))
    return caps, frac * available_w


def _escalation(gpus: Iterable[GpuState]) -> tuple[InstanceStop, ...]:
    frees: dict[tuple[str, str], float] = {}
    for g in gpus:
        if g.priority_class != BEST_EFFORT:
            continue
        for instance_id in g.instance_ids:
            key = (g.node_id, instance_id)
            frees[key] = frees.get(key, 0.0) + reducible_w(g)
    return tuple(InstanceStop(n, i, w) for (n, i), w in sorted(frees.items()))


# ---------------------------------------------------------------- pre-armed caps


@dataclass(frozen=True)
class PrearmedCaps:
    """Per node: capacity fraction -> {gpu index: cap W} (a GPU absent stays uncapped)."""
    by_node: dict[str, dict[float, dict[int, float]]] = field(default_factory=dict)


def prearm(snapshot: ShedSnapshot, normal_limit_w: float,
           severities: Sequence[float] = DEFAULT_SEVERITIES,
           margin_frac: float = 0.05) -> PrearmedCaps:
    """What every node applies by itself if the scope's capacity drops to each severity and the
    coordinator is gone: the Phase 1 caps of that severity, computed ahead of time for the worst
    case, every GPU drawing its maximum limit (the node is on its own then, and the load at the
    time of the failure is unknown). A node with no cap at a severity still gets an (empty)
    entry, so it knows it is covered."""
    by_node: dict[str, dict[float, dict[int, float]]] = {
        g.node_id: {s: {} for s in severities} for g in snapshot.gpus}
    worst = ShedSnapshot(tuple(replace(g, power_draw_w=g.power_limit_max_w)
                               for g in snapshot.gpus), snapshot.other_power_w)
    for s in severities:
        plan = shed(worst, normal_limit_w * s, margin_frac)
        for node_id, caps in plan.caps_by_node().items():
            by_node[node_id][s] = caps
    return PrearmedCaps(by_node)


def level_for(levels: Iterable[float], capacity_frac: float) -> float | None:
    """The pre-armed level to use for a declared capacity: the mildest one at or below it
    (enough), else the harshest there is; None when there are none."""
    levels = sorted(levels)
    if not levels:
        return None
    at_or_below = [s for s in levels if s <= capacity_frac + 1e-9]
    return at_or_below[-1] if at_or_below else levels[0]


# ---------------------------------------------------------------- clearing and Phase 2


def relaxed_cap_w(cap_w: float, max_w: float, step: int, steps: int) -> float | None:
    """Step k of n of the way back from cap_w to max_w; None at the last step (lifted)."""
    if step >= steps:
        return None
    return cap_w + (max_w - cap_w) * step / steps


@dataclass(frozen=True)
class ClockPoint:
    activity: float
    supported_clocks_mhz: tuple[int, ...]
    max_clock_mhz: int
    idle_power_w: float
    dynamic_power_max_w: float


def locked_clock_mhz(cap_w: float, point: ClockPoint) -> int | None:
    """Phase 2: the highest supported clock whose predicted draw at the GPU's activity fits
    under cap_w (a steady operating point instead of the cap's throttling). None when even the
    lowest clock does not fit, or when the GPU has no supported clocks."""
    fitting = [c for c in point.supported_clocks_mhz
               if physics.power_w(point.activity, c, point.max_clock_mhz, point.idle_power_w,
                                  point.dynamic_power_max_w) <= cap_w]
    return max(fitting) if fitting else None
