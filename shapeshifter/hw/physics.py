"""Pure GPU physics: power, clocks under a cap, throughput, temperature. No state, no I/O.

The simulated backend and the trace simulator both call these. Calibration (DESIGN §4):

* Power: P = P_idle + activity * D * (f / f_max) ** POWER_CLOCK_EXPONENT, D = TDP - P_idle.
  OASIS Table 3 (Llama-3-8B decode on A100, `004_…`): 239.4 W at 1320 MHz and 145.2 W at
  855 MHz. With P_idle = 55 W and D = 345 W both points fit with exponent 1.65 and
  activity 0.60 (:data:`OASIS_DECODE_ACTIVITY`). Superlinear because voltage rises with clock.
* Throughput: time per token = memory part + compute part, the compute part scaling as
  f_max / f. Table 3 has decode throughput -7.4 % from 1320 to 855 MHz, which gives a
  compute share of 0.14 at f_max; prefill is compute-bound (share 0.95, ~linear in clock).
* Temperature (TAPAS eqs. 1-2, `001_…`): steady state = inlet + k * P + per-GPU offset,
  approached with a first-order lag of :data:`THERMAL_TIME_CONSTANT_S`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

POWER_CLOCK_EXPONENT = 1.65
OASIS_DECODE_ACTIVITY = 0.60  # activity of the Table 3 Llama-3-8B load on A100
DECODE_COMPUTE_SHARE = 0.14  # share of a decode step's time that scales with SM clock, at f_max
PREFILL_COMPUTE_SHARE = 0.95
THERMAL_TIME_CONSTANT_S = 30.0
IDLE_ACTIVITY = 0.01  # below this the GPU drops to its idle clock ("gpu_idle")
TEMP_OFFSET_SPREAD_C = 10.0  # TAPAS: GPUs in one server differ by up to 10 C at the same load
THERMAL_BAND_C = 4.0  # clocks fall from full at max-operating to the floor at slowdown + band


def _relu(x: float) -> float:
    """max(x, 0) with operators only, so the same formula serves floats and numpy arrays."""
    return (x + abs(x)) * 0.5


def power_w(activity: float, clock_mhz: float, max_clock_mhz: float, idle_power_w: float,
            dynamic_power_max_w: float) -> float:
    """Board power at an activity (0..1) and SM clock. Floats or numpy arrays."""
    rel_clock = _relu(clock_mhz) / max_clock_mhz
    return idle_power_w + activity * dynamic_power_max_w * rel_clock**POWER_CLOCK_EXPONENT


def clock_for_power_cap_mhz(power_limit_w: float, activity: float, clocks_mhz: Sequence[int],
                            max_clock_mhz: float, idle_power_w: float,
                            dynamic_power_max_w: float) -> int:
    """The highest of `clocks_mhz` whose power fits under the limit (the lowest if none does).

    That is what a power cap does: the GPU lowers its clock until the draw fits.
    """
    for clock in sorted(clocks_mhz, reverse=True):
        draw_w = power_w(activity, clock, max_clock_mhz, idle_power_w, dynamic_power_max_w)
        if draw_w <= power_limit_w:
            return clock
    return min(clocks_mhz)


def clock_at_power_mhz(power_w_: float, activity: float, max_clock_mhz: float,
                       idle_power_w: float, dynamic_power_max_w: float) -> float:
    """`power_w` solved for the clock: the continuous clock that draws `power_w_` at `activity`.

    Floats or numpy arrays (the simulator snaps it down to the clock table); activity must be > 0.
    """
    headroom_w = _relu(power_w_ - idle_power_w)
    rel = headroom_w / (activity * dynamic_power_max_w)
    return max_clock_mhz * rel ** (1.0 / POWER_CLOCK_EXPONENT)


def thermal_clock_limit_mhz(temperature_c: float, max_operating_c: float, slowdown_c: float,
                            max_clock_mhz: float, min_clock_mhz: float) -> float:
    """The clock ceiling thermal management imposes at a temperature.

    Full clock up to the max operating temperature, then falling linearly to the minimum clock at
    slowdown + THERMAL_BAND_C, so a hot GPU settles near its slowdown temperature.
    Floats or numpy arrays.
    """
    span_c = slowdown_c + THERMAL_BAND_C - max_operating_c
    frac = _relu(temperature_c - max_operating_c) / span_c
    frac = frac - _relu(frac - 1.0)  # min(frac, 1)
    return max_clock_mhz - frac * (max_clock_mhz - min_clock_mhz)


def compute_share(decode_frac: float) -> float:
    """Share of step time that scales with the SM clock, for a decode/prefill mix."""
    return decode_frac * DECODE_COMPUTE_SHARE + (1.0 - decode_frac) * PREFILL_COMPUTE_SHARE


def relative_throughput(clock_mhz: float, max_clock_mhz: float, decode_frac: float) -> float:
    """Throughput at `clock_mhz` relative to the same work at `max_clock_mhz` (0..1].

    Floats or numpy arrays.
    """
    share = compute_share(decode_frac)
    step_time = (1.0 - share) + share * max_clock_mhz / (1.0 + _relu(clock_mhz - 1.0))
    return 1.0 / step_time


def steady_temperature_c(inlet_c: float, gpu_power_w: float, k_c_per_w: float,
                         offset_c: float) -> float:
    """TAPAS eq. 2: GPU temperature is linear in inlet temperature and GPU power."""
    return inlet_c + k_c_per_w * gpu_power_w + offset_c


def lag_step(current: float, target: float, dt_s: float,
             time_constant_s: float = THERMAL_TIME_CONSTANT_S) -> float:
    """One exact step of a first-order lag towards `target` over `dt_s` seconds."""
    if dt_s <= 0:
        return current
    return target + (current - target) * math.exp(-dt_s / time_constant_s)
