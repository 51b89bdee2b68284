"""What the live coordinator observes, accumulated by the engine between routing ticks: arrivals
binned per routing interval (the router's request counters), and per endpoint the completions
and their end-to-end latencies (vLLM's e2e histogram), per GPU the waiting requests and batch
fill (vLLM's num_requests_waiting / running). The closed-loop policies read only this.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from simulator.model.service import Completed

HISTORY_S = 600.0  # arrivals kept for the forecast


@dataclass(frozen=True)
class Observation:
    interval_s: float
    arrival_rates_rps: np.ndarray  # (bins, endpoints), oldest first, bins of interval_s
    served: np.ndarray  # completions per endpoint in the last interval
    late: np.ndarray  # per endpoint, completions over the SLO in the last interval
    waiting: np.ndarray  # per GPU, requests not yet in a batch
    running: np.ndarray  # per GPU, requests in the batch
    max_concurrency: int


class Observer:
    def __init__(self, n_endpoints: int, bin_s: float, slo_s: float) -> None:
        self.bin_s = bin_s
        self.slo_s = slo_s
        self.n_bins = max(3, round(HISTORY_S / bin_s))
        self.bins = np.zeros((0, n_endpoints))
        self.current = np.zeros(n_endpoints)
        self.served = np.zeros(n_endpoints, np.int64)
        self.e2e: list[np.ndarray] = []
        self.e2e_ep: list[np.ndarray] = []

    def on_arrivals(self, counts: np.ndarray) -> None:
        self.current += counts

    def on_completed(self, c: Completed) -> None:
        if len(c.e2e_s):
            self.served += np.bincount(c.endpoint, minlength=len(self.served))
            self.e2e.append(c.e2e_s)
            self.e2e_ep.append(c.endpoint)

    def close(self, waiting: np.ndarray, running: np.ndarray, max_concurrency: int
              ) -> Observation:
        """End the interval: its arrivals join the history; completions are reset."""
        self.bins = np.vstack([self.bins, self.current / self.bin_s])[-self.n_bins:]
        late = np.zeros(len(self.served), np.int64)
        if self.e2e:
            e2e, ep = np.concatenate(self.e2e), np.concatenate(self.e2e_ep)
            late = np.bincount(ep[e2e > self.slo_s], minlength=len(late))
        obs = Observation(self.bin_s, self.bins.copy(), self.served.copy(), late, waiting,
                          running, max_concurrency)
        self.current[:] = 0.0
        self.served[:] = 0
        self.e2e, self.e2e_ep = [], []
        return obs
