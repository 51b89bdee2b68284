"""Phase 2: once under the limit for phase2_after_s, capped GPUs get their clocks locked at the
highest clock whose predicted draw fits the cap (a steady point instead of cap throttling); an
emergency still active reconfigure_after_s after its declaration asks the rebalancer for a plan
under the lowered limits (one attempt, recorded in the timeline and the audit log)."""

from __future__ import annotations

from typing import Any, Protocol

import structlog

from coordinator.core import CoordinatorCore
from coordinator.emergency.records import Live, Tasks, Timeline
from coordinator.emergency.settings import EmergencySettings
from coordinator.policy.capping import phase2
from coordinator.rebalance.snapshot import capped_gpus
from coordinator.registry import NodeRecord
from coordinator.rpc import agent_codec
from shapeshifter.api.v1 import agent_pb2
from shapeshifter.common import errors


class Replanner(Protocol):
    """The rebalancer, seen from here: its mode and its plans (under the effective limits)."""

    mode: str

    def propose(self, trigger: str, actor: str, keep_empty: bool = True) -> dict[str, Any]: ...

    def apply(self, plan_id: str, actor: str) -> dict[str, Any]: ...


def clock_lock_actions(rec: NodeRecord, caps: dict[int, float]) -> list[agent_pb2.Action]:
    """Phase 2 clock points (coordinator.policy.capping.phase2, the simulator's too): capped GPUs
    locked at the highest clock that fits their cap (unlocked GPUs only: an operator's lock
    stays)."""
    gpus = capped_gpus(rec.node_id, rec.report, caps) if rec.report is not None else []
    lowest = {g.key[1]: min(g.point.supported_clocks_mhz) for g in gpus}
    plan = phase2.plan_phase2(gpus)
    return [agent_codec.lock_clocks(index, lowest[index], mhz, "emergency phase 2")
            for (_, index), mhz in sorted(plan.clock_mhz.items())]


class Phase2:
    """Clock locks and their reset (sent as plans, audited per node), and the replan."""

    def __init__(self, core: CoordinatorCore, settings: EmergencySettings, timeline: Timeline,
                 tasks: Tasks) -> None:
        self._core = core
        self._s = settings
        self._timeline = timeline
        self._tasks = tasks
        self.replanner: Replanner | None = None  # none: reconfiguration skipped
        self._log = structlog.get_logger().bind(component="emergency")

    def lock_clocks(self, live: Live, nodes: list[NodeRecord]) -> None:
        locks = 0
        for rec in nodes:
            actions = clock_lock_actions(rec, live.caps.get(rec.node_id, {}))
            if actions and rec.session is not None and not rec.session.closed:
                live.phase2_locked[rec.node_id] = [a.lock_clocks.gpu_index for a in actions]
                locks += len(actions)
                self._tasks.spawn(self._send_plan(live, rec, actions, "phase2_clocks"))
        self._timeline.event(live, "phase2", detail={"clock_locks": locks})

    def reset_clocks(self, live: Live) -> None:
        """Unlock what Phase 2 locked (before caps move or clearing starts)."""
        by_id = {r.node_id: r for r in self._core.registry.records()}
        for node_id, indices in live.phase2_locked.items():
            actions = [agent_codec.reset_clocks(i) for i in indices]
            if node_id in by_id:
                self._tasks.spawn(self._send_plan(live, by_id[node_id], actions, "phase2_reset"))
        live.phase2_locked = {}

    def reconfigure(self, live: Live) -> None:
        """Phase 2 for a long emergency: a rebalance plan under the lowered limits (cuts())."""
        r, planner = live.rec, self.replanner
        if planner is None or planner.mode == "off":
            why = "no rebalancer" if planner is None else "rebalance mode is off"
            self._timeline.event(live, "reconfigure_skipped", detail={"reason": why})
            return
        actor = f"emergency:{r.emergency_id}"
        trigger = (f"emergency {r.emergency_id}: {r.kind} {r.scope} {r.name} at "
                   f"{r.capacity_frac:g} for over {self._s.reconfigure_after_s:g} s")
        try:
            doc = planner.propose(trigger, actor, keep_empty=False)
            what = "reconfigure_none" if not doc["stages"] else "reconfigure_proposed"
            if doc["stages"] and planner.mode == "auto":
                planner.apply(doc["plan_id"], actor)
                what = "reconfigure_applied"
        except errors.DomainError as err:
            self._timeline.event(live, "reconfigure_failed", detail={"error": str(err)})
            self._timeline.audit(live, "reconfigure_failed", actor, str(err), ok=False)
            self._log.error("emergency_reconfigure_failed", emergency_id=r.emergency_id,
                            error=str(err))
            return
        actions = sum(len(st["actions"]) for st in doc["stages"])
        self._timeline.event(live, what, detail={"plan_id": doc["plan_id"], "actions": actions,
                                                 "mode": planner.mode})
        if doc["stages"]:
            self._timeline.audit(live, what, actor, f"plan {doc['plan_id']}: {actions} actions")

    async def _send_plan(self, live: Live, rec: NodeRecord, actions: list[agent_pb2.Action],
                         what: str) -> None:
        plan = agent_codec.plan(actions, self._core.epoch, f"emergency {live.rec.emergency_id}")
        session = rec.session
        if session is None:
            return
        try:
            resp = await session.apply_plan(plan, self._s.ack_timeout_s)
            bad = [f"{r.code} {r.message}" for r in resp.results if not r.ok]
        except errors.DomainError as err:
            bad = [str(err)]
        detail = {"actions": [a.WhichOneof("kind") for a in actions], "errors": bad}
        self._timeline.event(live, what if not bad else what + "_failed", rec.node_id, detail)
        self._timeline.audit_node(live, rec.node_id, what, detail, bad)
