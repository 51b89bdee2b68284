"""The simulated GPUs follow the engines' load (the demo's power moves with load)."""

from __future__ import annotations

import pytest

from nodeagent.device.sim import SimulatedBackend
from nodeagent.engines.sim_bridge import BUSY_FLOOR, activity_of, apply_engine_loads
from nodeagent.engines.types import EngineLoad
from shapeshifter.common.clock import ManualClock


def test_activity_of() -> None:
    assert activity_of(EngineLoad()) == (0.0, 0.8)
    half = EngineLoad(requests_running=2, max_num_seqs=4, generation_tokens_per_s=30,
                      prompt_tokens_per_s=10)
    assert activity_of(half) == pytest.approx((BUSY_FLOOR + (1 - BUSY_FLOOR) * 0.5, 0.75))
    assert activity_of(EngineLoad(requests_running=9, max_num_seqs=4))[0] == 1.0


def test_power_follows_engine_load() -> None:
    clock = ManualClock()
    backend = SimulatedBackend("a100-40gb", 2, clock)
    totals = {d.index: d.memory_total_mib for d in backend.devices()}
    busy = {0: EngineLoad(requests_running=4, max_num_seqs=4, kv_cache_usage_frac=0.5)}
    apply_engine_loads(backend, busy, totals.keys(), totals)
    clock.advance(120)  # let the first-order thermal/power response settle
    loaded, idle = backend.telemetry(0), backend.telemetry(1)
    assert loaded.power_draw_w > idle.power_draw_w + 100
    assert loaded.memory_used_mib == totals[0] // 2
    apply_engine_loads(backend, {}, totals.keys(), totals)  # engines went quiet
    clock.advance(120)
    assert backend.telemetry(0).power_draw_w == pytest.approx(idle.power_draw_w, abs=20)
