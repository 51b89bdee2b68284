"""Scaling rules that derive rows from others, after the trends of TAPAS Table 1 / Fig. 15.

TAPAS (`001_…` §3.3, Table 1, Fig. 15) publishes only the *direction* of each configuration
parameter's effect, measured on Llama2 on a DGX A100:

    model size 70B→7B:   perf ↑  power ↓  quality ↓↓
    quantization FP16→FP8: perf ↑  power ↓  quality ↓
    parallelism TP8→TP2:  perf ↓  power ↓ (server; per-GPU power and temperature ↑)
    batch size 64→16:     perf ↓  power ↓

The magnitudes below are this project's assumptions, chosen to follow those directions with
round, moderate factors; they are not published figures. Every row a rule produces has
`source = derived` and a provenance naming the rule, its factors and the row it came from.
A profiling run (measured rows) overrides a derived row for the same configuration.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass

from coordinator.profiles.schema import ProfileRow, Source
from shapeshifter.common.errors import InvalidArgument


@dataclass(frozen=True)
class ScalingRule:
    name: str
    direction: str  # what TAPAS Table 1 / Fig. 15 shows
    perf_factor: float  # msrr_rps, throughput_rps, throughput_tok_s
    power_factor: float  # avg_power_w (all GPUs of the instance)
    memory_factor: float  # memory_gb


QUANT_FP8 = ScalingRule(
    name="quantization none->fp8",
    direction="TAPAS Table 1/Fig. 15: FP16->FP8 raises performance, lowers power",
    perf_factor=1.2,  # assumption: decode is memory-bound; half the weight bytes, +20% req/s
    power_factor=0.9,  # assumption
    memory_factor=0.5,  # weights halve (the dominant part for 7-8B models at low concurrency)
)
TP2 = ScalingRule(
    name="tensor_parallel 1->2",
    direction="TAPAS Table 1/Fig. 15: fewer TP ranks lower performance and server power "
              "(so TP2 from TP1 raises both)",
    perf_factor=1.6,  # assumption: sub-linear (all-reduce per layer), not 2x
    power_factor=1.6,  # assumption: two GPUs, each at ~80% of the single-GPU draw
    memory_factor=1.0,  # same weights and KV, spread over two GPUs
)


def apply_rule(row: ProfileRow, rule: ScalingRule, **key_changes: object) -> ProfileRow:
    """A derived row: `row` with its key changed and its values scaled by `rule`.

    Latencies, TTFT and concurrency are left unknown (the rule says nothing about them);
    energy per token follows from the power and throughput factors.
    """
    def scale(v: float | None, f: float) -> float | None:
        return None if v is None else round(v * f, 6)

    return dataclasses.replace(
        row,
        msrr_rps=scale(row.msrr_rps, rule.perf_factor),
        throughput_rps=scale(row.throughput_rps, rule.perf_factor),
        throughput_tok_s=scale(row.throughput_tok_s, rule.perf_factor),
        avg_power_w=scale(row.avg_power_w, rule.power_factor),
        memory_gb=scale(row.memory_gb, rule.memory_factor),
        energy_per_token_j=scale(row.energy_per_token_j, rule.power_factor / rule.perf_factor),
        p95_latency_s=None, p99_latency_s=None, ttft_p95_s=None, max_concurrency=None,
        source=Source.DERIVED,
        provenance=(f"derived, not measured: rule '{rule.name}' (perf x{rule.perf_factor}, "
                    f"power x{rule.power_factor}, memory x{rule.memory_factor}; "
                    f"{rule.direction}; magnitudes are this project's assumption) applied to "
                    f"[{row.provenance.split(';')[0]}]"),
        **key_changes,  # type: ignore[arg-type]
    )


def scale_model_size(row: ProfileRow, model: str, params_from_b: float, params_to_b: float
                     ) -> ProfileRow:
    """Model-size rule: decode reads every weight per step, so req/s ∝ 1/params (memory-bound),
    memory ∝ params; power unchanged (TAPAS: smaller → lower power; keeping it is conservative).
    """
    if params_from_b <= 0 or params_to_b <= 0:
        raise InvalidArgument("parameter counts must be > 0 (billions)", field="params_b")
    ratio = params_to_b / params_from_b
    rule = ScalingRule(
        name=f"model size {params_from_b:g}B->{params_to_b:g}B",
        direction="TAPAS Table 1/Fig. 15: smaller models raise performance, lower power",
        perf_factor=round(1 / ratio, 6), power_factor=1.0, memory_factor=round(ratio, 6))
    return apply_rule(row, rule, model=model)


def cap_batch(row: ProfileRow, max_num_seqs: int) -> ProfileRow:
    """Batch rule: capping concurrency at b below the row's c scales req/s by at most b/c
    (Little's law at unchanged latency: a lower bound, as latency also falls); power unchanged
    (TAPAS: smaller batches draw less; keeping it is conservative).
    """
    if row.max_concurrency is None:
        raise InvalidArgument("the row has no max_concurrency to scale from",
                              field="max_concurrency")
    if max_num_seqs < 1:
        raise InvalidArgument(f"max_num_seqs must be >= 1, got {max_num_seqs}",
                              field="max_num_seqs")
    f = min(1.0, max_num_seqs / row.max_concurrency)
    rule = ScalingRule(name=f"batch cap {row.max_concurrency}->{max_num_seqs}",
                       direction="TAPAS Table 1/Fig. 15: smaller batches lower performance "
                                 "and power", perf_factor=round(f, 6), power_factor=1.0,
                       memory_factor=1.0)
    return dataclasses.replace(apply_rule(row, rule), max_concurrency=max_num_seqs)


def derive_defaults(published: Iterable[ProfileRow]) -> list[ProfileRow]:
    """The derived rows shipped in defaults.csv: FP8 and TP2 variants of every published
    full-GPU, TP1, unquantized row that has an MSRR (OASIS Tables 1-2)."""
    out: list[ProfileRow] = []
    for row in published:
        if (row.source is not Source.PUBLISHED or row.msrr_rps is None
                or row.tensor_parallel != 1 or row.quantization != "none"
                or row.mig_profile != "full"):
            continue
        out.append(apply_rule(row, QUANT_FP8, quantization="fp8"))
        out.append(apply_rule(row, TP2, tensor_parallel=2))
    return out
