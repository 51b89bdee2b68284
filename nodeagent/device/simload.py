"""A synthetic, smoothly varying load for the demo: a slow "diurnal" wave, a faster ripple and
occasional bursts, phase-shifted per node and GPU so that nodes differ. Pure."""

from __future__ import annotations

import math

DIURNAL_PERIOD_S = 60.0  # one "day" per minute so a short demo visibly varies
RIPPLE_PERIOD_S = 13.0
BURST_PERIOD_S = 23.0


def _phase(node_seed: int, index: int) -> float:
    """A fixed phase in [0, 2*pi) per (node, GPU): Knuth multiplicative hashing, no RNG state."""
    mixed = (node_seed * 2654435761 + index * 40503 + 12345) % 2**32
    return 2.0 * math.pi * mixed / 2**32


def demo_load(t_s: float, node_seed: int, index: int) -> tuple[float, float]:
    """(activity 0..1, memory fraction 0..1) of GPU `index` on node `node_seed` at time t_s."""
    phase = _phase(node_seed, index)
    diurnal = 0.5 + 0.5 * math.sin(2.0 * math.pi * t_s / DIURNAL_PERIOD_S + phase)
    ripple = math.sin(2.0 * math.pi * t_s / RIPPLE_PERIOD_S + 2.0 * phase)
    # A smooth burst: a sharpened positive half-wave, on for a few seconds per period.
    burst = max(0.0, math.sin(2.0 * math.pi * t_s / BURST_PERIOD_S + 3.0 * phase)) ** 6
    activity = 0.15 + 0.6 * diurnal + 0.08 * ripple + 0.25 * burst
    # KV cache follows the load with a lag (requests in flight hold their memory).
    lagged = 0.5 + 0.5 * math.sin(2.0 * math.pi * (t_s - 5.0) / DIURNAL_PERIOD_S + phase)
    memory_frac = 0.25 + 0.6 * lagged
    return _clamp01(activity), _clamp01(memory_frac)


def _clamp01(x: float) -> float:
    return min(max(x, 0.0), 1.0)
