"""The leaf's end of the hierarchy: its rows' rollups up to the parent, the parent's row limits
down into row power emergencies (issue 10).

A leaf is an ordinary coordinator for its rows that also dials its parent (ParentLink.Connect,
redialled with exponential backoff and jitter like the agents' link). Every report interval it
sends its rows' rollups; every RowLimits it gets is enforced through the emergency controller:

- a limit under the row's normal limit: a row power emergency with source "parent" at
  capacity_w = the limit (declared, or adjusted in place: EmergencyController.adjust, so the
  caps are never lifted in between);
- a limit back at normal: that emergency is cleared (the controller's clearing ladder);
- an operator's emergency is never touched: a stricter one is kept and acknowledged as
  enforcing the limit, a milder one is reported as blocking it; an automatic one (the leaf's
  own detection) is taken over: the declaration moves it to the parent's limit in place.

The enforcement is level-triggered (every reconcile interval, whether or not the parent is
reachable): an emergency that could not be adjusted yet (clearing, resuming after a restart) or
that an operator cleared is brought back to the parent's limit. With the parent unreachable the
last limits stay in force; a leaf restarted keeps its emergencies from its database and hears the
limits in force again as soon as it reconnects.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import grpc
import structlog

from coordinator.core import CoordinatorCore
from coordinator.emergency.controller import AUTO_SOURCE, EmergencyController, EmergencyView
from coordinator.hierarchy.policy import (
    ADJUST,
    CLEAR,
    DECLARE,
    KEEP,
    KEEP_LOCAL,
    LIMIT_TOLERANCE_W,
    NONE,
    InForce,
    RowStep,
    node_floor_w,
    row_step,
)
from shapeshifter import __version__
from shapeshifter.api.v1 import hierarchy_pb2 as hpb
from shapeshifter.api.v1 import hierarchy_pb2_grpc
from shapeshifter.common import errors
from shapeshifter.common.clock import Clock
from shapeshifter.net.streams import (
    RETRIED,
    LinkError,
    Redial,
    SessionEnded,
    describe,
    open_channel,
    redial_forever,
    run_session,
    write_forever,
)

SOURCE = "parent"  # the source of the emergencies a leaf declares for its parent
# RowAck.action: what was done for the latest limits; idle steps do not overwrite a done one.
LABELS = {DECLARE: "declared", ADJUST: "updated", CLEAR: "cleared", KEEP: "kept"}
IDLE_LABELS = frozenset({"kept", NONE, KEEP_LOCAL})
OK_LABELS = IDLE_LABELS | {"declared", "updated", "cleared"}


@dataclass(frozen=True)
class LeafSettings:
    parent: str  # the parent's address
    leaf_id: str
    report_interval_s: float = 1.0
    reconnect_initial_s: float = 0.5
    reconnect_max_s: float = 10.0
    reconcile_s: float = 0.25  # enforcement and agent acknowledgements are checked this often
    credentials: grpc.ChannelCredentials | None = None  # mTLS; None: plaintext


# ---------------------------------------------------------------- enforcement


class LeafEnforcer:
    """The parent's latest row limits, enforced on the emergency controller, and what each row's
    acknowledgement says. Runs on the event loop."""

    def __init__(self, core: CoordinatorCore, emergencies: EmergencyController,
                 actor: str) -> None:
        self._core = core
        self._em = emergencies
        self._actor = actor
        self._limits: dict[str, hpb.RowLimit] = {}
        self._seq = 0
        self._labels: dict[str, tuple[str, str]] = {}  # row -> (action, message) for this seq
        self._lock = asyncio.Lock()  # a declaration awaits its writes: one reconcile at a time
        self._log = structlog.get_logger().bind(component="hierarchy")

    def rows(self) -> list[hpb.LeafRow]:
        return [hpb.LeafRow(site=s.name, row=r.name, row_power_limit_w=r.row_power_limit_w)
                for s in self._core.topology.sites for r in s.rows]

    async def apply(self, limits: hpb.RowLimits) -> None:
        mine = {r.row for r in self.rows()}
        async with self._lock:
            self._seq = limits.seq
            self._labels = {}
            self._limits = {r.row: r for r in limits.rows if r.row in mine}
        self._log.info("row_limits_received", seq=limits.seq,
                       rows={r.row: round(r.power_limit_w) for r in limits.rows})
        await self.reconcile()

    async def reconcile(self) -> None:
        async with self._lock:
            for name, limit in self._limits.items():
                await self._reconcile_row(name, limit)

    async def _reconcile_row(self, name: str, limit: hpb.RowLimit) -> None:
        step = row_step(limit.power_limit_w, self._normal_w(name), self._in_force(name))
        label = (LABELS.get(step.action, step.action), step.why)
        try:
            await self._execute(name, limit, step)
        except errors.DomainError as err:
            label = ("failed", str(err))
        before = self._labels.get(name)
        if before is not None and before[0] in OK_LABELS and label[0] in IDLE_LABELS:
            return  # nothing done now: the ack goes on saying what was done for this seq
        self._labels[name] = label
        if label != before:
            log = self._log.info if label[0] in OK_LABELS else self._log.warning
            log("row_limit_enforced", row=name, action=label[0], message=label[1],
                limit_w=round(limit.power_limit_w), seq=self._seq)

    async def _execute(self, name: str, limit: hpb.RowLimit, step: RowStep) -> None:
        note = (f"parent site limit {limit.limit_id} ({limit.source}): row limit "
                f"{limit.power_limit_w:.0f} W" + (f"; {limit.note}" if limit.note else ""))
        if step.action == DECLARE:
            # capacity_w must be > 0: a row split down to nothing still gets a (1 W) emergency.
            await self._em.declare_and_send("row", name, "power", 0.0,
                                            max(1.0, limit.power_limit_w), 0.0, SOURCE, note,
                                            self._actor)
        elif step.action == ADJUST:
            self._em.adjust(step.emergency_id, max(1.0, limit.power_limit_w), note, self._actor)
        elif step.action == CLEAR:
            self._em.clear(step.emergency_id, f"parent: row back at its normal limit "
                           f"(site limit {limit.limit_id or 'cleared'})", self._actor)

    def ack(self) -> hpb.LimitsAck:
        return hpb.LimitsAck(seq=self._seq, rows=[self._row_ack(n, lim)
                                                  for n, lim in self._limits.items()])

    def _row_ack(self, name: str, limit: hpb.RowLimit) -> hpb.RowAck:
        action, message = self._labels.get(name, ("pending", "not reconciled yet"))
        out = hpb.RowAck(site=limit.site, row=name, power_limit_w=limit.power_limit_w,
                         action=action, message=message, agents_acked=True)
        cut = limit.power_limit_w < self._normal_w(name) - LIMIT_TOLERANCE_W
        enforcing = self._enforcing(name) if cut else None
        if enforcing is not None:
            r = enforcing.rec
            out.emergency_id, out.emergency_source = r.emergency_id, r.source
            out.in_force_limit_w, out.nodes, out.nodes_acked = (r.power_limit_w, enforcing.nodes,
                                                                enforcing.nodes_acked)
            out.agents_acked = enforcing.nodes_acked >= enforcing.nodes
        elif cut:
            out.agents_acked = False
        return out

    # ---------------------------------------------------------------- rollups

    def rollups(self) -> list[hpb.RowRollup]:
        cluster = self._core.cluster()
        by_row = {r.name: r for r in cluster.rows}
        floors: dict[str, float] = {}
        for rec in self._core.registry.records():
            if rec.placement is not None and rec.report is not None:
                row = rec.placement.row
                floors[row] = floors.get(row, 0.0) + node_floor_w(rec.report)
        out = []
        for s in self._core.topology.sites:
            for row in s.rows:
                r = by_row[row.name]
                msg = hpb.RowRollup(site=s.name, row=row.name, power_draw_w=r.power_draw_w,
                                    row_power_limit_w=row.row_power_limit_w,
                                    floor_w=floors.get(row.name, 0.0), nodes=r.nodes,
                                    nodes_up=r.nodes_up, gpus=r.gpus)
                shown = self._shown(row.name)
                if shown is not None:
                    msg.emergency.CopyFrom(_emergency_pb(shown))
                out.append(msg)
        return out

    # ---------------------------------------------------------------- internals

    def _normal_w(self, name: str) -> float:
        return next(r.row_power_limit_w for s in self._core.topology.sites for r in s.rows
                    if r.name == name)

    def _in_force(self, name: str) -> list[InForce]:
        return [InForce(v.rec.emergency_id, v.rec.power_limit_w, v.rec.state,
                        v.rec.source == SOURCE, self._em.resuming(v.rec.emergency_id),
                        v.rec.source == AUTO_SOURCE)
                for v in self._em.in_force("row", name)]

    def _enforcing(self, name: str) -> EmergencyView | None:
        """The active emergency on the row (at most one: the controller allows one per row)."""
        return next((v for v in self._em.in_force("row", name) if v.rec.state == "active"),
                    None)

    def _shown(self, name: str) -> EmergencyView | None:
        views = self._em.in_force("row", name)
        return next((v for v in views if v.rec.state == "active"), views[0] if views else None)


def _emergency_pb(v: EmergencyView) -> hpb.RowEmergency:
    r = v.rec
    return hpb.RowEmergency(emergency_id=r.emergency_id, source=r.source, state=r.state,
                            power_limit_w=r.power_limit_w, capacity_frac=r.capacity_frac,
                            nodes=v.nodes, nodes_acked=v.nodes_acked, note=r.note)


# ---------------------------------------------------------------- the link


class LeafLink:
    def __init__(self, settings: LeafSettings, enforcer: LeafEnforcer, clock: Clock) -> None:
        self._s = settings
        self._enforcer = enforcer
        self._clock = clock
        self._outbox: asyncio.Queue[hpb.LeafMessage] | None = None  # the session's, when up
        self._sent_ack: hpb.LimitsAck | None = None
        self._seq = 0
        self.connected = False
        self._log = structlog.get_logger().bind(component="hierarchy", parent=settings.parent,
                                                leaf_id=settings.leaf_id)

    async def run(self) -> None:
        """Reconcile forever (whether or not the parent is reachable) and keep the link up."""
        await asyncio.gather(self._reconcile_forever(), self._connect_forever())

    async def _reconcile_forever(self) -> None:
        while True:
            await asyncio.sleep(self._s.reconcile_s)
            try:
                await self._enforcer.reconcile()
                self._send_ack_if_changed()
            except Exception:  # logged loudly; the next interval retries
                self._log.exception("leaf_reconcile_failed")

    async def _connect_forever(self) -> None:
        redial = Redial(self._s.reconnect_initial_s, self._s.reconnect_max_s,
                        "parent_unreachable", "parent_link_lost")
        await redial_forever(self._session, redial, self._log)

    async def _session(self) -> None:
        async with open_channel(self._s.parent, self._s.credentials) as channel:
            call = hierarchy_pb2_grpc.ParentLinkStub(channel).Connect()
            await call.write(hpb.LeafMessage(register=hpb.LeafRegister(
                leaf_id=self._s.leaf_id, rows=self._enforcer.rows(),
                software_version=__version__, report_interval_s=self._s.report_interval_s)))
            first = await call.read()
            if first is grpc.aio.EOF or first.WhichOneof("kind") != "registered":
                raise LinkError("the parent did not answer the registration")
            self._log.info("parent_registered", warnings=first.registered.message)
            try:
                await self._exchange(call)
            except RETRIED as err:
                raise SessionEnded(describe(err)) from err
            finally:
                self.connected, self._outbox = False, None

    async def _exchange(self, call: Any) -> None:
        self._outbox, self._sent_ack, self.connected = asyncio.Queue(), None, True
        await run_session(call, write_forever(call, self._outbox), self._report(),
                          self._read(call), stopped=LinkError("the parent link stopped"))

    async def _report(self) -> None:
        while True:
            self._seq += 1
            report = hpb.LeafReport(seq=self._seq, sent_at_unix_s=self._clock.time(),
                                    rows=self._enforcer.rollups())
            self._send(hpb.LeafMessage(report=report))
            await asyncio.sleep(self._s.report_interval_s)

    async def _read(self, call: Any) -> None:
        while (msg := await call.read()) is not grpc.aio.EOF:
            if msg.WhichOneof("kind") == "limits":
                await self._enforcer.apply(msg.limits)
                self._send_ack_if_changed()
            else:
                self._log.warning("parent_unexpected_message", kind=msg.WhichOneof("kind"))
        raise LinkError("the parent closed the stream")

    def _send(self, msg: hpb.LeafMessage) -> None:
        if self._outbox is not None:
            self._outbox.put_nowait(msg)

    def _send_ack_if_changed(self) -> None:
        """The ack of the latest limits, again whenever it changes (e.g. the agents acked)."""
        if self._outbox is None:
            return
        ack = self._enforcer.ack()
        if ack.rows and ack != self._sent_ack:
            self._sent_ack = ack
            self._send(hpb.LeafMessage(ack=ack))


def start_leaf(settings: LeafSettings, core: CoordinatorCore,
               emergencies: EmergencyController, clock: Clock) -> asyncio.Task[Any]:
    """The leaf's background task (reconcile + link); cancel it to stop."""
    enforcer = LeafEnforcer(core, emergencies, f"parent {settings.parent}")
    return asyncio.create_task(LeafLink(settings, enforcer, clock).run())

