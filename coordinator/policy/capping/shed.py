"""Emergency load shedding (DESIGN §5 Shed, TAPAS §4.4): snapshot + new limit -> per-GPU caps.

Pure: no I/O, no clock. The coordinator's emergency controller, the simulator, the tests and the
bench call the same functions.

Phase 1 takes the cut in tiers, cheapest first, weighing what a watt costs (issue 18). Each GPU
may state a floor (`floor_w`): the draw below which cutting it costs its class something — for a
SaaS GPU the draw at the clock that still serves its batch and that its endpoint's measured
latency needs, for an opaque GPU the draw at the clock that keeps its relative performance at
the contract's floor (0.97, `OPAQUE_MIN_REL_PERF`). The range above a floor is free:
  0. best-effort instances (and GPUs serving nothing),
  1. SaaS slack above the floor, memory-bound (decode-heavy) instances first (a lower clock
     costs them least: OASIS Table 3, -39% power for -7% tokens/s), then
  2. compute-bound (prefill-heavy) ones,
  3. opaque (IaaS) GPUs down to their performance floor;
  4. below the floors every class gives the same share of what it has left. Taking the rest
     from the SaaS GPUs first would put them at their minimum limit, where the requests
     stretch past the SLO (a cliff), to spare the opaque GPUs a few percent: in the simulator's
     oversubscription sweep that order kept opaque at 0.95 and SLO at 69% at +40%, the shared
     cut 0.86 and 96% (the baseline's uniform caps: 0.86 and 90%).
     `saas_deep_weight` (0..1) is the share of its range below the floor a SaaS GPU offers in
     this tier; the rest comes last (5). The caller closes it on the opaque tenants' measured
     relative performance (`deep_weight_for`): while it stays above the contract's floor the
     opaque GPUs take the deep cut first, as it nears the floor the cut is shared again.
Without floors (floor_w = 0) the order is best-effort, SaaS, opaque, as TAPAS keeps opaque
performance whole. Within a tier every GPU gives up the same fraction of what it can give there,
so equals are treated alike; a tier is only touched when the ones before it are not enough. GPUs
outside the cut are left uncapped. When even every GPU at its minimum limit is not enough, the
plan says how much is missing and escalates: stop the best-effort instances.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace

from shapeshifter.hw import physics

BEST_EFFORT, SAAS, IAAS = "best_effort", "saas", "iaas"
PRIORITY_CLASSES = (BEST_EFFORT, SAAS, IAAS)
MEMORY_BOUND_SHARE = 0.5  # compute share below this: the step time barely follows the clock
DEFAULT_SEVERITIES = (0.9, 0.75, 0.5)
TIER_NAMES = ("best-effort", "flexible memory-bound slack", "flexible compute-bound slack",
              "opaque above its floor", "below the floors", "flexible below its floor, last")
OPAQUE_MIN_REL_PERF = 0.97  # the opaque tenants' contract: relative performance never below
OPAQUE_DECODE_FRAC = 0.5  # opaque work is neither decode nor prefill: half memory-bound
SHORTFALL_EPS_W = 1e-6
DEEP_TIER = 4  # below the floors every class gives the same share of what it has left
LAST_TIER = 5  # what a SaaS GPU does not offer in the deep tier (saas_deep_weight < 1)
# deep_weight_for: SaaS are spared below their floor while the opaque tenants' measured relative
# performance is this far above OPAQUE_MIN_REL_PERF, and share equally at the floor itself.
OPAQUE_PERF_BAND = 0.01
SLACK_HEADROOM = 1.1  # a SaaS GPU's floor keeps 10% over its batch (bursts within a report)


@dataclass(frozen=True)
class SheddableGpu:
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
    floor_w: float = 0.0  # cutting below this draw costs the GPU's class (see the module doc)


@dataclass(frozen=True)
class ShedSnapshot:
    gpus: tuple[SheddableGpu, ...]
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


def free_tier(g: SheddableGpu) -> int:
    """The tier of the GPU's range above its floor (of all of it when it has none)."""
    if g.priority_class == IAAS:
        return 3
    if g.priority_class == SAAS:
        share = physics.compute_share(min(1.0, max(0.0, g.decode_frac)))
        return 1 if share < MEMORY_BOUND_SHARE else 2
    return 0


def segments(g: SheddableGpu, saas_deep_weight: float = 1.0) -> list[tuple[int, float]]:
    """(tier, watts it can give there) for the GPU's range above and below its floor."""
    lo, hi = g.power_limit_min_w, g.power_draw_w
    if hi <= lo:
        return []
    free = free_tier(g)
    if free == 0:
        return [(0, hi - lo)]
    floor = min(max(g.floor_w, lo), hi)
    deep = floor - lo
    share = min(1.0, max(0.0, saas_deep_weight)) if g.priority_class == SAAS else 1.0
    parts = ((free, hi - floor), (DEEP_TIER, share * deep), (LAST_TIER, (1.0 - share) * deep))
    return [(t, w) for t, w in parts if w > 0]


def deep_weight_for(opaque_rel_perf: float | None, floor: float = OPAQUE_MIN_REL_PERF,
                    band: float = OPAQUE_PERF_BAND) -> float:
    """saas_deep_weight from the opaque tenants' measured relative performance: 0 (the opaque
    GPUs go first below the floors) at floor + band and above, 1 (shared) at the floor and
    below, linear between; 1 when nothing has been measured."""
    if opaque_rel_perf is None:
        return 1.0
    return min(1.0, max(0.0, (floor + band - opaque_rel_perf) / band))


def reducible_w(g: SheddableGpu) -> float:
    return max(0.0, g.power_draw_w - g.power_limit_min_w)


def shed(snapshot: ShedSnapshot, limit_w: float, margin_frac: float = 0.05,
         saas_deep_weight: float = 1.0) -> ShedPlan:
    """Caps that bring the scope's draw to limit_w * (1 - margin_frac), cheapest tier first."""
    target_w = limit_w * (1.0 - margin_frac)
    draw_w = snapshot.power_draw_w
    need_w = draw_w - target_w
    cut_by_gpu: dict[int, float] = {}
    last_tier: dict[int, int] = {}
    for t, members in _tiers(snapshot.gpus, saas_deep_weight):
        if need_w <= 0:
            break
        available_w = sum(w for _, w in members)
        frac = min(1.0, need_w / available_w)
        for k, w in members:
            cut_by_gpu[k] = cut_by_gpu.get(k, 0.0) + frac * w
            last_tier[k] = t
        need_w -= frac * available_w
    caps = [_cap(snapshot.gpus[k], cut_by_gpu[k], TIER_NAMES[last_tier[k]])
            for k in sorted(cut_by_gpu, key=lambda k: (snapshot.gpus[k].node_id,
                                                       snapshot.gpus[k].gpu_index))
            if cut_by_gpu[k] > 0]
    shortfall_w = need_w if need_w > SHORTFALL_EPS_W else 0.0  # float sums of the tiers
    stops = _escalation(snapshot.gpus) if shortfall_w > 0 else ()
    cut_w = sum(c.cut_w for c in caps)
    return ShedPlan(limit_w, target_w, draw_w, draw_w - cut_w, tuple(caps), shortfall_w, stops)


def _tiers(gpus: Sequence[SheddableGpu], saas_deep_weight: float
           ) -> list[tuple[int, list[tuple[int, float]]]]:
    """Per tier (ascending): (GPU position in `gpus`, watts it can give in that tier)."""
    by_tier: dict[int, list[tuple[int, float]]] = {}
    for k, g in enumerate(gpus):
        for t, w in segments(g, saas_deep_weight):
            by_tier.setdefault(t, []).append((k, w))
    return sorted(by_tier.items())


def _cap(g: SheddableGpu, cut_w: float, tier_name: str) -> GpuCap:
    cap_w = max(g.power_limit_min_w, g.power_draw_w - cut_w)
    at_min = " (at its minimum limit)" if math.isclose(cap_w, g.power_limit_min_w) else ""
    return GpuCap(g.node_id, g.gpu_index, cap_w, g.power_draw_w - cap_w,
                  f"{tier_name}: {g.power_draw_w:.0f} -> {cap_w:.0f} W{at_min}")


def clock_frac_for_rel(rel: float, decode_frac: float) -> float:
    """The clock (as a share of the maximum) at which work of this decode share runs at `rel`
    of its maximum-clock throughput: physics.relative_throughput solved for the clock."""
    share = physics.compute_share(min(1.0, max(0.0, decode_frac)))
    if rel <= 0 or share <= 0:
        return 0.0
    denom = 1.0 / min(rel, 1.0) - (1.0 - share)
    return 1.0 if denom <= share else share / denom


def floor_draw_w(draw_w: float, idle_w: float, clock_frac_now: float,
                 clock_frac_floor: float) -> float:
    """The draw at a lower clock for the same activity: the dynamic part scales with
    clock^POWER_CLOCK_EXPONENT (physics.power_w)."""
    if clock_frac_now <= 0 or clock_frac_floor >= clock_frac_now:
        return draw_w
    ratio = (clock_frac_floor / clock_frac_now) ** physics.POWER_CLOCK_EXPONENT
    return idle_w + max(0.0, draw_w - idle_w) * ratio


def opaque_floor_w(draw_w: float, idle_w: float, clock_frac_now: float = 1.0,
                   min_rel_perf: float = OPAQUE_MIN_REL_PERF) -> float:
    """An opaque GPU's floor: its draw at the clock that keeps min_rel_perf of the performance
    it has at the maximum clock."""
    return floor_draw_w(draw_w, idle_w, clock_frac_now,
                        clock_frac_for_rel(min_rel_perf, OPAQUE_DECODE_FRAC))


def saas_floor_from_occupancy(draw_w: float, idle_w: float, occupancy: float,
                              decode_frac: float, clock_frac_now: float = 1.0,
                              min_clock_frac: float = 0.0) -> float:
    """saas_floor_w from the batch occupancy (running / max concurrency, 1 when requests wait)
    at the clock it runs at now, with SLACK_HEADROOM to spare."""
    # In MHz: relative_throughput counts clocks in MHz (a clock below 1 MHz is off).
    rel_now = physics.relative_throughput(clock_frac_now * 1000.0, 1000.0, decode_frac)
    load = min(1.0, occupancy * SLACK_HEADROOM) * float(rel_now)
    return saas_floor_w(draw_w, idle_w, load, decode_frac, clock_frac_now, min_clock_frac)


def saas_floor_w(draw_w: float, idle_w: float, load_frac: float, decode_frac: float,
                 clock_frac_now: float = 1.0, min_clock_frac: float = 0.0) -> float:
    """A SaaS GPU's floor: its draw at the clock whose throughput still covers its load
    (`load_frac`: the share of its maximum-clock capacity it serves now, 1 = saturated), and
    not below `min_clock_frac` (the endpoint's latency floor: a lower clock stretches every
    request, which no capacity cures)."""
    clock = max(clock_frac_for_rel(min(1.0, load_frac), decode_frac), min_clock_frac)
    return floor_draw_w(draw_w, idle_w, clock_frac_now, clock)


def _escalation(gpus: Iterable[SheddableGpu]) -> tuple[InstanceStop, ...]:
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
    clocks = point.supported_clocks_mhz
    if not clocks:
        return None

    def fits(c: int) -> bool:
        return physics.power_w(point.activity, c, point.max_clock_mhz, point.idle_power_w,
                               point.dynamic_power_max_w) <= cap_w

    if point.activity <= 0:
        return max(clocks) if fits(max(clocks)) else None
    # The draw rises with the clock: start from the continuous solution, then check the
    # table around it (float edges) instead of evaluating every supported clock.
    guess = physics.clock_at_power_mhz(cap_w, point.activity, point.max_clock_mhz,
                                       point.idle_power_w, point.dynamic_power_max_w)
    ordered = sorted(clocks)
    k = bisect.bisect_right(ordered, guess)
    for c in (ordered[i] for i in range(min(k + 1, len(ordered)) - 1, -1, -1)):
        if fits(c):
            return c
    return None
