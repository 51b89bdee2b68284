"""What every tick watches. Verification of each emergency: scope power against its limit,
directives due again, tightening (over the limit again for retighten_after_s with every node's
caps acknowledged: a new cut, a GPU's cap only ever goes down), and the Phase 2 timers.
Detection: a row over its power limit, an aisle over its airflow limit, or an aisle with many
hot nodes, held detect_after_s, gets an automatic emergency."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

from coordinator.core import CoordinatorCore
from coordinator.emergency.caps import lower_caps
from coordinator.emergency.phase1 import CapFanout
from coordinator.emergency.phase2 import Phase2
from coordinator.emergency.records import ACTIVE, CLEARED, Live, Timeline
from coordinator.emergency.scope import Scopes
from coordinator.emergency.settings import EmergencySettings
from coordinator.registry import NodeRecord
from coordinator.state import NodeLoad, ScopeSums, node_load, scope_sums
from shapeshifter.common.clock import Clock
from shapeshifter.topology import Placement

AUTO_SOURCE = "auto"  # the source of the emergencies detection declares
Signal = tuple[str, str, str, str, str]  # (signal, scope, name, kind, note)
# declare(scope, name, kind, capacity_frac, capacity_w, capacity_cfm, source, note, actor)
Declare = Callable[[str, str, str, float, float, float, str, str, str], object]


class Verifier:
    def __init__(self, clock: Clock, settings: EmergencySettings, scopes: Scopes,
                 fanout: CapFanout, phase2: Phase2, timeline: Timeline) -> None:
        self._clock = clock
        self._s = settings
        self._scopes = scopes
        self._fanout = fanout
        self._phase2 = phase2
        self._timeline = timeline

    def verify(self, live: Live, now_mono_s: float) -> None:
        self._note_power(live, now_mono_s)
        by_id = {r.node_id: r for r in self._scopes.nodes(live.rec.scope, live.rec.name)}
        self._fanout.reissue_lagging(live, by_id, now_mono_s)
        if self._tighten_due(live, by_id, now_mono_s):
            self.tighten(live, list(by_id.values()), now_mono_s)
        if (live.rec.state == ACTIVE and not live.phase2_done and self._s.phase2_after_s > 0
                and live.under_since_mono_s is not None
                and now_mono_s - live.under_since_mono_s >= self._s.phase2_after_s):
            live.phase2_done = True
            self._phase2.lock_clocks(live, list(by_id.values()))
        if (live.rec.state == ACTIVE and not live.reconfigured and self._s.reconfigure_after_s > 0
                and now_mono_s - live.declared_mono_s >= self._s.reconfigure_after_s):
            live.reconfigured = True
            self._phase2.reconfigure(live)

    def _note_power(self, live: Live, now_mono_s: float) -> None:
        if live.rec.state != ACTIVE:
            return
        power_w = self._scopes.power_w(live)
        if power_w <= live.rec.power_limit_w:
            if live.under_since_mono_s is None:
                live.under_since_mono_s = now_mono_s
            if live.under_limit_unix_s is None:
                live.under_limit_unix_s = self._clock.time()
                self._timeline.event(live, "under_limit",
                                     detail={"scope_power_w": round(power_w, 1)})
            live.over_since_mono_s = None
        else:
            live.under_since_mono_s = None
            if live.over_since_mono_s is None:
                live.over_since_mono_s = now_mono_s

    def _tighten_due(self, live: Live, by_id: dict[str, NodeRecord], now_mono_s: float) -> bool:
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

    def tighten(self, live: Live, nodes: list[NodeRecord], now_mono_s: float) -> None:
        """A new cut at the same limit from the latest reports; each GPU keeps the lower of its
        cap now and the new plan's. Phase 2 clock locks are reset and redone under the new caps."""
        live.over_since_mono_s = now_mono_s  # the next one waits for reports under these caps
        plan = self._scopes.shed(self._scopes.snapshot(nodes), live.rec.power_limit_w)
        lower = lower_caps(live.caps, plan.caps_by_node())
        if not lower:
            return  # nothing left to cut by capping (escalation was Phase 1's)
        for node_id, caps in lower.items():
            live.caps.setdefault(node_id, {}).update(caps)
            live.base_caps.setdefault(node_id, {}).update(caps)
        live.max_w.update({(r.node_id, g.index): g.power_limit_max_w for r in nodes
                           if r.report is not None for g in r.report.gpus})
        self._phase2.reset_clocks(live)
        live.phase2_done = False
        self._timeline.event(live, "caps_tightened", detail={
            "scope_power_w": round(self._scopes.power_w(live), 1),
            "expected_w": round(plan.expected_w, 1), "gpus": sum(map(len, lower.values()))})
        for rec in nodes:
            if rec.node_id in lower:
                self._fanout.issue(live, rec)


class Detector:
    """Declares for every signal held detect_after_s while its scope has no emergency."""

    def __init__(self, core: CoordinatorCore, settings: EmergencySettings,
                 scopes: Scopes) -> None:
        self._core = core
        self._s = settings
        self._scopes = scopes
        self._over_since: dict[tuple[str, str, str], float] = {}  # (signal, scope, name)

    def tick(self, now_mono_s: float, lives: Mapping[str, Live], declare: Declare) -> None:
        over = {(sig, scope, name): (kind, note)
                for sig, scope, name, kind, note in self._signals()}
        for key in [k for k in self._over_since if k not in over]:
            del self._over_since[key]  # back under: a later excursion starts its own timer
        for key, (kind, note) in over.items():
            since = self._over_since.setdefault(key, now_mono_s)
            _, scope, name = key
            if (now_mono_s - since >= self._s.detect_after_s
                    and not self._covered(scope, name, lives)):
                declare(scope, name, kind, 1.0, 0.0, 0.0, AUTO_SOURCE,
                        f"{note} for {now_mono_s - since:.0f} s", "coordinator")

    def _covered(self, scope: str, name: str, lives: Mapping[str, Live]) -> bool:
        """An emergency not yet cleared on this scope, or on one that shares a node with it: an
        agent holds one emergency ceiling per GPU, so a second emergency on the same nodes would
        overwrite the first one's caps (and the two would re-issue against each other)."""
        nodes = {r.node_id for r in self._scopes.nodes(scope, name)}
        for live in lives.values():
            r = live.rec
            if r.state == CLEARED:
                continue
            if (r.scope, r.name) == (scope, name) or nodes & {
                    n.node_id for n in self._scopes.nodes(r.scope, r.name)}:
                return True
        return False

    def _signals(self) -> list[Signal]:
        """(signal, scope, name, kind, note) for each scope over a limit now. Summed straight
        from the loads computed at ingest (state.scope_sums): this runs every tick, and the full
        rollup it replaced cost more CPU at 1000 nodes than ingesting their reports."""
        sums = scope_sums(self._placed_loads(), self._s.detect_hot_headroom_c)
        sites = self._core.topology.sites
        out: list[Signal] = []
        for site, row in ((s.name, r) for s in sites for r in s.rows):
            draw_w = sums.row_power_w.get((site, row.name), 0.0)
            if 0 < row.row_power_limit_w < draw_w:
                out.append(("power", "row", row.name, "power",
                            f"measured {draw_w:.0f} W above the limit "
                            f"{row.row_power_limit_w:.0f} W"))
        for site, aisle in ((s.name, a) for s in sites for a in s.aisles):
            flow_cfm = sums.aisle_airflow_cfm.get((site, aisle.name), 0.0)
            if 0 < aisle.aisle_airflow_cfm < flow_cfm:
                out.append(("airflow", "aisle", aisle.name, "cooling",
                            f"airflow {flow_cfm:.0f} CFM above the limit "
                            f"{aisle.aisle_airflow_cfm:.0f} CFM"))
        return out + self._hot_aisles(sums)

    def _hot_aisles(self, sums: ScopeSums) -> list[Signal]:
        out: list[Signal] = []
        for key, nodes in sorted(sums.aisle_nodes.items()):
            hot, aisle = sums.aisle_hot_nodes[key], key[1]
            if hot >= self._s.detect_hot_nodes_frac * nodes:
                out.append(("hot_gpus", "aisle", aisle, "cooling",
                            f"{hot} of {nodes} nodes have a GPU within "
                            f"{self._s.detect_hot_headroom_c:g} C of slowdown"))
        return out

    def _placed_loads(self) -> Iterator[tuple[Placement, NodeLoad]]:
        """Every placed node that has reported, with its load (from ingest, or from a report
        restored from the database)."""
        for rec in self._core.registry.records():
            if rec.placement is not None and rec.report is not None:
                yield rec.placement, rec.load or node_load(rec.report)
