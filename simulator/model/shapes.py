"""Opaque (IaaS) GPU load: activity over time from configurable shapes. Pure, vectorized.

GPUs of one tenant share a phase (their loads are synchronous, like the replicas of one job), so a
row full of one tenant sees its peaks coincide; different tenants have different phases.
"""

from __future__ import annotations

import numpy as np

from simulator.inputs.scenario import OpaqueSpec

BURST_SHARPNESS = 4  # power of the positive half-wave: larger -> shorter, taller bursts
GPU_JITTER = 0.05  # per-GPU constant spread around the tenant's shape (OpaqueSpec's default)


def tenant_phases(n_tenants: int, rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(0.0, 2.0 * np.pi, n_tenants)


def gpu_jitter(n_gpus: int, rng: np.random.Generator, spread: float = GPU_JITTER
               ) -> np.ndarray:
    return rng.uniform(-spread, spread, n_gpus)


def opaque_activity(spec: OpaqueSpec, t_s: float, phase: np.ndarray, jitter: np.ndarray
                    ) -> np.ndarray:
    """Activity (0..1) per GPU at t_s; `phase` and `jitter` are per GPU (its tenant's phase)."""
    x = 2.0 * np.pi * t_s / spec.period_s + phase
    if spec.shape == "flat":
        wave = np.zeros_like(phase)
    elif spec.shape == "diurnal":
        wave = np.sin(x)
    else:  # bursty: a low plateau with sharp synchronous bursts, scaled to zero mean
        burst = np.maximum(np.sin(x), 0.0) ** BURST_SHARPNESS
        wave = 2.0 * (burst - _mean_burst()) / (1.0 - _mean_burst())
        wave = np.minimum(wave, 1.0)
    return np.clip(spec.mean_activity + spec.amplitude * wave + jitter, 0.0, 1.0)


def _mean_burst() -> float:
    # Mean of max(sin, 0)^4 over a period: (1/2) * 3/8.
    return 0.1875
