"""Synthetic request traces with the Azure LLM inference schema (TIMESTAMP, ContextTokens,
GeneratedTokens), for evaluating policies on workloads unlike the shipped trace. Pure and
seeded (numpy Generator): the same spec gives the same bytes. CLI: `shapectl trace synth`.

Arrivals: a Markov-modulated Poisson process. The rate holds a level for an exponential time
(mean `burst_period_s`), then jumps to a new one: `rate_rps` x a gamma multiplier of mean 1 and
coefficient of variation `burstiness` (0 = a plain Poisson process). Holding times do not depend
on the level, so the time-averaged rate stays `rate_rps` and, while `burst_period_s` is well
above a minute, the per-minute rate's CV is about `burstiness` (plus the Poisson noise
1/sqrt(60 x rate_rps)). An optional diurnal sine, 1 + `diurnal_amplitude` x
sin(2 pi t / `diurnal_period_s`), modulates the rate by thinning.

Tokens: per request a query class (OASIS §3, coordinator/profiles/classes.py, tau = 500) drawn
from `mix`, then prompt and output lengths from lognormals (sigma 0.6) clipped into the class's
bounds: small 1..500, large 501..8192 (prompt) or 501..4096 (output). The medians are this
project's choice, not measurements: small prompt 150, large prompt 1500, small output 120,
large output 900 tokens.

Presets (`--preset`; explicit fields override the preset's):
- `conversation` (default): the Azure 2023 conversation trace's class mix, CONVERSATION_MIX
  below, Poisson arrivals.
- `prompt-heavy`: mostly large prompts, siso 0.15, silo 0.05, liso 0.65, lilo 0.15, burstiness
  0.3.
- `bursty`: the conversation mix, burstiness 1.0, levels held 240 s on average.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from shapeshifter.common.atomic import atomic_write
from shapeshifter.common.errors import InvalidArgument, out_of_range

CLASSES = ("siso", "silo", "liso", "lilo")
TAU_TOKENS = 500
SMALL_PROMPT_MEDIAN_TOKENS, LARGE_PROMPT_MEDIAN_TOKENS = 150, 1500
SMALL_OUTPUT_MEDIAN_TOKENS, LARGE_OUTPUT_MEDIAN_TOKENS = 120, 900
TOKENS_SIGMA = 0.6  # lognormal shape of the token counts within a class
MAX_PROMPT_TOKENS, MAX_OUTPUT_TOKENS = 8192, 4096
DEFAULT_START = datetime(2023, 11, 16, tzinfo=UTC)
MAX_REQUESTS = 20_000_000  # ~0.8 GB of CSV; bounds memory and run time
MIX_SUM_TOLERANCE = 1e-6
TICKS_PER_S = 10**7  # Azure timestamps carry 7 fractional digits
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_CHUNK_ROWS = 500_000

# Measured from ../shared/data/azure-llm-2023/AzureLLMInferenceTrace_conv.csv with
# coordinator.profiles.classes.read_azure_trace + classify (tau 500): of 19,366 requests 7,627
# SISO, 9 SILO, 11,110 LISO, 620 LILO.
CONVERSATION_MIX = (7627 / 19366, 9 / 19366, 11110 / 19366, 620 / 19366)


@dataclass(frozen=True)
class SynthSpec:
    """A validated generator input: construction (and dataclasses.replace) raises
    InvalidArgument naming the field and its allowed range; the mix is normalised."""

    duration_s: float = 3600.0
    rate_rps: float = 5.0
    mix: tuple[float, float, float, float] = CONVERSATION_MIX  # siso, silo, liso, lilo
    burstiness: float = 0.0
    burst_period_s: float = 300.0
    diurnal_amplitude: float = 0.0
    diurnal_period_s: float = 86400.0
    seed: int = 0
    start: datetime = field(default=DEFAULT_START)

    def __post_init__(self) -> None:
        for name, low, high, unit in _RANGES:
            _check_range(name, getattr(self, name), low, high, unit)
        _check_seed(self.seed)
        object.__setattr__(self, "mix", _normalised_mix(self.mix))
        object.__setattr__(self, "start", _utc(self.start))
        expected = self.rate_rps * self.duration_s
        if expected > MAX_REQUESTS:
            raise InvalidArgument(
                f"rate_rps x duration_s = {expected:.4g} expected requests is above the limit "
                f"{MAX_REQUESTS:,}; lower rate_rps or duration_s", field="rate_rps")


_RANGES: tuple[tuple[str, float, float, str], ...] = (
    ("duration_s", 60, 172_800, "s"),
    ("rate_rps", 0.01, 10_000, "req/s"),
    ("burstiness", 0, 10, ""),
    ("burst_period_s", 10, 86_400, "s"),
    ("diurnal_amplitude", 0, 1, ""),
    ("diurnal_period_s", 60, 604_800, "s"),
)


def _check_range(name: str, value: object, low: float, high: float, unit: str = "") -> None:
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise InvalidArgument(f"{name}={value!r} is not a number; allowed range "
                              f"[{low:g}, {high:g}]", field=name)
    if not low <= value <= high:  # NaN fails this too
        raise out_of_range(name, float(value), low, high, unit)


def _check_seed(seed: object) -> None:
    if not isinstance(seed, numbers.Integral) or isinstance(seed, bool) or not (
            0 <= seed < 2**63):
        raise InvalidArgument(f"seed={seed!r} must be an integer in [0, 2^63)", field="seed")


def _normalised_mix(mix: object) -> tuple[float, float, float, float]:
    if not isinstance(mix, tuple | list) or len(mix) != len(CLASSES):
        raise InvalidArgument(f"mix={mix!r} must be 4 shares ({', '.join(CLASSES)})",
                              field="mix")
    for name, share in zip(CLASSES, mix, strict=True):
        _check_range(f"mix.{name}", share, 0, 1)
    total = float(sum(mix))
    if abs(total - 1.0) > MIX_SUM_TOLERANCE:
        raise InvalidArgument(f"mix shares must sum to 1 (within {MIX_SUM_TOLERANCE:g}), they "
                              f"sum to {total:.6g}", field="mix")
    a, b, c, d = (float(s) / total for s in mix)
    return (a, b, c, d)


def _utc(start: object) -> datetime:
    if not isinstance(start, datetime):
        raise InvalidArgument(f"start={start!r} must be a datetime", field="start")
    return start.replace(tzinfo=UTC) if start.tzinfo is None else start.astimezone(UTC)


PRESETS: dict[str, SynthSpec] = {
    "conversation": SynthSpec(),
    "prompt-heavy": SynthSpec(mix=(0.15, 0.05, 0.65, 0.15), burstiness=0.3),
    "bursty": SynthSpec(burstiness=1.0, burst_period_s=240.0),
}


def spec_from(preset: str, **overrides: Any) -> SynthSpec:
    """A preset with the given (non-None) fields replaced; validated."""
    if preset not in PRESETS:
        raise InvalidArgument(f"preset={preset!r} is unknown; allowed: {', '.join(PRESETS)}",
                              field="preset")
    return replace(PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None})


def parse_mix(text: str) -> tuple[float, float, float, float]:
    """'siso=0.2,liso=0.8' -> shares in CLASSES order (unnamed classes 0)."""
    shares: dict[str, float] = {}
    for part in text.split(","):
        name, sep, value = (s.strip() for s in part.partition("="))
        name = name.lower()
        if not sep or name not in CLASSES or name in shares:
            raise InvalidArgument(f"mix entry {part.strip()!r} is not CLASS=SHARE with CLASS "
                                  f"one of {', '.join(CLASSES)}, each once", field="mix")
        try:
            shares[name] = float(value)
        except ValueError:
            raise InvalidArgument(f"mix.{name}={value!r} is not a number; allowed range "
                                  "[0, 1]", field=f"mix.{name}") from None
    a, b, c, d = (shares.get(name, 0.0) for name in CLASSES)
    return (a, b, c, d)


class SynthRows(NamedTuple):
    arrival_s: np.ndarray  # float seconds from the start, sorted
    prompt_tokens: np.ndarray  # int64
    output_tokens: np.ndarray  # int64


def generate(spec: SynthSpec) -> SynthRows:
    rng = np.random.default_rng(spec.seed)
    arrival_s = arrivals_s(spec, rng)
    prompt, output = tokens(spec, len(arrival_s), rng)
    return SynthRows(arrival_s, prompt, output)


def arrivals_s(spec: SynthSpec, rng: np.random.Generator) -> np.ndarray:
    """Sorted arrival times in [0, duration_s): one Poisson segment per rate level."""
    segments, t_s, drawn = [], 0.0, 0
    peak_factor = 1.0 + spec.diurnal_amplitude
    while t_s < spec.duration_s:
        end_s = min(t_s + rng.exponential(spec.burst_period_s), spec.duration_s)
        level_rps = spec.rate_rps * _multiplier(spec.burstiness, rng)
        expected = level_rps * peak_factor * (end_s - t_s)
        if drawn + expected > 2 * MAX_REQUESTS:
            raise InvalidArgument(
                f"the drawn rate levels yield over {2 * MAX_REQUESTS:,} requests (burstiness "
                f"{spec.burstiness:g}); lower rate_rps, duration_s or burstiness",
                field="rate_rps")
        n = int(rng.poisson(expected))
        times_s = np.sort(rng.uniform(t_s, end_s, n))
        keep = rng.random(n) * peak_factor < _diurnal(spec, times_s)  # thinning
        segments.append(times_s[keep])
        drawn, t_s = drawn + n, end_s
    return np.concatenate(segments)


def _multiplier(cv: float, rng: np.random.Generator) -> float:
    """A gamma draw of mean 1 and coefficient of variation cv (1 when cv is 0)."""
    if cv <= 0:
        return 1.0
    shape = 1.0 / cv**2
    return float(rng.gamma(shape, 1.0 / shape))


def _diurnal(spec: SynthSpec, t_s: np.ndarray) -> np.ndarray:
    return 1.0 + spec.diurnal_amplitude * np.sin(2 * math.pi * t_s / spec.diurnal_period_s)


def tokens(spec: SynthSpec, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(prompt, output) token counts of n requests whose classes are drawn from spec.mix."""
    cls = rng.choice(len(CLASSES), size=n, p=np.asarray(spec.mix))
    large_in, large_out = (cls == 2) | (cls == 3), (cls == 1) | (cls == 3)
    prompt = np.where(
        large_in, _draw(LARGE_PROMPT_MEDIAN_TOKENS, TAU_TOKENS + 1, MAX_PROMPT_TOKENS, n, rng),
        _draw(SMALL_PROMPT_MEDIAN_TOKENS, 1, TAU_TOKENS, n, rng))
    output = np.where(
        large_out, _draw(LARGE_OUTPUT_MEDIAN_TOKENS, TAU_TOKENS + 1, MAX_OUTPUT_TOKENS, n, rng),
        _draw(SMALL_OUTPUT_MEDIAN_TOKENS, 1, TAU_TOKENS, n, rng))
    return prompt, output


def _draw(median_tokens: int, low: int, high: int, n: int, rng: np.random.Generator
          ) -> np.ndarray:
    draws = rng.lognormal(math.log(median_tokens), TOKENS_SIGMA, n)
    return np.clip(np.rint(draws), low, high).astype(np.int64)


def timestamps(arrival_s: np.ndarray, start: datetime = DEFAULT_START) -> list[str]:
    """Azure's format, 'YYYY-MM-DD HH:MM:SS.fffffff', rounded to 100 ns (order kept)."""
    start_ticks = (start - _EPOCH) // timedelta(microseconds=1) * (TICKS_PER_S // 10**6)
    ticks = np.rint(np.asarray(arrival_s) * TICKS_PER_S).astype(np.int64) + start_ticks
    whole_s, frac_ticks = np.divmod(ticks, TICKS_PER_S)
    days = np.datetime_as_string(whole_s.astype("datetime64[s]"), unit="s").tolist()
    return [f"{d[:10]} {d[11:]}.{f:07d}" for d, f in zip(days, frac_ticks.tolist(), strict=True)]


def write_csv(spec: SynthSpec, path: Path) -> dict[str, Any]:
    """Generate and write atomically (shapeshifter.common.atomic: a refused or failed run leaves
    nothing at path); returns summarize()'s summary."""
    rows = generate(spec)
    if len(rows.arrival_s) < 2:
        raise InvalidArgument(f"the spec yields {len(rows.arrival_s)} requests (a trace needs "
                              "at least 2); raise rate_rps or duration_s", field="rate_rps")
    with atomic_write(path, plain_mode=True, make_parents=True, encoding="utf-8",
                      newline="\n") as f:
        f.write("TIMESTAMP,ContextTokens,GeneratedTokens\n")
        for lo in range(0, len(rows.arrival_s), _CHUNK_ROWS):
            _write_rows(f, rows, spec.start, slice(lo, lo + _CHUNK_ROWS))
    return summarize(spec, rows)


def _write_rows(f: Any, rows: SynthRows, start: datetime, part: slice) -> None:
    stamps = timestamps(rows.arrival_s[part], start)
    f.writelines(f"{s},{p},{o}\n" for s, p, o in zip(
        stamps, rows.prompt_tokens[part].tolist(), rows.output_tokens[part].tolist(),
        strict=True))


def per_minute_cv(arrival_s: np.ndarray, duration_s: float) -> float:
    """CV of the arrival counts in the whole minutes of [0, duration_s)."""
    minutes = max(1, int(duration_s // 60))
    counts = np.bincount((arrival_s[arrival_s < minutes * 60] // 60).astype(np.int64),
                         minlength=minutes)
    return float(counts.std() / max(counts.mean(), 1e-12))


def summarize(spec: SynthSpec, rows: SynthRows) -> dict[str, Any]:
    """Requests, mean rate, per-minute CV (and a Poisson process's), measured class shares."""
    n = len(rows.arrival_s)
    large_in, large_out = rows.prompt_tokens > TAU_TOKENS, rows.output_tokens > TAU_TOKENS
    masks = (~large_in & ~large_out, ~large_in & large_out, large_in & ~large_out,
             large_in & large_out)
    return {
        "requests": n,
        "duration_s": spec.duration_s,
        "mean_rate_rps": n / spec.duration_s,
        "per_minute_cv": per_minute_cv(rows.arrival_s, spec.duration_s),
        "poisson_per_minute_cv": 1.0 / math.sqrt(60.0 * spec.rate_rps),
        "class_shares": {c: float(m.mean()) if n else 0.0
                         for c, m in zip(CLASSES, masks, strict=True)},
    }
