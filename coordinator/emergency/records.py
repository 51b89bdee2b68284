"""What the controller keeps per emergency (its live state, each node's directive track), the
timeline and audit records it writes, the summary it answers with, and its background tasks."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

from coordinator.core import CoordinatorCore
from coordinator.session import AgentSession
from coordinator.store.emergency import EmergencyRecord, EmergencyStoreLike, Event

ACTIVE, CLEARING, CLEARED = "active", "clearing", "cleared"
Caps = dict[str, dict[int, float]]  # node id -> GPU index -> cap (W)


@dataclass
class Track:
    """One node's latest directive of one emergency and its answer."""

    issued_unix_s: float | None = None
    issued_mono_s: float = 0.0
    acked_unix_s: float | None = None
    failed: str = ""
    session: AgentSession | None = None
    directive_id: str = ""


@dataclass
class Live:
    """An emergency not yet cleared, or cleared since this coordinator started."""

    rec: EmergencyRecord
    declared_mono_s: float
    caps: Caps = field(default_factory=dict)  # what is in force now
    base_caps: Caps = field(default_factory=dict)  # Phase 1
    max_w: dict[tuple[str, int], float] = field(default_factory=dict)
    tracks: dict[str, Track] = field(default_factory=dict)
    events: list[Event] = field(default_factory=list)
    under_limit_unix_s: float | None = None
    under_since_mono_s: float | None = None
    over_since_mono_s: float | None = None  # active and over the limit since (see retighten)
    phase2_locked: dict[str, list[int]] = field(default_factory=dict)
    phase2_done: bool = False
    reconfigured: bool = False
    resume_pending: bool = False  # loaded at start from the store: see the controller's resume
    phase1_issued_unix_s: dict[str, float] = field(default_factory=dict)  # first caps per node
    phase1_acked_unix_s: dict[str, float] = field(default_factory=dict)
    task: asyncio.Task[None] | None = None


@dataclass(frozen=True)
class EmergencyView:
    rec: EmergencyRecord
    nodes: int
    nodes_acked: int
    scope_power_w: float
    issued_s: float
    acked_s: float
    under_limit_s: float
    timeline: list[Event]


def summarize(live: Live, timeline: list[Event], scope_power_w: float) -> EmergencyView:
    """issued_s / acked_s: declaration -> every node's first Phase 1 caps issued / acknowledged
    (-1 until all are); under_limit_s: declaration -> the scope first under its limit."""
    t0 = live.rec.declared_at_unix_s
    tracks = list(live.tracks.values())
    issued = [live.phase1_issued_unix_s.get(n) for n in live.tracks]  # Phase 1 only
    acked = [live.phase1_acked_unix_s.get(n) for n in live.tracks]

    def span(times: list[float | None]) -> float:
        return max(times) - t0 if times and None not in times else -1.0  # type: ignore

    under = live.under_limit_unix_s - t0 if live.under_limit_unix_s is not None else -1.0
    return EmergencyView(live.rec, len(tracks), sum(t.acked_unix_s is not None for t in tracks),
                         scope_power_w, span(issued), span(acked), under, timeline)


class Timeline:
    """An emergency's timeline (buffered, then appended to the emergency store) and its
    entries in the coordinator's audit log."""

    def __init__(self, core: CoordinatorCore, store: EmergencyStoreLike) -> None:
        self._core = core
        self._store = store

    def event(self, live: Live, kind: str, node_id: str = "",
              detail: dict[str, Any] | None = None) -> None:
        live.events.append(Event(self._core.clock.time(), kind, node_id, detail))

    def flush(self, live: Live) -> None:
        if live.events:
            events, live.events = live.events, []
            self._store.append(live.rec.emergency_id, events)

    def audit(self, live: Live, action: str, actor: str, message: str, ok: bool = True) -> None:
        request = json.dumps({"emergency_id": live.rec.emergency_id, "scope": live.rec.scope,
                              "name": live.rec.name, "capacity_frac": live.rec.capacity_frac})
        self._core.store.append_audit(self._core.clock.time(), self._core.epoch, "", action,
                                      request, ok, "OK" if ok else "FAILED", message, actor)

    def audit_node(self, live: Live, node_id: str, action: str, detail: dict[str, Any],
                   errors: list[str]) -> None:
        """A plan the emergency sent one node (Phase 2 clocks), audited with its outcome."""
        ok = not errors
        self._core.store.append_audit(self._core.clock.time(), self._core.epoch, node_id,
                                      action, json.dumps(detail), ok,
                                      "OK" if ok else "FAILED", "; ".join(errors),
                                      f"emergency:{live.rec.emergency_id}")


class Tasks:
    """The controller's background tasks (acknowledgements, plans, clearing steps), held so
    the loop does not drop them."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task
