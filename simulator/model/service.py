"""LLM serving per instance: continuous batching fitted to the profiles, requests as arrays.

Model (one instance = one full GPU, TP1). A decode iteration over a batch of n requests takes
tau(n) = tau0 + kappa * n seconds and yields one token per request; a prompt of P tokens costs
P * prefill_s_per_token of exclusive time. Both speed up with the SM clock as physics says
(prefill compute-bound, decode memory-bound). kappa and the prefill cost are fitted so that the
profile's published MSRR for LISO and SILO (OASIS Tables 1-2, at their max_concurrency) are met
exactly; tau0 is the weight-streaming time of one iteration (model bytes / HBM bandwidth, about
10 ms for an 8B fp16 model on A100), an assumption documented here, not a measurement.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from coordinator.profiles.classes import class_tokens
from coordinator.profiles.lookup import select
from coordinator.profiles.schema import ProfileRow, QueryClass
from shapeshifter.common.errors import NotFound

TAU0_S = 0.010
DEFAULT_MAX_CONCURRENCY = 64
PREFILL_ACTIVITY = 1.0  # compute-bound
# Decode activity rises with the batch; 0.6 at a full batch is OASIS Table 3's load (physics.py).
DECODE_ACTIVITY_EMPTY = 0.3
DECODE_ACTIVITY_FULL = 0.6


@dataclass(frozen=True)
class ServiceParams:
    tau0_s: float
    kappa_s: float  # extra iteration time per request in the batch
    prefill_s_per_token: float
    max_concurrency: int

    def slowed(self, factor: float) -> ServiceParams:
        """The same engine `factor` times slower (a profile that overstates capacity)."""
        return ServiceParams(self.tau0_s * factor, self.kappa_s * factor,
                             self.prefill_s_per_token * factor, self.max_concurrency)

    def mean_request_s(self, prompt_tokens: float, output_tokens: float) -> float:
        """Instance time one request takes at a full batch (1 / MSRR)."""
        c = self.max_concurrency
        return (prompt_tokens * self.prefill_s_per_token
                + output_tokens * (self.tau0_s / c + self.kappa_s))


def _msrr_row(rows: list[ProfileRow], gpu_type: str, model: str, qc: QueryClass, quant: str
              ) -> ProfileRow:
    found = [r for r in select(rows, gpu_type=gpu_type, model=model, query_class=qc,
                               quantization=quant) if r.msrr_rps and r.sm_clock_mhz is None]
    if not found:
        raise NotFound(f"no {qc} MSRR profile for {model} on {gpu_type} ({quant})",
                       field="workload.model")
    return found[0]


def fit_service(rows: list[ProfileRow], gpu_type: str, model: str) -> ServiceParams:
    """Solve the two MSRR equations (LISO, SILO) for kappa and the prefill cost."""
    eqs = []
    concurrency = []
    for qc in (QueryClass.LISO, QueryClass.SILO):
        row = _msrr_row(rows, gpu_type, model, qc, "none")
        c = row.max_concurrency or DEFAULT_MAX_CONCURRENCY
        p_tok, g_tok = class_tokens(qc)
        # 1/msrr = P * prefill + G * (tau0 / c + kappa)
        eqs.append(([p_tok, g_tok], 1.0 / (row.msrr_rps or 1.0) - g_tok * TAU0_S / c))
        concurrency.append(c)
    a = np.array([e[0] for e in eqs], float)
    b = np.array([e[1] for e in eqs], float)
    prefill, kappa = np.linalg.solve(a, b)
    return ServiceParams(tau0_s=TAU0_S, kappa_s=max(float(kappa), 1e-6),
                         prefill_s_per_token=max(float(prefill), 1e-7),
                         max_concurrency=max(concurrency))


def quant_speedup(rows: list[ProfileRow], gpu_type: str, model: str, quant: str) -> float:
    """MSRR of a quantized variant over the unquantized one (mean over LISO and SILO)."""
    if quant == "none":
        return 1.0
    ratios = [(_msrr_row(rows, gpu_type, model, qc, quant).msrr_rps or 0.0)
              / (_msrr_row(rows, gpu_type, model, qc, "none").msrr_rps or 1.0)
              for qc in (QueryClass.LISO, QueryClass.SILO)]
    return float(np.mean(ratios))


@dataclass
class Completed:
    """Requests that finished in one step."""

    endpoint: np.ndarray
    e2e_s: np.ndarray
    ttft_s: np.ndarray
    output_tokens: np.ndarray
    prompt_tokens: np.ndarray


_FIELDS = ("gpu", "endpoint", "arrival_s", "prompt", "output", "remaining", "decode_start_s",
           "first_token_s")


class RequestPool:
    """Requests in flight (waiting or in a batch), in arrival order, one row per request."""

    def __init__(self, n_gpus: int, params: ServiceParams) -> None:
        self.params = params
        self.n_gpus = n_gpus
        self.gpu = np.zeros(0, np.int64)
        self.endpoint = np.zeros(0, np.int64)
        self.arrival_s = np.zeros(0)
        self.prompt = np.zeros(0, np.int64)
        self.output = np.zeros(0, np.int64)
        self.remaining = np.zeros(0)  # output tokens still to generate
        self.decode_start_s = np.zeros(0)  # NaN while waiting for a batch slot
        self.first_token_s = np.zeros(0)
        self.prefill_backlog_s = np.zeros(n_gpus)  # admitted prompt work not yet done

    def __len__(self) -> int:
        return len(self.gpu)

    def add(self, gpu: np.ndarray, endpoint: np.ndarray, arrival_s: np.ndarray,
            prompt: np.ndarray, output: np.ndarray) -> None:
        n = len(gpu)
        new = {"gpu": gpu, "endpoint": endpoint, "arrival_s": arrival_s, "prompt": prompt,
               "output": output, "remaining": output.astype(float),
               "decode_start_s": np.full(n, np.nan), "first_token_s": np.full(n, np.nan)}
        for name in _FIELDS:
            setattr(self, name, np.concatenate([getattr(self, name), new[name]]))

    def in_flight_per_gpu(self) -> np.ndarray:
        return np.bincount(self.gpu, minlength=self.n_gpus)

    def waiting_running_per_gpu(self) -> tuple[np.ndarray, np.ndarray]:
        """(requests waiting for a batch slot, requests in the batch) per GPU."""
        waiting = np.isnan(self.decode_start_s)
        return (np.bincount(self.gpu[waiting], minlength=self.n_gpus),
                np.bincount(self.gpu[~waiting], minlength=self.n_gpus))

    def step(self, t_s: float, dt_s: float, speed: np.ndarray, prefill_rel: np.ndarray,
             decode_rel: np.ndarray, timeout_s: float
             ) -> tuple[Completed, np.ndarray, np.ndarray]:
        """Serve [t_s, t_s + dt_s). `speed`: config speed-up per GPU; *_rel: clock factors.

        Returns (completed, dropped per endpoint index array, GPU activity 0..1 per GPU).
        """
        dropped = self._drop_stale(t_s, timeout_s)
        prefill_speed = speed * prefill_rel
        self._admit(t_s, prefill_speed)
        prefill_used_s = np.minimum(self.prefill_backlog_s, dt_s)
        self.prefill_backlog_s -= prefill_used_s
        decode_window_s = dt_s - prefill_used_s
        completed, batch = self._decode(t_s, dt_s, speed * decode_rel, decode_window_s)
        activity = self._activity(prefill_used_s, decode_window_s, batch, dt_s)
        return completed, dropped, activity

    def _drop_stale(self, t_s: float, timeout_s: float) -> np.ndarray:
        stale = np.isnan(self.decode_start_s) & (t_s - self.arrival_s > timeout_s)
        dropped = self.endpoint[stale]
        if stale.any():
            self._keep(~stale)
        return dropped

    def _admit(self, t_s: float, prefill_speed: np.ndarray) -> None:
        """Waiting requests join their GPU's batch in arrival order while slots are free."""
        waiting = np.flatnonzero(np.isnan(self.decode_start_s))
        if len(waiting) == 0:
            return
        active = np.bincount(self.gpu[~np.isnan(self.decode_start_s)], minlength=self.n_gpus)
        free = self.params.max_concurrency - active
        order = waiting[np.argsort(self.gpu[waiting], kind="stable")]
        g = self.gpu[order]
        group_start = np.r_[0, np.flatnonzero(np.diff(g)) + 1]
        rank = np.arange(len(order)) - np.repeat(group_start, np.diff(np.r_[group_start,
                                                                            len(order)]))
        admit = order[rank < free[g]]
        if len(admit) == 0:
            return
        # FIFO prefill: each admitted prompt finishes after the backlog ahead of it on its GPU.
        admit = np.sort(admit)
        cost_s = self.prompt[admit] * self.params.prefill_s_per_token / prefill_speed[self.gpu[
            admit]]
        ahead_s = _cumsum_by_group(self.gpu[admit], cost_s) + self.prefill_backlog_s[
            self.gpu[admit]]
        self.decode_start_s[admit] = t_s + ahead_s
        self.prefill_backlog_s += np.bincount(self.gpu[admit], cost_s, minlength=self.n_gpus)

    def _decode(self, t_s: float, dt_s: float, decode_speed: np.ndarray,
                window_s: np.ndarray) -> tuple[Completed, np.ndarray]:
        p = self.params
        t_end = t_s + dt_s
        in_batch = ~np.isnan(self.decode_start_s)
        batch = np.bincount(self.gpu[in_batch], minlength=self.n_gpus).astype(float)
        tau_s = (p.tau0_s + p.kappa_s * batch) / decode_speed
        iters = np.where(batch > 0, window_s / tau_s, 0.0)  # tokens per request this step
        start = np.where(in_batch, np.maximum(self.decode_start_s, t_s), t_end)
        frac = np.clip((t_end - start) / dt_s, 0.0, 1.0)
        tokens = iters[self.gpu] * frac
        first = in_batch & np.isnan(self.first_token_s) & (frac > 0)
        self.first_token_s[first] = start[first] + tau_s[self.gpu[first]]
        self.remaining -= np.where(in_batch, tokens, 0.0)
        done = in_batch & (self.remaining <= 0)
        # Finish time within the step, tokens assumed evenly spread over the active window.
        finish = t_end - (-self.remaining[done]) / np.maximum(tokens[done], 1e-12) * (
            t_end - start[done])
        finish = np.maximum(finish, start[done]) if done.any() else finish
        first_tok = np.minimum(self.first_token_s[done], finish)
        completed = Completed(endpoint=self.endpoint[done],
                              e2e_s=finish - self.arrival_s[done],
                              ttft_s=first_tok - self.arrival_s[done],
                              output_tokens=self.output[done], prompt_tokens=self.prompt[done])
        if done.any():
            self._keep(~done)
        return completed, batch

    def _activity(self, prefill_used_s: np.ndarray, window_s: np.ndarray, batch: np.ndarray,
                  dt_s: float) -> np.ndarray:
        fill = np.minimum(batch / self.params.max_concurrency, 1.0)
        decode_act = DECODE_ACTIVITY_EMPTY + (DECODE_ACTIVITY_FULL - DECODE_ACTIVITY_EMPTY) * fill
        decode_busy = np.where(batch > 0, window_s / dt_s, 0.0)
        return np.clip(prefill_used_s / dt_s * PREFILL_ACTIVITY + decode_busy * decode_act,
                       0.0, 1.0)

    def _keep(self, mask: np.ndarray) -> None:
        for name in _FIELDS:
            setattr(self, name, getattr(self, name)[mask])


def _cumsum_by_group(groups: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Inclusive running sum of values within each group, in the given (stable) order."""
    order = np.argsort(groups, kind="stable")
    v = values[order]
    c = np.cumsum(v)
    g = groups[order]
    starts = np.r_[0, np.flatnonzero(np.diff(g)) + 1]
    offset = np.repeat(c[starts] - v[starts], np.diff(np.r_[starts, len(g)]))
    out = np.empty_like(values)
    out[order] = c - offset
    return out
