"""Emergency Phase 2 (DESIGN §5 Shed, TAPAS §4.4): caps in force -> clock points, routing and
the capacity to add elsewhere. Pure: the live emergency controller and the simulator call it on
the same kind of snapshot.

Given the GPUs under a cap:
- clock point: each capped GPU is locked at the highest supported clock whose predicted draw at
  its activity fits the cap (a steady operating point instead of the cap's throttling;
  shed.locked_clock_mhz). A GPU the operator locked keeps its lock;
- routing: a capped instance's weight is multiplied by its relative throughput at that clock,
  so its endpoint's load moves to the instances that are not capped;
- capacity to add: per endpoint, the instance-equivalents (at the maximum clock) its capped
  instances lost; the rebalancer adds them where rows and aisles have headroom, make before
  break (RebalanceConfig.place_over_limits lets an under-covered endpoint go over them).
When the caps relax the GPUs leave this snapshot: their locks are reset, their weights come
back, and the capacity added is given back in steps by the ordinary scale-in (at most a share
of an endpoint's capacity per plan, after a clean lateness window).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from coordinator.policy.capping.shed import ClockPoint, locked_clock_mhz
from shapeshifter.hw import physics

GpuKey = tuple[str, int]  # (node id, GPU index)
MAX_LOST_SHARE = 0.9  # an endpoint's demand is raised for at most this share of it lost


@dataclass(frozen=True)
class CappedGpu:
    key: GpuKey
    cap_w: float
    point: ClockPoint  # activity now, supported clocks, power model
    endpoint: str = ""  # the LLM endpoint its instance serves; "" = opaque or nothing
    decode_frac: float = 0.5  # of that endpoint's work (how much a lower clock costs it)
    operator_locked: bool = False  # a lock set by hand stays as it is


@dataclass(frozen=True)
class Phase2Plan:
    clock_mhz: dict[GpuKey, int] = field(default_factory=dict)  # locks to set
    weight_mult: dict[GpuKey, float] = field(default_factory=dict)  # routing multipliers
    lost_instances: dict[str, float] = field(default_factory=dict)  # per endpoint

    @property
    def empty(self) -> bool:
        return not self.clock_mhz and not self.weight_mult


def plan_phase2(gpus: Sequence[CappedGpu]) -> Phase2Plan:
    """Clock points, routing multipliers and lost capacity for the capped GPUs."""
    clocks: dict[GpuKey, int] = {}
    mult: dict[GpuKey, float] = {}
    lost: dict[str, float] = {}
    for g in sorted(gpus, key=lambda g: g.key):
        p = g.point
        fit = locked_clock_mhz(g.cap_w, p)
        if fit is not None and fit < p.max_clock_mhz and not g.operator_locked:
            clocks[g.key] = fit
        # Where even the lowest clock does not fit at this activity the cap throttles below
        # the table: count that GPU at the lowest clock.
        mhz = fit if fit is not None else min(p.supported_clocks_mhz, default=p.max_clock_mhz)
        if not g.endpoint:
            continue
        rel = float(physics.relative_throughput(mhz, p.max_clock_mhz, g.decode_frac))
        if rel < 1.0:
            mult[g.key] = rel
            lost[g.endpoint] = lost.get(g.endpoint, 0.0) + 1.0 - rel
    return Phase2Plan(clocks, mult, lost)


def demand_with_lost(demand_rps: float, lost_instances: float, instances: int) -> float:
    """The demand to provision when caps took `lost_instances` (instance-equivalents at the
    maximum clock) of an endpoint's `instances`: what the capped capacity no longer serves is
    asked of new instances, so the whole is the demand over the share not lost."""
    if instances <= 0 or lost_instances <= 0:
        return demand_rps
    return demand_rps / (1.0 - min(lost_instances / instances, MAX_LOST_SHARE))
