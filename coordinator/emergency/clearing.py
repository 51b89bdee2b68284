"""Stepped clearing: clock locks reset, then caps raised in steps; every step waits a
randomized time and only proceeds while the scope has hysteresis headroom under its restored
limit; then the caps are lifted and the emergency is cleared."""

from __future__ import annotations

import asyncio
import random

import structlog

from coordinator.emergency.caps import caps_from_reports, relaxed_caps
from coordinator.emergency.phase1 import CapFanout
from coordinator.emergency.phase2 import Phase2
from coordinator.emergency.records import CLEARED, Live, Timeline
from coordinator.emergency.scope import Scopes
from coordinator.emergency.settings import EmergencySettings
from coordinator.store.emergency import EmergencyStoreLike
from shapeshifter.common.clock import Clock


class Clearing:
    def __init__(self, clock: Clock, store: EmergencyStoreLike, settings: EmergencySettings,
                 rng: random.Random, scopes: Scopes, fanout: CapFanout, phase2: Phase2,
                 timeline: Timeline) -> None:
        self._clock = clock
        self._store = store
        self._s = settings
        self._rng = rng
        self._scopes = scopes
        self._fanout = fanout
        self._phase2 = phase2
        self._timeline = timeline
        self._log = structlog.get_logger().bind(component="emergency")

    async def run(self, live: Live) -> None:
        """Clear `live` (state clearing) in clear_steps steps; the last lifts every cap."""
        if not live.base_caps:
            live.base_caps = caps_from_reports(
                live, self._scopes.nodes(live.rec.scope, live.rec.name))
        self._phase2.reset_clocks(live)
        steps = self._s.clear_steps
        for step in range(1, steps + 1):
            await asyncio.sleep(self._s.clear_step_s * (1 + self._rng.uniform(
                0, self._s.clear_jitter_frac)))
            await self._hold_for_headroom(live)
            nodes = self._scopes.nodes(live.rec.scope, live.rec.name)
            if step < steps:
                live.caps = relaxed_caps(live.base_caps, live.max_w, step, steps)
                self._timeline.event(live, "relax_step", detail={"step": step, "of": steps})
                for rec in nodes:
                    self._fanout.issue(live, rec)
            else:
                live.caps = {}
                live.rec.state = CLEARED
                for rec in nodes:
                    self._fanout.issue(live, rec, active=False)
        live.rec.cleared_at_unix_s = self._clock.time()
        self._store.save(live.rec)
        self._timeline.event(live, "cleared")
        self._timeline.flush(live)
        self._log.info("emergency_cleared", emergency_id=live.rec.emergency_id)

    async def _hold_for_headroom(self, live: Live) -> None:
        """Hysteresis: relax only while the scope is clearly under its restored limit."""
        held = False
        while self._scopes.power_w(live) > live.rec.normal_limit * (1 - self._s.hysteresis_frac):
            if not held:
                self._timeline.event(live, "clear_held",
                                     detail={"scope_now": self._scopes.power_w(live)})
                held = True
            await asyncio.sleep(self._s.clear_step_s)
