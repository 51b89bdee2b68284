"""Query classes of a live endpoint's recent requests, from two scrapes of its vLLM /metrics.

vLLM counts every finished request's prompt and generation lengths in two histograms
(`vllm:request_prompt_tokens`, `vllm:request_generation_tokens`, 1-2-5 buckets). The difference
of two scrapes is the window's requests. τ = 500 is a bucket bound, so the share of prompts
(outputs) of at most τ tokens is exact there; for other τ it is interpolated inside the bucket.

The histograms are marginals: the joint class shares assume prompt and output lengths are
independent within the window. That is stated in the result (`assumption`), never hidden; a
trace (`classes.class_shares`) gives the exact joint shares.
"""

from __future__ import annotations

import math
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass

from coordinator.profiles.classes import DEFAULT_TAU_TOKENS
from coordinator.profiles.schema import QueryClass
from shapeshifter.common.errors import (
    FailedPrecondition,
    InvalidArgument,
    Unavailable,
    out_of_range,
)
from shapeshifter.vllm.metrics import (
    GENERATION_LENGTH,
    PROMPT_LENGTH,
    EngineSample,
    Histogram,
    parse_metrics,
)

INDEPENDENCE = "prompt and output lengths independent (vLLM exports them as separate histograms)"


@dataclass(frozen=True)
class LiveClasses:
    requests: float  # finished in the window
    window_s: float
    short_prompt_frac: float  # prompt <= tau
    short_output_frac: float  # output <= tau
    shares: dict[QueryClass, float]
    demand_rps: dict[QueryClass, float]
    tau_exact: bool  # tau is a bucket bound of both histograms
    assumption: str = INDEPENDENCE


def fraction_at_most(hist: Histogram, tokens: float) -> tuple[float, bool]:
    """Share of observations <= tokens (linear inside a bucket) and whether it is exact."""
    total = hist.count
    if total <= 0:
        raise FailedPrecondition("no requests finished in the window", field="window_s")
    prev_le, prev_n = 0.0, 0.0
    for le, n in hist.buckets:
        if tokens == le:
            return n / total, True
        if tokens < le:
            if math.isinf(le):  # beyond the largest finite bound: all but what lies above it
                return prev_n / total, False
            inside = (tokens - prev_le) / (le - prev_le)
            return (prev_n + inside * (n - prev_n)) / total, False
        prev_le, prev_n = le, n
    return 1.0, True


def classify_window(older: EngineSample, newer: EngineSample, window_s: float,
                    tau_tokens: int = DEFAULT_TAU_TOKENS) -> LiveClasses:
    """Class shares and demand of the requests that finished between two scrapes (pure)."""
    if not window_s > 0:
        raise out_of_range("window_s", window_s, 0.001, math.inf, "s")
    if tau_tokens < 1:
        raise out_of_range("tau_tokens", tau_tokens, 1, math.inf, "tokens")
    prompts = _window(older, newer, PROMPT_LENGTH)
    outputs = _window(older, newer, GENERATION_LENGTH)
    p_short, p_exact = fraction_at_most(prompts, tau_tokens)
    o_short, o_exact = fraction_at_most(outputs, tau_tokens)
    shares = {
        QueryClass.SISO: p_short * o_short,
        QueryClass.SILO: p_short * (1 - o_short),
        QueryClass.LISO: (1 - p_short) * o_short,
        QueryClass.LILO: (1 - p_short) * (1 - o_short),
    }
    rate_rps = prompts.count / window_s
    return LiveClasses(prompts.count, window_s, p_short, o_short, shares,
                       {qc: share * rate_rps for qc, share in shares.items()},
                       p_exact and o_exact)


def _window(older: EngineSample, newer: EngineSample, name: str) -> Histogram:
    now = newer.histograms.get(name)
    if now is None:
        raise FailedPrecondition(f"the endpoint does not export {name} (not a vLLM /metrics?)",
                                 field="url")
    window = now.minus(older.histograms.get(name, Histogram(())))
    if any(n < 0 for _, n in window.buckets):
        raise FailedPrecondition("the engine restarted during the window (counters went down)",
                                 field="window_s")
    return window


def scrape(url: str, timeout_s: float = 5.0) -> EngineSample:
    """GET URL/metrics and parse it."""
    metrics_url = url.rstrip("/") + "/metrics"
    try:
        with urllib.request.urlopen(metrics_url, timeout=timeout_s) as resp:
            text = resp.read().decode()
    except OSError as err:
        raise Unavailable(f"cannot read {metrics_url}: {err}", field="url") from err
    try:
        return parse_metrics(text)
    except ValueError as err:
        raise InvalidArgument(f"{metrics_url} is not Prometheus text: {err}", field="url") from err


def observe(url: str, window_s: float, tau_tokens: int, *, monotonic: Callable[[], float],
            sleep: Callable[[float], None]) -> LiveClasses:
    """Scrape, wait window_s, scrape again, classify the requests that finished in between."""
    if not 0.1 <= window_s <= 86_400:
        raise out_of_range("window_s", window_s, 0.1, 86_400, "s")
    first, t0 = scrape(url), monotonic()
    sleep(window_s)
    second, t1 = scrape(url), monotonic()
    return classify_window(first, second, t1 - t0, tau_tokens)
