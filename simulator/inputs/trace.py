"""Request traces with the Azure LLM inference schema (TIMESTAMP, ContextTokens, GeneratedTokens).

The trace gives a rate-over-time profile and an empirical (prompt, output) token distribution; the
simulator draws Poisson arrivals at a scaled version of that rate (resampling, as the seed papers
scale traces) and token pairs from the empirical distribution.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from coordinator.profiles.classes import read_azure_trace
from shapeshifter.common.errors import InvalidArgument

RATE_BIN_S = 60.0  # the trace's rate profile is counted per minute (smooths single arrivals)


@dataclass(frozen=True)
class Trace:
    rate_rps: np.ndarray  # arrivals per second in each RATE_BIN_S bin
    prompt_tokens: np.ndarray  # int, one per trace request
    output_tokens: np.ndarray

    @property
    def mean_rate_rps(self) -> float:
        return float(self.rate_rps.mean())

    @property
    def peak_rate_rps(self) -> float:
        return float(self.rate_rps.max())

    def rate_at(self, t_s: np.ndarray | float, scale: float, offset_s: float) -> np.ndarray:
        """Scaled arrival rate at times t_s, the profile wrapped around (offset shifts it)."""
        n = len(self.rate_rps)
        idx = (np.floor((np.asarray(t_s) + offset_s) / RATE_BIN_S).astype(np.int64)) % n
        return scale * self.rate_rps[idx]


def load_trace(path: str | Path) -> Trace:
    """Read a trace CSV; InvalidArgument names the file when it is unusable."""
    p = Path(path)
    if not p.is_file():
        raise InvalidArgument(f"trace {str(p)!r} is not a readable file", field="trace")
    requests = read_azure_trace(p)
    if len(requests) < 2:
        raise InvalidArgument(f"trace {p}: needs at least 2 requests, has {len(requests)}",
                              field="trace")
    arrival_s = np.array([r.arrival_s for r in requests])
    arrival_s -= arrival_s.min()
    span_s = max(float(arrival_s.max()), RATE_BIN_S)
    n_bins = int(np.ceil(span_s / RATE_BIN_S))
    counts = np.bincount(np.minimum((arrival_s // RATE_BIN_S).astype(np.int64), n_bins - 1),
                         minlength=n_bins)
    return Trace(rate_rps=counts / RATE_BIN_S,
                 prompt_tokens=np.array([max(1, r.prompt_tokens) for r in requests], np.int64),
                 output_tokens=np.array([max(1, r.output_tokens) for r in requests], np.int64))


def default_trace_path() -> Path:
    """The sample shipped with the package (simulator/data, see its README for attribution)."""
    return Path(__file__).parents[1] / "data" / "AzureLLMInferenceTrace_conv_sample.csv"
