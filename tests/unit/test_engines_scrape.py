"""Parsing vLLM /metrics (current and deprecated names), rates and p95 latencies."""

from __future__ import annotations

import pytest

from shapeshifter.vllm.metrics import (
    E2E_LATENCY,
    Histogram,
    histogram_quantile,
    parse_metrics,
    update_metrics,
)

# The shape vLLM 0.32 exposes (checked against its v1/metrics/loggers.py), two engines.
CURRENT = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="tiny"} 3.0
vllm:num_requests_running{engine="1",model_name="tiny"} 2.0
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="tiny"} 1.0
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="tiny"} 0.25
vllm:kv_cache_usage_perc{engine="1",model_name="tiny"} 0.5
# TYPE vllm:prompt_tokens counter
vllm:prompt_tokens_total{engine="0",model_name="tiny"} 100.0
vllm:prompt_tokens_created{engine="0",model_name="tiny"} 1.7e9
# TYPE vllm:generation_tokens counter
vllm:generation_tokens_total{engine="0",model_name="tiny"} 400.0
# TYPE vllm:engine_sleep_state gauge
vllm:engine_sleep_state{engine="0",model_name="tiny",sleep_state="awake"} 0.0
vllm:engine_sleep_state{engine="0",model_name="tiny",sleep_state="weights_offloaded"} 1.0
vllm:engine_sleep_state{engine="0",model_name="tiny",sleep_state="discard_all"} 0.0
# TYPE vllm:e2e_request_latency_seconds histogram
vllm:e2e_request_latency_seconds_bucket{engine="0",le="0.5",model_name="tiny"} 10.0
vllm:e2e_request_latency_seconds_bucket{engine="0",le="1.0",model_name="tiny"} 18.0
vllm:e2e_request_latency_seconds_bucket{engine="0",le="2.0",model_name="tiny"} 20.0
vllm:e2e_request_latency_seconds_bucket{engine="0",le="+Inf",model_name="tiny"} 20.0
vllm:e2e_request_latency_seconds_count{engine="0",model_name="tiny"} 20.0
vllm:e2e_request_latency_seconds_sum{engine="0",model_name="tiny"} 12.0
"""

DEPRECATED = """\
# TYPE vllm:gpu_cache_usage_perc gauge
vllm:gpu_cache_usage_perc{model_name="old"} 0.75
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{model_name="old"} 1.0
"""


def test_current_names_summed_over_engines() -> None:
    s = parse_metrics(CURRENT)
    assert s.requests_running == 5.0
    assert s.requests_waiting == 1.0
    assert s.kv_cache_usage_frac == 0.5  # the fullest engine
    assert s.prompt_tokens_total == 100.0  # the _created sample is not added
    assert s.generation_tokens_total == 400.0
    assert s.engine_sleep_state == 1.0  # weights_offloaded
    assert s.histograms[E2E_LATENCY].count == 20.0


def test_deprecated_kv_name_and_missing_metrics() -> None:
    s = parse_metrics(DEPRECATED)
    assert s.kv_cache_usage_frac == 0.75
    assert s.requests_running == 1.0
    assert s.engine_sleep_state == 0.0
    assert parse_metrics("").kv_cache_usage_frac == -1.0


def test_malformed_text_raises_value_error() -> None:
    with pytest.raises(ValueError):
        parse_metrics("vllm:num_requests_running{engine=0 oops\n")


def test_histogram_quantile_interpolates() -> None:
    h = Histogram(((0.5, 10.0), (1.0, 18.0), (2.0, 20.0), (float("inf"), 20.0)))
    assert histogram_quantile(0.5, h) == pytest.approx(0.5)
    # rank 19 of 20 falls in (1, 2]: 1 + (19 - 18) / (20 - 18)
    assert histogram_quantile(0.95, h) == pytest.approx(1.5)
    assert histogram_quantile(0.95, Histogram(((1.0, 0.0), (float("inf"), 4.0)))) == 1.0
    assert histogram_quantile(0.95, Histogram(())) == 0.0


def test_rates_and_window_p95_between_scrapes() -> None:
    first = parse_metrics(CURRENT)
    m1 = update_metrics(None, None, first, 0.0)
    assert m1.generation_tokens_per_s == 0.0  # no previous scrape yet
    later = parse_metrics(
        CURRENT.replace("} 400.0", "} 600.0").replace("} 100.0", "} 150.0")
        .replace('le="2.0",model_name="tiny"} 20.0', 'le="2.0",model_name="tiny"} 30.0')
        .replace('le="+Inf",model_name="tiny"} 20.0', 'le="+Inf",model_name="tiny"} 30.0')
    )
    m2 = update_metrics(m1, first, later, 2.0)
    assert m2.generation_tokens_per_s == pytest.approx(100.0)
    assert m2.prompt_tokens_per_s == pytest.approx(25.0)
    # the 10 requests finished in the window all took 1..2 s
    assert 1.0 < m2.e2e_latency_p95_s <= 2.0
    # no new requests: the previous p95 is kept; a counter reset gives rate 0, not negative
    m3 = update_metrics(m2, later, first, 1.0)
    assert m3.generation_tokens_per_s == 0.0
    assert m3.e2e_latency_p95_s == m2.e2e_latency_p95_s
