"""The load sweep: measure a live OpenAI-compatible endpoint and record profile rows.

For one query class the profiler sends requests whose prompt and output lengths are exact:
the prompt is a list of token ids from the served tokenizer (via vLLM's `/tokenize`), the
output is `max_tokens` with `ignore_eos` (and `min_tokens`) set. Where the endpoint has no
`/tokenize`, the prompt is N copies of the word "hello" — an approximation (one token per word
in common BPE vocabularies, plus any BOS token), said so in the row's provenance.

Concurrency ramps up (1, 2, 4, ... then bisection between the last good and first bad level);
each step is a closed loop of `concurrency` workers. A step records P95/P99 latency, P95 TTFT
(when the endpoint streams), completed requests/s, generated tokens/s and — with an agent —
the mean GPU power sampled during the step. MSRR is OASIS eq. 3: the highest throughput among
the steps whose P95 latency is within the SLO (a step with any failed request does not count).
"""

from __future__ import annotations

import json
import math
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Protocol

import structlog

from coordinator.profiles.schema import FULL_GPU, ProfileRow, QueryClass, Source, validate
from shapeshifter.common.clock import Clock, SystemClock
from shapeshifter.common.errors import FailedPrecondition, InvalidArgument, Unavailable

log = structlog.get_logger(__name__)

_SEED_TEXT = ("The quick brown fox jumps over the lazy dog while the committee reviews the "
              "quarterly report on power, cooling and inference capacity in every row.")


# ---------------------------------------------------------------------------------------------
# Pure statistics


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), linear between closest ranks (numpy's default method)."""
    if not values:
        raise InvalidArgument("percentile of no values", field="values")
    if not 0 <= q <= 100:
        raise InvalidArgument(f"q must be in [0, 100], got {q}", field="q")
    s = sorted(values)
    pos = (len(s) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


@dataclass(frozen=True)
class RequestResult:
    ok: bool
    latency_s: float
    ttft_s: float | None = None  # None when the endpoint did not stream
    output_tokens: int = 0
    error: str | None = None
    prompt_tokens: int | None = None  # as the server counted them (usage), when it says


@dataclass(frozen=True)
class StepResult:
    concurrency: int
    requests: int
    errors: int
    wall_s: float
    p95_latency_s: float
    p99_latency_s: float
    ttft_p95_s: float | None
    throughput_rps: float
    throughput_tok_s: float
    avg_power_w: float | None
    first_error: str | None = None
    peak_memory_gb: float | None = None  # GPU memory in use (weights + KV cache), from the agent

    def meets(self, slo_p95_s: float) -> bool:
        return self.errors == 0 and self.p95_latency_s <= slo_p95_s


def summarize(concurrency: int, results: Sequence[RequestResult], wall_s: float,
              power_samples_w: Sequence[float] = (),
              memory_samples_gb: Sequence[float] = ()) -> StepResult:
    """Statistics of one step; latencies and TTFT over the successful requests."""
    if not results:
        raise InvalidArgument("a step needs at least one finished request", field="results")
    if wall_s <= 0:
        raise InvalidArgument(f"wall_s must be > 0, got {wall_s}", field="wall_s")
    ok = [r for r in results if r.ok]
    lat = [r.latency_s for r in ok] or [math.inf]
    ttft = [r.ttft_s for r in ok if r.ttft_s is not None]
    return StepResult(
        concurrency=concurrency, requests=len(results), errors=len(results) - len(ok),
        wall_s=wall_s, p95_latency_s=percentile(lat, 95), p99_latency_s=percentile(lat, 99),
        ttft_p95_s=percentile(ttft, 95) if ttft else None,
        throughput_rps=len(ok) / wall_s,
        throughput_tok_s=sum(r.output_tokens for r in ok) / wall_s,
        avg_power_w=sum(power_samples_w) / len(power_samples_w) if power_samples_w else None,
        first_error=next((r.error for r in results if not r.ok), None),
        peak_memory_gb=max(memory_samples_gb) if memory_samples_gb else None,
    )


def msrr_step(steps: Sequence[StepResult], slo_p95_s: float) -> StepResult | None:
    """OASIS eq. 3: the step with the highest throughput among those within the P95 SLO."""
    good = [s for s in steps if s.meets(slo_p95_s)]
    return max(good, key=lambda s: (s.throughput_rps, -s.concurrency)) if good else None


def next_concurrency(tried: dict[int, bool], max_concurrency: int) -> int | None:
    """The next level to try given {level: met SLO}: double until the first miss, then bisect
    between the highest good and the lowest bad level; None when done."""
    if not tried:
        return 1
    good = [c for c, ok in tried.items() if ok]
    bad = [c for c, ok in tried.items() if not ok]
    hi_good = max(good, default=0)
    if not bad:
        nxt = min(max(1, hi_good * 2), max_concurrency)
        return None if nxt in tried else nxt
    lo_bad = min(bad)
    if lo_bad - hi_good <= 1:
        return None
    return (hi_good + lo_bad) // 2


# ---------------------------------------------------------------------------------------------
# The endpoint


class Endpoint(Protocol):
    def tokenize(self, text: str) -> list[int] | None: ...
    def complete(self, prompt: str | list[int], max_tokens: int) -> RequestResult: ...


class OpenAIEndpoint:
    """An OpenAI-compatible server (vLLM or any other), over the standard library's HTTP."""

    def __init__(self, base_url: str, model: str, *, timeout_s: float = 300.0,
                 clock: Clock | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.timeout_s = timeout_s
        self.clock = clock or SystemClock()

    def _post(self, path: str, body: dict[str, object]) -> urllib.request.Request:
        return urllib.request.Request(
            self.base_url + path, data=json.dumps(body).encode(), method="POST",
            headers={"Content-Type": "application/json", "Accept": "text/event-stream"})

    def tokenize(self, text: str) -> list[int] | None:
        """Token ids from vLLM's /tokenize, or None when the endpoint has none."""
        req = self._post("/tokenize", {"model": self.model, "prompt": text,
                                       "add_special_tokens": False})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                tokens = json.loads(resp.read()).get("tokens")
        except urllib.error.HTTPError as err:
            if err.code in (404, 405, 501):
                return None
            raise Unavailable(f"/tokenize answered HTTP {err.code}") from err
        except (urllib.error.URLError, OSError) as err:
            raise Unavailable(f"cannot reach {self.base_url}: {err}") from err
        if not isinstance(tokens, list) or not all(isinstance(t, int) for t in tokens):
            return None
        return tokens

    def complete(self, prompt: str | list[int], max_tokens: int) -> RequestResult:
        body = {"model": self.model, "prompt": prompt, "max_tokens": max_tokens,
                "min_tokens": max_tokens, "ignore_eos": True, "temperature": 0.0,
                "stream": True, "stream_options": {"include_usage": True}}
        start = self.clock.monotonic()
        ttft: float | None = None
        chunks = 0
        usage: dict[str, int] = {}
        try:
            with urllib.request.urlopen(self._post("/v1/completions", body),
                                        timeout=self.timeout_s) as resp:
                if "text/event-stream" in resp.headers.get("Content-Type", ""):
                    for raw in resp:
                        line = raw.decode("utf-8", "replace").strip()
                        if not line.startswith("data:"):
                            continue
                        data = line[5:].strip()
                        if data == "[DONE]":
                            break
                        event = json.loads(data)
                        if event.get("choices") and event["choices"][0].get("text"):
                            chunks += 1
                            if ttft is None:
                                ttft = self.clock.monotonic() - start
                        if event.get("usage"):
                            usage = event["usage"]
                else:
                    usage = json.loads(resp.read()).get("usage") or {}
        except urllib.error.HTTPError as err:
            return RequestResult(False, self.clock.monotonic() - start,
                                 error=f"HTTP {err.code}")
        except (urllib.error.URLError, OSError, ValueError) as err:
            return RequestResult(False, self.clock.monotonic() - start, error=str(err))
        tokens = usage.get("completion_tokens", chunks)
        return RequestResult(True, self.clock.monotonic() - start, ttft, int(tokens),
                             prompt_tokens=usage.get("prompt_tokens"))


def build_prompt(endpoint: Endpoint, prompt_tokens: int) -> tuple[str | list[int], bool]:
    """A prompt of exactly `prompt_tokens` tokens from the served vocabulary, and whether it is
    exact (token ids via /tokenize) or the word approximation."""
    if prompt_tokens < 1:
        raise InvalidArgument(f"prompt_tokens must be >= 1, got {prompt_tokens}",
                              field="prompt_tokens")
    ids = endpoint.tokenize(_SEED_TEXT)
    if ids:
        return [ids[i % len(ids)] for i in range(prompt_tokens)], True
    return " ".join(["hello"] * prompt_tokens), False


# ---------------------------------------------------------------------------------------------
# GPU access through the node agent


class GpuAgent(Protocol):
    """What the profiler needs from a node agent (shapectl adapts its AgentTarget to this)."""

    def gpu_type(self, gpu: int) -> str: ...
    def is_simulated(self) -> bool: ...
    def power_w(self, gpu: int) -> float: ...
    def memory_used_gb(self, gpu: int) -> float: ...
    def lock_clocks(self, gpu: int, sm_clock_mhz: int) -> None: ...
    def reset_clocks(self, gpu: int) -> None: ...


class _PowerSampler:
    """Samples GPU power (and, when given, memory in use) in the background during a step."""

    def __init__(self, read_w: Callable[[], float], interval_s: float,
                 read_memory_gb: Callable[[], float] | None = None) -> None:
        self._read_w, self._interval_s = read_w, interval_s
        self._read_memory_gb = read_memory_gb
        self._stop = threading.Event()
        self.samples_w: list[float] = []
        self.samples_memory_gb: list[float] = []
        self._thread = threading.Thread(target=self._run, daemon=True, name="power-sampler")

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.samples_w.append(float(self._read_w()))
                if self._read_memory_gb is not None:
                    self.samples_memory_gb.append(float(self._read_memory_gb()))
            except Exception as err:  # a lost sample must not stop the sweep
                log.warning("power_sample_failed", error=str(err))
            self._stop.wait(self._interval_s)

    def __enter__(self) -> _PowerSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


# ---------------------------------------------------------------------------------------------
# The sweep


@dataclass(frozen=True)
class SweepConfig:
    model: str
    query_class: QueryClass
    slo_p95_s: float
    prompt_tokens: int
    output_tokens: int
    gpu_type: str = "unknown"
    tensor_parallel: int = 1
    quantization: str = "none"
    mig_profile: str = FULL_GPU
    gpu: int = 0  # the agent's GPU index to read power from and lock clocks on
    clocks_mhz: tuple[int, ...] = ()  # locked clocks to sweep; () = leave clocks alone
    allow_sim: bool = False
    max_concurrency: int = 256
    min_requests_per_step: int = 20
    requests_per_concurrency: int = 3
    power_interval_s: float = 0.2
    url: str = ""

    def __post_init__(self) -> None:
        if self.slo_p95_s <= 0:
            raise InvalidArgument(f"slo_p95_s must be > 0 s, got {self.slo_p95_s}",
                                  field="slo_p95_s")
        if self.query_class is QueryClass.MIXED:
            raise InvalidArgument("profile one class: SISO, SILO, LISO or LILO",
                                  field="query_class")
        for name in ("prompt_tokens", "output_tokens", "max_concurrency",
                     "min_requests_per_step", "requests_per_concurrency"):
            if getattr(self, name) < 1:
                raise InvalidArgument(f"{name} must be >= 1, got {getattr(self, name)}",
                                      field=name)
        # The row key must be valid before a long sweep, not after it.
        validate(ProfileRow(gpu_type=self.gpu_type, model=self.model,
                            tensor_parallel=self.tensor_parallel, quantization=self.quantization,
                            mig_profile=self.mig_profile, sm_clock_mhz=None, power_limit_w=None,
                            query_class=self.query_class, slo_p95_s=self.slo_p95_s,
                            provenance="config check"))
        for mhz in self.clocks_mhz:
            validate(ProfileRow(gpu_type=self.gpu_type, model=self.model, tensor_parallel=1,
                                quantization="none", mig_profile=FULL_GPU, sm_clock_mhz=mhz,
                                power_limit_w=None, query_class=self.query_class,
                                provenance="config check"))

    def requests_for(self, concurrency: int) -> int:
        return max(self.min_requests_per_step, self.requests_per_concurrency * concurrency)


@dataclass
class SweepResult:
    rows: list[ProfileRow] = field(default_factory=list)
    steps: dict[int | None, list[StepResult]] = field(default_factory=dict)  # by clock
    interrupted: bool = False
    exact_prompt: bool = False


def run_step(endpoint: Endpoint, prompt: str | list[int], max_tokens: int, concurrency: int,
             n_requests: int, clock: Clock, power: Callable[[], float] | None = None,
             power_interval_s: float = 0.2, on_request: Callable[[], None] | None = None,
             stop: threading.Event | None = None,
             memory_gb: Callable[[], float] | None = None) -> StepResult:
    """One closed-loop step: `concurrency` workers issue `n_requests` requests in all.

    Workers are daemon threads; on KeyboardInterrupt the workers stop issuing and the interrupt
    propagates (the partial step is discarded).
    """
    stop = stop or threading.Event()
    lock = threading.Lock()
    results: list[RequestResult] = []
    issued = 0

    def worker() -> None:
        nonlocal issued
        while not stop.is_set():
            with lock:
                if issued >= n_requests:
                    return
                issued += 1
            r = endpoint.complete(prompt, max_tokens)
            with lock:
                results.append(r)
            if on_request:
                on_request()

    threads = [threading.Thread(target=worker, daemon=True, name=f"profile-worker-{i}")
               for i in range(min(concurrency, n_requests))]
    sampler = _PowerSampler(power, power_interval_s, memory_gb) if power else None
    start = clock.monotonic()
    try:
        if sampler:
            sampler.__enter__()
        for t in threads:
            t.start()
        for t in threads:
            while t.is_alive():
                t.join(timeout=0.1)  # short joins so Ctrl-C is seen promptly
    except BaseException:
        stop.set()
        raise
    finally:
        if sampler:
            sampler.__exit__()
    wall_s = max(clock.monotonic() - start, 1e-9)
    return summarize(concurrency, results, wall_s, sampler.samples_w if sampler else (),
                     sampler.samples_memory_gb if sampler else ())


def _row(cfg: SweepConfig, clock_mhz: int | None, steps: Sequence[StepResult], exact: bool,
         agent_note: str, now_s: float, interrupted: bool) -> ProfileRow | None:
    if not steps:
        return None
    best = msrr_step(steps, cfg.slo_p95_s)
    point = best or min(steps, key=lambda s: s.concurrency)
    energy = (point.avg_power_w / point.throughput_tok_s
              if point.avg_power_w is not None and point.throughput_tok_s > 0 else None)
    when = datetime.fromtimestamp(now_s, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    levels = ",".join(str(s.concurrency) for s in sorted(steps, key=lambda s: s.concurrency))
    prompt_note = ("exact token ids from the served tokenizer" if exact
                   else "approximate: repeated word, endpoint has no /tokenize")
    provenance = (
        f"measured by shapectl profile at {when} against {cfg.url or 'endpoint'}: "
        f"{cfg.prompt_tokens} prompt tokens ({prompt_note}), {cfg.output_tokens} output tokens "
        f"(ignore_eos); concurrency steps {levels}; OASIS eq. 3 "
        f"{'MSRR at c=' + str(best.concurrency) if best else 'no step met the SLO: MSRR 0'}; "
        f"{agent_note}" + ("; sweep interrupted" if interrupted else "")
    )
    row = ProfileRow(
        gpu_type=cfg.gpu_type, model=cfg.model, tensor_parallel=cfg.tensor_parallel,
        quantization=cfg.quantization, mig_profile=cfg.mig_profile, sm_clock_mhz=clock_mhz,
        power_limit_w=None, query_class=cfg.query_class,
        msrr_rps=round(best.throughput_rps, 6) if best else 0.0, slo_p95_s=cfg.slo_p95_s,
        p95_latency_s=round(point.p95_latency_s, 6) if math.isfinite(point.p95_latency_s)
        else None,
        p99_latency_s=round(point.p99_latency_s, 6) if math.isfinite(point.p99_latency_s)
        else None,
        ttft_p95_s=None if point.ttft_p95_s is None else round(point.ttft_p95_s, 6),
        throughput_rps=round(point.throughput_rps, 6),
        throughput_tok_s=round(point.throughput_tok_s, 6),
        avg_power_w=None if point.avg_power_w is None else round(point.avg_power_w, 3),
        energy_per_token_j=None if energy is None else round(energy, 6),
        memory_gb=_memory_gb(point.peak_memory_gb),
        max_concurrency=point.concurrency, source=Source.MEASURED,
        provenance=provenance,
    )
    return validate(row)


def _memory_gb(peak_gb: float | None) -> float | None:
    """The row's memory: None when unmeasured or when nothing was resident (idle sim GPU)."""
    return round(peak_gb, 3) if peak_gb is not None and peak_gb >= 0.001 else None


def sweep(cfg: SweepConfig, endpoint: Endpoint, *, agent: GpuAgent | None = None,
          clock: Clock | None = None, on_row: Callable[[ProfileRow], None] | None = None,
          on_step: Callable[[int | None, StepResult], None] | None = None,
          on_request: Callable[[], None] | None = None,
          step_runner: Callable[..., StepResult] | None = None) -> SweepResult:
    """Ramp concurrency (per locked clock when cfg.clocks_mhz), one measured row per clock.

    `on_row` is called with each finished row (the CLI writes it to the CSV at once); Ctrl-C
    ends the sweep and the steps already measured still give their row. `step_runner`
    (default `run_step`, same arguments) is replaceable for tests of the ramp logic.
    """
    runner = step_runner or run_step
    clock = clock or SystemClock()
    if cfg.clocks_mhz:
        if agent is None:
            raise FailedPrecondition("--clocks needs --agent: clocks are locked by the node agent",
                                     field="clocks")
        if agent.is_simulated() and not cfg.allow_sim:
            raise FailedPrecondition(
                "the agent runs the simulated GPU backend: locking its clocks does not change "
                "what the endpoint measures; pass --allow-sim to sweep anyway", field="clocks")
    prompt, exact = build_prompt(endpoint, cfg.prompt_tokens)
    power = (lambda: agent.power_w(cfg.gpu)) if agent else None
    memory = (lambda: agent.memory_used_gb(cfg.gpu)) if agent else None
    agent_note = (f"power from the node agent, GPU {cfg.gpu}" if agent
                  else "power not measured (no --agent)")
    result = SweepResult(exact_prompt=exact)
    log.info("profile_sweep_start", model=cfg.model, query_class=str(cfg.query_class),
             prompt_tokens=cfg.prompt_tokens, output_tokens=cfg.output_tokens, exact=exact)
    clock_points: Sequence[int | None] = cfg.clocks_mhz or (None,)
    try:
        for clock_mhz in clock_points:
            steps = result.steps.setdefault(clock_mhz, [])
            try:
                if clock_mhz is not None and agent is not None:
                    agent.lock_clocks(cfg.gpu, clock_mhz)
                tried: dict[int, bool] = {}
                while (c := next_concurrency(tried, cfg.max_concurrency)) is not None:
                    step = runner(endpoint, prompt, cfg.output_tokens, c, cfg.requests_for(c),
                                    clock, power, cfg.power_interval_s, on_request,
                                    memory_gb=memory)
                    if step.errors == step.requests:
                        raise Unavailable(f"every request failed at concurrency {c}: "
                                          f"{step.first_error}")
                    steps.append(step)
                    tried[c] = step.meets(cfg.slo_p95_s)
                    log.info("profile_step", clock_mhz=clock_mhz, concurrency=c,
                             p95_latency_s=step.p95_latency_s, rps=step.throughput_rps,
                             errors=step.errors)
                    if on_step:
                        on_step(clock_mhz, step)
            except KeyboardInterrupt:
                result.interrupted = True
            row = _row(cfg, clock_mhz, steps, exact, agent_note, clock.time(),
                       result.interrupted)
            if row is not None:
                result.rows.append(row)
                if on_row:
                    on_row(row)
            if result.interrupted:
                break
    finally:
        if cfg.clocks_mhz and agent is not None:
            agent.reset_clocks(cfg.gpu)
    return result
