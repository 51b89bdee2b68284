"""Pre-arming (every prearm_interval_s, and at once for a (re)connected node): each node gets
the caps of its row's Phase 1 plan at each severity, which its agent applies by itself when a
declaration's broadcast reaches it but its own caps do not."""

from __future__ import annotations

from collections.abc import Callable

import structlog

from coordinator.core import CoordinatorCore
from coordinator.emergency.records import Tasks
from coordinator.emergency.scope import Scopes
from coordinator.emergency.settings import EmergencySettings
from coordinator.policy.capping import shed as policy
from coordinator.registry import NodeRecord
from coordinator.rpc import agent_codec
from coordinator.session import AgentSession
from shapeshifter.api.v1 import agent_pb2
from shapeshifter.common import errors


class Prearming:
    def __init__(self, core: CoordinatorCore, settings: EmergencySettings, scopes: Scopes,
                 tasks: Tasks, on_connected: Callable[[NodeRecord], None]) -> None:
        """on_connected: told where the emergencies stand, after a fresh session's pre-arm."""
        self._core = core
        self._s = settings
        self._scopes = scopes
        self._tasks = tasks
        self._on_connected = on_connected
        self._sessions: dict[str, AgentSession] = {}  # the session each node was pre-armed on
        self._acked: set[str] = set()
        self._next_mono_s = 0.0
        self._log = structlog.get_logger().bind(component="emergency")

    @property
    def acked_nodes(self) -> int:
        return len(self._acked)

    def tick(self, now_mono_s: float) -> None:
        due = now_mono_s >= self._next_mono_s
        if due:
            self._next_mono_s = now_mono_s + self._s.prearm_interval_s
        placed = [r for r in self._core.registry.records() if r.placement]
        # Between due passes only rows with a fresh session need a plan: one pass over the
        # records finds them (this runs every tick).
        rows = {r.placement.row for r in placed if due or self._fresh(r)}  # type: ignore[union-attr]
        for row in rows:
            nodes = self._scopes.nodes("row", row)
            fresh = [r for r in nodes if self._fresh(r)]
            targets = nodes if due else fresh
            if not targets:
                continue
            limit_w = self._scopes.normal_capacity("row", row, "power")
            armed = policy.prearm(self._scopes.snapshot(nodes), limit_w, self._s.severities,
                                  self._s.margin_frac)
            for rec in targets:
                self._send(rec, armed.by_node.get(rec.node_id, {}))
            for rec in fresh:
                self._on_connected(rec)

    def _fresh(self, rec: NodeRecord) -> bool:
        """Connected on a session this node was not pre-armed on yet."""
        return (rec.session is not None and not rec.session.closed
                and self._sessions.get(rec.node_id) is not rec.session)

    def _send(self, rec: NodeRecord, levels: dict[float, dict[int, float]]) -> None:
        session = rec.session
        if session is None or session.closed:
            return
        self._sessions[rec.node_id] = session
        msg = agent_codec.emergency_prearm(self._core.epoch, levels)
        self._tasks.spawn(self._await(rec.node_id, session, msg))

    async def _await(self, node_id: str, session: AgentSession,
                     msg: agent_pb2.EmergencyPrearm) -> None:
        try:
            answer = await session.request(agent_codec.prearm_message(msg), msg.prearm_id,
                                           self._s.ack_timeout_s)
        except errors.DomainError as err:
            self._acked.discard(node_id)
            self._log.warning("prearm_unanswered", node_id=node_id, error=str(err))
            return
        if answer.completed:
            self._acked.add(node_id)
        else:
            self._acked.discard(node_id)
            self._log.error("prearm_refused", node_id=node_id,
                            error=answer.results[0].message if answer.results else "")
