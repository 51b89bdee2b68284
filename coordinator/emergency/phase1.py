"""Phase 1: the broadcast and every node's emergency caps, queued on all streams at once and
acknowledged concurrently; escalation (best-effort instances stopped) when the cut cannot reach
the target; what makes a node's caps due again; and what a (re)connected node is told."""

from __future__ import annotations

from collections.abc import Iterable

import structlog

from coordinator.core import CoordinatorCore
from coordinator.emergency.caps import CAP_TOLERANCE_W
from coordinator.emergency.records import ACTIVE, CLEARED, Live, Tasks, Timeline, Track
from coordinator.emergency.scope import Scopes
from coordinator.emergency.settings import EmergencySettings
from coordinator.policy.capping import shed as policy
from coordinator.registry import NodeRecord
from coordinator.rpc import agent_codec
from coordinator.session import AgentSession
from shapeshifter.api.v1 import agent_pb2
from shapeshifter.common import errors


class CapFanout:
    """Sends an emergency's directives (its caps, the broadcast, the lift) and tracks the
    answers in each node's Track and the timeline."""

    def __init__(self, core: CoordinatorCore, settings: EmergencySettings, scopes: Scopes,
                 timeline: Timeline, tasks: Tasks) -> None:
        self._core = core
        self._s = settings
        self._scopes = scopes
        self._timeline = timeline
        self._tasks = tasks
        self._log = structlog.get_logger().bind(component="emergency")

    def broadcast(self, live: Live, nodes: list[NodeRecord]) -> None:
        """The declaration without caps: an agent that then misses its own caps falls back on
        its pre-armed ones."""
        sent = 0
        for rec in nodes:
            if rec.session is not None and not rec.session.closed:
                rec.session.send(agent_codec.emergency_message(self._directive(live, None)))
                sent += 1
        self._timeline.event(live, "broadcast", detail={"nodes": sent, "of": len(nodes)})

    def phase1(self, live: Live, nodes: list[NodeRecord]) -> None:
        """Cut the scope to the emergency's limit and send every node its caps."""
        plan = self._scopes.shed(self._scopes.snapshot(nodes), live.rec.power_limit_w)
        live.rec.shortfall_w = plan.shortfall_w
        live.base_caps = plan.caps_by_node()
        live.caps = {r.node_id: dict(live.base_caps.get(r.node_id, {})) for r in nodes}
        live.max_w = {(r.node_id, g.index): g.power_limit_max_w for r in nodes
                      if r.report is not None for g in r.report.gpus}
        self._timeline.event(live, "plan", detail={
            "power_draw_w": round(plan.power_draw_w, 1), "target_w": round(plan.target_w, 1),
            "expected_w": round(plan.expected_w, 1), "shortfall_w": round(plan.shortfall_w, 1),
            "gpus_capped": len(plan.caps), "reasons": [c.reason for c in plan.caps[:50]]})
        for rec in nodes:
            self.issue(live, rec)
        if not plan.feasible:
            self.escalate(live, plan)

    def _directive(self, live: Live, caps: dict[int, float] | None,
                   active: bool = True) -> agent_pb2.EmergencyDirective:
        r = live.rec
        return agent_codec.emergency_directive(
            self._core.epoch, r.emergency_id, r.capacity_frac, caps, self._s.fallback_after_s,
            f"{r.kind} emergency {r.scope} {r.name}", active)

    def issue(self, live: Live, rec: NodeRecord, active: bool = True) -> None:
        """Queue this node's caps (active=False: the lift) on its stream now; await the answer
        in a task."""
        caps = live.caps.get(rec.node_id, {}) if active else None
        track = live.tracks.setdefault(rec.node_id, Track())
        d = self._directive(live, caps, active)
        track.directive_id, track.acked_unix_s, track.failed = d.directive_id, None, ""
        track.issued_mono_s = self._core.clock.monotonic()
        session = rec.session
        track.session = session
        if session is None or session.closed:
            track.failed = "not connected"
            return
        track.issued_unix_s = self._core.clock.time()
        if active and live.rec.state == ACTIVE:
            live.phase1_issued_unix_s.setdefault(rec.node_id, track.issued_unix_s)
        self._timeline.event(live, "caps_issued" if active else "caps_lifted", rec.node_id,
                             {"caps_w": {str(k): round(v, 1) for k, v in (caps or {}).items()}})
        self._tasks.spawn(self._await_ack(live, rec.node_id, session, d))

    async def _await_ack(self, live: Live, node_id: str, session: AgentSession,
                         d: agent_pb2.EmergencyDirective) -> None:
        track = live.tracks[node_id]
        try:
            answer = await session.request(agent_codec.emergency_message(d), d.directive_id,
                                           self._s.ack_timeout_s)
        except errors.DomainError as err:
            if track.directive_id == d.directive_id:
                track.failed = str(err)
            self._timeline.event(live, "caps_unanswered", node_id, {"error": str(err)})
            return
        if track.directive_id != d.directive_id:
            return  # superseded by a newer directive
        bad = [f"gpu {r.action_id}: {r.code} {r.message}" for r in answer.results if not r.ok]
        if bad:  # surfaced in the timeline; re-issued by the next verification
            track.failed = "; ".join(bad)
            self._timeline.event(live, "caps_failed", node_id, {"errors": bad})
            self._log.error("emergency_caps_failed", node_id=node_id, errors=bad)
            return
        track.acked_unix_s = self._core.clock.time()
        if d.active and live.rec.state == ACTIVE:
            live.phase1_acked_unix_s.setdefault(node_id, track.acked_unix_s)
        self._timeline.event(live, "caps_acked" if d.active else "lift_acked", node_id)

    def escalate(self, live: Live, plan: policy.ShedPlan) -> None:
        """The cut cannot reach the target: stop the plan's best-effort instances."""
        self._timeline.event(live, "escalation", detail={
            "shortfall_w": round(plan.shortfall_w, 1),
            "stop_instances": [f"{s.node_id}/{s.instance_id}" for s in plan.stop_instances]})
        for stop in plan.stop_instances:
            action = agent_codec.stop_instance(stop.instance_id, "emergency escalation")
            self._tasks.spawn(self._stop_instance(live, stop.node_id, action))

    async def _stop_instance(self, live: Live, node_id: str, action: agent_pb2.Action) -> None:
        actor = f"emergency:{live.rec.emergency_id}"
        try:
            await self._core.pass_through(node_id, action, actor)  # validated and audited
            self._timeline.event(live, "instance_stopped", node_id,
                                 {"instance_id": action.stop_instance.instance_id})
        except errors.DomainError as err:
            self._timeline.event(live, "instance_stop_failed", node_id, {"error": str(err)})

    def reissue_lagging(self, live: Live, by_id: dict[str, NodeRecord],
                        now_mono_s: float) -> None:
        """Verification: a node that did not acknowledge, answered with a failure, reconnected,
        or reports a limit above its cap gets its directive again."""
        for node_id, track in live.tracks.items():
            rec = by_id.get(node_id)
            if rec is None or track.directive_id == "":
                continue
            reason = self._lagging(live, rec, track, now_mono_s)
            if reason:
                self._timeline.event(live, "caps_reissued", node_id, {"reason": reason})
                self.issue(live, rec, active=live.rec.state != CLEARED)

    def _lagging(self, live: Live, rec: NodeRecord, track: Track, now_mono_s: float) -> str:
        if rec.session is not None and rec.session is not track.session and not rec.session.closed:
            return "reconnected"
        if track.acked_unix_s is None:
            overdue = now_mono_s - track.issued_mono_s >= self._s.reissue_after_s
            return f"no acknowledgement ({track.failed or 'waiting'})" if overdue else ""
        node = rec.report
        # Received (coordinator clock, not the agent's) well after the acknowledgement.
        if node is None or rec.report_received_unix_s < track.acked_unix_s + 0.5:
            return ""
        for gpu in node.gpus:
            cap_w = live.caps.get(rec.node_id, {}).get(gpu.index)
            if cap_w is not None and gpu.power_limit_w > cap_w + CAP_TOLERANCE_W:
                return f"gpu {gpu.index} reports {gpu.power_limit_w:.0f} W over its cap"
        return ""

    def resync(self, lives: Iterable[Live], rec: NodeRecord) -> None:
        """A (re)connected node learns where the emergencies stand: its caps, or the all-clear."""
        for live in lives:
            if live.rec.state == CLEARED or rec.node_id not in {
                    r.node_id for r in self._scopes.nodes(live.rec.scope, live.rec.name)}:
                continue
            if rec.node_id in live.caps:
                self.issue(live, rec)
            else:  # restored after a restart: keep its fallback until caps are known
                rec.session.send(agent_codec.emergency_message(self._directive(live, None)))
            return
        rec.session.send(agent_codec.emergency_message(agent_codec.all_clear(self._core.epoch)))
