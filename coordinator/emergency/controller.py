"""Emergency controller: declare -> Phase 1 caps in parallel -> verify -> Phase 2 -> clear in steps.

Runs on the coordinator's event loop. The cut itself is the pure policy
coordinator.policy.capping.shed; this package only gathers its snapshot from the registry
(scope.py), sends the result over the agents' established streams (phase1.py, phase2.py,
prearm.py; messages from coordinator.rpc.agent_codec) and records everything in the emergency's
timeline (SQLite) and the audit log (records.py). This module holds the admin entry points and
the tick; verification, tightening and detection are in watch.py, clearing in clearing.py, the
cap arithmetic in caps.py, the settings and daemon flags in settings.py.

- Declaration: the broadcast goes to every node of the scope first (one small message each, so an
  agent that then misses its own caps falls back on its pre-armed ones), then every node's caps.
  Sends are queued on all streams at once; acknowledgements are awaited concurrently.
- Verification (every tick): scope power from the latest reports; nodes that did not acknowledge,
  answered with a failure, reconnected, or report a limit above their cap get their caps again.
- Escalation: when the cut cannot reach the target, best-effort instances are stopped.
- Tightening: an active emergency whose scope is over its limit again for retighten_after_s
  (every node acknowledged its caps) gets a new cut from the latest reports; a GPU's cap only
  ever goes down that way (the lower of its cap now and the new plan's).
- Phase 2: once under the limit for phase2_after_s, capped GPUs get their clocks locked at the
  highest clock whose predicted draw fits the cap (a steady point instead of cap throttling).
  Routing: `cuts()` lowers the rebalancer's limits (routes, placement, plans) to the emergency's
  capacity, and instances on capped GPUs get a lower routing weight (policy.routing).
  Reconfiguration: an emergency still active reconfigure_after_s after its declaration asks the
  rebalancer (attach_replanner) for a plan under those lowered limits: kept as a proposal in
  propose mode, applied in auto mode, skipped (and recorded so) when rebalancing is off. One
  attempt per emergency; its outcome is in the timeline and the audit log.
- Clearing: clock locks reset, then caps raised in steps; every step waits a randomized time and
  only proceeds while the scope has hysteresis headroom under its restored limit; then lifted.
- Adjusting (`adjust`, a parent coordinator's new row limit): an active power emergency's limit
  moves in place, caps recomputed without lifting any in between (clear + declare would).
- Pre-arming (every prearm_interval_s, and at once for a (re)connected node): each node gets the
  caps of its row's Phase 1 plan at each severity.
- Detection (on by default, detect_after_s 3 s; 0 = off): a row drawing above its limit (an
  aisle above its airflow limit) for detect_after_s declares an emergency at capacity 1.0 with
  source "auto". So does an aisle where at least detect_hot_nodes_frac of the reporting nodes
  have a GPU within detect_hot_headroom_c of its slowdown temperature for that long: one hot GPU
  is its agent's thermal guard's business (a local fault), many hot nodes in one aisle point at
  its cooling. Nothing is declared on a scope sharing a node with an emergency in force (an
  agent holds one emergency ceiling per GPU). An automatic emergency stays until cleared; a
  later declaration of a power emergency on its row (a UPS failure, a parent's row limit) takes
  it over in place (`_supersede`: adjusted to the declared limit, caps never lifted).
- issued_s / acked_s describe Phase 1: declaration -> every node's first emergency caps issued /
  acknowledged (later re-issues and clearing steps do not move them).
"""

from __future__ import annotations

import asyncio
import random
from typing import Any

import structlog

from coordinator.core import CoordinatorCore
from coordinator.emergency.caps import adjusted_caps, caps_from_reports
from coordinator.emergency.clearing import Clearing
from coordinator.emergency.phase1 import CapFanout
from coordinator.emergency.phase2 import Phase2, Replanner
from coordinator.emergency.prearm import Prearming
from coordinator.emergency.records import (
    ACTIVE,
    CLEARED,
    CLEARING,
    EmergencyView,
    Live,
    Tasks,
    Timeline,
    summarize,
)
from coordinator.emergency.scope import OpaquePerf, Scopes
from coordinator.emergency.settings import (
    EmergencySettings,
    add_emergency_args,
    emergency_settings_from_args,
)
from coordinator.emergency.watch import AUTO_SOURCE, Detector, Verifier
from coordinator.rebalance.snapshot import ScopeCut
from coordinator.rpc import agent_codec
from coordinator.store.emergency import EmergencyRecord, EmergencyStoreLike
from shapeshifter.common import errors

__all__ = ["AUTO_SOURCE", "EmergencyController", "EmergencySettings", "EmergencyView",
           "Replanner", "add_emergency_args", "emergency_settings_from_args"]

RESUME_WAIT_S = 10.0  # after a restart, how long an emergency waits for its nodes' reports


class EmergencyController:
    def __init__(self, core: CoordinatorCore, store: EmergencyStoreLike,
                 settings: EmergencySettings, rng: random.Random) -> None:
        self._core = core
        self._store = store
        self._s = settings
        self._live: dict[str, Live] = {}
        self._log = structlog.get_logger().bind(component="emergency")
        self._started_unix_s = core.clock.time()
        self._started_mono_s = core.clock.monotonic()
        self._opaque_perf = OpaquePerf()
        self._tasks = Tasks()
        self._timeline = Timeline(core, store)
        self._scopes = Scopes(core, settings, self._opaque_perf)
        self._fanout = CapFanout(core, settings, self._scopes, self._timeline, self._tasks)
        self._phase2 = Phase2(core, settings, self._timeline, self._tasks)
        self._clearing = Clearing(core.clock, store, settings, rng, self._scopes, self._fanout,
                                  self._phase2, self._timeline)
        self._verifier = Verifier(core.clock, settings, self._scopes, self._fanout,
                                  self._phase2, self._timeline)
        self._detector = Detector(core, settings, self._scopes)
        self._prearming = Prearming(core, settings, self._scopes, self._tasks,
                                    lambda rec: self._fanout.resync(self._live.values(), rec))
        for rec in store.load(active_only=True):  # a restart resumes; caps come from reports
            self._live[rec.emergency_id] = Live(rec, core.clock.monotonic(), resume_pending=True)

    # ---------------------------------------------------------------- admin

    def declare(self, scope: str, name: str, kind: str, capacity_frac: float, capacity_w: float,
                capacity_cfm: float, source: str, note: str, actor: str) -> EmergencyView:
        kind = kind or ("cooling" if scope == "aisle" else "power")
        auto = self._auto_on(scope, name, kind)
        if auto is not None and source != AUTO_SOURCE:
            return self._supersede(auto, capacity_frac, capacity_w, source, note, actor)
        normal = self._scopes.validate(scope, name, kind, capacity_frac, capacity_w,
                                       capacity_cfm, self._live.values())
        frac = capacity_frac or (capacity_w or capacity_cfm) / normal
        new_limit = normal * frac
        power_limit_w = (new_limit if kind == "power"
                         else self._scopes.cooling_power_w(scope, name, frac))
        now = self._core.clock.time()
        rec = EmergencyRecord(agent_codec.new_id()[:12], scope, name, kind, ACTIVE, frac, normal,
                              new_limit, power_limit_w, source or "operator", note, now)
        live = Live(rec, self._core.clock.monotonic())
        self._live[rec.emergency_id] = live
        self._timeline.event(live, "declared", detail={
            "actor": actor, "scope": scope, "name": name, "kind": kind, "capacity_frac": frac,
            "normal_limit": normal, "new_limit": new_limit, "power_limit_w": power_limit_w})
        nodes = self._scopes.nodes(scope, name)
        self._fanout.broadcast(live, nodes)
        self._fanout.phase1(live, nodes)
        self._store.save(rec)
        self._timeline.flush(live)
        self._timeline.audit(live, "DeclareEmergency", actor, f"{kind} {scope} {name} -> {frac:g}")
        self._log.warning("emergency_declared", emergency_id=rec.emergency_id, scope=scope,
                          name=name, capacity_frac=frac, power_limit_w=round(power_limit_w),
                          nodes=len(nodes), shortfall_w=round(rec.shortfall_w))
        return self.view(rec.emergency_id, with_timeline=False)

    async def declare_and_send(self, *args: Any, timeout_s: float = 1.0) -> EmergencyView:
        """declare(), then wait (bounded) until the broadcast and the caps are written to every
        connected node of the scope: a coordinator that dies right after answering has still told
        its agents, which then fall back on their pre-armed caps by themselves."""
        view = self.declare(*args)
        live = self._live[view.rec.emergency_id]
        sessions = [t.session for t in live.tracks.values() if t.session is not None]
        done = await asyncio.gather(*(s.written(timeout_s) for s in sessions))
        if not all(done):
            self._log.warning("emergency_broadcast_slow", emergency_id=view.rec.emergency_id,
                              unwritten=done.count(False), timeout_s=timeout_s)
        return view

    def clear(self, emergency_id: str, note: str, actor: str) -> EmergencyView:
        live = self._get_live(emergency_id)
        if live.rec.state != ACTIVE:
            raise errors.FailedPrecondition(
                f"emergency_id={emergency_id!r} is {live.rec.state}, not active",
                field="emergency_id")
        live.rec.state, live.resume_pending = CLEARING, False
        self._store.save(live.rec)
        self._timeline.event(live, "clear_requested", detail={"actor": actor, "note": note})
        self._timeline.audit(live, "ClearEmergency", actor, note)
        live.task = self._tasks.spawn(self._clearing.run(live))
        return self.view(emergency_id, with_timeline=False)

    def _auto_on(self, scope: str, name: str, kind: str) -> Live | None:
        """The active automatic power emergency on this scope, if one is in force."""
        for live in self._live.values():
            r = live.rec
            if (r.state == ACTIVE and r.source == AUTO_SOURCE and kind == "power" == r.kind
                    and (r.scope, r.name) == (scope, name) and not live.resume_pending):
                return live
        return None

    def _supersede(self, live: Live, capacity_frac: float, capacity_w: float, source: str,
                   note: str, actor: str) -> EmergencyView:
        """A declaration (a UPS failure, say) on a scope that automatic detection already caps:
        the automatic emergency takes the declared limit in place and the declared source, so
        the caps never lift in between (clearing first would)."""
        r = live.rec
        if bool(capacity_frac) == bool(capacity_w):
            raise errors.InvalidArgument("give exactly one of capacity_frac, capacity_w",
                                         field="capacity")
        if capacity_frac and not 0.0 < capacity_frac <= 1.0:
            raise errors.out_of_range("capacity_frac", capacity_frac, 0.0, 1.0)
        limit_w = capacity_w or r.normal_limit * capacity_frac
        view = self.adjust(r.emergency_id, limit_w, note, actor)
        r.source = source or "operator"
        self._store.save(r)
        return view

    def adjust(self, emergency_id: str, power_limit_w: float, note: str,
               actor: str) -> EmergencyView:
        """Move an active power emergency's limit in place (a parent coordinator's new row
        limit): clearing and declaring again would lift the caps in between. The new caps are
        caps.adjusted_caps' (a lower limit raises no cap, a higher one cannot overshoot).
        Phase 2 clock locks are reset and redone under the new caps; clearing later starts
        from them."""
        live = self._get_live(emergency_id)
        r = live.rec
        if r.state != ACTIVE or live.resume_pending:
            why = "resuming after a restart" if r.state == ACTIVE else r.state
            raise errors.FailedPrecondition(
                f"emergency_id={emergency_id!r} is {why}; only an active emergency can be "
                "adjusted", field="emergency_id")
        if r.kind != "power":
            raise errors.InvalidArgument(
                f"emergency_id={emergency_id!r} is a {r.kind} emergency; only power "
                "emergencies can be adjusted", field="emergency_id")
        if not 0.0 < power_limit_w <= r.normal_limit:
            raise errors.out_of_range("power_limit_w", power_limit_w, 0.0, r.normal_limit, "W")
        before_w = r.power_limit_w
        nodes = self._scopes.nodes(r.scope, r.name)
        plan, caps = adjusted_caps(self._scopes.snapshot(nodes), live.caps,
                                   power_limit_w >= before_w,
                                   lambda snap: self._scopes.shed(snap, power_limit_w))
        r.capacity_frac, r.new_limit, r.power_limit_w = (power_limit_w / r.normal_limit,
                                                         power_limit_w, power_limit_w)
        r.note, r.shortfall_w = note or r.note, plan.shortfall_w
        self._phase2.reset_clocks(live)
        live.phase2_done, live.under_since_mono_s, live.under_limit_unix_s = False, None, None
        live.over_since_mono_s = None  # tightening waits for reports under the new caps
        live.base_caps = caps
        live.caps = {rec.node_id: dict(caps.get(rec.node_id, {})) for rec in nodes}
        self._timeline.event(live, "adjusted", detail={
            "actor": actor, "from_power_limit_w": before_w, "power_limit_w": power_limit_w,
            "expected_w": round(plan.expected_w, 1), "shortfall_w": round(plan.shortfall_w, 1)})
        for rec in nodes:
            self._fanout.issue(live, rec)
        if not plan.feasible and power_limit_w < before_w:
            self._fanout.escalate(live, plan)
        self._store.save(r)
        self._timeline.flush(live)
        self._timeline.audit(live, "AdjustEmergency", actor,
                             f"{before_w:.0f} -> {power_limit_w:.0f} W")
        self._log.warning("emergency_adjusted", emergency_id=emergency_id,
                          from_power_limit_w=round(before_w), power_limit_w=round(power_limit_w))
        return self.view(emergency_id, with_timeline=False)

    def in_force(self, scope: str, name: str, kind: str = "power") -> list[EmergencyView]:
        """The emergencies not yet cleared (active or clearing) on one scope, oldest first."""
        return [self.view(live.rec.emergency_id, with_timeline=False)
                for live in self._live.values()
                if live.rec.state != CLEARED
                and (live.rec.scope, live.rec.name, live.rec.kind) == (scope, name, kind)]

    def resuming(self, emergency_id: str) -> bool:
        """Found in force at start and still waiting for its nodes' reports (see _try_resume)."""
        live = self._live.get(emergency_id)
        return live is not None and live.resume_pending

    def view(self, emergency_id: str, with_timeline: bool = True) -> EmergencyView:
        live = self._live.get(emergency_id)
        if live is None:
            recs = [r for r in self._store.load() if r.emergency_id == emergency_id]
            if not recs:
                raise errors.NotFound(f"emergency_id={emergency_id!r} is not a known emergency",
                                      field="emergency_id")
            rec = recs[0]
            timeline = self._store.timeline(emergency_id) if with_timeline else []
            return EmergencyView(rec, 0, 0, 0.0, -1.0, -1.0, -1.0, timeline)
        self._timeline.flush(live)
        timeline = self._store.timeline(emergency_id) if with_timeline else []
        return summarize(live, timeline, self._scopes.power_w(live))

    def list(self, active_only: bool) -> list[EmergencyView]:
        return [self.view(r.emergency_id, with_timeline=False)
                for r in self._store.load(active_only)]

    @property
    def prearmed_nodes(self) -> int:
        return self._prearming.acked_nodes

    def attach_replanner(self, replanner: Replanner) -> None:
        """The rebalancer that reconfigures long emergencies (none: reconfiguration skipped)."""
        self._phase2.replanner = replanner

    def cuts(self) -> tuple[ScopeCut, ...]:
        """The emergencies in force (active or clearing): the rebalancer's lowered limits."""
        return tuple(ScopeCut(r.scope, r.name, r.kind, r.capacity_frac)
                     for r in (live.rec for live in self._live.values()) if r.state != CLEARED)

    def _get_live(self, emergency_id: str) -> Live:
        live = self._live.get(emergency_id)
        if live is None:
            self.view(emergency_id, with_timeline=False)  # NOT_FOUND for an unknown id
            raise errors.FailedPrecondition(
                f"emergency_id={emergency_id!r} is already cleared", field="emergency_id")
        return live

    # ---------------------------------------------------------------- loop

    async def run(self) -> None:
        while True:
            try:
                self.tick()
            except Exception:  # a failed tick is logged loudly; the next one retries
                self._log.exception("emergency_tick_failed")
            await asyncio.sleep(self._s.tick_s)

    def tick(self) -> None:
        now = self._core.clock.monotonic()
        for live in list(self._live.values()):
            if live.resume_pending:
                self._try_resume(live, now)
            elif live.rec.state != CLEARED:
                self._verifier.verify(live, now)
            self._timeline.flush(live)
        self._prearming.tick(now)
        self._opaque_perf.sample(self._core.registry.records(), now)
        if self._s.detect_after_s > 0:
            self._detector.tick(now, self._live, self.declare)

    def _try_resume(self, live: Live, now_mono_s: float) -> None:
        """An emergency this coordinator found in force at start (its predecessor died). Once
        every node of the scope has reported here (or after RESUME_WAIT_S), the emergency
        ceilings the nodes report (their own caps, or the pre-armed fallback they applied when
        the link dropped) become its caps and are sent back as such, so verification and
        clearing go on from what is in force; nothing is lifted or raised by the restart. One
        that was clearing resumes its steps."""
        nodes = self._scopes.nodes(live.rec.scope, live.rec.name)
        fresh = [r for r in nodes if r.report is not None  # received here (agent clocks may skew)
                 and r.report_received_unix_s >= self._started_unix_s]
        if len(fresh) < len(nodes) and now_mono_s - self._started_mono_s < RESUME_WAIT_S:
            return
        live.resume_pending = False
        live.caps = caps_from_reports(live, nodes)
        live.base_caps = {n: dict(c) for n, c in live.caps.items()}
        self._timeline.event(live, "resumed", detail={
            "nodes_reported": len(fresh), "of": len(nodes), "capped_nodes": sorted(live.caps)})
        self._log.warning("emergency_resumed", emergency_id=live.rec.emergency_id,
                          state=live.rec.state, nodes_reported=len(fresh), of=len(nodes))
        if live.rec.state == CLEARING:
            live.task = self._tasks.spawn(self._clearing.run(live))
            return
        for rec in fresh:
            if rec.node_id in live.caps:  # a node reporting no emergency ceiling is left as is
                self._fanout.issue(live, rec)
