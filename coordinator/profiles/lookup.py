"""Pure lookups over profile rows: selection, clock interpolation and Pareto fronts."""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence

from coordinator.profiles.schema import FULL_GPU, ProfileRow, QueryClass, Source
from shapeshifter.common.errors import InvalidArgument, NotFound

# Values that interpolate linearly with the clock (all the numeric outcome fields).
_INTERPOLATED = ("msrr_rps", "p95_latency_s", "p99_latency_s", "ttft_p95_s", "throughput_rps",
                 "throughput_tok_s", "avg_power_w", "energy_per_token_j", "memory_gb")


def select(rows: Iterable[ProfileRow], *, gpu_type: str, model: str,
           query_class: QueryClass | str, tensor_parallel: int = 1, quantization: str = "none",
           mig_profile: str = FULL_GPU) -> list[ProfileRow]:
    """Rows of one configuration (all clocks and power limits), ordered by sm_clock_mhz."""
    qc = QueryClass(query_class)
    out = [r for r in rows if r.gpu_type == gpu_type and r.model == model
           and r.query_class is qc and r.tensor_parallel == tensor_parallel
           and r.quantization == quantization and r.mig_profile == mig_profile]
    return sorted(out, key=lambda r: (r.sm_clock_mhz or 0, r.power_limit_w or 0.0))


def interpolate_clock(rows: Sequence[ProfileRow], sm_clock_mhz: int) -> ProfileRow:
    """The row at `sm_clock_mhz`, linear between the two nearest clock points around it.

    `rows` are one configuration's rows (see `select`); those without a locked clock are ignored.
    An exact clock point is returned as is. Between points the result is marked `derived`, each
    value interpolated when both neighbours have it (else left unknown); outside the measured
    range it is an error (no extrapolation).
    """
    points = sorted((r for r in rows if r.sm_clock_mhz is not None),
                    key=lambda r: r.sm_clock_mhz or 0)
    if not points:
        raise NotFound("no rows with a locked clock to interpolate between", field="sm_clock_mhz")
    keys = {dataclasses.replace(r, sm_clock_mhz=None).key for r in points}
    if len(keys) > 1:
        raise InvalidArgument(f"rows span {len(keys)} configurations; pass one (see select())",
                              field="rows")
    clocks = [r.sm_clock_mhz for r in points]
    if len(set(clocks)) != len(clocks):
        raise InvalidArgument(f"duplicate clock points {clocks}", field="sm_clock_mhz")
    for r in points:
        if r.sm_clock_mhz == sm_clock_mhz:
            return r
    lo_mhz, hi_mhz = points[0].sm_clock_mhz or 0, points[-1].sm_clock_mhz or 0
    if not lo_mhz < sm_clock_mhz < hi_mhz:
        raise InvalidArgument(f"sm_clock_mhz {sm_clock_mhz} is outside the profiled range "
                              f"[{lo_mhz}, {hi_mhz}] MHz", field="sm_clock_mhz")
    below = max((r for r in points if (r.sm_clock_mhz or 0) < sm_clock_mhz),
                key=lambda r: r.sm_clock_mhz or 0)
    above = min((r for r in points if (r.sm_clock_mhz or 0) > sm_clock_mhz),
                key=lambda r: r.sm_clock_mhz or 0)
    f0, f1 = below.sm_clock_mhz or 0, above.sm_clock_mhz or 0
    w = (sm_clock_mhz - f0) / (f1 - f0)
    values: dict[str, float | None] = {}
    for name in _INTERPOLATED:
        a, b = getattr(below, name), getattr(above, name)
        values[name] = None if a is None or b is None else a + w * (b - a)
    slo = below.slo_p95_s if below.slo_p95_s == above.slo_p95_s else None
    if slo is None:
        values["msrr_rps"] = None  # MSRR is only meaningful at one SLO
    return dataclasses.replace(
        below, sm_clock_mhz=sm_clock_mhz, slo_p95_s=slo, max_concurrency=None,
        source=Source.DERIVED,
        provenance=(f"interpolated linearly at {sm_clock_mhz} MHz between {f0} MHz "
                    f"({below.source}) and {f1} MHz ({above.source})"),
        **values,
    )


def _objectives(r: ProfileRow) -> tuple[float, float, float]:
    """(msrr to maximize, power to minimize, memory to minimize); unknown cost → +inf."""
    return (r.msrr_rps or 0.0,
            math.inf if r.avg_power_w is None else r.avg_power_w,
            math.inf if r.memory_gb is None else r.memory_gb)


def dominates(a: ProfileRow, b: ProfileRow) -> bool:
    """a is at least as good as b in msrr, power and memory, and better in one."""
    (ma, pa, ga), (mb, pb, gb) = _objectives(a), _objectives(b)
    return ma >= mb and pa <= pb and ga <= gb and (ma > mb or pa < pb or ga < gb)


def pareto_front(rows: Iterable[ProfileRow]) -> list[ProfileRow]:
    """Non-dominated rows over (msrr max, power min, memory min), msrr descending.

    Rows without an MSRR are not candidates; an unknown power or memory counts as the worst
    value, so a row that states its costs is preferred to one that does not.
    """
    candidates = [r for r in rows if r.msrr_rps is not None and r.msrr_rps > 0]
    front = [r for r in candidates if not any(dominates(o, r) for o in candidates)]
    return sorted(front, key=lambda r: (-(r.msrr_rps or 0.0), _objectives(r)[1:]))


def pareto_fronts(rows: Iterable[ProfileRow]
                  ) -> dict[tuple[str, str, QueryClass], list[ProfileRow]]:
    """Pareto front per (model, gpu_type, query_class)."""
    groups: dict[tuple[str, str, QueryClass], list[ProfileRow]] = defaultdict(list)
    for r in rows:
        groups[(r.model, r.gpu_type, r.query_class)].append(r)
    fronts = {k: pareto_front(v) for k, v in groups.items()}
    return {k: v for k, v in fronts.items() if v}
