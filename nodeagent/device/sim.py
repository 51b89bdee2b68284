"""A stateful simulated GPU server that behaves like the real device under the GpuBackend Protocol.

It enforces the real constraints (models.py) and answers with the physics of physics.py. Callers
drive the load (set_load, set_inlet_temp_c, set_processes). State advances lazily to
clock.monotonic() on every call: power follows a cap at once (electrical), temperature with a
first-order lag. Thread-safe: one lock guards all state.
"""

from __future__ import annotations

import math
import random
import threading
import uuid
from collections import deque
from dataclasses import dataclass, field

from shapeshifter.common.clock import Clock
from shapeshifter.common.errors import (
    FailedPrecondition,
    InUse,
    InvalidArgument,
    NotFound,
    out_of_range,
)
from shapeshifter.hw import physics
from shapeshifter.hw.mig import place_mig_layout
from shapeshifter.hw.models import GpuModel, gpu_model
from shapeshifter.hw.types import (
    GpuIdentity,
    GpuTelemetry,
    MigInstance,
    MigProfile,
    MigState,
    PowerConstraints,
    SupportedClocks,
    ThermalThresholds,
)

AVERAGE_WINDOW_S = 1.0  # NVML's averaged power is a ~1 s mean
MAX_STEP_S = 1.0  # integration step; exact lag per step, so only throttling feedback needs it small
MAX_STEPS = 2000  # bound the work of one very long advance
# Reads closer together than this see the same state (NVML refreshes readings every ~10-20 ms);
# without it every read integrates all GPUs again and an 8-GPU sample costs O(GPUs^2) steps.
MIN_ADVANCE_S = 0.005
MEMORY_TEMP_DELTA_C = 5.0  # HBM runs a few degrees above the GPU die
INLET_RANGE_C = (0.0, 60.0)
_UUID_NAMESPACE = uuid.UUID("6f1c1a52-5d0e-4a8e-9a57-2b7d3c0e8f11")


@dataclass(frozen=True)
class _OperatingPoint:
    clock_mhz: int
    power_w: float
    throttle_reasons: tuple[str, ...]


@dataclass
class _Gpu:
    identity: GpuIdentity
    temp_offset_c: float
    power_limit_w: float
    temperature_c: float
    locked_mhz: tuple[int, int] | None = None
    activity: float = 0.0
    memory_used_mib: int = 0
    decode_frac: float = 0.8
    energy_j: float = 0.0
    pids: tuple[int, ...] = ()
    mig_enabled: bool = False
    mig_instances: tuple[MigInstance, ...] = ()
    mig_generation: int = 0  # makes MIG UUIDs of a new layout differ from the old one
    # (end time, duration, power) of recent integration steps, for the averaged power
    history: deque[tuple[float, float, float]] = field(default_factory=deque)


class SimulatedBackend:
    kind = "sim"

    def __init__(self, gpu_type: str, n_gpus: int, clock: Clock, *, seed: int = 0,
                 inlet_temp_c: float = 25.0, node_name: str = "sim") -> None:
        try:
            self._model: GpuModel = gpu_model(gpu_type)
        except KeyError as e:
            raise InvalidArgument(str(e.args[0]), field="gpu_type") from None
        if n_gpus < 1:
            raise InvalidArgument(f"n_gpus={n_gpus} must be >= 1", field="n_gpus")
        _check_inlet(inlet_temp_c)
        self.gpu_type = gpu_type
        self._clock = clock
        self._inlet_c = inlet_temp_c
        self._lock = threading.Lock()
        self._last_s = clock.monotonic()
        rng = random.Random(f"{node_name}/{seed}")
        spread_c = physics.TEMP_OFFSET_SPREAD_C
        self._gpus = [self._new_gpu(i, node_name, seed, rng.uniform(0.0, spread_c))
                      for i in range(n_gpus)]

    def _new_gpu(self, index: int, node_name: str, seed: int, offset_c: float) -> _Gpu:
        m = self._model
        gpu_uuid = uuid.uuid5(_UUID_NAMESPACE, f"{node_name}/{seed}/{index}")
        identity = GpuIdentity(
            index=index, uuid=f"GPU-{gpu_uuid}", name=m.driver_name,
            serial=str(int(gpu_uuid.hex[:12], 16) % 10**13).zfill(13),
            memory_total_mib=m.memory_total_mib, gpu_type=m.key)
        temp_c = physics.steady_temperature_c(self._inlet_c, m.idle_power_w, m.thermal_c_per_w,
                                              offset_c)
        return _Gpu(identity=identity, temp_offset_c=offset_c, power_limit_w=m.power.default_w,
                    temperature_c=temp_c)

    # ---- discovery and constraints ----

    def devices(self) -> list[GpuIdentity]:
        return [g.identity for g in self._gpus]

    def power_constraints(self, index: int) -> PowerConstraints:
        self._gpu(index)
        return self._model.power

    def thermal_thresholds(self, index: int) -> ThermalThresholds:
        self._gpu(index)
        return self._model.thermal

    def supported_clocks(self, index: int) -> SupportedClocks:
        self._gpu(index)
        return self._model.supported_clocks

    def mig_profiles(self, index: int) -> list[MigProfile]:
        self._gpu(index)
        return list(self._model.mig_profiles)

    # ---- telemetry ----

    def telemetry(self, index: int) -> GpuTelemetry:
        with self._lock:
            self._advance()
            g = self._gpu(index)
            op = self._operating_point(g)
            memory_busy = g.decode_frac * 0.9 + (1.0 - g.decode_frac) * 0.4  # decode streams HBM
            return GpuTelemetry(
                index=index,
                power_draw_w=op.power_w,
                power_draw_avg_w=_window_mean_w(g.history, self._last_s, op.power_w),
                power_limit_w=g.power_limit_w,
                energy_j=g.energy_j,
                temperature_c=g.temperature_c,
                memory_temperature_c=g.temperature_c + MEMORY_TEMP_DELTA_C,
                sm_clock_mhz=op.clock_mhz,
                memory_clock_mhz=self._model.memory_clock_mhz,
                utilization_gpu_pct=100.0 * g.activity,
                utilization_memory_pct=100.0 * g.activity * memory_busy,
                memory_used_mib=g.memory_used_mib,
                memory_total_mib=self._model.memory_total_mib,
                throttle_reasons=op.throttle_reasons,
                process_pids=g.pids,
                enforced_power_limit_w=g.power_limit_w,  # no BMC or other tool caps a sim GPU
            )

    def mig_state(self, index: int) -> MigState:
        with self._lock:
            g = self._gpu(index)
            return MigState(enabled=g.mig_enabled, pending_enabled=g.mig_enabled,
                            instances=g.mig_instances)

    def compute_pids(self, index: int) -> frozenset[int]:
        """The sim has no real compute contexts: the pids registered with set_processes (by
        tests or the engine bridge), which span the GPU and its MIG instances alike."""
        with self._lock:
            return frozenset(self._gpu(index).pids)

    def relative_throughput(self, index: int) -> float:
        """Throughput now relative to the same load at the unconstrained max clock."""
        with self._lock:
            self._advance()
            g = self._gpu(index)
            if g.activity < physics.IDLE_ACTIVITY:
                return 1.0  # nothing is running, so nothing is slowed
            op = self._operating_point(g)
            return physics.relative_throughput(op.clock_mhz, self._model.sm_max_clock_mhz,
                                               g.decode_frac)

    # ---- actuators ----

    def set_power_limit_w(self, index: int, power_limit_w: float) -> None:
        p = self._model.power
        with self._lock:
            g = self._gpu(index)
            if not p.min_w <= power_limit_w <= p.max_w:
                raise out_of_range("power_limit_w", power_limit_w, p.min_w, p.max_w, "W")
            self._advance()
            g.power_limit_w = float(power_limit_w)

    def lock_gpu_clocks_mhz(self, index: int, min_mhz: int, max_mhz: int) -> None:
        lo, hi = self._model.sm_min_clock_mhz, self._model.sm_max_clock_mhz
        with self._lock:
            g = self._gpu(index)
            for name, value in (("min_mhz", min_mhz), ("max_mhz", max_mhz)):
                if not lo <= value <= hi:
                    raise out_of_range(name, value, lo, hi, "MHz")
            if min_mhz > max_mhz:
                raise InvalidArgument(f"min_mhz={min_mhz} must be <= max_mhz={max_mhz}",
                                      field="min_mhz")
            self._advance()
            g.locked_mhz = (int(min_mhz), int(max_mhz))

    def reset_gpu_clocks(self, index: int) -> None:
        with self._lock:
            g = self._gpu(index)
            self._advance()
            g.locked_mhz = None

    def set_mig_mode(self, index: int, enabled: bool) -> None:
        with self._lock:
            g = self._gpu(index)
            if enabled == g.mig_enabled:
                return
            if g.pids:
                raise InUse(f"gpu {index}: cannot change MIG mode while processes {list(g.pids)} "
                            "run on it", field="index")
            if not enabled and g.mig_instances:
                raise InUse(f"gpu {index}: MIG instances exist; apply an empty layout first",
                            field="index")
            g.mig_enabled = enabled

    def apply_mig_layout(self, index: int, profiles: list[str]) -> list[MigInstance]:
        with self._lock:
            g = self._gpu(index)
            placements = place_mig_layout(self._model.mig_profiles, profiles)
            if not g.mig_enabled:
                raise FailedPrecondition(f"gpu {index}: MIG mode is disabled; enable it first",
                                         field="index")
            if g.pids:
                raise InUse(f"gpu {index}: cannot change the MIG layout while processes "
                            f"{list(g.pids)} run on it", field="index")
            g.mig_generation += 1
            g.mig_instances = tuple(
                MigInstance(
                    gpu_instance_id=i + 1, compute_instance_id=0, profile=pl.profile.name,
                    placement_start=pl.start, placement_size=pl.profile.placement_size,
                    uuid="MIG-" + str(uuid.uuid5(
                        _UUID_NAMESPACE, f"{g.identity.uuid}/{g.mig_generation}/{pl.start}")),
                    memory_mib=pl.profile.memory_mib)
                for i, pl in enumerate(placements))
            return list(g.mig_instances)

    def gpu_was_reset(self, index: int) -> None:
        """Nothing cached or sticky to forget (reset_gpu models the reset itself)."""
        with self._lock:
            self._gpu(index)

    def close(self) -> None:
        """Nothing to release."""

    # ---- load driven by callers (tests, demo, engine manager) ----

    def set_load(self, index: int, activity: float, memory_used_mib: int | None = None,
                 decode_frac: float = 0.8) -> None:
        with self._lock:
            g = self._gpu(index)
            if not 0.0 <= activity <= 1.0:
                raise out_of_range("activity", activity, 0.0, 1.0)
            if not 0.0 <= decode_frac <= 1.0:
                raise out_of_range("decode_frac", decode_frac, 0.0, 1.0)
            total = self._model.memory_total_mib
            if memory_used_mib is not None and not 0 <= memory_used_mib <= total:
                raise out_of_range("memory_used_mib", memory_used_mib, 0, total, "MiB")
            self._advance()
            g.activity = float(activity)
            g.decode_frac = float(decode_frac)
            if memory_used_mib is not None:
                g.memory_used_mib = int(memory_used_mib)

    def set_inlet_temp_c(self, inlet_temp_c: float) -> None:
        _check_inlet(inlet_temp_c)
        with self._lock:
            self._advance()
            self._inlet_c = float(inlet_temp_c)

    def reset_gpu(self, index: int) -> None:
        """A GPU reset (nvidia-smi -r), for tests and demos: refused while processes run; it
        drops the power limit to the default, unlocks clocks and destroys MIG instances."""
        with self._lock:
            g = self._gpu(index)
            if g.pids:
                raise InUse(f"gpu {index}: cannot reset while processes {list(g.pids)} run on it",
                            field="index")
            self._advance()
            g.power_limit_w = self._model.power.default_w
            g.locked_mhz = None
            g.mig_instances = ()

    def set_processes(self, index: int, pids: list[int] | tuple[int, ...]) -> None:
        """Register the processes "running" on GPU `index` (telemetry and compute_pids)."""
        with self._lock:
            self._gpu(index).pids = tuple(pids)

    # ---- internals (called with the lock held) ----

    def _gpu(self, index: int) -> _Gpu:
        n = len(self._gpus)
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < n:
            raise NotFound(f"gpu index {index!r} not found; this node has GPUs 0..{n - 1}",
                           field="index")
        return self._gpus[index]

    def _operating_point(self, g: _Gpu) -> _OperatingPoint:
        m = self._model
        reasons: list[str] = []
        if g.locked_mhz is not None:
            target_mhz = g.locked_mhz[1]
        elif g.activity < physics.IDLE_ACTIVITY:
            target_mhz = m.sm_idle_clock_mhz
            reasons.append("gpu_idle")
        else:
            target_mhz = m.sm_max_clock_mhz
        thermal_mhz = physics.thermal_clock_limit_mhz(
            g.temperature_c, m.max_operating_c, m.thermal.slowdown_c, m.sm_max_clock_mhz,
            m.sm_min_clock_mhz)
        if thermal_mhz < target_mhz:
            hot = g.temperature_c >= m.thermal.slowdown_c
            reasons.append("hw_slowdown" if hot else "sw_thermal")
        ceiling_mhz = min(target_mhz, thermal_mhz)
        candidates = [c for c in m.sm_clocks_mhz if c <= ceiling_mhz] or [m.sm_min_clock_mhz]
        clock_mhz = physics.clock_for_power_cap_mhz(
            g.power_limit_w, g.activity, candidates, m.sm_max_clock_mhz, m.idle_power_w,
            m.dynamic_power_max_w)
        if clock_mhz < max(candidates):
            reasons.append("sw_power_cap")
        power_w = physics.power_w(g.activity, clock_mhz, m.sm_max_clock_mhz, m.idle_power_w,
                                  m.dynamic_power_max_w)
        return _OperatingPoint(clock_mhz, power_w, tuple(reasons))

    def _advance(self) -> None:
        """Integrate every GPU from the last call to now (energy, temperature, power history)."""
        now_s = self._clock.monotonic()
        elapsed_s = now_s - self._last_s
        if elapsed_s < MIN_ADVANCE_S:
            return
        n_steps = min(MAX_STEPS, math.ceil(elapsed_s / MAX_STEP_S))
        dt_s = elapsed_s / n_steps
        for g in self._gpus:
            t_s = self._last_s
            for _ in range(n_steps):
                t_s += dt_s
                self._step(g, t_s, dt_s)
        self._last_s = now_s

    def _step(self, g: _Gpu, t_end_s: float, dt_s: float) -> None:
        m = self._model
        op = self._operating_point(g)
        g.energy_j += op.power_w * dt_s
        target_c = physics.steady_temperature_c(self._inlet_c, op.power_w, m.thermal_c_per_w,
                                                g.temp_offset_c)
        g.temperature_c = physics.lag_step(g.temperature_c, target_c, dt_s)
        g.history.append((t_end_s, dt_s, op.power_w))
        while g.history and g.history[0][0] <= t_end_s - AVERAGE_WINDOW_S:
            g.history.popleft()


def _window_mean_w(history: deque[tuple[float, float, float]], now_s: float,
                   instant_w: float) -> float:
    """Mean power over the last AVERAGE_WINDOW_S (the instant power before any time has passed)."""
    start_s = now_s - AVERAGE_WINDOW_S
    energy_j = covered_s = 0.0
    for end_s, dt_s, p_w in history:
        overlap_s = end_s - max(end_s - dt_s, start_s)
        if overlap_s > 0:
            energy_j += p_w * overlap_s
            covered_s += overlap_s
    return energy_j / covered_s if covered_s > 0 else instant_w


def _check_inlet(inlet_temp_c: float) -> None:
    lo, hi = INLET_RANGE_C
    if not lo <= inlet_temp_c <= hi:
        raise out_of_range("inlet_temp_c", inlet_temp_c, lo, hi, "C")
