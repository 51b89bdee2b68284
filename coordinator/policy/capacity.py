"""Closed-loop capacity: demand forecast with a headroom measured from the demand itself, and a
correction of the profiled capacity from observed lateness, queueing and saturation. Pure
functions of their inputs; the caller keeps the state (the correction factor) between calls.

Forecast (`forecast`): arrivals binned per routing interval, oldest first. The level is the
mean of the recent bins, the trend a least-squares slope over the window (only growth is
projected: the capacity being provisioned must serve until the next one can start), and the
headroom z x sigma, sigma the standard deviation of the bins around that fit. So a smooth
trace gets little headroom and a bursty one more, with no constant fitted to either; z is the
normal quantile of the share of intervals allowed to run short (default 1%). A demand that
jumps between levels is covered by the quantile of the rises seen within one lead time (the
time new capacity takes to serve), whichever of the three is larger.

Correction (`update_correction`, as NVIDIA Dynamo's SLA planner corrects its profiles): when
most of an endpoint's instances are saturated (a full batch and requests waiting), what they
serve *is* their capacity, so the factor moves towards served / profiled. Independently, more
requests over the SLO than the budget while instances queue cuts it multiplicatively, and an
interval well within budget lets it creep back up, never above what saturation last measured
(AIMD on measured latency).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

from shapeshifter.common.errors import out_of_range


@dataclass(frozen=True)
class Forecast:
    level_rps: float
    trend_rps_per_s: float
    sigma_rps: float
    provision_rps: float  # level + the larger of: projected growth, a likely rise, z x sigma
    rise_rps: float = 0.0  # the (1 - short_fraction) quantile of rises over the lead time


def forecast(rates_rps: Sequence[float] | np.ndarray, bin_s: float, lead_s: float,
             short_fraction: float = 0.01, level_bins: int = 0) -> Forecast:
    """Forecast from per-bin arrival rates (oldest first). `lead_s`: how far ahead the
    capacity must hold (instance start + decision interval for counts, ~0 for clocks);
    `short_fraction`: the share of bins allowed to exceed the provision; `level_bins`: how many
    recent bins the level averages (0 = a quarter of the window, at least one)."""
    r = np.asarray(rates_rps, float)
    if len(r) == 0:
        return Forecast(0.0, 0.0, 0.0, 0.0)
    if not 0.0 < short_fraction < 0.5:
        raise out_of_range("short_fraction", short_fraction, 0.0, 0.5)
    k = level_bins or max(1, len(r) // 4)
    level = float(r[-k:].mean())
    slope, sigma = _fit(r, bin_s)
    z = NormalDist().inv_cdf(1.0 - short_fraction)
    growth = max(slope, 0.0) * (lead_s + 0.5 * k * bin_s)  # the level lags by half its window
    rise = _rise(r, max(1, round(lead_s / bin_s)), 1.0 - short_fraction)
    return Forecast(level, slope, sigma, level + max(growth, rise, z * sigma), rise)


def _rise(r: np.ndarray, lag: int, q: float) -> float:
    """How much the rate rose within `lag` bins, at quantile q, over the history: the jump a
    level-switching (bursty) demand makes before new capacity can serve. 0 without history."""
    if len(r) <= lag + 2:
        return 0.0
    return max(float(np.quantile(r[lag:] - r[:-lag], q)), 0.0)


def _fit(r: np.ndarray, bin_s: float) -> tuple[float, float]:
    """(slope per second, residual standard deviation) of a least-squares line."""
    if len(r) < 3:
        return 0.0, float(np.sqrt(max(r.mean(), 0.0) / bin_s))  # Poisson, nothing else known
    t = np.arange(len(r)) * bin_s
    slope, intercept = np.polyfit(t, r, 1)
    resid = r - (slope * t + intercept)
    return float(slope), float(resid.std(ddof=2))


@dataclass(frozen=True)
class CapacityObservation:
    """One endpoint over the last interval."""

    served_rps: float  # requests completed per second, all its serving instances
    arrival_rps: float  # requests arriving per second
    instances: int  # serving instances
    saturated_frac: float  # share of them with a full batch and requests waiting
    queued_frac: float  # share of them with any request waiting for a batch slot
    late_frac: float | None  # share of completed requests over the SLO; None = none completed
    profile_capacity_rps: float  # one instance, from the profile, at the clock it ran at
    # Whether the lateness is significantly over the budget (`late_over_budget`); None: the
    # late share above the budget is taken as over.
    over_budget: bool | None = None


@dataclass(frozen=True)
class CorrectionState:
    factor: float = 1.0  # true capacity / profiled capacity
    measured_ceiling: float = math.inf  # the last saturated measurement (smoothed)
    hold: int = 0  # intervals before the next cut (the lateness window must turn over first)


@dataclass(frozen=True)
class CorrectionConfig:
    late_budget: float = 0.005  # share of requests over the SLO allowed: half the 1% of 99%
    decrease: float = 0.9  # multiplicative cut over budget while covered (once per hold)
    increase: float = 0.001  # additive recovery per interval well within budget
    hold_intervals: int = 12  # after a cut, the late window's length: one cut per event
    saturated_quorum: float = 0.5  # this share of instances saturated: served = capacity
    queued_quorum: float = 0.2  # this share queueing: lateness is the load's doing
    busy_utilization: float = 0.5  # or serving this share of their profiled capacity
    smoothing: float = 0.3  # weight of a new saturated measurement
    floor: float = 0.3
    ceiling: float = 1.5

    def validate(self) -> CorrectionConfig:
        if not 0.0 < self.late_budget < 0.5:
            raise out_of_range("late_budget", self.late_budget, 0.0, 0.5)
        if not 0.0 < self.decrease < 1.0:
            raise out_of_range("decrease", self.decrease, 0.0, 1.0)
        if not 0.0 < self.floor < 1.0:
            raise out_of_range("floor", self.floor, 0.0, 1.0)
        if not 1.0 <= self.ceiling <= 10.0:
            raise out_of_range("ceiling", self.ceiling, 1.0, 10.0)
        return self


def update_correction(state: CorrectionState, obs: CapacityObservation,
                      config: CorrectionConfig = CorrectionConfig()) -> CorrectionState:
    """One interval: saturation measures the capacity. Lateness (over the caller's window)
    while the corrected capacity was believed to cover the arrivals, and instances queue or
    serve over half their profiled capacity, cuts the factor (they serve less within the SLO
    than the profile says). Lateness while arrivals exceed the believed capacity is the
    provisioning's doing (the forecast's to fix), and lateness on lightly loaded instances the
    requests' own length, which no capacity cures: neither moves it."""
    f, ceiling, hold = state.factor, state.measured_ceiling, max(state.hold - 1, 0)
    saturated = obs.instances > 0 and obs.saturated_frac >= config.saturated_quorum
    if saturated and obs.profile_capacity_rps > 0:
        measured = obs.served_rps / (obs.instances * obs.profile_capacity_rps)
        f += config.smoothing * (measured - f)
        ceiling = measured if math.isinf(ceiling) else ceiling + config.smoothing * (
            measured - ceiling)
    if obs.late_frac is not None:
        profiled_rps = obs.instances * obs.profile_capacity_rps
        utilization = obs.served_rps / profiled_rps if profiled_rps > 0 else 0.0
        loaded = (obs.queued_frac >= config.queued_quorum
                  or utilization >= config.busy_utilization)
        covered = obs.arrival_rps <= f * profiled_rps
        over = (obs.late_frac > config.late_budget if obs.over_budget is None
                else obs.over_budget)
        if over and loaded and covered:
            if hold == 0:
                f *= config.decrease
                hold = config.hold_intervals
        elif obs.late_frac <= 0.5 * config.late_budget and not saturated and hold == 0:
            top = 1.0 if math.isinf(ceiling) else max(ceiling, 1.0)
            f = min(f + config.increase, max(top, f))
    return CorrectionState(float(min(max(f, config.floor), config.ceiling)), ceiling, hold)


def outruns_capacity(arrival_rps: float, live_capacity_rps: float, factor: float) -> bool:
    """A burst the forecast has not caught up with: the last interval's arrivals exceed what the
    ready and starting instances serve within the SLO (profiled capacity x correction). Queues
    are the other signal, but an engine with room in its batch (vLLM admits until its KV cache
    is full) slows every request before one waits, so arrivals are checked directly."""
    return live_capacity_rps > 0 and arrival_rps > factor * live_capacity_rps


def scale_out_rps(provision_rps: float, arrival_rps: float) -> float:
    """What a scale-out between rebalances provisions: the forecast's provision, or the rate
    arriving now when it is higher (the forecast's level averages over a window the burst has
    only just entered)."""
    return max(provision_rps, arrival_rps)


def late_over_budget(late: int, served: int, budget: float, alarm_share: float) -> bool:
    """Whether one interval's late completions are evidence of lateness over the budget: more
    than the count a Poisson number with mean budget x served exceeds with probability at most
    `alarm_share`. A controller stepping up on this and down otherwise, with steps in the ratio
    (1 - alarm_share) : alarm_share, settles where the late share is the budget whatever the
    endpoint's rate (a plain `late > budget x served` test fires on a single late request at
    low rates, and so holds small endpoints far inside the budget)."""
    if not 0.0 < alarm_share < 1.0:
        raise out_of_range("alarm_share", alarm_share, 0.0, 1.0)
    if late <= 0:
        return False
    mean = budget * max(served, 0)
    pmf = cdf = math.exp(-mean)
    k = 0
    while 1.0 - cdf > alarm_share and k < late:
        k += 1
        pmf *= mean / k
        cdf += pmf
    return late > k


def validated_min_count(count: int, max_shed: int, util_now: float, util_ok: float) -> int:
    """The fewest instances a scale-in may leave: at most max_shed fewer than count, and no
    fewer than would run the busiest recent load (util_now: its share of the current
    instances' corrected capacity) at a utilization already seen within the SLO budget
    (util_ok). A fleet then shrinks only as far as the load per instance it has been seen to
    serve, plus the probe the caller allows, and learns further by serving it; a capacity the
    profile overstates is met before the fleet is cut down to it. No such interval: keep
    every instance."""
    for name, value in (("count", count), ("max_shed", max_shed)):
        if value < 0:
            raise out_of_range(name, value, 0, math.inf)
    if util_ok <= 0 or not math.isfinite(util_now):
        return count
    need = math.ceil(count * max(util_now, 0.0) / util_ok - 1e-9)
    return min(count, max(count - max_shed, need))
