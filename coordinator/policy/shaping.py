"""Row- and thermal-aware shaping of SaaS load (TAPAS §4.4-4.5 Route + Config). Pure.

Every row (and aisle) has a steady target below its limit (`ShapingConfig.row_target_frac`).
As a row's draw nears it, in this order:
1. its SaaS instances' routing weights fall, so their endpoints' load moves to rows with
   headroom (`update_row_weights`: a proportional step per routing interval, sized by how far
   the row is over its target against the SaaS dynamic power that routing can move; undone in
   steps once the row is back under);
2. when routing has done what it can (its weights are at their floor, or every row is high),
   the row's SaaS clocks get a ceiling that takes the rest of the excess from their dynamic
   power (`row_clock_ceiling_mhz`: power ~ clock ** 1.65);
3. smaller configurations are the rebalancer's business (it packs under the same targets).
Opaque (IaaS) GPUs are never touched here. GPUs near their slowdown temperature get less load
(`thermal_weights`) and the same clock ceiling rule on their own excess temperature.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from shapeshifter.common.errors import out_of_range
from shapeshifter.hw.physics import POWER_CLOCK_EXPONENT


@dataclass(frozen=True)
class ShapingConfig:
    row_target_frac: float = 0.9  # steady target as a share of the row's (current) limit
    aisle_target_frac: float = 0.9
    min_weight: float = 0.5  # a row's SaaS instances keep at least this share of their weight
    gain: float = 0.7  # share of the excess removed per routing interval
    relax: float = 0.1  # weight regained per interval when a row is under its target
    thermal_guard_c: float = 6.0  # act this far below the slowdown temperature
    clock_floor_frac: float = 0.6  # no SaaS clock ceiling below this share of the maximum

    def validate(self) -> ShapingConfig:
        for name in ("row_target_frac", "aisle_target_frac"):
            v = getattr(self, name)
            if not 0.5 <= v <= 1.0:
                raise out_of_range(name, v, 0.5, 1.0)
        if not 0.0 < self.min_weight <= 1.0:
            raise out_of_range("min_weight", self.min_weight, 0.0, 1.0)
        if not 0.0 < self.gain <= 1.0:
            raise out_of_range("gain", self.gain, 0.0, 1.0)
        if not 0.0 < self.clock_floor_frac <= 1.0:
            raise out_of_range("clock_floor_frac", self.clock_floor_frac, 0.0, 1.0)
        return self


def row_excess_w(row_power_w: np.ndarray, row_limit_w: np.ndarray, config: ShapingConfig
                 ) -> np.ndarray:
    """Watts each row is above its steady target (negative: headroom)."""
    return row_power_w - config.row_target_frac * row_limit_w


def update_row_weights(weights: np.ndarray, excess_w: np.ndarray, movable_w: np.ndarray,
                       config: ShapingConfig) -> np.ndarray:
    """One routing interval of the per-row SaaS weight multipliers (1 = untouched).

    `movable_w`: per row, the dynamic power of its SaaS instances (what routing can move).
    Over target: the multiplier falls by the share of that power the excess is, times the
    gain. Under target by more than what regaining `relax` would add back: it rises again."""
    w = weights.astype(float).copy()
    with np.errstate(divide="ignore", invalid="ignore"):
        share = np.where(movable_w > 0, excess_w / movable_w, 0.0)
    over = excess_w > 0
    w[over] *= 1.0 - config.gain * np.minimum(share[over], 1.0)
    regain = (~over) & (-excess_w > config.relax * np.maximum(movable_w, 0.0))
    w[regain] = np.minimum(1.0, w[regain] + config.relax)
    return np.clip(w, config.min_weight, 1.0)


def row_clock_ceiling_mhz(excess_w: np.ndarray, saas_dynamic_w: np.ndarray,
                          max_clock_mhz: float, config: ShapingConfig) -> np.ndarray:
    """Per row, the SaaS clock ceiling that removes the excess from their dynamic power
    (NaN = no ceiling): dynamic power scales as (f / f_max) ** 1.65."""
    out = np.full(len(excess_w), np.nan)
    need = (excess_w > 0) & (saas_dynamic_w > 0)
    keep = np.clip(1.0 - excess_w[need] / saas_dynamic_w[need], 0.0, 1.0)
    rel = np.maximum(keep ** (1.0 / POWER_CLOCK_EXPONENT), config.clock_floor_frac)
    out[need] = rel * max_clock_mhz
    return out


def thermal_weights(temperature_c: np.ndarray, slowdown_c: float, config: ShapingConfig
                    ) -> np.ndarray:
    """Per GPU weight multiplier: 1 until `thermal_guard_c` below slowdown, falling linearly to
    `min_weight` at the slowdown temperature."""
    frac = (slowdown_c - temperature_c) / config.thermal_guard_c
    return np.clip(frac, config.min_weight, 1.0)


def thermal_clock_ceiling_mhz(temperature_c: np.ndarray, slowdown_c: float,
                              max_clock_mhz: float, c_per_w: float, dynamic_w: np.ndarray,
                              config: ShapingConfig) -> np.ndarray:
    """Per GPU clock ceiling (NaN = none) that brings a GPU inside the guard band back out of
    it: the watts to drop are the degrees over (slowdown - guard) / the thermal slope."""
    over_c = temperature_c - (slowdown_c - config.thermal_guard_c)
    out = np.full(len(temperature_c), np.nan)
    need = (over_c > 0) & (dynamic_w > 0)
    keep = np.clip(1.0 - over_c[need] / c_per_w / dynamic_w[need], 0.0, 1.0)
    out[need] = np.maximum(keep ** (1.0 / POWER_CLOCK_EXPONENT),
                           config.clock_floor_frac) * max_clock_mhz
    return out
