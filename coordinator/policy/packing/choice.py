"""Variant choice for the rebalance policy: per endpoint, keep what runs or change it to its
best mix (covered or not, the saving, hysteresis), within the round's restart budget (scale
out, scale in or grow to max_instances when the budget or the cap is short); and each
endpoint's outcome. Pure."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from coordinator.policy.model import EndpointOutcome, InstanceConfig, InstanceState, RebalanceConfig
from coordinator.policy.packing.candidates import Candidate, Mix
from coordinator.policy.packing.sizing import EPS, SizedEndpoint


@dataclass
class Change:
    ep: SizedEndpoint
    mix: Mix
    keep: list[InstanceState]
    stop: list[InstanceState]
    start: list[Candidate]
    reason: str

    @property
    def cost(self) -> int:
        return len(self.stop) + len(self.start)


def decide(endpoints: Sequence[SizedEndpoint], config: RebalanceConfig
           ) -> tuple[list[Change], dict[str, EndpointOutcome]]:
    """The changes to make this round (under-covered endpoints first, then the largest saving,
    within the restart budget) and the outcome of each endpoint left as it is."""
    outcomes: dict[str, EndpointOutcome] = {}
    wanted: list[Change] = []
    for ep in endpoints:
        change, why = _want_change(ep, config)
        if change is None:
            outcomes[ep.spec.name] = outcome(ep, None, "kept", why)
        else:
            wanted.append(change)
    wanted.sort(key=lambda c: (c.ep.covered, -(c.ep.equiv_before - c.mix.gpu_equiv),
                               c.ep.spec.name))
    budget = config.max_restarts_per_round
    chosen: list[Change] = []
    for ch in wanted:
        if ch.cost > budget and not ch.ep.covered:
            ch = _scale_out(ch, budget)
        elif ch.cost > budget and not ch.start and budget > 0:
            ch = _scale_in(ch, budget)
        if ch.cost > budget or ch.cost == 0:
            outcomes[ch.ep.spec.name] = outcome(
                ch.ep, None, "deferred",
                f"{ch.reason}; needs {ch.cost} restarts, {budget} left this round "
                f"(max_restarts_per_round={config.max_restarts_per_round})")
            continue
        budget -= ch.cost
        chosen.append(ch)
    return chosen, outcomes


def _want_change(ep: SizedEndpoint, config: RebalanceConfig) -> tuple[Change | None, str]:
    if not ep.mixes:
        if ep.known and not ep.covered and (grow := _grow_to_cap(ep)) is not None:
            return grow, ""
        if ep.known:  # configurations exist, but none covers the demand within the cap
            return None, (f"covering {ep.total_rps * (1 + config.headroom_frac):.2f} req/s "
                          f"needs more than max_instances={ep.spec.max_instances} instances of "
                          "any profiled configuration; kept as is")
        return None, ("no profiled configuration meets its SLO and quality floor on these GPUs; "
                      "kept as is")
    best = ep.mixes[0]
    saving = ep.equiv_before - best.gpu_equiv
    need = ep.total_rps * (1 + config.headroom_frac)
    if ep.covered:
        if saving < config.min_gpu_saving - EPS:
            return None, (f"covers {need:.2f} req/s with {ep.cap_before_rps:.2f}; reshaping "
                          f"would save {saving:.2f} GPUs (< {config.min_gpu_saving:g})")
        if ep.recent:
            return None, f"changed within the last {config.hysteresis_s:g} s (hysteresis)"
        reason = (f"reshape to {best.describe()}: {best.gpu_equiv:.2f} GPUs instead of "
                  f"{ep.equiv_before:.2f} for {ep.total_rps:.2f} req/s (+{config.headroom_frac:.0%}"
                  " headroom)")
    else:
        reason = (f"capacity {ep.cap_before_rps:.2f} req/s < demand {ep.total_rps:.2f} x "
                  f"{1 + config.headroom_frac:g} = {need:.2f}; size to {best.describe()}")
    return change_for(ep, best, reason), ""


def change_for(ep: SizedEndpoint, mix: Mix, reason: str) -> Change:
    """Keep running instances whose configuration the mix has; stop the rest; start the gap."""
    by_cfg: dict[InstanceConfig, list[InstanceState]] = {}
    for inst in ep.current:
        by_cfg.setdefault(ep.cfg_of[inst.instance_id], []).append(inst)
    keep: list[InstanceState] = []
    start: list[Candidate] = []
    for cand, n in mix.counts:
        running = sorted(by_cfg.get(cand.config, []), key=lambda i: (not i.ready, i.instance_id))
        keep += running[:n]
        start += [cand] * max(0, n - len(running))
    kept_ids = {i.instance_id for i in keep}
    stop = [i for i in ep.current if i.instance_id not in kept_ids]
    return Change(ep, mix, keep, stop, start, reason)


def _scale_out(ch: Change, budget: int) -> Change:
    """Under budget pressure an under-covered endpoint only adds instances (no stops)."""
    primary = ch.mix.counts[0][0]
    missing = ch.ep.total_rps * 1.0 - ch.ep.cap_before_rps  # at least the demand itself
    missing = max(missing, 0.0)
    cap = primary.capacity_rps(ch.ep.demand)
    n = min(budget, max(1, math.ceil(missing / cap - EPS))) if cap > 0 else 0
    return Change(ch.ep, ch.mix, list(ch.ep.current), [], [primary] * n,
                  f"{ch.reason}; restart budget short: scale out by {n} only")


def _grow_to_cap(ep: SizedEndpoint) -> Change | None:
    """No mix covers the demand within max_instances: add instances of the configuration with
    the most capacity per GPU up to the cap (short of demand, closer to it than keeping)."""
    room = ep.spec.max_instances - len(ep.current)
    if room <= 0:
        return None
    best = max(ep.known.values(),
               key=lambda c: (c.capacity_rps(ep.demand) / max(c.gpu_equiv, EPS),
                              c.config.describe()))
    mix = Mix(((best, room),), best.gpu_equiv * room, best.power_w * room)
    return Change(ep, mix, list(ep.current), [], [best] * room,
                  f"no configuration covers {ep.total_rps:.2f} req/s within max_instances="
                  f"{ep.spec.max_instances}: add {room}x {best.config.describe()}")


def _scale_in(ch: Change, budget: int) -> Change:
    """Under budget pressure a covered endpoint that only sheds instances sheds `budget` of
    them now and the rest in later rounds (capacity only falls towards the mix's)."""
    stop = ch.stop[:budget]
    keep = ch.keep + ch.stop[budget:]
    return Change(ch.ep, ch.mix, keep, stop, [],
                  f"{ch.reason}; restart budget short: scale in by {len(stop)} now")


def outcome(ep: SizedEndpoint, ch: Change | None, decision: str, reason: str) -> EndpointOutcome:
    if ch is None:
        return EndpointOutcome(ep.spec.name, ep.total_rps, ep.cap_before_rps, ep.cap_before_rps,
                               ep.equiv_before, ep.equiv_before, decision, reason)
    after = [*_kept_cands(ch), *ch.start]
    return EndpointOutcome(ep.spec.name, ep.total_rps, ep.cap_before_rps,
                           sum(c.capacity_rps(ep.demand) for c in after),
                           ep.equiv_before, sum(c.gpu_equiv for c in after), decision, reason)


def _kept_cands(ch: Change) -> Iterable[Candidate]:
    for inst in ch.keep:
        cand = ch.ep.known.get(ch.ep.cfg_of[inst.instance_id])
        if cand is not None:
            yield cand
