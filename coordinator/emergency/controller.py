"""Emergency controller: declare -> Phase 1 caps in parallel -> verify -> Phase 2 -> clear in steps.

Runs on the coordinator's event loop. The cut itself is the pure policy
coordinator.policy.capping.shed;
this module only gathers its snapshot from the registry, sends the result over the agents'
established streams and records everything in the emergency's timeline (SQLite) and the audit log.

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
import json
import random
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import structlog

from coordinator.core import CoordinatorCore
from coordinator.policy.capping import phase2
from coordinator.policy.capping import shed as policy
from coordinator.rebalance.snapshot import ScopeCut, capped_gpus, decode_frac, instances_by_gpu
from coordinator.registry import NodeRecord
from coordinator.rpc import agent_codec
from coordinator.session import AgentSession
from coordinator.store.emergency import EmergencyRecord, EmergencyStoreLike, Event
from shapeshifter.api.v1 import agent_pb2
from shapeshifter.api.v1 import link_pb2 as lpb
from shapeshifter.common import errors
from shapeshifter.hw import physics
from shapeshifter.hw.models import GPU_MODELS

SCOPES = ("row", "aisle", "site")
KINDS = ("power", "cooling")
RESUME_WAIT_S = 10.0  # after a restart, how long an emergency waits for its nodes' reports
ACTIVE, CLEARING, CLEARED = "active", "clearing", "cleared"
AUTO_SOURCE = "auto"  # the source of the emergencies detection declares
CAP_TOLERANCE_W = 1.0
OPAQUE_SAMPLE_S = 10.0  # how often the opaque GPUs' relative performance is sampled


@dataclass(frozen=True)
class EmergencySettings:
    margin_frac: float = 0.05
    severities: tuple[float, ...] = policy.DEFAULT_SEVERITIES
    tick_s: float = 0.1
    ack_timeout_s: float = 5.0
    reissue_after_s: float = 1.0  # no acknowledgement (or a wrong limit reported) this long
    fallback_after_s: float = 1.0  # agents: broadcast but no own caps -> pre-armed caps
    phase2_after_s: float = 10.0  # under the limit this long -> locked clocks; 0 = never
    clear_steps: int = 3
    clear_step_s: float = 2.0
    clear_jitter_frac: float = 0.5  # each step waits clear_step_s * (1 + U(0, this))
    hysteresis_frac: float = 0.05
    prearm_interval_s: float = 10.0
    # A row over its limit (an aisle over its airflow) this long is acted on without a human:
    # three reports at the default 1 s interval, so one noisy sample does not declare. 0 = off.
    detect_after_s: float = 3.0
    detect_hot_headroom_c: float = 3.0  # a GPU this close to slowdown makes its node "hot"
    detect_hot_nodes_frac: float = 0.5  # this share of an aisle's nodes hot: a cooling signal
    reconfigure_after_s: float = 300.0  # still active this long -> rebalance plan; 0 = never
    # Active, every node acknowledged, and the scope over its emergency limit again this long
    # (the load rose on GPUs the caps left alone) -> tighter caps. 0 = never.
    retighten_after_s: float = 3.0


class Replanner(Protocol):
    """The rebalancer, seen from here: its mode and its plans (under the effective limits)."""

    mode: str

    def propose(self, trigger: str, actor: str, keep_empty: bool = True) -> dict[str, Any]: ...

    def apply(self, plan_id: str, actor: str) -> dict[str, Any]: ...


@dataclass
class _Track:
    issued_unix_s: float | None = None
    issued_mono_s: float = 0.0
    acked_unix_s: float | None = None
    failed: str = ""
    session: AgentSession | None = None
    directive_id: str = ""


@dataclass
class _Live:
    rec: EmergencyRecord
    declared_mono_s: float
    caps: dict[str, dict[int, float]] = field(default_factory=dict)  # what is in force now
    base_caps: dict[str, dict[int, float]] = field(default_factory=dict)  # Phase 1
    max_w: dict[tuple[str, int], float] = field(default_factory=dict)
    tracks: dict[str, _Track] = field(default_factory=dict)
    events: list[Event] = field(default_factory=list)
    under_limit_unix_s: float | None = None
    under_since_mono_s: float | None = None
    over_since_mono_s: float | None = None  # active and over the limit since (see _tighten)
    phase2_locked: dict[str, list[int]] = field(default_factory=dict)
    phase2_done: bool = False
    reconfigured: bool = False
    resume_pending: bool = False  # loaded at start from the store: see _try_resume
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


class EmergencyController:
    def __init__(self, core: CoordinatorCore, store: EmergencyStoreLike,
                 settings: EmergencySettings, rng: random.Random) -> None:
        self._core = core
        self._store = store
        self._s = settings
        self._rng = rng
        self._live: dict[str, _Live] = {}
        self._prearm_sessions: dict[str, AgentSession] = {}
        self._prearm_acked: set[str] = set()
        self._next_prearm_mono_s = 0.0
        self._over_since: dict[tuple[str, str, str], float] = {}  # (signal, scope, name)
        self._replanner: Replanner | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._log = structlog.get_logger().bind(component="emergency")
        self._started_unix_s = core.clock.time()
        self._started_mono_s = core.clock.monotonic()
        self._opaque_perf = _OpaquePerf()
        for rec in store.load(active_only=True):  # a restart resumes; caps come from reports
            self._live[rec.emergency_id] = _Live(rec, core.clock.monotonic(),
                                                 resume_pending=True)

    # ---------------------------------------------------------------- admin

    def declare(self, scope: str, name: str, kind: str, capacity_frac: float, capacity_w: float,
                capacity_cfm: float, source: str, note: str, actor: str) -> EmergencyView:
        kind = kind or ("cooling" if scope == "aisle" else "power")
        auto = self._auto_on(scope, name, kind)
        if auto is not None and source != AUTO_SOURCE:
            return self._supersede(auto, capacity_frac, capacity_w, source, note, actor)
        normal = self._validate(scope, name, kind, capacity_frac, capacity_w, capacity_cfm)
        frac = capacity_frac or (capacity_w or capacity_cfm) / normal
        new_limit = normal * frac
        power_limit_w = new_limit if kind == "power" else self._cooling_power_w(scope, name, frac)
        now = self._core.clock.time()
        rec = EmergencyRecord(agent_codec.new_id()[:12], scope, name, kind, ACTIVE, frac, normal,
                              new_limit, power_limit_w, source or "operator", note, now)
        live = _Live(rec, self._core.clock.monotonic())
        self._live[rec.emergency_id] = live
        self._event(live, "declared", detail={"actor": actor, "scope": scope, "name": name,
                                              "kind": kind, "capacity_frac": frac,
                                              "normal_limit": normal, "new_limit": new_limit,
                                              "power_limit_w": power_limit_w})
        nodes = self._scope_nodes(scope, name)
        self._broadcast(live, nodes)
        self._phase1(live, nodes)
        self._store.save(rec)
        self._flush(live)
        self._audit(live, "DeclareEmergency", actor, f"{kind} {scope} {name} -> {frac:g}")
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
        self._event(live, "clear_requested", detail={"actor": actor, "note": note})
        self._audit(live, "ClearEmergency", actor, note)
        live.task = self._spawn(self._clear_steps(live))
        return self.view(emergency_id, with_timeline=False)

    def _auto_on(self, scope: str, name: str, kind: str) -> _Live | None:
        """The active automatic power emergency on this scope, if one is in force."""
        for live in self._live.values():
            r = live.rec
            if (r.state == ACTIVE and r.source == AUTO_SOURCE and kind == "power" == r.kind
                    and (r.scope, r.name) == (scope, name) and not live.resume_pending):
                return live
        return None

    def _supersede(self, live: _Live, capacity_frac: float, capacity_w: float, source: str,
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
        limit): clearing and declaring again would lift the caps in between. Lower: every GPU
        gets the lower of its cap now and its cap in a Phase 1 plan at the new limit (none is
        raised). Higher: a Phase 1 plan at the new limit that counts every capped GPU at its
        maximum (the cap hides what it would draw), so a raise cannot overshoot. Phase 2 clock
        locks are reset and redone under the new caps; clearing later starts from them."""
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
        nodes = self._scope_nodes(r.scope, r.name)
        plan, caps = self._adjusted_caps(live, nodes, power_limit_w)
        r.capacity_frac, r.new_limit, r.power_limit_w = (power_limit_w / r.normal_limit,
                                                         power_limit_w, power_limit_w)
        r.note, r.shortfall_w = note or r.note, plan.shortfall_w
        self._reset_clocks(live)
        live.phase2_done, live.under_since_mono_s, live.under_limit_unix_s = False, None, None
        live.over_since_mono_s = None  # tightening waits for reports under the new caps
        live.base_caps = caps
        live.caps = {rec.node_id: dict(caps.get(rec.node_id, {})) for rec in nodes}
        self._event(live, "adjusted", detail={
            "actor": actor, "from_power_limit_w": before_w, "power_limit_w": power_limit_w,
            "expected_w": round(plan.expected_w, 1), "shortfall_w": round(plan.shortfall_w, 1)})
        for rec in nodes:
            self._issue(live, rec)
        if not plan.feasible and power_limit_w < before_w:
            self._escalate(live, plan)
        self._store.save(r)
        self._flush(live)
        self._audit(live, "AdjustEmergency", actor, f"{before_w:.0f} -> {power_limit_w:.0f} W")
        self._log.warning("emergency_adjusted", emergency_id=emergency_id,
                          from_power_limit_w=round(before_w), power_limit_w=round(power_limit_w))
        return self.view(emergency_id, with_timeline=False)

    def _adjusted_caps(self, live: _Live, nodes: list[NodeRecord], power_limit_w: float
                       ) -> tuple[policy.ShedPlan, dict[str, dict[int, float]]]:
        snapshot = self._snapshot(nodes)
        if power_limit_w >= live.rec.power_limit_w:
            capped = {(n, i) for n, caps in live.caps.items() for i in caps}
            snapshot = replace(snapshot, gpus=tuple(
                replace(g, power_draw_w=g.power_limit_max_w)
                if (g.node_id, g.gpu_index) in capped else g for g in snapshot.gpus))
            plan = policy.shed(snapshot, power_limit_w, self._s.margin_frac,
                               self._opaque_perf.deep_weight())
            return plan, plan.caps_by_node()
        plan = policy.shed(snapshot, power_limit_w, self._s.margin_frac,
                               self._opaque_perf.deep_weight())
        caps = {n: dict(c) for n, c in live.caps.items() if c}
        for node_id, new in plan.caps_by_node().items():
            mine = caps.setdefault(node_id, {})
            for index, cap_w in new.items():
                mine[index] = min(cap_w, mine.get(index, cap_w))
        return plan, caps

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
        self._flush(live)
        timeline = self._store.timeline(emergency_id) if with_timeline else []
        return self._summarize(live, timeline)

    def list(self, active_only: bool) -> list[EmergencyView]:
        return [self.view(r.emergency_id, with_timeline=False)
                for r in self._store.load(active_only)]

    @property
    def prearmed_nodes(self) -> int:
        return len(self._prearm_acked)

    def attach_replanner(self, replanner: Replanner) -> None:
        """The rebalancer that reconfigures long emergencies (none: reconfiguration skipped)."""
        self._replanner = replanner

    def cuts(self) -> tuple[ScopeCut, ...]:
        """The emergencies in force (active or clearing): the rebalancer's lowered limits."""
        return tuple(ScopeCut(r.scope, r.name, r.kind, r.capacity_frac)
                     for r in (live.rec for live in self._live.values()) if r.state != CLEARED)

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
                self._verify(live, now)
            self._flush(live)
        self._prearm(now)
        self._opaque_perf.sample(self._core.registry.records(), now)
        if self._s.detect_after_s > 0:
            self._detect(now)

    def _try_resume(self, live: _Live, now_mono_s: float) -> None:
        """An emergency this coordinator found in force at start (its predecessor died). Once
        every node of the scope has reported here (or after RESUME_WAIT_S), the emergency
        ceilings the nodes report (their own caps, or the pre-armed fallback they applied when
        the link dropped) become its caps and are sent back as such, so verification and
        clearing go on from what is in force; nothing is lifted or raised by the restart. One
        that was clearing resumes its steps."""
        nodes = self._scope_nodes(live.rec.scope, live.rec.name)
        fresh = [r for r in nodes if r.report is not None  # received here (agent clocks may skew)
                 and r.report_received_unix_s >= self._started_unix_s]
        if len(fresh) < len(nodes) and now_mono_s - self._started_mono_s < RESUME_WAIT_S:
            return
        live.resume_pending = False
        live.caps = self._caps_from_reports(live)
        live.base_caps = {n: dict(c) for n, c in live.caps.items()}
        self._event(live, "resumed", detail={"nodes_reported": len(fresh), "of": len(nodes),
                                             "capped_nodes": sorted(live.caps)})
        self._log.warning("emergency_resumed", emergency_id=live.rec.emergency_id,
                          state=live.rec.state, nodes_reported=len(fresh), of=len(nodes))
        if live.rec.state == CLEARING:
            live.task = self._spawn(self._clear_steps(live))
            return
        for rec in fresh:
            if rec.node_id in live.caps:  # a node reporting no emergency ceiling is left as is
                self._issue(live, rec)

    # ---------------------------------------------------------------- validation

    def _validate(self, scope: str, name: str, kind: str, frac: float, cap_w: float,
                  cap_cfm: float) -> float:
        """The scope's normal capacity (W or CFM); raises with the bad field named."""
        if scope not in SCOPES:
            raise errors.InvalidArgument(f"scope={scope!r} is not one of {', '.join(SCOPES)}",
                                         field="scope")
        if kind not in KINDS:
            raise errors.InvalidArgument(f"kind={kind!r} is not one of {', '.join(KINDS)}",
                                         field="kind")
        normal = self._normal_capacity(scope, name, kind)
        given = [v for v in (frac, cap_w, cap_cfm) if v]
        if len(given) > 1:
            raise errors.InvalidArgument(
                "give exactly one of capacity_frac, capacity_w, capacity_cfm", field="capacity")
        if not given or (frac and not 0.0 < frac <= 1.0):
            raise errors.InvalidArgument(
                f"capacity_frac={frac:g} is outside the allowed range (0, 1] "
                "(or give capacity_w / capacity_cfm)", field="capacity_frac")
        if (cap_w and kind != "power") or (cap_cfm and kind != "cooling"):
            raise errors.InvalidArgument(
                f"kind={kind} takes {'capacity_w' if kind == 'power' else 'capacity_cfm'}",
                field="capacity_w" if cap_w else "capacity_cfm")
        for fld, v, unit in (("capacity_w", cap_w, "W"), ("capacity_cfm", cap_cfm, "CFM")):
            if v and not 0.0 < v <= normal:
                raise errors.out_of_range(fld, v, 0.0, normal, unit)
        for live in self._live.values():
            r = live.rec
            if r.state != CLEARED and (r.scope, r.name, r.kind) == (scope, name, kind):
                raise errors.FailedPrecondition(
                    f"{scope} {name!r} already has active {kind} emergency {r.emergency_id}; "
                    "clear it first", field="name")
        return normal

    def _normal_capacity(self, scope: str, name: str, kind: str) -> float:
        sites = self._core.topology.sites
        rows = [(s.name, r) for s in sites for r in s.rows]
        aisles = [(s.name, a) for s in sites for a in s.aisles]
        if (kind == "power" and scope == "aisle") or (kind == "cooling" and scope == "row"):
            raise errors.InvalidArgument(
                f"kind={kind} needs scope {'row or site' if kind == 'power' else 'aisle or site'}"
                " (rows have a power limit, aisles an airflow limit)", field="kind")
        if scope == "site":
            if name not in {s.name for s in sites}:
                raise errors.NotFound(f"name={name!r} is not a site of the topology",
                                      field="name")
            if kind == "power":
                return sum(r.row_power_limit_w for s, r in rows if s == name)
            return sum(a.aisle_airflow_cfm for s, a in aisles if s == name)
        table = ({r.name: r.row_power_limit_w for _, r in rows} if scope == "row"
                 else {a.name: a.aisle_airflow_cfm for _, a in aisles})
        if name not in table:
            known = ", ".join(sorted(table))
            raise errors.NotFound(f"name={name!r} is not a {scope} of the topology "
                                  f"(known: {known})", field="name")
        return table[name]

    def _cooling_power_w(self, scope: str, name: str, frac: float) -> float:
        """Airflow is about linear in load (DESIGN §4): the power that keeps the scope's airflow
        under frac of its limit, scaled from the current power/airflow ratio."""
        nodes = self._scope_nodes(scope, name)
        power_w = sum(r.report.budget.node_power_w for r in nodes if r.report is not None)
        cfm = sum(r.report.budget.airflow_cfm for r in nodes if r.report is not None)
        limit_cfm = self._normal_capacity(scope, name, "cooling") * frac
        return power_w * min(1.0, limit_cfm / cfm) if cfm > 0 else power_w

    # ---------------------------------------------------------------- scope and snapshot

    def _scope_nodes(self, scope: str, name: str) -> list[NodeRecord]:
        return [r for r in self._core.registry.records()
                if r.placement is not None and getattr(r.placement, scope) == name]

    def _snapshot(self, nodes: Iterable[NodeRecord]) -> policy.ShedSnapshot:
        gpus: list[policy.GpuState] = []
        other_w = 0.0
        for rec in nodes:
            node = rec.report
            if node is None:
                continue
            other_w += max(0.0, node.budget.node_power_w - node.budget.gpu_power_w)
            gpus.extend(_gpu_states(rec.node_id, node))
        return policy.ShedSnapshot(tuple(gpus), other_w)

    def _scope_power_w(self, live: _Live) -> float:
        nodes = self._scope_nodes(live.rec.scope, live.rec.name)
        key = "airflow_cfm" if live.rec.kind == "cooling" and live.rec.state != ACTIVE else ""
        return sum(getattr(r.report.budget, key or "node_power_w") for r in nodes
                   if r.report is not None)

    # ---------------------------------------------------------------- Phase 1

    def _broadcast(self, live: _Live, nodes: list[NodeRecord]) -> None:
        sent = 0
        for rec in nodes:
            if rec.session is not None and not rec.session.closed:
                rec.session.send(lpb.CoordinatorMessage(emergency=self._directive(live, None)))
                sent += 1
        self._event(live, "broadcast", detail={"nodes": sent, "of": len(nodes)})

    def _phase1(self, live: _Live, nodes: list[NodeRecord]) -> None:
        plan = policy.shed(self._snapshot(nodes), live.rec.power_limit_w, self._s.margin_frac,
                           self._opaque_perf.deep_weight())
        live.rec.shortfall_w = plan.shortfall_w
        live.base_caps = plan.caps_by_node()
        live.caps = {r.node_id: dict(live.base_caps.get(r.node_id, {})) for r in nodes}
        live.max_w = {(r.node_id, g.index): g.power_limit_max_w for r in nodes
                      if r.report is not None for g in r.report.gpus}
        self._event(live, "plan", detail={
            "power_draw_w": round(plan.power_draw_w, 1), "target_w": round(plan.target_w, 1),
            "expected_w": round(plan.expected_w, 1), "shortfall_w": round(plan.shortfall_w, 1),
            "gpus_capped": len(plan.caps), "reasons": [c.reason for c in plan.caps[:50]]})
        for rec in nodes:
            self._issue(live, rec)
        if not plan.feasible:
            self._escalate(live, plan)

    def _directive(self, live: _Live, caps: dict[int, float] | None,
                   active: bool = True) -> agent_pb2.EmergencyDirective:
        return agent_pb2.EmergencyDirective(
            directive_id=agent_codec.new_id(), epoch=self._core.epoch,
            emergency_id=live.rec.emergency_id, active=active,
            capacity_frac=live.rec.capacity_frac, gpu_power_ceiling_w=caps or {},
            has_caps=caps is not None, fallback_after_s=self._s.fallback_after_s,
            reason=f"{live.rec.kind} emergency {live.rec.scope} {live.rec.name}")

    def _issue(self, live: _Live, rec: NodeRecord, active: bool = True) -> None:
        """Queue this node's caps on its stream now; await the answer in a task."""
        caps = live.caps.get(rec.node_id, {}) if active else None
        track = live.tracks.setdefault(rec.node_id, _Track())
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
        self._event(live, "caps_issued" if active else "caps_lifted", rec.node_id,
                    {"caps_w": {str(k): round(v, 1) for k, v in (caps or {}).items()}})
        self._spawn(self._await_ack(live, rec.node_id, session, d))

    async def _await_ack(self, live: _Live, node_id: str, session: AgentSession,
                         d: agent_pb2.EmergencyDirective) -> None:
        track = live.tracks[node_id]
        try:
            answer = await session.request(lpb.CoordinatorMessage(emergency=d), d.directive_id,
                                           self._s.ack_timeout_s)
        except errors.DomainError as err:
            if track.directive_id == d.directive_id:
                track.failed = str(err)
            self._event(live, "caps_unanswered", node_id, {"error": str(err)})
            return
        if track.directive_id != d.directive_id:
            return  # superseded by a newer directive
        bad = [f"gpu {r.action_id}: {r.code} {r.message}" for r in answer.results if not r.ok]
        if bad:  # surfaced in the timeline; re-issued by the next verification
            track.failed = "; ".join(bad)
            self._event(live, "caps_failed", node_id, {"errors": bad})
            self._log.error("emergency_caps_failed", node_id=node_id, errors=bad)
            return
        track.acked_unix_s = self._core.clock.time()
        if d.active and live.rec.state == ACTIVE:
            live.phase1_acked_unix_s.setdefault(node_id, track.acked_unix_s)
        self._event(live, "caps_acked" if d.active else "lift_acked", node_id)

    def _escalate(self, live: _Live, plan: policy.ShedPlan) -> None:
        self._event(live, "escalation", detail={
            "shortfall_w": round(plan.shortfall_w, 1),
            "stop_instances": [f"{s.node_id}/{s.instance_id}" for s in plan.stop_instances]})
        for stop in plan.stop_instances:
            action = agent_pb2.Action(stop_instance=agent_pb2.StopInstanceRequest(
                instance_id=stop.instance_id, force=True), reason="emergency escalation")
            self._spawn(self._stop_instance(live, stop.node_id, action))

    async def _stop_instance(self, live: _Live, node_id: str, action: agent_pb2.Action) -> None:
        actor = f"emergency:{live.rec.emergency_id}"
        try:
            await self._core.pass_through(node_id, action, actor)  # validated and audited
            self._event(live, "instance_stopped", node_id,
                        {"instance_id": action.stop_instance.instance_id})
        except errors.DomainError as err:
            self._event(live, "instance_stop_failed", node_id, {"error": str(err)})

    # ---------------------------------------------------------------- verification, Phase 2

    def _verify(self, live: _Live, now_mono_s: float) -> None:
        self._note_power(live, now_mono_s)
        by_id = {r.node_id: r for r in self._scope_nodes(live.rec.scope, live.rec.name)}
        for node_id, track in live.tracks.items():
            rec = by_id.get(node_id)
            if rec is None or track.directive_id == "":
                continue
            reason = self._lagging(live, rec, track, now_mono_s)
            if reason:
                self._event(live, "caps_reissued", node_id, {"reason": reason})
                self._issue(live, rec, active=live.rec.state != CLEARED)
        if self._tighten_due(live, by_id, now_mono_s):
            self._tighten(live, list(by_id.values()), now_mono_s)
        if (live.rec.state == ACTIVE and not live.phase2_done and self._s.phase2_after_s > 0
                and live.under_since_mono_s is not None
                and now_mono_s - live.under_since_mono_s >= self._s.phase2_after_s):
            live.phase2_done = True
            self._phase2(live, list(by_id.values()))
        if (live.rec.state == ACTIVE and not live.reconfigured and self._s.reconfigure_after_s > 0
                and now_mono_s - live.declared_mono_s >= self._s.reconfigure_after_s):
            live.reconfigured = True
            self._reconfigure(live)

    def _lagging(self, live: _Live, rec: NodeRecord, track: _Track, now_mono_s: float) -> str:
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

    def _note_power(self, live: _Live, now_mono_s: float) -> None:
        if live.rec.state != ACTIVE:
            return
        power_w = self._scope_power_w(live)
        if power_w <= live.rec.power_limit_w:
            if live.under_since_mono_s is None:
                live.under_since_mono_s = now_mono_s
            if live.under_limit_unix_s is None:
                live.under_limit_unix_s = self._core.clock.time()
                self._event(live, "under_limit", detail={"scope_power_w": round(power_w, 1)})
            live.over_since_mono_s = None
        else:
            live.under_since_mono_s = None
            if live.over_since_mono_s is None:
                live.over_since_mono_s = now_mono_s

    def _tighten_due(self, live: _Live, by_id: dict[str, NodeRecord], now_mono_s: float
                     ) -> bool:
        """Over the limit for retighten_after_s, every connected node's caps acknowledged and
        reported on since (caps still on their way are no reason to cut more)."""
        if (live.rec.state != ACTIVE or self._s.retighten_after_s <= 0
                or live.over_since_mono_s is None
                or now_mono_s - live.over_since_mono_s < self._s.retighten_after_s):
            return False
        for node_id, t in live.tracks.items():
            rec = by_id.get(node_id)
            if rec is None or t.session is None or t.session.closed:
                continue
            if t.acked_unix_s is None or rec.report_received_unix_s < t.acked_unix_s + 0.5:
                return False
        return True

    def _tighten(self, live: _Live, nodes: list[NodeRecord], now_mono_s: float) -> None:
        """A new cut at the same limit from the latest reports; each GPU keeps the lower of its
        cap now and the new plan's. Phase 2 clock locks are reset and redone under the new caps."""
        live.over_since_mono_s = now_mono_s  # the next one waits for reports under these caps
        plan = policy.shed(self._snapshot(nodes), live.rec.power_limit_w, self._s.margin_frac,
                           self._opaque_perf.deep_weight())
        lower = _lower_caps(live.caps, plan.caps_by_node())
        if not lower:
            return  # nothing left to cut by capping (escalation was Phase 1's)
        for node_id, caps in lower.items():
            live.caps.setdefault(node_id, {}).update(caps)
            live.base_caps.setdefault(node_id, {}).update(caps)
        live.max_w.update({(r.node_id, g.index): g.power_limit_max_w for r in nodes
                           if r.report is not None for g in r.report.gpus})
        self._reset_clocks(live)
        live.phase2_done = False
        self._event(live, "caps_tightened", detail={
            "scope_power_w": round(self._scope_power_w(live), 1),
            "expected_w": round(plan.expected_w, 1), "gpus": sum(map(len, lower.values()))})
        for rec in nodes:
            if rec.node_id in lower:
                self._issue(live, rec)

    def _phase2(self, live: _Live, nodes: list[NodeRecord]) -> None:
        locks = 0
        for rec in nodes:
            actions = _clock_lock_actions(rec, live.caps.get(rec.node_id, {}))
            if actions and rec.session is not None and not rec.session.closed:
                live.phase2_locked[rec.node_id] = [a.lock_clocks.gpu_index for a in actions]
                locks += len(actions)
                self._spawn(self._send_plan(live, rec, actions, "phase2_clocks"))
        self._event(live, "phase2", detail={"clock_locks": locks})

    def _reconfigure(self, live: _Live) -> None:
        """Phase 2 for a long emergency: a rebalance plan under the lowered limits (cuts())."""
        r, planner = live.rec, self._replanner
        if planner is None or planner.mode == "off":
            why = "no rebalancer" if planner is None else "rebalance mode is off"
            self._event(live, "reconfigure_skipped", detail={"reason": why})
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
            self._event(live, "reconfigure_failed", detail={"error": str(err)})
            self._audit(live, "reconfigure_failed", actor, str(err), ok=False)
            self._log.error("emergency_reconfigure_failed", emergency_id=r.emergency_id,
                            error=str(err))
            return
        actions = sum(len(st["actions"]) for st in doc["stages"])
        self._event(live, what, detail={"plan_id": doc["plan_id"], "actions": actions,
                                        "mode": planner.mode})
        if doc["stages"]:
            self._audit(live, what, actor, f"plan {doc['plan_id']}: {actions} actions")

    async def _send_plan(self, live: _Live, rec: NodeRecord, actions: list[agent_pb2.Action],
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
        self._event(live, what if not bad else what + "_failed", rec.node_id, detail)
        self._core.store.append_audit(self._core.clock.time(), self._core.epoch, rec.node_id,
                                      what, json.dumps(detail), not bad,
                                      "OK" if not bad else "FAILED", "; ".join(bad),
                                      f"emergency:{live.rec.emergency_id}")

    # ---------------------------------------------------------------- clearing

    async def _clear_steps(self, live: _Live) -> None:
        if not live.base_caps:
            live.base_caps = self._caps_from_reports(live)
        self._reset_clocks(live)
        steps = self._s.clear_steps
        for step in range(1, steps + 1):
            await asyncio.sleep(self._s.clear_step_s * (1 + self._rng.uniform(
                0, self._s.clear_jitter_frac)))
            await self._hold_for_headroom(live)
            nodes = self._scope_nodes(live.rec.scope, live.rec.name)
            if step < steps:
                live.caps = self._relaxed(live, step, steps)
                self._event(live, "relax_step", detail={"step": step, "of": steps})
                for rec in nodes:
                    self._issue(live, rec)
            else:
                live.caps = {}
                live.rec.state = CLEARED
                for rec in nodes:
                    self._issue(live, rec, active=False)
        live.rec.cleared_at_unix_s = self._core.clock.time()
        self._store.save(live.rec)
        self._event(live, "cleared")
        self._flush(live)
        self._log.info("emergency_cleared", emergency_id=live.rec.emergency_id)

    async def _hold_for_headroom(self, live: _Live) -> None:
        """Hysteresis: relax only while the scope is clearly under its restored limit."""
        held = False
        while self._scope_power_w(live) > live.rec.normal_limit * (1 - self._s.hysteresis_frac):
            if not held:
                self._event(live, "clear_held", detail={"scope_now": self._scope_power_w(live)})
                held = True
            await asyncio.sleep(self._s.clear_step_s)

    def _relaxed(self, live: _Live, step: int, steps: int) -> dict[str, dict[int, float]]:
        out: dict[str, dict[int, float]] = {}
        for node_id, caps in live.base_caps.items():
            for index, cap_w in caps.items():
                max_w = live.max_w.get((node_id, index), cap_w)
                relaxed = policy.relaxed_cap_w(cap_w, max_w, step, steps)
                if relaxed is not None:
                    out.setdefault(node_id, {})[index] = relaxed
        return out

    def _reset_clocks(self, live: _Live) -> None:
        by_id = {r.node_id: r for r in self._core.registry.records()}
        for node_id, indices in live.phase2_locked.items():
            actions = [agent_pb2.Action(action_id=agent_codec.new_id(),
                                        reset_clocks=agent_pb2.ResetClocksRequest(gpu_index=i))
                       for i in indices]
            if node_id in by_id:
                self._spawn(self._send_plan(live, by_id[node_id], actions, "phase2_reset"))
        live.phase2_locked = {}

    def _caps_from_reports(self, live: _Live) -> dict[str, dict[int, float]]:
        """After a restart: the emergency caps the agents report in force."""
        out: dict[str, dict[int, float]] = {}
        for rec in self._scope_nodes(live.rec.scope, live.rec.name):
            for g in rec.report.gpus if rec.report is not None else ():
                live.max_w[(rec.node_id, g.index)] = g.power_limit_max_w
                live.tracks.setdefault(rec.node_id, _Track())
                if g.power_ceiling_source.startswith("emergency"):
                    out.setdefault(rec.node_id, {})[g.index] = g.power_ceiling_w
        return out

    # ---------------------------------------------------------------- pre-arming, detection

    def _prearm(self, now_mono_s: float) -> None:
        due = now_mono_s >= self._next_prearm_mono_s
        if due:
            self._next_prearm_mono_s = now_mono_s + self._s.prearm_interval_s
        for row in {r.placement.row for r in self._core.registry.records() if r.placement}:
            nodes = self._scope_nodes("row", row)
            fresh = [r for r in nodes if r.session is not None and not r.session.closed
                     and self._prearm_sessions.get(r.node_id) is not r.session]
            targets = nodes if due else fresh
            if not targets:
                continue
            limit_w = self._normal_capacity("row", row, "power")
            armed = policy.prearm(self._snapshot(nodes), limit_w, self._s.severities,
                                  self._s.margin_frac)
            for rec in targets:
                self._send_prearm(rec, armed.by_node.get(rec.node_id, {}))
            for rec in fresh:
                self._resync(rec)

    def _send_prearm(self, rec: NodeRecord, levels: dict[float, dict[int, float]]) -> None:
        session = rec.session
        if session is None or session.closed:
            return
        self._prearm_sessions[rec.node_id] = session
        msg = agent_pb2.EmergencyPrearm(prearm_id=agent_codec.new_id(), epoch=self._core.epoch,
                                        levels=[agent_pb2.PrearmedLevel(
                                            capacity_frac=s, gpu_power_ceiling_w=caps)
                                            for s, caps in sorted(levels.items())])
        self._spawn(self._await_prearm(rec.node_id, session, msg))

    async def _await_prearm(self, node_id: str, session: AgentSession,
                            msg: agent_pb2.EmergencyPrearm) -> None:
        try:
            answer = await session.request(lpb.CoordinatorMessage(prearm=msg), msg.prearm_id,
                                           self._s.ack_timeout_s)
        except errors.DomainError as err:
            self._prearm_acked.discard(node_id)
            self._log.warning("prearm_unanswered", node_id=node_id, error=str(err))
            return
        if answer.completed:
            self._prearm_acked.add(node_id)
        else:
            self._prearm_acked.discard(node_id)
            self._log.error("prearm_refused", node_id=node_id,
                            error=answer.results[0].message if answer.results else "")

    def _resync(self, rec: NodeRecord) -> None:
        """A (re)connected node learns where the emergencies stand: its caps, or the all-clear."""
        for live in self._live.values():
            if live.rec.state == CLEARED or rec.node_id not in {
                    r.node_id for r in self._scope_nodes(live.rec.scope, live.rec.name)}:
                continue
            if rec.node_id in live.caps:
                self._issue(live, rec)
            else:  # restored after a restart: keep its fallback until caps are known
                rec.session.send(lpb.CoordinatorMessage(emergency=self._directive(live, None)))
            return
        lift = agent_pb2.EmergencyDirective(directive_id=agent_codec.new_id(),
                                            epoch=self._core.epoch, active=False,
                                            reason="no emergency")
        rec.session.send(lpb.CoordinatorMessage(emergency=lift))

    def _detect(self, now_mono_s: float) -> None:
        """Declare for every signal held detect_after_s while its scope has no emergency."""
        over = {(sig, scope, name): (kind, note)
                for sig, scope, name, kind, note in self._signals()}
        for key in [k for k in self._over_since if k not in over]:
            del self._over_since[key]  # back under: a later excursion starts its own timer
        for key, (kind, note) in over.items():
            since = self._over_since.setdefault(key, now_mono_s)
            _, scope, name = key
            if now_mono_s - since >= self._s.detect_after_s and not self._covered(scope, name):
                self.declare(scope, name, kind, 1.0, 0.0, 0.0, AUTO_SOURCE,
                             f"{note} for {now_mono_s - since:.0f} s", "coordinator")

    def _covered(self, scope: str, name: str) -> bool:
        """An emergency not yet cleared on this scope, or on one that shares a node with it: an
        agent holds one emergency ceiling per GPU, so a second emergency on the same nodes would
        overwrite the first one's caps (and the two would re-issue against each other)."""
        nodes = {r.node_id for r in self._scope_nodes(scope, name)}
        for live in self._live.values():
            r = live.rec
            if r.state == CLEARED:
                continue
            if (r.scope, r.name) == (scope, name) or nodes & {
                    n.node_id for n in self._scope_nodes(r.scope, r.name)}:
                return True
        return False

    def _signals(self) -> list[tuple[str, str, str, str, str]]:
        """(signal, scope, name, kind, note) for each scope over a limit now."""
        rollups = self._core.cluster()
        out = [("power", "row", r.name, "power",
                f"measured {r.power_draw_w:.0f} W above the limit {r.power_limit_w:.0f} W")
               for r in rollups.rows if 0 < r.power_limit_w < r.power_draw_w]
        out += [("airflow", "aisle", a.name, "cooling",
                 f"airflow {a.airflow_cfm:.0f} CFM above the limit {a.airflow_limit_cfm:.0f} CFM")
                for a in rollups.aisles if 0 < a.airflow_limit_cfm < a.airflow_cfm]
        return out + self._hot_aisles()

    def _hot_aisles(self) -> list[tuple[str, str, str, str, str]]:
        by_aisle: dict[str, list[bool]] = {}
        for rec in self._core.registry.records():
            if rec.placement is not None and rec.report is not None:
                hot = _hot_node(rec.report, self._s.detect_hot_headroom_c)
                by_aisle.setdefault(rec.placement.aisle, []).append(hot)
        return [("hot_gpus", "aisle", aisle, "cooling",
                 f"{sum(hot)} of {len(hot)} nodes have a GPU within "
                 f"{self._s.detect_hot_headroom_c:g} C of slowdown")
                for aisle, hot in sorted(by_aisle.items())
                if sum(hot) >= self._s.detect_hot_nodes_frac * len(hot)]

    # ---------------------------------------------------------------- records

    def _event(self, live: _Live, kind: str, node_id: str = "",
               detail: dict[str, Any] | None = None) -> None:
        live.events.append(Event(self._core.clock.time(), kind, node_id, detail))

    def _flush(self, live: _Live) -> None:
        if live.events:
            events, live.events = live.events, []
            self._store.append(live.rec.emergency_id, events)

    def _audit(self, live: _Live, action: str, actor: str, message: str,
               ok: bool = True) -> None:
        request = json.dumps({"emergency_id": live.rec.emergency_id, "scope": live.rec.scope,
                              "name": live.rec.name, "capacity_frac": live.rec.capacity_frac})
        self._core.store.append_audit(self._core.clock.time(), self._core.epoch, "", action,
                                      request, ok, "OK" if ok else "FAILED", message, actor)

    def _summarize(self, live: _Live, timeline: list[Event]) -> EmergencyView:
        t0 = live.rec.declared_at_unix_s
        tracks = list(live.tracks.values())
        issued = [live.phase1_issued_unix_s.get(n) for n in live.tracks]  # Phase 1 only
        acked = [live.phase1_acked_unix_s.get(n) for n in live.tracks]

        def span(times: list[float | None]) -> float:
            return max(times) - t0 if times and None not in times else -1.0  # type: ignore

        under = live.under_limit_unix_s - t0 if live.under_limit_unix_s is not None else -1.0
        return EmergencyView(live.rec, len(tracks),
                             sum(t.acked_unix_s is not None for t in tracks),
                             self._scope_power_w(live), span(issued), span(acked), under,
                             timeline)

    def _get_live(self, emergency_id: str) -> _Live:
        live = self._live.get(emergency_id)
        if live is None:
            self.view(emergency_id, with_timeline=False)  # NOT_FOUND for an unknown id
            raise errors.FailedPrecondition(
                f"emergency_id={emergency_id!r} is already cleared", field="emergency_id")
        return live

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task


def _gpu_states(node_id: str, node: agent_pb2.Node) -> list[policy.GpuState]:
    by_gpu = instances_by_gpu(node)
    out = []
    for g in node.gpus:
        insts = by_gpu.get(g.index, [])
        cls = max((i.spec.priority_class or policy.SAAS for i in insts),
                  key=policy.PRIORITY_CLASSES.index, default=policy.BEST_EFFORT)
        cls = cls if cls in policy.PRIORITY_CLASSES else policy.SAAS
        out.append(policy.GpuState(
            node_id, g.index, g.power_draw_w, g.power_limit_min_w, g.power_limit_max_w,
            cls, decode_frac(insts), tuple(i.spec.instance_id for i in insts),
            node.labels.get("row", ""), node.labels.get("aisle", ""),
            _floor_w(g, cls, insts)))
    return out


@dataclass
class _OpaquePerf:
    """The opaque (IaaS) GPUs' relative performance since this coordinator started, sampled
    from the reports every OPAQUE_SAMPLE_S: the shedding's deep weight closes on it
    (policy.deep_weight_for), as the simulator's loop does over its run."""

    total: float = 0.0
    samples: int = 0
    next_mono_s: float = 0.0

    def sample(self, records: Iterable[NodeRecord], now_mono_s: float) -> None:
        if now_mono_s < self.next_mono_s:
            return
        self.next_mono_s = now_mono_s + OPAQUE_SAMPLE_S
        for rec in records:
            node = rec.report
            if node is None:
                continue
            for g, state in zip(node.gpus, _gpu_states(rec.node_id, node), strict=True):
                model = GPU_MODELS.get(g.gpu_type)
                top = g.sm_clock_max_mhz or (model.sm_max_clock_mhz if model else 0)
                if state.priority_class != policy.IAAS or g.utilization_gpu_pct < 1 or not top:
                    continue
                self.total += physics.relative_throughput(g.sm_clock_mhz, top,
                                                          policy.OPAQUE_DECODE_FRAC)
                self.samples += 1

    def deep_weight(self) -> float:
        return policy.deep_weight_for(self.total / self.samples if self.samples else None)


def _floor_w(g: agent_pb2.Gpu, cls: str, insts: list[agent_pb2.Instance]) -> float:
    """The draw below which cutting the GPU costs its class (policy.shed's floors): an opaque
    GPU's at the contract's performance floor, a SaaS GPU's at the clock covering its batch
    (KV-cache usage as the occupancy, full while requests wait); 0 when unknown."""
    model = GPU_MODELS.get(g.gpu_type)
    if model is None or cls == policy.BEST_EFFORT:
        return 0.0
    top = g.sm_clock_max_mhz or model.sm_max_clock_mhz
    clock_frac = min(1.0, g.sm_clock_mhz / top) if g.sm_clock_mhz and top else 1.0
    if cls == policy.IAAS:
        return policy.opaque_floor_w(g.power_draw_w, model.idle_power_w, clock_frac)
    waiting = any(i.metrics.requests_waiting > 0 for i in insts)
    occupancy = 1.0 if waiting else max((i.metrics.kv_cache_usage_frac for i in insts),
                                        default=1.0)
    return policy.saas_floor_from_occupancy(g.power_draw_w, model.idle_power_w, occupancy,
                                            decode_frac(insts), clock_frac)


def _lower_caps(current: dict[str, dict[int, float]], proposed: dict[str, dict[int, float]]
                ) -> dict[str, dict[int, float]]:
    """The proposed caps that are lower than the ones in force (a GPU without a cap has none)."""
    out: dict[str, dict[int, float]] = {}
    for node_id, caps in proposed.items():
        for index, cap_w in caps.items():
            if cap_w < current.get(node_id, {}).get(index, float("inf")) - CAP_TOLERANCE_W:
                out.setdefault(node_id, {})[index] = cap_w
    return out


def _hot_node(node: agent_pb2.Node, headroom_c: float) -> bool:
    """A GPU within headroom_c of its slowdown temperature (reported, else its model's)."""
    for g in node.gpus:
        model = GPU_MODELS.get(g.gpu_type)
        slowdown_c = g.slowdown_temp_c or (model.thermal.slowdown_c if model else 0.0)
        if slowdown_c > 0 and g.temperature_c >= slowdown_c - headroom_c:
            return True
    return False


def _clock_lock_actions(rec: NodeRecord, caps: dict[int, float]) -> list[agent_pb2.Action]:
    """Phase 2 clock points (coordinator.policy.capping.phase2, the simulator's too): capped GPUs
    locked
    at the highest clock that fits their cap (unlocked GPUs only: an operator's lock stays)."""
    gpus = capped_gpus(rec.node_id, rec.report, caps) if rec.report is not None else []
    lowest = {g.key[1]: min(g.point.supported_clocks_mhz) for g in gpus}
    plan = phase2.plan_phase2(gpus)
    return [agent_pb2.Action(
        action_id=agent_codec.new_id(), reason="emergency phase 2",
        lock_clocks=agent_pb2.LockClocksRequest(gpu_index=index, min_mhz=lowest[index],
                                                max_mhz=mhz))
        for (_, index), mhz in sorted(plan.clock_mhz.items())]


# ---------------------------------------------------------------- daemon options

_OPTIONS = (  # flag suffix, settings field, low, high
    ("margin-frac", "margin_frac", 0.0, 0.5),
    ("fallback-after-s", "fallback_after_s", 0.1, 60.0),
    ("reissue-after-s", "reissue_after_s", 0.1, 60.0),
    ("phase2-after-s", "phase2_after_s", 0.0, 3600.0),
    ("clear-step-s", "clear_step_s", 0.0, 3600.0),
    ("prearm-interval-s", "prearm_interval_s", 0.5, 3600.0),
    ("detect-after-s", "detect_after_s", 0.0, 3600.0),
    ("detect-hot-headroom-c", "detect_hot_headroom_c", 0.0, 30.0),
    ("detect-hot-nodes-frac", "detect_hot_nodes_frac", 0.01, 1.0),
    ("reconfigure-after-s", "reconfigure_after_s", 0.0, 86400.0),
    ("retighten-after-s", "retighten_after_s", 0.0, 3600.0),
)
_HELP = {
    "detect_after_s": "seconds a row (aisle) must stay over its power (airflow) limit, or an "
                      "aisle's nodes hot, before the coordinator declares an emergency itself "
                      "(source auto, capacity 1.0); 0 = no automatic detection",
    "retighten_after_s": "seconds an active emergency's scope may stay over its limit again "
                         "before its caps are cut further; 0 = never",
}


def add_emergency_args(p: Any) -> None:
    defaults = EmergencySettings()
    for flag, name, low, high in _OPTIONS:
        p.add_argument(f"--emergency-{flag}", dest=f"emergency_{name}", type=float,
                       default=getattr(defaults, name), metavar="X",
                       help=f"{_HELP.get(name, 'emergency ' + name.replace('_', ' '))} "
                            f"[{low:g}, {high:g}] (default {getattr(defaults, name):g})")


def emergency_settings_from_args(args: Any) -> EmergencySettings:
    values = {}
    for _, name, low, high in _OPTIONS:
        v = getattr(args, f"emergency_{name}")
        if not low <= v <= high:
            raise errors.out_of_range(f"emergency_{name}", v, low, high)
        values[name] = v
    return EmergencySettings(**values)
