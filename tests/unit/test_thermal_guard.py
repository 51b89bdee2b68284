from __future__ import annotations

from typing import Any

from nodeagent.safety.thermal import SOURCE, GuardSettings, ThermalGuard, decide_ceiling_w
from shapeshifter.common.clock import ManualClock
from shapeshifter.hw.types import PowerConstraints

H100 = PowerConstraints(min_w=200, max_w=700, default_w=700)
S = GuardSettings(margin_c=3, hysteresis_c=3, step_frac=0.05, cooldown_s=5)  # 35 W steps


def test_cool_gpu_gets_no_ceiling() -> None:
    assert decide_ceiling_w(70, 87, None, 700, H100, S) is None


def test_near_slowdown_steps_down_from_the_applied_limit() -> None:
    assert decide_ceiling_w(84, 87, None, 700, H100, S) == 665
    assert decide_ceiling_w(86, 87, 665, 665, H100, S) == 630


def test_never_below_min() -> None:
    assert decide_ceiling_w(90, 87, 210, 210, H100, S) == 200
    assert decide_ceiling_w(90, 87, 200, 200, H100, S) == 200


def test_hysteresis_band_holds_then_lifts() -> None:
    assert decide_ceiling_w(82, 87, 600, 600, H100, S) == 600  # between 81 and 84: hold
    assert decide_ceiling_w(81, 87, 600, 600, H100, S) == 635  # cool enough: lift a step
    assert decide_ceiling_w(70, 87, 680, 680, H100, S) is None  # back at max: gone


class Setter:
    def __init__(self) -> None:
        self.calls: list[tuple[dict[int, float | None], str]] = []

    def set_power_ceilings_w(self, ceilings: dict[int, float | None], source: str) -> Any:
        self.calls.append((ceilings, source))


class NullLog:
    def __getattr__(self, _name: str) -> Any:
        return lambda *a, **k: None


def test_guard_applies_steps_with_cooldown() -> None:
    clock, setter = ManualClock(), Setter()
    guard = ThermalGuard(setter, clock, NullLog(), S)
    guard.observe(0, 85, 87, 700, H100)
    guard.observe(0, 86, 87, 665, H100)  # within the cooldown: no second step
    assert setter.calls == [({0: 665}, SOURCE)]
    clock.advance(5)
    guard.observe(0, 86, 87, 665, H100)
    assert setter.calls[-1] == ({0: 630}, SOURCE) and guard.ceilings_w == {0: 630}
    clock.advance(5)
    guard.observe(0, 60, 87, 630, H100)
    assert guard.ceilings_w == {0: 665}
    guard.observe(1, 60, 87, 700, H100)  # other GPU, cool: nothing
    assert len(setter.calls) == 3
