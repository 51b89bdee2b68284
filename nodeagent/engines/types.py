"""What the engine layer tells the rest of the agent about load on each GPU."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EngineLoad:
    """Load of the engine instances on one GPU (summed when several share it via MIG)."""

    requests_running: float = 0.0
    requests_waiting: float = 0.0
    max_num_seqs: float = 0.0  # compute capacity in concurrent requests
    kv_cache_usage_frac: float = -1.0  # -1 when no engine reports it
    generation_tokens_per_s: float = 0.0
    prompt_tokens_per_s: float = 0.0
