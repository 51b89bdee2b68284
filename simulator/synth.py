"""Synthetic request traces with the Azure LLM inference schema (TIMESTAMP, ContextTokens,
GeneratedTokens), for evaluating policies on workloads unlike the shipped trace. Pure and
seeded: the same spec gives the same bytes.

Arrivals: a Markov-modulated Poisson process. The rate holds a level for an exponential time
(mean `burst_period_s`), then jumps to a new one: `rate_rps` x a gamma multiplier of mean 1 and
coefficient of variation `burstiness` (0 = a plain Poisson process), times an optional diurnal
sine. Tokens: per request a query class (OASIS §3, tau = 500) drawn from `mix`, then prompt and
output lengths from lognormals clipped into the class's bounds (medians below, this project's
assumption: small prompt 150, large 1500, small output 120, large 900 tokens).

Presets: `conversation` (the Azure conversation trace's mix, measured from the 2023 trace with
coordinator.profiles.classes.classify over its 19,366 requests: 0.394 SISO, 0.000 SILO,
0.574 LISO, 0.032 LILO), `prompt-heavy`
(0.15/0.05/0.65/0.15, burstiness 0.3) and `bursty` (conversation mix, burstiness 1.0, levels
held 240 s on average).
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from nodeagent.errors import InvalidArgument, out_of_range

CLASSES = ("siso", "silo", "liso", "lilo")
TAU_TOKENS = 500
SMALL_PROMPT, LARGE_PROMPT, SMALL_OUTPUT, LARGE_OUTPUT = 150, 1500, 120, 900
SIGMA = 0.6  # lognormal shape of the token counts within a class
MAX_PROMPT, MAX_OUTPUT = 8192, 4096
START = datetime(2023, 11, 16, tzinfo=UTC)
CONVERSATION_MIX = (0.394, 0.0, 0.574, 0.032)


@dataclass(frozen=True)
class SynthSpec:
    duration_s: float = 3600.0
    rate_rps: float = 5.0
    mix: tuple[float, float, float, float] = CONVERSATION_MIX  # siso, silo, liso, lilo
    burstiness: float = 0.0
    burst_period_s: float = 300.0
    diurnal_amplitude: float = 0.0
    diurnal_period_s: float = 86400.0
    seed: int = 0

    def validate(self) -> SynthSpec:
        _range("duration_s", self.duration_s, 60, 172_800, "s")
        _range("rate_rps", self.rate_rps, 0.01, 10_000, "req/s")
        _range("burstiness", self.burstiness, 0, 10)
        _range("burst_period_s", self.burst_period_s, 10, 86_400, "s")
        _range("diurnal_amplitude", self.diurnal_amplitude, 0, 1)
        _range("diurnal_period_s", self.diurnal_period_s, 60, 604_800, "s")
        _range("seed", self.seed, 0, 2**31 - 1)
        for name, share in zip(CLASSES, self.mix, strict=True):
            _range(f"mix.{name}", share, 0, 1)
        if abs(sum(self.mix) - 1.0) > 1e-6:
            raise InvalidArgument(f"mix shares must sum to 1, they sum to {sum(self.mix):.6g}",
                                  field="mix")
        return self


PRESETS: dict[str, SynthSpec] = {
    "conversation": SynthSpec(),
    "prompt-heavy": SynthSpec(mix=(0.15, 0.05, 0.65, 0.15), burstiness=0.3),
    "bursty": SynthSpec(burstiness=1.0, burst_period_s=240.0),
}


def _range(name: str, value: float, low: float, high: float, unit: str = "") -> None:
    if not low <= value <= high:
        raise out_of_range(name, value, low, high, unit)


def parse_mix(text: str) -> tuple[float, float, float, float]:
    """'siso=0.2,liso=0.8' -> shares in CLASSES order (unnamed classes 0)."""
    shares = dict.fromkeys(CLASSES, 0.0)
    for part in text.split(","):
        name, sep, value = part.partition("=")
        name = name.strip().lower()
        if not sep or name not in shares:
            raise InvalidArgument(f"mix entry {part!r} is not CLASS=SHARE with CLASS one of "
                                  f"{', '.join(CLASSES)}", field="mix")
        try:
            shares[name] = float(value)
        except ValueError as err:
            raise InvalidArgument(f"mix.{name}={value!r} is not a number",
                                  field=f"mix.{name}") from err
    return (shares["siso"], shares["silo"], shares["liso"], shares["lilo"])


def arrivals_s(spec: SynthSpec, rng: np.random.Generator) -> np.ndarray:
    """Sorted arrival times in [0, duration_s)."""
    out, t = [], 0.0
    while t < spec.duration_s:
        hold = rng.exponential(spec.burst_period_s)
        level = spec.rate_rps * _multiplier(spec.burstiness, rng)
        end = min(t + hold, spec.duration_s)
        # Thinning of a Poisson process at the segment's peak rate by the diurnal factor.
        peak = level * (1.0 + spec.diurnal_amplitude)
        n = rng.poisson(peak * (end - t))
        times = np.sort(rng.uniform(t, end, n))
        keep = rng.random(n) * (1.0 + spec.diurnal_amplitude) < _diurnal(spec, times)
        out.append(times[keep])
        t = end
    return np.concatenate(out) if out else np.zeros(0)


def _multiplier(cv: float, rng: np.random.Generator) -> float:
    if cv <= 0:
        return 1.0
    shape = 1.0 / cv**2
    return float(rng.gamma(shape, 1.0 / shape))


def _diurnal(spec: SynthSpec, t_s: np.ndarray) -> np.ndarray:
    return 1.0 + spec.diurnal_amplitude * np.sin(2 * math.pi * t_s / spec.diurnal_period_s)


def tokens(spec: SynthSpec, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    cls = rng.choice(4, size=n, p=np.asarray(spec.mix) / sum(spec.mix))
    large_in = (cls == 2) | (cls == 3)
    large_out = (cls == 1) | (cls == 3)
    prompt = np.where(large_in, _draw(LARGE_PROMPT, TAU_TOKENS + 1, MAX_PROMPT, n, rng),
                      _draw(SMALL_PROMPT, 1, TAU_TOKENS, n, rng))
    output = np.where(large_out, _draw(LARGE_OUTPUT, TAU_TOKENS + 1, MAX_OUTPUT, n, rng),
                      _draw(SMALL_OUTPUT, 1, TAU_TOKENS, n, rng))
    return prompt, output


def _draw(median: int, low: int, high: int, n: int, rng: np.random.Generator) -> np.ndarray:
    return np.clip(np.rint(rng.lognormal(math.log(median), SIGMA, n)), low, high).astype(int)


def generate(spec: SynthSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(arrival s, prompt tokens, output tokens), arrivals sorted."""
    spec.validate()
    rng = np.random.default_rng(spec.seed)
    t = arrivals_s(spec, rng)
    prompt, output = tokens(spec, len(t), rng)
    return t, prompt, output


def _timestamp(t_s: float) -> str:
    """Azure's format: seconds with 7 fractional digits."""
    whole = math.floor(t_s)
    base = datetime.fromtimestamp(START.timestamp() + whole, UTC).strftime("%Y-%m-%d %H:%M:%S")
    return f"{base}.{round((t_s - whole) * 1e7):07d}"[:27]


def write_csv(spec: SynthSpec, path: Path) -> dict[str, float]:
    """Generate and write atomically (a refused spec writes nothing); return a summary."""
    t, prompt, output = generate(spec)
    if len(t) < 2:
        raise InvalidArgument(f"the spec yields {len(t)} requests; raise rate_rps or "
                              "duration_s", field="rate_rps")
    lines = ["TIMESTAMP,ContextTokens,GeneratedTokens"]
    lines += [f"{_timestamp(float(a))},{int(p)},{int(o)}" for a, p, o in
              zip(t, prompt, output, strict=True)]
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return summarize(spec, t, prompt, output)


def summarize(spec: SynthSpec, t: np.ndarray, prompt: np.ndarray, output: np.ndarray
              ) -> dict[str, float]:
    per_min = np.bincount((t // 60).astype(int), minlength=max(1, int(spec.duration_s // 60)))
    large_in, large_out = prompt > TAU_TOKENS, output > TAU_TOKENS
    shares = {"siso": ~large_in & ~large_out, "silo": ~large_in & large_out,
              "liso": large_in & ~large_out, "lilo": large_in & large_out}
    return {"requests": float(len(t)), "mean_rate_rps": float(len(t) / spec.duration_s),
            "per_minute_cv": float(per_min.std() / max(per_min.mean(), 1e-9)),
            **{f"share_{k}": float(v.mean()) for k, v in shares.items()}}


def spec_from(preset: str, **overrides: object) -> SynthSpec:
    if preset not in PRESETS:
        raise InvalidArgument(f"preset={preset!r} is unknown; allowed: {', '.join(PRESETS)}",
                              field="preset")
    given = {k: v for k, v in overrides.items() if v is not None}
    return replace(PRESETS[preset], **given).validate()  # type: ignore[arg-type]
