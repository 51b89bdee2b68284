"""The parent coordinator's domain: its leaves, their rows' rollups, and the site limits.

Runs on the server's event loop; the gRPC servicers (coordinator.rpc.hierarchy) only
translate. A site limit is split into row limits once, when it is set (the pure
coordinator.hierarchy.policy.split_site_limit on the latest rollups), persisted with that split,
and pushed to every leaf with rows of the site. A leaf that (re)connects gets the limits of its
rows at once, a restarted parent re-sends the stored split: nothing is lifted by either.
"""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from dataclasses import dataclass, field

import structlog

from coordinator.hierarchy.policy import LIMIT_TOLERANCE_W, RowDemand, split_site_limit
from coordinator.store.hierarchy import (
    ACTIVE,
    CLEARED,
    REPLACED,
    SiteLimitRecord,
    SiteLimitStore,
)
from coordinator.store.sqlite import Store
from shapeshifter.api.v1 import hierarchy_pb2 as hpb
from shapeshifter.common import errors
from shapeshifter.common.clock import Clock
from shapeshifter.topology import Topology

LEAF_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
MAX_SOURCE_CHARS, MAX_NOTE_CHARS = 64, 1024
# What a leaf may answer and still count as enforcing the limit (RowAck.action).
ENFORCED = frozenset({"declared", "updated", "kept", "cleared", "none", "kept_local"})


class LeafSession:
    """One connected leaf's stream, seen from the parent: an outbox the servicer drains."""

    def __init__(self, leaf_id: str) -> None:
        self.leaf_id = leaf_id
        self.outbox: asyncio.Queue[hpb.ParentMessage | None] = asyncio.Queue()
        self.closed = False

    def send(self, msg: hpb.ParentMessage) -> None:
        if not self.closed:
            self.outbox.put_nowait(msg)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.outbox.put_nowait(None)


@dataclass
class _Row:
    site: str
    name: str
    normal_w: float
    leaf_id: str = ""
    report: hpb.RowRollup | None = None
    report_mono_s: float = 0.0
    ack: hpb.RowAck | None = None
    ack_seq: int = 0


@dataclass
class _Leaf:
    leaf_id: str
    rows: list[str] = field(default_factory=list)
    session: LeafSession | None = None
    acked_seq: int = 0
    report_mono_s: float | None = None

    @property
    def connected(self) -> bool:
        return self.session is not None and not self.session.closed


@dataclass(frozen=True)
class RowView:
    name: str
    leaf_id: str
    leaf_connected: bool
    normal_limit_w: float
    limit_w: float
    report: hpb.RowRollup | None
    report_age_s: float
    ack: hpb.RowAck | None
    acked: bool


@dataclass(frozen=True)
class LeafView:
    leaf_id: str
    connected: bool
    rows: list[str]
    acked_seq: int
    report_age_s: float


@dataclass(frozen=True)
class SiteView:
    site: str
    state: str  # normal | limited | cleared
    rec: SiteLimitRecord | None  # the latest limit (None: never limited)
    normal_limit_w: float
    power_limit_w: float
    seq: int
    acked_s: float
    rows: list[RowView]
    leaves: list[LeafView]


class ParentController:
    def __init__(self, topology: Topology, limits: SiteLimitStore, audit: Store,
                 clock: Clock, epoch: int = 0) -> None:
        self._topology = topology
        self._epoch = epoch
        self._limits_store = limits
        self._audit_store = audit
        self._clock = clock
        self._rows = {r.name: _Row(s.name, r.name, r.row_power_limit_w)
                      for s in topology.sites for r in s.rows}
        self._leaves: dict[str, _Leaf] = {}
        self._limits = limits.latest()  # per site, in force or not: re-sent after a restart
        self._log = structlog.get_logger().bind(component="hierarchy")

    # ---------------------------------------------------------------- leaf link

    def register(self, msg: hpb.LeafRegister, session: LeafSession) -> hpb.LeafRegistered:
        """Validate (nothing changes on a refusal), attach the stream, queue the row limits."""
        names, warnings = self._validate_register(msg)
        leaf = self._leaves.setdefault(msg.leaf_id, _Leaf(msg.leaf_id))
        if leaf.session is not None and leaf.session is not session:
            leaf.session.close()  # a leaf that redialled: the newer stream wins
        for name in leaf.rows:
            if name not in names and self._rows[name].leaf_id == leaf.leaf_id:
                self._rows[name].leaf_id = ""
        leaf.rows, leaf.session = names, session
        for name in names:
            self._rows[name].leaf_id = leaf.leaf_id
        self._log.info("leaf_registered", leaf_id=leaf.leaf_id, rows=names, warnings=warnings)
        session.send(hpb.ParentMessage(limits=self._row_limits(leaf)))
        return hpb.LeafRegistered(leaf_id=leaf.leaf_id, message="; ".join(warnings))

    def _validate_register(self, msg: hpb.LeafRegister) -> tuple[list[str], list[str]]:
        if not LEAF_ID.match(msg.leaf_id):
            raise errors.InvalidArgument(
                f"leaf_id={msg.leaf_id!r} must be 1-128 characters of letters, digits and "
                "._:- starting with a letter or digit", field="leaf_id")
        if not msg.rows:
            raise errors.InvalidArgument("rows must list at least one row of the leaf",
                                         field="rows")
        names, warnings = [], []
        for i, r in enumerate(msg.rows):
            row = self._rows.get(r.row)
            if row is None or row.site != r.site:
                raise errors.NotFound(
                    f"rows[{i}]: row {r.row!r} of site {r.site!r} is not in the parent's "
                    f"topology (known: {', '.join(sorted(self._rows))})", field="rows")
            owner = self._leaves.get(row.leaf_id)
            if owner is not None and owner.leaf_id != msg.leaf_id and owner.connected:
                raise errors.FailedPrecondition(
                    f"rows[{i}]: row {r.row!r} belongs to connected leaf {owner.leaf_id!r}",
                    field="rows")
            if abs(r.row_power_limit_w - row.normal_w) > LIMIT_TOLERANCE_W:
                warnings.append(f"row {r.row}: the leaf's normal limit {r.row_power_limit_w:.0f} "
                                f"W differs from the parent's {row.normal_w:.0f} W (the "
                                "parent's is used)")
            names.append(r.row)
        return names, warnings

    def report(self, leaf_id: str, report: hpb.LeafReport) -> None:
        leaf = self._leaves.get(leaf_id)
        if leaf is None:
            return
        now = self._clock.monotonic()
        leaf.report_mono_s = now
        for r in report.rows:
            row = self._rows.get(r.row)
            if row is not None and row.leaf_id == leaf_id:
                row.report, row.report_mono_s = r, now

    def ack(self, leaf_id: str, ack: hpb.LimitsAck) -> None:
        leaf = self._leaves.get(leaf_id)
        if leaf is None:
            return
        leaf.acked_seq = max(leaf.acked_seq, ack.seq)
        for a in ack.rows:
            row = self._rows.get(a.row)
            if row is not None and row.leaf_id == leaf_id and ack.seq >= row.ack_seq:
                row.ack, row.ack_seq = a, ack.seq
        for site in {self._rows[a.row].site for a in ack.rows if a.row in self._rows}:
            self._note_acked(site)

    def disconnect(self, leaf_id: str, session: LeafSession) -> None:
        leaf = self._leaves.get(leaf_id)
        session.close()
        if leaf is not None and leaf.session is session:
            leaf.session = None
            self._log.warning("leaf_disconnected", leaf_id=leaf_id)

    def close_sessions(self) -> None:
        for leaf in self._leaves.values():
            if leaf.session is not None:
                leaf.session.close()

    # ---------------------------------------------------------------- operators

    def set_site_limit(self, site: str, capacity_frac: float, power_limit_w: float,
                       source: str, note: str, actor: str) -> SiteView:
        normal_w = self._site_normal_w(site)
        limit_w = self._validate_limit(capacity_frac, power_limit_w, normal_w)
        _check_text("source", source, MAX_SOURCE_CHARS)
        _check_text("note", note, MAX_NOTE_CHARS)
        split = split_site_limit(limit_w, self._demands(site))
        now = self._clock.time()
        old = self._active(site)
        if old is not None:
            old.state, old.cleared_at_unix_s = REPLACED, now
            self._limits_store.save(old)
        rec = SiteLimitRecord(uuid.uuid4().hex[:12], site, ACTIVE, limit_w, limit_w / normal_w,
                              normal_w, source or "operator", note, now,
                              infeasible=split.infeasible, seq=self._limits_store.next_seq(),
                              row_limits_w=split.limits_w, actor=actor)
        self._limits[site] = rec
        self._limits_store.save(rec)
        self._audit("SetSiteLimit", rec, actor, f"site {site} -> {limit_w:.0f} W"
                    + (f" (replaces {old.limit_id})" if old else ""))
        log = self._log.error if split.infeasible else self._log.warning
        log("site_limit_set", site=site, limit_id=rec.limit_id, power_limit_w=round(limit_w),
            infeasible=split.infeasible, rows={n: round(w) for n, w in split.limits_w.items()})
        self._push(site)
        return self.site(site)

    def clear_site_limit(self, site: str, note: str, actor: str) -> SiteView:
        self._site_normal_w(site)
        _check_text("note", note, MAX_NOTE_CHARS)
        rec = self._active(site)
        if rec is None:
            raise errors.FailedPrecondition(f"site={site!r} has no site limit in force",
                                            field="site")
        rec.state, rec.cleared_at_unix_s = CLEARED, self._clock.time()
        rec.seq, rec.acked_at_unix_s = self._limits_store.next_seq(), 0.0
        self._limits_store.save(rec)
        self._audit("ClearSiteLimit", rec, actor, note)
        self._log.warning("site_limit_cleared", site=site, limit_id=rec.limit_id)
        self._push(site)
        return self.site(site)

    def site(self, site: str) -> SiteView:
        normal_w = self._site_normal_w(site)
        rec = self._limits.get(site)
        active = rec is not None and rec.state == ACTIVE
        state = "normal" if rec is None else ("limited" if active else "cleared")
        now = self._clock.monotonic()
        rows = [self._row_view(r, now) for r in self._rows.values() if r.site == site]
        leaves = [LeafView(lf.leaf_id, lf.connected, list(lf.rows), lf.acked_seq,
                           now - lf.report_mono_s if lf.report_mono_s is not None else -1.0)
                  for lf in self._leaves.values()
                  if any(self._rows[n].site == site for n in lf.rows)]
        return SiteView(site, state, rec, normal_w,
                        rec.power_limit_w if active and rec else normal_w,
                        rec.seq if rec else 0, _acked_s(rec), rows, leaves)

    # ---------------------------------------------------------------- internals

    def _site_normal_w(self, site: str) -> float:
        known = [s.name for s in self._topology.sites]
        if not site:
            raise errors.InvalidArgument(f"site must name a site of the topology (known: "
                                         f"{', '.join(known)})", field="site")
        if site not in known:
            raise errors.NotFound(f"site={site!r} is not a site of the topology (known: "
                                  f"{', '.join(known)})", field="site")
        return sum(r.normal_w for r in self._rows.values() if r.site == site)

    @staticmethod
    def _validate_limit(frac: float, limit_w: float, normal_w: float) -> float:
        """The site limit in W; exactly one of the two is given (NaN fails every range)."""
        if frac and limit_w:
            raise errors.InvalidArgument("give exactly one of capacity_frac, power_limit_w",
                                         field="capacity")
        if limit_w:
            if not 0.0 < limit_w <= normal_w:
                raise errors.InvalidArgument(
                    f"power_limit_w={limit_w:g} W is outside the allowed range (0, "
                    f"{normal_w:g}] W (the site's normal limit)", field="power_limit_w")
            return limit_w
        if not 0.0 < frac <= 1.0:
            raise errors.InvalidArgument(
                f"capacity_frac={frac:g} is outside the allowed range (0, 1] (or give "
                "power_limit_w)", field="capacity_frac")
        return frac * normal_w

    def _demands(self, site: str) -> dict[str, RowDemand]:
        """The split's input. A row with no report since this parent started counts at its
        normal limit (its draw is unknown; worst case) with no floor. A row already under a cut
        counts at least at that limit: its caps hide how much more it would draw."""
        out = {}
        for r in self._rows.values():
            if r.site != site:
                continue
            if r.report is None:
                out[r.name] = RowDemand(r.normal_w, 0.0, r.normal_w)
                continue
            limit_w = self._limit_w(r)
            draw_w = r.report.power_draw_w
            if limit_w < r.normal_w:
                draw_w = max(draw_w, limit_w)
            out[r.name] = RowDemand(r.normal_w, r.report.floor_w, draw_w)
        return out

    def _active(self, site: str) -> SiteLimitRecord | None:
        rec = self._limits.get(site)
        return rec if rec is not None and rec.state == ACTIVE else None

    def _limit_w(self, row: _Row) -> float:
        rec = self._active(row.site)
        return rec.row_limits_w.get(row.name, row.normal_w) if rec else row.normal_w

    def _seq(self) -> int:
        return max((r.seq for r in self._limits.values()), default=0)

    def _row_limits(self, leaf: _Leaf) -> hpb.RowLimits:
        rows = []
        for name in leaf.rows:
            row = self._rows[name]
            rec = self._active(row.site)
            rows.append(hpb.RowLimit(site=row.site, row=name, power_limit_w=self._limit_w(row),
                                     normal_limit_w=row.normal_w,
                                     limit_id=rec.limit_id if rec else "",
                                     source=rec.source if rec else "",
                                     note=rec.note if rec else ""))
        return hpb.RowLimits(seq=self._seq(), rows=rows)

    def _push(self, site: str) -> None:
        for leaf in self._leaves.values():
            if leaf.connected and any(self._rows[n].site == site for n in leaf.rows):
                assert leaf.session is not None
                leaf.session.send(hpb.ParentMessage(limits=self._row_limits(leaf)))

    def _row_view(self, r: _Row, now_mono_s: float) -> RowView:
        leaf = self._leaves.get(r.leaf_id)
        rec = self._limits.get(r.site)
        return RowView(r.name, r.leaf_id, leaf is not None and leaf.connected, r.normal_w,
                       self._limit_w(r), r.report,
                       now_mono_s - r.report_mono_s if r.report is not None else -1.0, r.ack,
                       r.ack is not None and r.ack_seq >= (rec.seq if rec else 0))

    def _note_acked(self, site: str) -> None:
        """Stamp the site's latest change once every leaf row enforces it with its agents."""
        rec = self._limits.get(site)
        if rec is None or rec.acked_at_unix_s > 0:
            return
        rows = [r for r in self._rows.values() if r.site == site and r.leaf_id]
        if rows and all(r.ack is not None and r.ack_seq >= rec.seq and r.ack.agents_acked
                        and r.ack.action in ENFORCED for r in rows):
            rec.acked_at_unix_s = self._clock.time()
            self._limits_store.save(rec)
            self._log.info("site_limit_acked", site=site, limit_id=rec.limit_id,
                           state=rec.state, acked_s=round(_acked_s(rec), 3))

    def _audit(self, action: str, rec: SiteLimitRecord, actor: str, message: str) -> None:
        request = json.dumps({"site": rec.site, "limit_id": rec.limit_id,
                              "power_limit_w": rec.power_limit_w, "source": rec.source})
        self._audit_store.append_audit(self._clock.time(), self._epoch, "", action, request,
                                       True, "OK", message, actor)


def _acked_s(rec: SiteLimitRecord | None) -> float:
    if rec is None or rec.acked_at_unix_s <= 0:
        return -1.0
    since = rec.cleared_at_unix_s if rec.state == CLEARED else rec.declared_at_unix_s
    return rec.acked_at_unix_s - since


def _check_text(name: str, value: str, max_chars: int) -> None:
    if len(value) > max_chars:
        raise errors.InvalidArgument(f"{name} is {len(value)} characters; at most {max_chars}",
                                     field=name)
