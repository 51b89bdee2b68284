"""Query classes, trace classification, demand per class and GPUs needed (OASIS §3, eq. 5).

A request is "large" in a dimension when its token count exceeds τ (default 500):
SISO: in ≤ τ, out ≤ τ · SILO: in ≤ τ, out > τ · LISO: in > τ, out ≤ τ · LILO: in > τ, out > τ.
"""

from __future__ import annotations

import csv
import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from coordinator.profiles.schema import ProfileError, QueryClass
from shapeshifter.common.errors import InvalidArgument

DEFAULT_TAU_TOKENS = 500
CLASSES: tuple[QueryClass, ...] = (QueryClass.SISO, QueryClass.SILO, QueryClass.LISO,
                                   QueryClass.LILO)


def classify(prompt_tokens: int, output_tokens: int, tau_tokens: int = DEFAULT_TAU_TOKENS
             ) -> QueryClass:
    for name, value in (("prompt_tokens", prompt_tokens), ("output_tokens", output_tokens)):
        if value < 0:
            raise InvalidArgument(f"{name} must be >= 0, got {value}", field=name)
    if tau_tokens < 1:
        raise InvalidArgument(f"tau_tokens must be >= 1, got {tau_tokens}", field="tau_tokens")
    large_in, large_out = prompt_tokens > tau_tokens, output_tokens > tau_tokens
    if large_in:
        return QueryClass.LILO if large_out else QueryClass.LISO
    return QueryClass.SILO if large_out else QueryClass.SISO


def class_tokens(query_class: QueryClass | str, tau_tokens: int = DEFAULT_TAU_TOKENS
                 ) -> tuple[int, int]:
    """Representative (prompt, output) token counts for profiling a class.

    With the default τ = 500 these are OASIS §4.1's lengths (LISO 1000/50, SILO 50/1000);
    SISO and LILO use the same small (τ/10) and large (2τ) sizes.
    """
    qc = QueryClass(query_class)
    if qc is QueryClass.MIXED:
        raise InvalidArgument("MIXED has no single prompt/output length", field="query_class")
    small, large = max(1, tau_tokens // 10), 2 * tau_tokens
    return (large if qc in (QueryClass.LISO, QueryClass.LILO) else small,
            large if qc in (QueryClass.SILO, QueryClass.LILO) else small)


@dataclass(frozen=True)
class TraceRequest:
    arrival_s: float  # Unix seconds
    prompt_tokens: int
    output_tokens: int


def _parse_timestamp(text: str) -> float:
    # "2023-11-16 18:15:46.6805900": 7 fractional digits, which datetime does not parse.
    whole, _, frac = text.strip().partition(".")
    dt = datetime.strptime(whole, "%Y-%m-%d %H:%M:%S").replace(tzinfo=UTC)
    return dt.timestamp() + (float(f"0.{frac}") if frac else 0.0)


def read_azure_trace(path: str | Path) -> list[TraceRequest]:
    """Read an Azure LLM inference trace CSV (TIMESTAMP, ContextTokens, GeneratedTokens)."""
    out: list[TraceRequest] = []
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        need = {"TIMESTAMP", "ContextTokens", "GeneratedTokens"}
        if not need <= set(reader.fieldnames or ()):
            raise ProfileError(f"trace needs columns {sorted(need)}, has {reader.fieldnames}",
                               path=str(path), line=1)
        for rec in reader:
            try:
                out.append(TraceRequest(_parse_timestamp(rec["TIMESTAMP"]),
                                        int(rec["ContextTokens"]), int(rec["GeneratedTokens"])))
            except ValueError as err:
                raise ProfileError(f"bad trace record: {err}", path=str(path),
                                   line=reader.line_num) from None
    return out


def class_counts(requests: Iterable[TraceRequest], tau_tokens: int = DEFAULT_TAU_TOKENS
                 ) -> dict[QueryClass, int]:
    counts = Counter(classify(r.prompt_tokens, r.output_tokens, tau_tokens) for r in requests)
    return {qc: counts.get(qc, 0) for qc in CLASSES}


def class_shares(requests: Sequence[TraceRequest], tau_tokens: int = DEFAULT_TAU_TOKENS
                 ) -> dict[QueryClass, float]:
    """Fraction of requests in each class (all four classes present; sums to 1)."""
    if not requests:
        raise InvalidArgument("no requests to classify", field="requests")
    counts = class_counts(requests, tau_tokens)
    return {qc: n / len(requests) for qc, n in counts.items()}


def demand_rps(requests: Iterable[TraceRequest], start_s: float, window_s: float,
               tau_tokens: int = DEFAULT_TAU_TOKENS) -> dict[QueryClass, float]:
    """Arrivals per second of each class in [start_s, start_s + window_s)."""
    if window_s <= 0:
        raise InvalidArgument(f"window_s must be > 0, got {window_s}", field="window_s")
    end_s = start_s + window_s
    counts = class_counts((r for r in requests if start_s <= r.arrival_s < end_s), tau_tokens)
    return {qc: n / window_s for qc, n in counts.items()}


def gpus_required(rate_rps: float, msrr_rps: float) -> float:
    """OASIS eq. 5: GPU_required = RR(QT) / MSRR(QT)."""
    if rate_rps < 0:
        raise InvalidArgument(f"rate_rps must be >= 0, got {rate_rps}", field="rate_rps")
    if msrr_rps <= 0:
        raise InvalidArgument(f"msrr_rps must be > 0, got {msrr_rps}", field="msrr_rps")
    return rate_rps / msrr_rps


@dataclass(frozen=True)
class MigOption:
    name: str  # e.g. "1g.10gb"
    slices: int  # compute slices of the 7 on A100/H100
    memory_mib: int


@dataclass(frozen=True)
class Provisioning:
    gpus_required: float  # eq. 5, fractional
    full_gpus: int  # ⌈gpus_required⌉ when ≥ 1, else 0
    mig_profile: str | None  # the smallest MIG slice with enough compute when < 1


def provision(rate_rps: float, msrr_rps: float, mig_options: Sequence[MigOption],
              total_slices: int = 7) -> Provisioning:
    """OASIS Algorithm 1 lines 10-16: < 1 GPU → a MIG slice sized by compute share, else ⌈·⌉ GPUs.

    The slice is the one with the fewest compute slices whose share (slices / total_slices)
    covers the requirement, the smallest memory among equals. With no MIG option (or a rate of
    zero) the answer is one full GPU (zero for zero demand).
    """
    need = gpus_required(rate_rps, msrr_rps)
    if need >= 1:
        return Provisioning(need, math.ceil(need), None)
    if need == 0:
        return Provisioning(0.0, 0, None)
    fitting = [m for m in mig_options if m.slices / total_slices >= need]
    if not fitting:
        return Provisioning(need, 1, None)
    best = min(fitting, key=lambda m: (m.slices, m.memory_mib))
    return Provisioning(need, 0, best.name)


def mig_options_for(gpu_type: str) -> list[MigOption]:
    """The MIG profiles the node agent knows for a GPU type ("a100-80gb", ...); [] if unknown."""
    from shapeshifter.hw.models import GPU_MODELS

    model = GPU_MODELS.get(gpu_type)
    if model is None:
        return []
    return [MigOption(p.name, p.slices, p.memory_mib) for p in model.mig_profiles]
