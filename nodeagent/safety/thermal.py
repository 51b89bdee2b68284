"""Local thermal safety: step a GPU's power ceiling down as it nears its slowdown temperature,
and back up (with hysteresis) once it has cooled. Acts before the coordinator hears of it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from shapeshifter.common.clock import Clock
from shapeshifter.hw.types import PowerConstraints

SOURCE = "thermal"


@dataclass(frozen=True)
class GuardSettings:
    margin_c: float = 3.0  # act when within this of slowdown
    hysteresis_c: float = 3.0  # lift only when this much further below the margin
    step_frac: float = 0.05  # of the max limit, per step
    cooldown_s: float = 5.0  # min time between steps on one GPU (thermal lag is tens of s)


def decide_ceiling_w(
    temperature_c: float,
    slowdown_c: float,
    ceiling_w: float | None,
    power_limit_w: float,
    constraints: PowerConstraints,
    settings: GuardSettings,
) -> float | None:
    """The guard's next ceiling for one GPU (None = no ceiling). Pure."""
    step_w = settings.step_frac * constraints.max_w
    if temperature_c >= slowdown_c - settings.margin_c:
        start_w = power_limit_w if ceiling_w is None else ceiling_w
        return max(constraints.min_w, start_w - step_w)
    if (
        ceiling_w is not None
        and temperature_c <= slowdown_c - settings.margin_c - settings.hysteresis_c
    ):
        raised_w = ceiling_w + step_w
        return None if raised_w >= constraints.max_w else raised_w
    return ceiling_w


class CeilingSetter(Protocol):
    def set_power_ceilings_w(self, ceilings: dict[int, float | None], source: str) -> Any: ...


class ThermalGuard:
    """Applies decide_ceiling_w through the actuator, at most one step per cooldown per GPU."""

    def __init__(
        self, actuator: CeilingSetter, clock: Clock, log: Any, settings: GuardSettings
    ) -> None:
        self._actuator = actuator
        self._clock = clock
        self._log = log
        self._settings = settings
        self._ceilings_w: dict[int, float] = {}
        self._last_step_s: dict[int, float] = {}

    @property
    def ceilings_w(self) -> dict[int, float]:
        """GPUs the guard is holding down, for the report."""
        return dict(self._ceilings_w)

    def observe(
        self,
        index: int,
        temperature_c: float,
        slowdown_c: float,
        power_limit_w: float,
        constraints: PowerConstraints,
    ) -> None:
        now_s = self._clock.monotonic()
        last_s = self._last_step_s.get(index)
        if last_s is not None and now_s - last_s < self._settings.cooldown_s:
            return
        current = self._ceilings_w.get(index)
        new = decide_ceiling_w(
            temperature_c, slowdown_c, current, power_limit_w, constraints, self._settings
        )
        if new == current:
            return
        self._actuator.set_power_ceilings_w({index: new}, SOURCE)  # raises: the sampler logs it
        self._last_step_s[index] = now_s
        if new is None:
            self._ceilings_w.pop(index, None)
        else:
            self._ceilings_w[index] = new
        self._log.warning(
            "thermal guard",
            gpu=index,
            temperature_c=temperature_c,
            slowdown_c=slowdown_c,
            ceiling_w=new,
        )
