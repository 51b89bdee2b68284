"""All GPUs of the cluster as numpy arrays, stepped with the sim backend's physics.

Every formula is shapeshifter.hw.physics (the functions accept arrays); this module only does what
SimulatedBackend._operating_point and _step do per GPU, for all GPUs at once: target clock (locked,
idle or max), thermal ceiling, the highest table clock that fits the power limit, power, energy and
the first-order temperature lag.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from shapeshifter.hw import physics
from shapeshifter.hw.models import GpuModel

CLOCK_STEP_MHZ = 15.0  # models.py clock tables are 15 MHz apart, ending exactly at the max
_MIN_ACTIVITY = 1e-9  # clock_at_power_mhz divides by the activity


@dataclass
class GpuArrays:
    model: GpuModel
    power_limit_w: np.ndarray
    locked_max_mhz: np.ndarray  # NaN: clocks not locked
    temperature_c: np.ndarray
    temp_offset_c: np.ndarray
    clock_mhz: np.ndarray
    power_w: np.ndarray
    energy_j: np.ndarray
    power_capped: np.ndarray  # bool: the power limit lowered the clock this step
    thermal_throttled: np.ndarray  # bool: temperature lowered the clock this step

    @classmethod
    def create(cls, model: GpuModel, n: int, inlet_c: np.ndarray,
               rng: np.random.Generator) -> GpuArrays:
        offset_c = rng.uniform(0.0, physics.TEMP_OFFSET_SPREAD_C, n)
        temp_c = physics.steady_temperature_c(inlet_c, model.idle_power_w, model.thermal_c_per_w,
                                              offset_c)
        return cls(model=model, power_limit_w=np.full(n, model.power.default_w),
                   locked_max_mhz=np.full(n, np.nan), temperature_c=temp_c,
                   temp_offset_c=offset_c, clock_mhz=np.full(n, float(model.sm_idle_clock_mhz)),
                   power_w=np.full(n, model.idle_power_w), energy_j=np.zeros(n),
                   power_capped=np.zeros(n, bool), thermal_throttled=np.zeros(n, bool))

    def step(self, activity: np.ndarray, inlet_c: np.ndarray, dt_s: float) -> None:
        """Advance all GPUs by dt_s at `activity` (0..1) with per-GPU inlet temperatures."""
        m = self.model
        clock_mhz, capped, hot = operating_clock_mhz(m, activity, self.power_limit_w,
                                                     self.locked_max_mhz, self.temperature_c)
        power_w = physics.power_w(activity, clock_mhz, m.sm_max_clock_mhz, m.idle_power_w,
                                  m.dynamic_power_max_w)
        self.energy_j += power_w * dt_s
        target_c = physics.steady_temperature_c(inlet_c, power_w, m.thermal_c_per_w,
                                                self.temp_offset_c)
        self.temperature_c = physics.lag_step(self.temperature_c, target_c, dt_s)
        self.clock_mhz, self.power_w = clock_mhz, power_w
        self.power_capped, self.thermal_throttled = capped, hot


def snap_down_mhz(model: GpuModel, clock_mhz: np.ndarray) -> np.ndarray:
    """The highest table clock <= clock_mhz (the table's minimum when none is)."""
    top = float(model.sm_max_clock_mhz)
    steps = np.ceil((top - clock_mhz) / CLOCK_STEP_MHZ - 1e-9)
    snapped = top - np.maximum(steps, 0.0) * CLOCK_STEP_MHZ
    return np.maximum(snapped, float(model.sm_min_clock_mhz))


def operating_clock_mhz(m: GpuModel, activity: np.ndarray, power_limit_w: np.ndarray,
                        locked_max_mhz: np.ndarray, temperature_c: np.ndarray
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(clock, power-capped, thermally throttled) per GPU, as SimulatedBackend chooses them."""
    idle = activity < physics.IDLE_ACTIVITY
    target = np.where(np.isnan(locked_max_mhz),
                      np.where(idle, float(m.sm_idle_clock_mhz), float(m.sm_max_clock_mhz)),
                      locked_max_mhz)
    thermal = physics.thermal_clock_limit_mhz(temperature_c, m.max_operating_c,
                                              m.thermal.slowdown_c, m.sm_max_clock_mhz,
                                              m.sm_min_clock_mhz)
    ceiling = snap_down_mhz(m, np.minimum(target, thermal))
    with np.errstate(divide="ignore", over="ignore"):
        fit = physics.clock_at_power_mhz(power_limit_w, np.maximum(activity, _MIN_ACTIVITY),
                                         m.sm_max_clock_mhz, m.idle_power_w,
                                         m.dynamic_power_max_w)
    cap_clock = snap_down_mhz(m, np.minimum(fit, 1e9))
    clock = np.minimum(ceiling, cap_clock)
    return clock, cap_clock < ceiling, thermal < target
