"""Profiler logic without a server: statistics, the ramp, eq. 3, clocks, Ctrl-C."""

from __future__ import annotations

from typing import Any

import pytest

from coordinator.profiles.profiler import (
    RequestResult,
    StepResult,
    SweepConfig,
    build_prompt,
    msrr_step,
    next_concurrency,
    percentile,
    summarize,
    sweep,
)
from coordinator.profiles.schema import QueryClass, Source
from shapeshifter.common.clock import ManualClock
from shapeshifter.common.errors import FailedPrecondition, InvalidArgument, Unavailable


def test_percentile_linear_between_ranks() -> None:
    values = [float(v) for v in range(1, 101)]  # 1..100
    assert percentile(values, 95) == pytest.approx(95.05)
    assert percentile(values, 50) == pytest.approx(50.5)
    assert percentile([3.0], 99) == 3.0
    assert percentile([4.0, 1.0, 2.0, 3.0], 100) == 4.0
    with pytest.raises(InvalidArgument):
        percentile([], 95)


def test_summarize_counts_failures_and_tokens() -> None:
    results = [RequestResult(True, 1.0, 0.1, 50), RequestResult(True, 3.0, 0.3, 50),
               RequestResult(False, 0.5, error="HTTP 500")]
    s = summarize(4, results, wall_s=2.0, power_samples_w=[100.0, 200.0],
                  memory_samples_gb=[10.0, 12.5, 11.0])
    assert s.peak_memory_gb == 12.5
    assert (s.requests, s.errors) == (3, 1)
    assert s.throughput_rps == pytest.approx(1.0)
    assert s.throughput_tok_s == pytest.approx(50.0)
    assert s.p95_latency_s == pytest.approx(2.9)
    assert s.avg_power_w == pytest.approx(150.0)
    assert not s.meets(100.0)  # a step with a failed request never counts


def test_ramp_doubles_then_bisects() -> None:
    tried: dict[int, bool] = {}
    order = []
    limit = 11  # levels up to 11 meet the SLO
    while (c := next_concurrency(tried, 256)) is not None:
        order.append(c)
        tried[c] = c <= limit
    assert order == [1, 2, 4, 8, 16, 12, 10, 11]
    tried = {}
    order = []
    while (c := next_concurrency(tried, 6)) is not None:
        order.append(c)
        tried[c] = True
    assert order == [1, 2, 4, 6]


def _model_step(endpoint: Any, prompt: Any, max_tokens: int, c: int, n: int, clock: Any,
                power: Any, interval: float, on_request: Any, memory_gb: Any = None
                ) -> StepResult:
    """A server that serves 8 requests at a time, 1 s each: latency grows past c = 8."""
    latency = 1.0 * max(1.0, c / 8)
    rps = min(c, 8) / 1.0
    watts = power() if power else None
    return StepResult(c, n, 0, n / rps, latency, latency * 1.1, 0.1, rps, rps * max_tokens,
                      watts)


class _Endpoint:
    def tokenize(self, text: str) -> list[int] | None:
        return [7, 8, 9]

    def complete(self, prompt: Any, max_tokens: int) -> RequestResult:  # pragma: no cover
        raise AssertionError("the step runner is replaced")


class _Agent:
    def __init__(self, simulated: bool = False) -> None:
        self.simulated = simulated
        self.calls: list[tuple[str, int]] = []

    def gpu_type(self, gpu: int) -> str:
        return "a100-80gb"

    def is_simulated(self) -> bool:
        return self.simulated

    def power_w(self, gpu: int) -> float:
        return 200.0

    def memory_used_gb(self, gpu: int) -> float:
        return 0.0  # an idle simulated GPU: nothing resident, so no memory figure

    def lock_clocks(self, gpu: int, sm_clock_mhz: int) -> None:
        self.calls.append(("lock", sm_clock_mhz))

    def reset_clocks(self, gpu: int) -> None:
        self.calls.append(("reset", gpu))


def _cfg(**over: Any) -> SweepConfig:
    base: dict[str, Any] = dict(model="m/x", query_class=QueryClass.LISO, slo_p95_s=1.5,
                                prompt_tokens=1000, output_tokens=50, gpu_type="a100-80gb")
    base.update(over)
    return SweepConfig(**base)


def test_sweep_finds_msrr_by_eq3_and_builds_a_measured_row() -> None:
    rows = []
    result = sweep(_cfg(), _Endpoint(), agent=_Agent(), clock=ManualClock(),
                   step_runner=_model_step, on_row=rows.append)
    # latency = c/8 s above c = 8, SLO 1.5 s: c = 12 is the last level within it, but
    # throughput saturates at 8 req/s from c = 8: eq. 3 picks the lowest such level.
    assert [s.concurrency for s in result.steps[None]] == [1, 2, 4, 8, 16, 12, 14, 13]
    (row,) = result.rows
    assert rows == [row]
    assert row.msrr_rps == 8.0 and row.max_concurrency == 8
    assert row.p95_latency_s is not None and row.p95_latency_s <= 1.5
    assert row.avg_power_w == 200.0
    assert row.memory_gb is None
    assert row.energy_per_token_j == pytest.approx(200.0 / 400.0)
    assert row.source is Source.MEASURED and "exact token ids" in row.provenance
    assert result.exact_prompt and not result.interrupted


def test_sweep_with_no_step_within_slo_records_msrr_zero() -> None:
    result = sweep(_cfg(slo_p95_s=0.5), _Endpoint(), clock=ManualClock(),
                   step_runner=_model_step)
    assert [s.concurrency for s in result.steps[None]] == [1]
    assert result.rows[0].msrr_rps == 0.0 and "no step met the SLO" in result.rows[0].provenance


def test_clock_sweep_locks_each_clock_and_resets() -> None:
    agent = _Agent()
    result = sweep(_cfg(clocks_mhz=(1410, 855), max_concurrency=8), _Endpoint(), agent=agent,
                   clock=ManualClock(), step_runner=_model_step)
    assert [r.sm_clock_mhz for r in result.rows] == [1410, 855]
    assert agent.calls == [("lock", 1410), ("lock", 855), ("reset", 0)]


def test_clock_sweep_refused_on_sim_or_without_agent() -> None:
    with pytest.raises(FailedPrecondition, match="--allow-sim"):
        sweep(_cfg(clocks_mhz=(900,)), _Endpoint(), agent=_Agent(simulated=True),
              step_runner=_model_step)
    with pytest.raises(FailedPrecondition, match="--agent"):
        sweep(_cfg(clocks_mhz=(900,)), _Endpoint(), step_runner=_model_step)
    agent = _Agent(simulated=True)
    result = sweep(_cfg(clocks_mhz=(900,), allow_sim=True, max_concurrency=2), _Endpoint(),
                   agent=agent, clock=ManualClock(), step_runner=_model_step)
    assert result.rows[0].sm_clock_mhz == 900 and agent.calls[-1] == ("reset", 0)


def test_ctrl_c_keeps_the_steps_measured_and_resets_clocks() -> None:
    agent = _Agent()
    seen: list[int] = []

    def on_step(clock_mhz: int | None, step: StepResult) -> None:
        seen.append(step.concurrency)
        if len(seen) == 3:
            raise KeyboardInterrupt

    result = sweep(_cfg(clocks_mhz=(1410, 855)), _Endpoint(), agent=agent, clock=ManualClock(),
                   step_runner=_model_step, on_step=on_step)
    assert result.interrupted
    (row,) = result.rows  # the second clock never ran
    assert row.sm_clock_mhz == 1410 and row.msrr_rps == 4.0 and "interrupted" in row.provenance
    assert agent.calls[-1] == ("reset", 0)


def test_prompt_is_exact_token_ids_or_a_documented_approximation() -> None:
    prompt, exact = build_prompt(_Endpoint(), 7)
    assert exact and prompt == [7, 8, 9, 7, 8, 9, 7]

    class NoTokenizer(_Endpoint):
        def tokenize(self, text: str) -> list[int] | None:
            return None

    prompt, exact = build_prompt(NoTokenizer(), 3)
    assert not exact and prompt == "hello hello hello"


def test_config_validation_names_the_field() -> None:
    with pytest.raises(InvalidArgument, match="slo_p95_s"):
        _cfg(slo_p95_s=0)
    with pytest.raises(InvalidArgument, match="one class"):
        _cfg(query_class=QueryClass.MIXED)
    assert msrr_step([], 1.0) is None


def test_bad_row_key_is_refused_before_any_request() -> None:
    with pytest.raises(InvalidArgument, match="quantization"):
        _cfg(quantization="fp7")
    with pytest.raises(InvalidArgument, match="sm_clock_mhz"):
        _cfg(clocks_mhz=(5000,))


def test_an_endpoint_that_fails_every_request_stops_the_sweep() -> None:
    def failing(*args: Any, **kwargs: Any) -> StepResult:
        return summarize(args[3], [RequestResult(False, 0.1, error="HTTP 404")], 1.0)

    with pytest.raises(Unavailable, match="HTTP 404"):
        sweep(_cfg(), _Endpoint(), clock=ManualClock(), step_runner=failing)
