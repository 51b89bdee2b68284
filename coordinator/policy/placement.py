"""Placement for cluster managers (TAPAS §4.1/§4.5, DESIGN §5 "Place"). Pure.

    place(request, snapshot, limits) -> list[RankedNode]      (best first; empty: nowhere)

A request is an opaque GPU VM/job (GPU count, predicted peak power, workload "opaque") or an
LLM instance ("flexible": its configuration can be reshaped later). Nodes are filtered out when
they lack free GPUs of the type, or when the request's predicted peak would take their row over
its power limit, their aisle over its airflow limit, or a GPU past its thermal headroom. The
rest are ranked: first the row whose opaque/flexible mix stays closest to the cluster's (so
every row keeps load that can be shed), then opaque loads to cooler servers and flexible loads
to warmer ones (flexible loads absorb thermal emergencies by reshaping).

With a predicted power profile (TAPAS Place: the load's power over one period, from its
history, e.g. one point per few minutes) and each row's profile of what it already hosts, the
first key is instead the row's *peak* once the load is added (the mix comes second): loads
whose peaks coincide land in different rows, as long as the row's and aisle's mix stay within
MIX_TOLERANCE of the cluster's (else the node ranks last). With each aisle's predicted airflow
profile too, the key is the sum of the row's peak (share of its power limit) and the aisle's
(share of its airflow limit): opaque peaks are spread over the aisles as well as the rows.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from coordinator.policy.model import ClusterSnapshot, GpuState, Limits, NodeState
from coordinator.policy.packing.ledger import gpu_temp_c, gpu_temp_limit_c, node_power_w, shape_of
from shapeshifter.common.errors import InvalidArgument, out_of_range
from shapeshifter.hw.models import GPU_MODELS

WORKLOADS = ("opaque", "flexible")
MAX_PROFILE_POINTS = 1440  # one a minute over a day
MIX_TOLERANCE = 0.25  # a row's (aisle's) opaque share may drift this far from the cluster's


@dataclass(frozen=True)
class PlaceRequest:
    gpus: int  # GPUs wanted on one node
    predicted_peak_power_w: float  # of all its GPUs together
    workload: str = "opaque"  # opaque | flexible
    gpu_type: str = ""  # "" = any type
    # Predicted power of all its GPUs over one period (W per point); () = peak only.
    predicted_profile_w: tuple[float, ...] = ()


@dataclass(frozen=True)
class RankedNode:
    node_id: str
    row: str
    aisle: str
    gpu_indices: tuple[int, ...]  # the free GPUs it would get (coolest first)
    inlet_temp_c: float
    row_power_after_w: float
    row_mix_opaque_frac_after: float
    reason: str


def validate_request(request: PlaceRequest) -> PlaceRequest:
    if not 1 <= request.gpus <= 64:
        raise out_of_range("gpus", request.gpus, 1, 64)
    if not 0 <= request.predicted_peak_power_w <= 64 * 1000:
        raise out_of_range("predicted_peak_power_w", request.predicted_peak_power_w, 0, 64_000,
                           "W")
    if request.workload not in WORKLOADS:
        raise InvalidArgument(f"workload={request.workload!r} is unknown; allowed: "
                              f"{', '.join(WORKLOADS)}", field="workload")
    if len(request.predicted_profile_w) > MAX_PROFILE_POINTS:
        raise out_of_range("len(predicted_profile_w)", len(request.predicted_profile_w), 0,
                           MAX_PROFILE_POINTS)
    for i, w in enumerate(request.predicted_profile_w):
        if not 0 <= w <= 64 * 1000:
            raise out_of_range(f"predicted_profile_w[{i}]", w, 0, 64_000, "W")
    return request


def _free_gpus(node: NodeState, busy: set[tuple[str, int]], gpu_type: str) -> list[GpuState]:
    return [g for g in node.gpus
            if g.healthy and not g.reserved and (node.node_id, g.index) not in busy
            and not any(s.in_use for s in g.mig_slices)
            and (not gpu_type or g.gpu_type == gpu_type)]


def _mix(snapshot: ClusterSnapshot, busy: set[tuple[str, int]], scope: str = "row"
         ) -> tuple[dict[str, list[int]], list[int]]:
    """Per row (or aisle) [opaque GPUs, flexible GPUs], and the cluster's totals."""
    rows: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for n in snapshot.nodes:
        name = getattr(n, scope)
        for g in n.gpus:
            if g.reserved:
                rows[name][0] += 1
            elif (n.node_id, g.index) in busy:
                rows[name][1] += 1
    total = [sum(v[0] for v in rows.values()), sum(v[1] for v in rows.values())]
    return rows, total


def place(request: PlaceRequest, snapshot: ClusterSnapshot, limits: Limits,
          row_profiles_w: Mapping[str, Sequence[float]] | None = None,
          aisle_profiles_cfm: Mapping[str, Sequence[float]] | None = None) -> list[RankedNode]:
    """Nodes that can take the request within every limit, best first, each with a reason.
    `row_profiles_w`: per row, the predicted power of what it hosts over the same period as
    the request's `predicted_profile_w` (both needed for peak-aware ranking);
    `aisle_profiles_cfm`: per aisle, the predicted airflow of what it hosts, same period."""
    validate_request(request)
    peaks_w = _peak_after(request, snapshot, row_profiles_w)
    peak_of = None if peaks_w is None else _peak_key(peaks_w, limits)
    aisle_of = _aisle_peak_key(request, snapshot, aisle_profiles_cfm, limits)
    busy = {(i.node_id, g) for i in snapshot.instances for g in i.gpu_indices}
    row_w: dict[str, float] = defaultdict(float)
    aisle_cfm: dict[str, float] = defaultdict(float)
    for n in snapshot.nodes:
        row_w[n.row] += n.power_draw_w
        aisle_cfm[n.aisle] += n.airflow_cfm
    mix_rows, mix_total = _mix(snapshot, busy)
    mix_aisles, _ = _mix(snapshot, busy, "aisle")
    opaque = request.workload == "opaque"
    ranked = []
    for n in snapshot.nodes:
        r = _consider(request, n, busy, row_w, aisle_cfm, limits,
                      None if peaks_w is None else peaks_w[n.row])
        if r is None:
            continue
        cluster_frac = (mix_total[0] + (request.gpus if opaque else 0)) / (
            sum(mix_total) + request.gpus)
        frac_after = _share_after(mix_rows[n.row], request.gpus, opaque)
        imbalance = abs(frac_after - cluster_frac)
        drift = max(imbalance, abs(_share_after(mix_aisles[n.aisle], request.gpus, opaque)
                                   - cluster_frac))
        temp_key = n.inlet_temp_c if opaque else -n.inlet_temp_c
        peak = None if peak_of is None else round(peak_of[n.row] + aisle_of.get(n.node_id, 0.0), 2)
        # A row or aisle whose mix would drift far from the cluster's goes last, peak or not:
        # every scope keeps load that can be shed or moved in an emergency (TAPAS §4.1).
        key = ((round(imbalance, 1),) if peak is None
               else (drift > MIX_TOLERANCE, peak, round(imbalance, 1)))
        ranked.append(((*key, temp_key, n.node_id), RankedNode(
            n.node_id, n.row, n.aisle, r[0], n.inlet_temp_c, r[1], frac_after,
            f"{r[2]}; inlet {n.inlet_temp_c:.1f} C ({'cooler' if opaque else 'warmer'} is "
            f"better for {request.workload} loads); row {n.row} opaque share "
            f"{frac_after:.0%} after vs cluster {cluster_frac:.0%}")))
    ranked.sort(key=lambda kr: kr[0])
    return [r for _, r in ranked]


def _share_after(mix: list[int], gpus: int, opaque: bool) -> float:
    """The opaque share of a scope's GPUs once the request is added."""
    o, f = mix
    o, f = (o + gpus, f) if opaque else (o, f + gpus)
    return o / (o + f)


def _peak_after(request: PlaceRequest, snapshot: ClusterSnapshot,
                row_profiles_w: Mapping[str, Sequence[float]] | None) -> dict[str, float] | None:
    """Per row, its predicted peak (W) with the request added; None without profiles."""
    prof = request.predicted_profile_w
    if not prof or row_profiles_w is None:
        return None
    req = list(prof)
    peaks = {}
    for row in {n.row for n in snapshot.nodes}:
        base = list(row_profiles_w.get(row, ())) or [0.0] * len(req)
        if len(base) != len(req):
            raise InvalidArgument(f"row_profiles_w[{row!r}] has {len(base)} points, the "
                                  f"request's predicted_profile_w {len(req)}",
                                  field="predicted_profile_w")
        peaks[row] = max(b + r for b, r in zip(base, req, strict=True))
    return peaks


def _peak_key(peaks_w: dict[str, float], limits: Limits) -> dict[str, float]:
    """A row's peak as a share of its limit (of the highest peak where rows have no limit),
    rounded to 1% so that cooler/warmer breaks near-ties."""
    scale = max(peaks_w.values()) or 1.0
    return {row: round(peak / (limits.row_power_limit_w.get(row) or scale), 2)
            for row, peak in peaks_w.items()}


def _aisle_peak_key(request: PlaceRequest, snapshot: ClusterSnapshot,
                    aisle_profiles_cfm: Mapping[str, Sequence[float]] | None, limits: Limits
                    ) -> dict[str, float]:
    """Per node, its aisle's predicted airflow peak with the request on it, as a share of the
    aisle's limit (rounded to 1%, as _peak_key); empty without profiles or limits. Airflow is
    linear in the node's GPU power (TAPAS eq. 3), so the request adds its profile above its
    GPUs' idle draw times the node's CFM per GPU watt."""
    prof = request.predicted_profile_w
    if not prof or aisle_profiles_cfm is None:
        return {}
    out = {}
    for n in snapshot.nodes:
        limit = limits.aisle_airflow_cfm.get(n.aisle)
        base = aisle_profiles_cfm.get(n.aisle)
        if not limit or not base:
            continue
        if len(base) != len(prof):
            raise InvalidArgument(f"aisle_profiles_cfm[{n.aisle!r}] has {len(base)} points, "
                                  f"the request's predicted_profile_w {len(prof)}",
                                  field="predicted_profile_w")
        shape = shape_of(n)
        cfm_per_w = ((node_power_w(shape, shape.max_gpu_power_w)[1] - node_power_w(shape, 0.0)[1])
                     / shape.max_gpu_power_w) if shape.max_gpu_power_w > 0 else 0.0
        model = GPU_MODELS.get(shape.gpu_type)
        idle_w = request.gpus * (model.idle_power_w if model else 0.0)
        peak = max(b + cfm_per_w * max(0.0, r - idle_w) for b, r in zip(base, prof, strict=True))
        out[n.node_id] = round(peak / limit, 2)
    return out


def _consider(request: PlaceRequest, n: NodeState, busy: set[tuple[str, int]],
              row_w: dict[str, float], aisle_cfm: dict[str, float], limits: Limits,
              row_peak_w: float | None = None) -> tuple[tuple[int, ...], float, str] | None:
    """(GPUs, row power after, reason) when the node passes every filter, else None.
    `row_peak_w`: the row's profile peak with the request (replaces the sum of peaks)."""
    free = _free_gpus(n, busy, request.gpu_type)
    if len(free) < request.gpus:
        return None
    per_gpu_w = request.predicted_peak_power_w / request.gpus
    free = [g for g in free
            if gpu_temp_c(n.inlet_temp_c, g.gpu_type, per_gpu_w)
            <= gpu_temp_limit_c(g.gpu_type, limits)]
    if len(free) < request.gpus:
        return None
    chosen = sorted(free, key=lambda g: (g.temperature_c, g.index))[:request.gpus]
    shape = shape_of(n)
    gpu_now_w = sum(g.power_draw_w for g in n.gpus)
    added = sum(per_gpu_w - g.power_draw_w for g in chosen)
    p0, a0 = node_power_w(shape, gpu_now_w)
    p1, a1 = node_power_w(shape, gpu_now_w + max(added, 0.0))
    row_after = row_w[n.row] + (p1 - p0) if row_peak_w is None else row_peak_w
    aisle_after = aisle_cfm[n.aisle] + (a1 - a0)
    row_limit = limits.row_power_limit_w.get(n.row)
    aisle_limit = limits.aisle_airflow_cfm.get(n.aisle)
    if row_limit is not None and row_after > row_limit:
        return None
    if aisle_limit is not None and aisle_after > aisle_limit:
        return None
    why = (f"row {n.row} peak {row_after:.0f} W"
           + (f" of {row_limit:.0f} W" if row_limit is not None else "")
           + f", aisle {n.aisle} {aisle_after:.0f} CFM"
           + (f" of {aisle_limit:.0f} CFM" if aisle_limit is not None else ""))
    return tuple(g.index for g in chosen), row_after, why
