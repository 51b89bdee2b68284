"""The policy's fast paths give what the plain computations they replace give.

size_endpoint ranks (primary, tail) pairs before building Mixes, pareto_fronts compares all
pairs with numpy, CandidateCache shares candidates between endpoints, and the packer checks
open MIG bins in score order: each must pick exactly what the straightforward version picks.
"""

from __future__ import annotations

import gc
import math
from collections import defaultdict

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator.policy.model import (
    ClusterSnapshot,
    EndpointSpec,
    GpuState,
    InstanceConfig,
    Limits,
    NodeState,
    RebalanceConfig,
)
from coordinator.policy.packing.candidates import (
    Candidate,
    CandidateCache,
    Mix,
    all_candidates,
    pareto_fronts,
    pareto_fronts_many,
    size_endpoint,
)
from coordinator.policy.packing.ledger import Ledger, shape_of
from coordinator.policy.packing.packer import GpuBin, Packer
from coordinator.policy.rebalance import rebalance
from coordinator.profiles.schema import ProfileRow, QueryClass, Source

A100 = "a100-80gb"
_EPS = 1e-9
CLASSES = (QueryClass.SISO, QueryClass.LISO, QueryClass.LILO)
MIG_PROFILES = ("3g.40gb", "2g.20gb", "1g.10gb")


def cand(i: int, equiv: float, power_w: float, msrr: tuple[float, ...]) -> Candidate:
    mig = MIG_PROFILES[i % 3] if equiv < 1 else "full"
    cfg = InstanceConfig(A100, f"m{i}", max(1, round(equiv)), "none", mig)
    return Candidate(cfg, dict(zip(CLASSES, msrr, strict=True)), power_w, 10.0,
                     max(1, round(equiv)) if mig == "full" else 0, 0, 0, equiv, False)


# ---------------------------------------------------------------- references (the plain code)


def ref_mix(parts: dict[Candidate, int]) -> Mix:
    counts = tuple(sorted(((c, n) for c, n in parts.items() if n > 0),
                          key=lambda cn: (-cn[0].gpu_equiv, cn[0].config.describe())))
    return Mix(counts, sum(c.gpu_equiv * n for c, n in counts),
               sum(c.power_w * n for c, n in counts))


def ref_size(ep: EndpointSpec, demand: dict[QueryClass, float], cands: list[Candidate],
             headroom: float, limit: int) -> list[Mix]:
    mixes: dict[tuple, Mix] = {}
    for p in cands:
        units = p.load_units(demand, headroom)
        whole = math.floor(units + _EPS)
        rest = max(0.0, (units - whole) / units)
        for t in cands if rest > _EPS else (p,):
            parts: dict[Candidate, int] = defaultdict(int)
            parts[p] += whole
            parts[t] += math.ceil(rest * t.load_units(demand, headroom) - _EPS)
            m = ref_mix(parts)
            missing = ep.min_instances - m.instances
            if missing > 0 and m.counts:
                smallest = min((c for c, _ in m.counts), key=lambda c: c.gpu_equiv)
                parts = defaultdict(int, m.counts)
                parts[smallest] += missing
                m = ref_mix(parts)
            if m.instances <= ep.max_instances:
                mixes[tuple((c.config, n) for c, n in m.counts)] = m
    ranked = sorted(mixes.values(), key=lambda m: (round(m.gpu_equiv, 6), m.power_w,
                                                   m.instances))
    return ranked[:limit]


def ref_front(cands: list[Candidate], demand: dict[QueryClass, float]) -> list[Candidate]:
    def objs(c: Candidate) -> tuple[float, float, float]:
        cap = c.capacity_rps(demand)
        return (c.gpu_equiv / cap, c.power_w / cap, c.gpu_equiv)

    def dominated(a: Candidate, b: Candidate) -> bool:
        oa, ob = objs(a), objs(b)
        return all(y <= x + _EPS for x, y in zip(oa, ob, strict=True)) and oa != ob

    return sorted((c for c in cands if not any(dominated(c, o) for o in cands)),
                  key=lambda c: (-c.gpu_equiv, c.config.describe()))


# ---------------------------------------------------------------- properties

equivs = st.sampled_from([1 / 7, 2 / 7, 3 / 7, 0.5, 1.0, 2.0, 4.0])
cands_st = st.lists(st.tuples(equivs, st.floats(50, 900), st.tuples(
    *(st.floats(0.05, 20) for _ in CLASSES))), min_size=1, max_size=9)
demand_st = st.tuples(*(st.one_of(st.just(0.0), st.floats(0.01, 200)) for _ in CLASSES))


@settings(max_examples=300, deadline=None)
@given(cands_st, demand_st, st.integers(0, 4), st.integers(1, 60), st.integers(1, 4),
       st.sampled_from([0.0, 0.2, 0.5]))
def test_size_endpoint_matches_building_every_mix(raw, rps, min_inst, max_inst, limit,
                                                  headroom) -> None:
    cands = [cand(i, e, p, m) for i, (e, p, m) in enumerate(raw)]
    demand = {qc: v for qc, v in zip(CLASSES, rps, strict=True) if v > 0}
    if not demand:
        demand = {QueryClass.LISO: 1.0}
    ep = EndpointSpec("e", "m0", min_instances=min_inst, max_instances=max(max_inst, min_inst, 1))
    got = size_endpoint(ep, demand, cands, RebalanceConfig(headroom_frac=headroom), limit)
    want = ref_size(ep, demand, cands, headroom, limit)
    assert [(m.describe(), m.gpu_equiv, m.power_w) for m in got] == \
        [(m.describe(), m.gpu_equiv, m.power_w) for m in want]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(cands_st, demand_st), min_size=1, max_size=5))
def test_pareto_fronts_match_pairwise_comparison(jobs) -> None:
    """Batched (sets of equal size share one numpy call) and alone, as the plain loop."""
    sets = []
    for raw, rps in jobs:
        demand = {qc: v for qc, v in zip(CLASSES, rps, strict=True) if v > 0}
        sets.append(([cand(i, e, p, m) for i, (e, p, m) in enumerate(raw)],
                     demand or {QueryClass.LISO: 1.0}))
    want = [{A100: ref_front(cands, demand)} for cands, demand in sets]
    assert pareto_fronts_many(sets) == want
    assert [pareto_fronts(cands, demand) for cands, demand in sets] == want


def _rows() -> list[ProfileRow]:
    out = []
    for model in ("a", "b"):
        for quant in ("none", "fp8"):
            for tp, mig in ((1, "full"), (2, "full"), (1, "3g.40gb"), (1, "1g.10gb")):
                for qc, msrr in ((QueryClass.SISO, 5.0), (QueryClass.LISO, 2.0)):
                    out.append(ProfileRow(A100, model, tp, quant, mig, None, None, qc,
                                          msrr_rps=msrr * tp, slo_p95_s=20, memory_gb=8,
                                          avg_power_w=250.0 * tp if mig == "full" else None,
                                          source=Source.MEASURED))
    return out


def test_candidate_cache_equals_all_candidates_and_shares_by_floor() -> None:
    rows, config = _rows(), RebalanceConfig()
    cache = CandidateCache(rows, [A100], config)
    specs = [EndpointSpec("e1", "a", allowed_quantizations=("none", "fp8")),
             EndpointSpec("e2", "a", allowed_quantizations=("fp8", "none")),
             EndpointSpec("e3", "b", allowed_models=("a", "b")),
             EndpointSpec("e4", "a", slo_p95_s=5.0)]
    demands = [{QueryClass.SISO: 3.0}, {QueryClass.SISO: 9.0, QueryClass.LISO: 1.0},
               {QueryClass.LILO: 1.0}]
    fields = ("config", "msrr_rps", "power_w", "memory_gb", "gpus", "slices", "mem_slots",
              "gpu_equiv", "power_estimated")
    for spec in specs:
        for demand in demands:
            got = cache.all_candidates(spec, demand)
            want = all_candidates(spec, demand, rows, [A100], config)
            assert list(got) == list(want)
            assert all(getattr(got[k], f) == getattr(want[k], f) for k in got for f in fields)
    same_floor = [cache.all_candidates(s, {QueryClass.SISO: v})
                  for s, v in ((specs[0], 1.0), (specs[1], 50.0))]
    assert all(same_floor[0][k] is same_floor[1][k] for k in same_floor[0])


class FullScanPacker(Packer):
    """The packer as it was: every open MIG bin is checked, the best score wins."""

    def _best_open_mig(self, opened: dict[tuple[str, int], None], cand: Candidate
                       ) -> GpuBin | None:
        options = [(self._mig_score(b, cand), b) for k in opened
                   if self._mig_fits(b := self.gpus[k], cand)]
        return max(options, key=lambda o: o[0])[1] if options else None


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2), st.sampled_from([40.0, 80.0, 150.0])), min_size=1,
                max_size=40),  # equal powers: ties in score, which the first open bin wins
       st.sampled_from(["dot", "l2"]), st.floats(0.5, 1.0))
def test_packer_open_mig_choice_matches_full_scan(items, fit, row_frac) -> None:
    nodes = tuple(NodeState(f"n{i}", f"r{i % 2}", "a", tuple(GpuState(g, A100) for g in range(2)),
                            inlet_temp_c=25.0 + 3 * i) for i in range(3))
    limits = Limits({"r0": 6000 * row_frac, "r1": 6000 * row_frac})
    results = []
    for cls in (Packer, FullScanPacker):
        ledger = Ledger({n.node_id: shape_of(n) for n in nodes},
                        {n.node_id: 2 * 50.0 for n in nodes}, limits)
        packer = cls(nodes, ledger, limits, fit)
        placed = []
        for k, (i, power_w) in enumerate(items):
            c = cand(i, (3 / 7, 2 / 7, 1 / 7)[i], power_w, (1.0, 1.0, 1.0))
            c = Candidate(c.config, c.msrr_rps, c.power_w, c.memory_gb, 0, (3, 2, 1)[i],
                          (4, 2, 1)[i], c.gpu_equiv, False)
            placed.append(packer.place(f"k{k}", c))
        results.append((placed, dict(ledger.row_w)))
    assert results[0] == results[1]


@pytest.mark.parametrize("enabled", [True, False])
def test_rebalance_restores_the_callers_gc_setting(enabled: bool) -> None:
    was = gc.isenabled()
    try:
        (gc.enable if enabled else gc.disable)()
        n = NodeState("n1", "r1", "a1", (GpuState(0, A100),))
        s = ClusterSnapshot((n,), (), (EndpointSpec("e", "a"),), {"e": {QueryClass.SISO: 1.0}})
        rebalance(s, _rows(), Limits(), RebalanceConfig())
        assert gc.isenabled() is enabled
    finally:
        (gc.enable if was else gc.disable)()
