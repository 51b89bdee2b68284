"""The profile row: what one serving configuration delivers and what it costs (OASIS §3).

A row's key is `(gpu_type, model, tensor_parallel, quantization, mig_profile, sm_clock_mhz,
power_limit_w, query_class)`; its values are the operating point measured or published for it.
Every value except `source` and `provenance` may be unknown (`None`, an empty CSV cell): the
published tables each report only some of them, and a blank is never filled with a guess.

`parse_row` turns one CSV record (strings) into a `ProfileRow`, refusing anything out of range
with a `ProfileError` that names the line and the field.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, fields
from enum import StrEnum
from typing import Any

from shapeshifter.common.errors import InvalidArgument


class QueryClass(StrEnum):
    """OASIS query classes by prompt/output token counts (τ = 500 by default, see classes.py).

    MIXED is a workload not restricted to one class (e.g. a replayed trace), or a published figure
    whose source does not say which class it was measured with.
    """

    SISO = "SISO"
    SILO = "SILO"
    LISO = "LISO"
    LILO = "LILO"
    MIXED = "MIXED"


class Source(StrEnum):
    MEASURED = "measured"  # produced by the profiler against a live endpoint
    PUBLISHED = "published"  # read from a paper's table; provenance names the table
    DERIVED = "derived"  # computed from other rows by a documented rule; never a measurement


FULL_GPU = "full"
QUANTIZATIONS = frozenset(
    {"none", "fp8", "int8", "int4", "awq", "gptq", "bitsandbytes", "gguf", "compressed-tensors"}
)
_GPU_TYPE_RE = re.compile(r"^[a-z0-9][a-z0-9._-]*$")
_MIG_RE = re.compile(r"^[1-7]g\.[0-9]+gb$")

KEY_FIELDS: tuple[str, ...] = (
    "gpu_type",
    "model",
    "tensor_parallel",
    "quantization",
    "mig_profile",
    "sm_clock_mhz",
    "power_limit_w",
    "query_class",
)
VALUE_FIELDS: tuple[str, ...] = (
    "msrr_rps",
    "slo_p95_s",
    "p95_latency_s",
    "p99_latency_s",
    "ttft_p95_s",
    "throughput_rps",
    "throughput_tok_s",
    "avg_power_w",
    "energy_per_token_j",
    "memory_gb",
    "max_concurrency",
    "source",
    "provenance",
)
COLUMNS: tuple[str, ...] = KEY_FIELDS + VALUE_FIELDS

ProfileKey = tuple[str, str, int, str, str, int | None, float | None, str]


class ProfileError(InvalidArgument):
    """A profile row or file that breaks the schema; names the line (1-based, header = 1)."""

    def __init__(self, message: str, *, line: int | None = None, field: str | None = None,
                 path: str | None = None) -> None:
        where = ", ".join(
            p for p in (path, f"line {line}" if line is not None else None,
                        f"field {field!r}" if field else None) if p
        )
        super().__init__(f"{where}: {message}" if where else message, field=field)
        self.reason = message
        self.line = line
        self.path = path


@dataclass(frozen=True)
class ProfileRow:
    """One configuration's operating point. Units are in the field names."""

    gpu_type: str  # GPU model key as the node agent names it: "a100-80gb", "h100-80gb", ...
    model: str  # served model name (Hugging Face id)
    tensor_parallel: int  # GPUs (or MIG slices) the instance spans
    quantization: str  # "none" (fp16/bf16) or a vLLM --quantization method
    mig_profile: str  # "full" or a MIG profile such as "1g.10gb"
    sm_clock_mhz: int | None  # locked SM clock, or None (not locked)
    power_limit_w: float | None  # power cap, or None (default cap)
    query_class: QueryClass
    msrr_rps: float | None = None  # max serviceable request rate at slo_p95_s (OASIS eq. 3)
    slo_p95_s: float | None = None  # the P95 end-to-end latency SLO msrr_rps is defined against
    p95_latency_s: float | None = None  # P95 latency at the recorded operating point
    p99_latency_s: float | None = None
    ttft_p95_s: float | None = None
    throughput_rps: float | None = None  # completed requests/s at the operating point
    throughput_tok_s: float | None = None  # generated tokens/s at the operating point
    avg_power_w: float | None = None  # mean power of the instance's GPU(s) at the point
    energy_per_token_j: float | None = None
    memory_gb: float | None = None
    max_concurrency: int | None = None  # concurrent requests at the recorded point
    source: Source = Source.MEASURED
    provenance: str = ""

    @property
    def key(self) -> ProfileKey:
        return (self.gpu_type, self.model, self.tensor_parallel, self.quantization,
                self.mig_profile, self.sm_clock_mhz, self.power_limit_w, str(self.query_class))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["query_class"] = str(self.query_class)
        d["source"] = str(self.source)
        return d

    def to_record(self) -> dict[str, str]:
        """The CSV cells: blanks for None, shortest round-tripping text for numbers."""
        return {k: _cell(v) for k, v in self.to_dict().items()}


def _cell(v: object) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        text = repr(v)
        return text.removesuffix(".0")
    return str(v)


# field -> (low, high, unit, integer?) for the numeric fields; bounds inclusive.
_NUMERIC: dict[str, tuple[float, float, str, bool]] = {
    "tensor_parallel": (1, 64, "GPUs", True),
    "sm_clock_mhz": (100, 3000, "MHz", True),
    "power_limit_w": (50, 2000, "W", False),
    "msrr_rps": (0, 1e6, "req/s", False),
    "slo_p95_s": (0.001, 86400, "s", False),
    "p95_latency_s": (0, 86400, "s", False),
    "p99_latency_s": (0, 86400, "s", False),
    "ttft_p95_s": (0, 86400, "s", False),
    "throughput_rps": (0, 1e6, "req/s", False),
    "throughput_tok_s": (0, 1e8, "tok/s", False),
    "avg_power_w": (1, 20000, "W", False),
    "energy_per_token_j": (0, 1e4, "J/token", False),
    "memory_gb": (0.001, 10000, "GB", False),
    "max_concurrency": (1, 1_000_000, "requests", True),
}
_REQUIRED = frozenset({"gpu_type", "model", "tensor_parallel", "quantization", "mig_profile",
                       "query_class", "source", "provenance"})


def _number(field: str, text: str, line: int | None) -> int | float:
    low, high, unit, integer = _NUMERIC[field]
    allowed = f"a number of {unit} in [{low:g}, {high:g}]"
    try:
        value: int | float = int(text) if integer else float(text)
    except ValueError:
        raise ProfileError(f"{text!r} is not {'an integer' if integer else 'a number'}; "
                           f"expected {allowed} (no unit suffix)", line=line, field=field) from None
    if isinstance(value, float) and not math.isfinite(value):
        raise ProfileError(f"{text!r} is not finite; expected {allowed}", line=line, field=field)
    if not low <= value <= high:
        raise ProfileError(f"{text} is out of range; expected {allowed}", line=line, field=field)
    return value


def parse_row(record: dict[str, str], line: int | None = None) -> ProfileRow:
    """Validate one CSV record (column -> text) into a row; the record must have exactly COLUMNS."""
    unknown = sorted(set(record) - set(COLUMNS))
    if unknown:
        raise ProfileError(f"unknown column(s) {unknown}; allowed: {list(COLUMNS)}", line=line,
                           field=unknown[0])
    missing = [c for c in COLUMNS if c not in record]
    if missing:
        raise ProfileError(f"missing column(s) {missing}", line=line, field=missing[0])
    cells = {k: (v or "").strip() for k, v in record.items()}
    for name in COLUMNS:
        if name in _REQUIRED and not cells[name]:
            raise ProfileError("is required and empty", line=line, field=name)

    values: dict[str, Any] = {}
    for name in _NUMERIC:
        values[name] = _number(name, cells[name], line) if cells[name] else None

    gpu_type = cells["gpu_type"]
    if not _GPU_TYPE_RE.match(gpu_type):
        raise ProfileError(f"{gpu_type!r} is not a GPU type key (lower case, e.g. 'a100-80gb')",
                           line=line, field="gpu_type")
    model = cells["model"]
    if any(c.isspace() for c in model):
        raise ProfileError(f"{model!r} must not contain whitespace", line=line, field="model")
    quantization = cells["quantization"]
    if quantization not in QUANTIZATIONS:
        raise ProfileError(f"{quantization!r} is not one of {sorted(QUANTIZATIONS)}",
                           line=line, field="quantization")
    mig = cells["mig_profile"]
    if mig != FULL_GPU and not _MIG_RE.match(mig):
        raise ProfileError(f"{mig!r} is neither 'full' nor a MIG profile like '1g.10gb'",
                           line=line, field="mig_profile")
    try:
        query_class = QueryClass(cells["query_class"])
    except ValueError:
        raise ProfileError(f"{cells['query_class']!r} is not one of "
                           f"{[c.value for c in QueryClass]}", line=line,
                           field="query_class") from None
    try:
        source = Source(cells["source"])
    except ValueError:
        raise ProfileError(f"{cells['source']!r} is not one of {[s.value for s in Source]}",
                           line=line, field="source") from None
    if values["sm_clock_mhz"] is not None and values["power_limit_w"] is not None:
        raise ProfileError("set sm_clock_mhz or power_limit_w, not both", line=line,
                           field="power_limit_w")
    if values["msrr_rps"] is not None and values["slo_p95_s"] is None:
        raise ProfileError("msrr_rps is defined at an SLO: slo_p95_s is required with it",
                           line=line, field="slo_p95_s")
    for name in ("power_limit_w", "avg_power_w", "memory_gb"):
        if values[name] is not None:
            values[name] = float(values[name])
    return ProfileRow(gpu_type=gpu_type, model=model, quantization=quantization, mig_profile=mig,
                      query_class=query_class, source=source, provenance=cells["provenance"],
                      **values)


def validate(row: ProfileRow, line: int | None = None) -> ProfileRow:
    """Re-check a row built in code (e.g. by the profiler) through the same rules as the loader."""
    return parse_row(row.to_record(), line)


assert {f.name for f in fields(ProfileRow)} == set(COLUMNS)
