"""Drive the simulated GPU backend from the engines' reported load (demo: power follows load)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Protocol

from nodeagent.engines.types import EngineLoad

BUSY_FLOOR = 0.3  # a running batch keeps the SMs busy every decode step, however small
DEFAULT_DECODE_FRAC = 0.8


class LoadSettable(Protocol):
    def set_load(
        self,
        index: int,
        activity: float,
        memory_used_mib: int | None = None,
        decode_frac: float = DEFAULT_DECODE_FRAC,
    ) -> None: ...


def activity_of(load: EngineLoad) -> tuple[float, float]:
    """(activity 0..1, decode fraction 0..1) of a GPU from its engines' load. Pure.

    Idle when nothing runs; otherwise BUSY_FLOOR plus the rest in proportion to the running
    sequences over the batch limit. Decode fraction = generated / all tokens per second.
    """
    if load.requests_running <= 0 or load.max_num_seqs <= 0:
        return 0.0, DEFAULT_DECODE_FRAC
    occupancy = min(load.requests_running / load.max_num_seqs, 1.0)
    tokens_per_s = load.generation_tokens_per_s + load.prompt_tokens_per_s
    decode = DEFAULT_DECODE_FRAC
    if tokens_per_s > 0:
        decode = load.generation_tokens_per_s / tokens_per_s
    return BUSY_FLOOR + (1.0 - BUSY_FLOOR) * occupancy, decode


def apply_engine_loads(
    backend: LoadSettable,
    loads: Mapping[int, EngineLoad],
    gpu_indices: Iterable[int],
    memory_total_mib: Mapping[int, int],
) -> None:
    """Set every GPU's simulated load; GPUs without engine load go idle. KV usage becomes
    memory used when an engine reports it."""
    for index in gpu_indices:
        load = loads.get(index, EngineLoad())
        activity, decode = activity_of(load)
        memory_mib = None
        if load.kv_cache_usage_frac >= 0:
            memory_mib = int(load.kv_cache_usage_frac * memory_total_mib[index])
        backend.set_load(index, activity, memory_used_mib=memory_mib, decode_frac=decode)
