"""Parse vLLM's Prometheus /metrics and turn successive scrapes into rates and p95 latencies.

Pure functions: fetching over HTTP is the runner's job. Both current and deprecated names are
read (vllm:gpu_cache_usage_perc was renamed vllm:kv_cache_usage_perc). Samples with several
label sets (one per engine/model) are summed, except the KV fraction (the fullest one).
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field, replace

from prometheus_client.parser import text_string_to_metric_families

KV_USAGE_NAMES = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")
RUNNING = "vllm:num_requests_running"
WAITING = "vllm:num_requests_waiting"
PROMPT_TOKENS = "vllm:prompt_tokens_total"
GENERATION_TOKENS = "vllm:generation_tokens_total"
SLEEP_STATE = "vllm:engine_sleep_state"
E2E_LATENCY = "vllm:e2e_request_latency_seconds"
TTFT = "vllm:time_to_first_token_seconds"
# Per-request token counts (1-2-5 buckets up to max-model-len): the query-class mix of live traffic.
PROMPT_LENGTH = "vllm:request_prompt_tokens"
GENERATION_LENGTH = "vllm:request_generation_tokens"
HISTOGRAMS = (E2E_LATENCY, TTFT, PROMPT_LENGTH, GENERATION_LENGTH)
# vLLM reports the sleep state as one gauge per sleep_state label (1 = current); as a level:
SLEEP_LEVELS = {"awake": 0.0, "weights_offloaded": 1.0, "discard_all": 2.0}


@dataclass(frozen=True)
class Histogram:
    """Cumulative bucket counts by upper bound (le), +Inf included."""

    buckets: tuple[tuple[float, float], ...]  # (le, cumulative count), ascending le

    @property
    def count(self) -> float:
        return self.buckets[-1][1] if self.buckets else 0.0

    def minus(self, older: Histogram) -> Histogram:
        before = dict(older.buckets)
        return Histogram(tuple((le, n - before.get(le, 0.0)) for le, n in self.buckets))


@dataclass(frozen=True)
class EngineSample:
    """One scrape's raw values; kv_cache_usage_frac is -1 when the engine does not report it.
    engine_sleep_state: 0 awake, 1 weights offloaded (sleep level 1), 2 discard all (level 2)."""

    kv_cache_usage_frac: float = -1.0
    requests_running: float = 0.0
    requests_waiting: float = 0.0
    prompt_tokens_total: float = 0.0
    generation_tokens_total: float = 0.0
    engine_sleep_state: float = 0.0
    histograms: dict[str, Histogram] = field(default_factory=dict)


@dataclass(frozen=True)
class EngineMetrics:
    """What the report and budgets show for one instance (mirrors proto InstanceMetrics)."""

    kv_cache_usage_frac: float = -1.0
    requests_running: float = 0.0
    requests_waiting: float = 0.0
    prompt_tokens_total: float = 0.0
    generation_tokens_total: float = 0.0
    prompt_tokens_per_s: float = 0.0
    generation_tokens_per_s: float = 0.0
    engine_sleep_state: float = 0.0
    e2e_latency_p95_s: float = 0.0
    ttft_p95_s: float = 0.0


def parse_metrics(text: str) -> EngineSample:
    """Parse Prometheus text exposition from a vLLM /metrics endpoint (ValueError if malformed)."""
    sums: dict[str, float] = defaultdict(float)
    kv_fracs: list[float] = []
    sleep_levels: list[float] = []
    buckets: dict[str, dict[float, float]] = defaultdict(lambda: defaultdict(float))
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name in KV_USAGE_NAMES:
                kv_fracs.append(s.value)
            elif s.name == SLEEP_STATE:
                level = SLEEP_LEVELS.get(s.labels.get("sleep_state", ""))
                sleep_levels.append(s.value if level is None else level * (s.value > 0))
            elif s.name.endswith("_bucket") and s.name[: -len("_bucket")] in HISTOGRAMS:
                buckets[s.name[: -len("_bucket")]][float(s.labels["le"])] += s.value
            else:
                sums[s.name] += s.value
    histograms = {name: Histogram(tuple(sorted(by_le.items()))) for name, by_le in buckets.items()}
    return EngineSample(
        kv_cache_usage_frac=max(kv_fracs) if kv_fracs else -1.0,
        requests_running=sums[RUNNING],
        requests_waiting=sums[WAITING],
        prompt_tokens_total=sums[PROMPT_TOKENS],
        generation_tokens_total=sums[GENERATION_TOKENS],
        engine_sleep_state=max(sleep_levels, default=0.0),
        histograms=histograms,
    )


def histogram_quantile(q: float, hist: Histogram) -> float:
    """Prometheus-style quantile with linear interpolation inside the bucket; 0 when empty.

    When the quantile falls in the +Inf bucket, the highest finite bound is returned.
    """
    total = hist.count
    if total <= 0:
        return 0.0
    rank = q * total
    prev_le, prev_n = 0.0, 0.0
    for le, n in hist.buckets:
        if n >= rank:
            if math.isinf(le):
                return prev_le
            if n == prev_n:
                return le
            return prev_le + (le - prev_le) * (rank - prev_n) / (n - prev_n)
        prev_le, prev_n = le, n
    return prev_le


def update_metrics(
    previous: EngineMetrics | None,
    prev_sample: EngineSample | None,
    sample: EngineSample,
    interval_s: float,
) -> EngineMetrics:
    """Metrics after a new scrape: token rates over the interval; p95 of the requests that
    finished during it (the previous p95 is kept when none finished). A counter that went
    down (engine restarted) restarts the rate at zero."""
    metrics = EngineMetrics(
        kv_cache_usage_frac=sample.kv_cache_usage_frac,
        requests_running=sample.requests_running,
        requests_waiting=sample.requests_waiting,
        prompt_tokens_total=sample.prompt_tokens_total,
        generation_tokens_total=sample.generation_tokens_total,
        engine_sleep_state=sample.engine_sleep_state,
        e2e_latency_p95_s=previous.e2e_latency_p95_s if previous else 0.0,
        ttft_p95_s=previous.ttft_p95_s if previous else 0.0,
    )
    if prev_sample is None or interval_s <= 0:
        return metrics
    return replace(
        metrics,
        prompt_tokens_per_s=_rate(
            prev_sample.prompt_tokens_total, sample.prompt_tokens_total, interval_s
        ),
        generation_tokens_per_s=_rate(
            prev_sample.generation_tokens_total, sample.generation_tokens_total, interval_s
        ),
        e2e_latency_p95_s=_window_p95(prev_sample, sample, E2E_LATENCY, metrics.e2e_latency_p95_s),
        ttft_p95_s=_window_p95(prev_sample, sample, TTFT, metrics.ttft_p95_s),
    )


def _rate(before: float, after: float, interval_s: float) -> float:
    return max(after - before, 0.0) / interval_s


def _window_p95(prev: EngineSample, cur: EngineSample, name: str, fallback: float) -> float:
    now = cur.histograms.get(name)
    if now is None:
        return fallback
    window = now.minus(prev.histograms.get(name, Histogram(())))
    if window.count <= 0 or any(n < 0 for _, n in window.buckets):
        return fallback
    return histogram_quantile(0.95, window)
